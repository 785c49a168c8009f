"""Kernels: each op has a plain PyTorch reference and a Triton implementation behind one dispatch function.

Every op folder (indexer, topk, candidate_topk, sparse_mla, kv_store, moe, rms_norm, rope) holds ``__init__.py``
(the public names, re-exported), ``ops.py`` (checks, launch planning, dispatch), ``reference.py`` (plain PyTorch)
and ``triton.py`` (the kernels);
``formats.py`` defines the cache byte layouts once. On a CUDA device the Triton path runs; elsewhere the reference
runs, unless ``TRITON_INTERPRET=1`` asks for the Triton kernels on CPU tensors (tests).
"""
