"""Kernels: each op has a plain PyTorch reference and a Triton implementation behind one dispatch function.

The model and engine import only from this module. On a CUDA device the Triton path runs; elsewhere the
reference runs, unless ``TRITON_INTERPRET=1`` asks for the Triton kernels on CPU tensors (tests).
"""
