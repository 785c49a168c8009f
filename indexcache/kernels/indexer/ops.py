"""Lightning indexer dispatch and planning: logits (prefill and paged decode), bounded-memory prefill top-k.

Public functions dispatch to Triton for CUDA tensors (or CPU tensors under TRITON_INTERPRET=1) and to the PyTorch
references in ``reference.py`` otherwise. Top-k selection uses ``indexcache.kernels.topk.topk_rows`` when it
imports (Triton present), else ``reference.topk_rows_torch``; both have the signature
``topk_rows(logits [R,N] fp32, k, *, row_start=None, row_end=None) -> int32 [R,k]`` (column ids, -1 padding).
"""
from __future__ import annotations

import numpy as np
import torch

from indexcache.kernels._dispatch import use_triton
from indexcache.kernels.formats import PAGE, check_indexer_cache
from indexcache.kernels.indexer.reference import (
    check_logits_inputs,
    indexer_logits_decode_ref,
    indexer_logits_ref,
    topk_rows_torch,
)


def indexer_logits(q_fp8, w, k_fp8, k_scale, row_start, row_end, *, out=None, config: dict | None = None):
    """logits [T,S] fp32: k_scale[s]·Σ_h w[t,h]·relu(q_fp8[t,h]·k_fp8[s]) for row_start[t] <= s < row_end[t], else -inf.

    q_fp8 [T,H,128] e4m3, w [T,H] fp32 (folded, see quantize_indexer_q), k_fp8 [S,128] e4m3, k_scale [S] fp32,
    row_start/row_end [T] int32 (clamped to [0,S]). ``out`` (optional) is a [T,S] fp32 buffer with unit column stride.
    ``config`` overrides the Triton launch parameters (keys of ``triton.prefill_config``; benchmarks sweep them).
    """
    t, _, s = check_logits_inputs(q_fp8, w, k_fp8, k_scale, row_start, row_end)
    if out is not None and (tuple(out.shape) != (t, s) or out.dtype != torch.float32 or out.stride(1) != 1):
        raise ValueError(f"indexer_logits: out must be [T,S]=({t},{s}) fp32 with unit column stride, got {tuple(out.shape)}")
    if use_triton(q_fp8):
        from indexcache.kernels.indexer.triton import indexer_logits_triton

        return indexer_logits_triton(q_fp8, w, k_fp8, k_scale, row_start, row_end, out=out, config=config)
    return _into(out, indexer_logits_ref(q_fp8, w, k_fp8, k_scale, row_start, row_end))


def default_topk_fn():
    """``indexcache.kernels.topk.topk_rows`` if it is importable, else the torch fallback."""
    try:
        from indexcache.kernels.topk import topk_rows  # noqa: PLC0415

        return topk_rows
    except ImportError:
        return topk_rows_torch


SLOT_BYTES = 24


def _into(out, res):
    """The reference result, copied into ``out`` when the caller gave one (as the Triton paths write into it)."""
    if out is None:
        return res
    out.copy_(res)
    return out


def plan_prefill_chunks(row_start, row_end, topk: int, workspace_bytes: int,
                        slot_bytes: int = SLOT_BYTES) -> list[tuple[int, int, int, int]]:
    """Split rows into chunks [r0, r1) whose logits over their column span [c0, c1) fit in workspace_bytes.

    Two budgets that add up to workspace_bytes: the fp32 logits of a chunk (rows * span * 4) get 3/4 of it and
    the selection's temporaries (``slot_bytes`` per top-k slot per row; default SLOT_BYTES for the torch fallback:
    torch.topk values + int64 ids, output, index shift) get 1/4. Returns (r0, r1, c0, c1) tuples. Needs the windows on the host (one device sync).
    """
    rs = row_start.long().cpu().numpy()
    re = np.maximum(row_end.long().cpu().numpy(), rs)
    t = len(rs)
    logits_budget = workspace_bytes - workspace_bytes // 4
    max_rows = (workspace_bytes // 4) // (slot_bytes * topk)
    if max_rows < 1:
        raise ValueError(f"indexer_topk_prefill: workspace_bytes={workspace_bytes} is too small for topk={topk}; "
                         f"need at least {4 * slot_bytes * topk} for the selection of one row")
    chunks = []
    r0 = 0
    while r0 < t:
        seg = slice(r0, min(t, r0 + max_rows))
        lo = np.minimum.accumulate(rs[seg])
        hi = np.maximum.accumulate(re[seg])
        cost = np.arange(1, len(lo) + 1) * (hi - lo) * 4
        n = int(np.searchsorted(cost, logits_budget, side="right"))  # cost is non-decreasing
        if n == 0:
            raise ValueError(f"indexer_topk_prefill: workspace_bytes={workspace_bytes} cannot hold one row of "
                             f"{hi[0] - lo[0]} logits; raise it to at least {int(cost[0]) * 4 // 3 + 1}")
        chunks.append((r0, r0 + n, int(lo[n - 1]), int(hi[n - 1])))
        r0 += n
    return chunks


def indexer_topk_prefill(q_fp8, w, k_fp8, k_scale, row_start, row_end, topk: int, *,
                         workspace_bytes: int = 2 << 30, topk_fn=None, out=None):
    """idx [T, topk] int32 of the key indices (columns of k_fp8) with the largest logits in each row's window.

    Rows are processed in chunks whose logits over the chunk's column span fit in ``workspace_bytes``; logits of
    the whole prefill are never materialised. ``topk_fn(logits [R,N], k, row_start=, row_end=)`` selects per row
    (default: ``default_topk_fn()``); rows with fewer than topk valid keys are padded with -1.
    """
    t, _, s = check_logits_inputs(q_fp8, w, k_fp8, k_scale, row_start, row_end)
    if topk <= 0:
        raise ValueError(f"indexer_topk_prefill: topk must be positive, got {topk}")
    topk_fn = topk_fn or default_topk_fn()
    if out is None:
        out = torch.empty(t, topk, dtype=torch.int32, device=q_fp8.device)
    rs_all = row_start.clamp(0, s).to(torch.int32)
    re_all = row_end.clamp(0, s).to(torch.int32)
    chunks = plan_prefill_chunks(rs_all, re_all, topk, workspace_bytes, selection_slot_bytes(topk_fn, topk, s))
    need_max = max((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in chunks) if chunks else 0
    buf = torch.empty(max(need_max, 1), dtype=torch.float32, device=q_fp8.device)  # one buffer, reused
    for r0, r1, c0, c1 in chunks:
        n = c1 - c0
        if n == 0:
            out[r0:r1] = -1
            continue
        logits = buf[:(r1 - r0) * n].view(r1 - r0, n)
        rs = rs_all[r0:r1] - c0
        re = re_all[r0:r1] - c0
        indexer_logits(q_fp8[r0:r1], w[r0:r1], k_fp8[c0:c1], k_scale[c0:c1], rs, re, out=logits)
        dst = out[r0:r1]
        dst.copy_(topk_fn(logits, topk, row_start=rs, row_end=re))
        if c0:
            dst.add_((dst >= 0).to(dst.dtype), alpha=c0)
    return out


def selection_slot_bytes(topk_fn, topk: int, n: int) -> int:
    """Temporary bytes per top-k slot of one selected row: the Triton top-k's own scratch bound plus the output
    copy and index shift here; SLOT_BYTES for the torch fallback."""
    try:
        from indexcache.kernels.topk import scratch_bytes_per_row, topk_rows  # noqa: PLC0415
    except ImportError:
        return SLOT_BYTES
    if topk_fn is not topk_rows:
        return SLOT_BYTES
    return -(-(scratch_bytes_per_row(topk, n) + 8 * topk) // topk)


def _check_decode_inputs(q_fp8, w, kv_cache, block_table, context_lens, max_len):
    if q_fp8.dim() != 3 or q_fp8.shape[2] != 128 or q_fp8.dtype != torch.float8_e4m3fn:
        raise ValueError(f"indexer_logits_decode: q_fp8 must be [B,H,128] float8_e4m3fn, got {tuple(q_fp8.shape)} {q_fp8.dtype}")
    b, h, _ = q_fp8.shape
    if tuple(w.shape) != (b, h) or w.dtype != torch.float32:
        raise ValueError(f"indexer_logits_decode: w must be [B,H]=({b},{h}) float32, got {tuple(w.shape)} {w.dtype}")
    check_indexer_cache(kv_cache, "indexer_logits_decode: kv_cache")
    if block_table.dim() != 2 or block_table.shape[0] != b or block_table.dtype != torch.int32:
        raise ValueError(f"indexer_logits_decode: block_table must be [B={b}, max_pages] int32, got {tuple(block_table.shape)} {block_table.dtype}")
    if block_table.stride(1) != 1:
        raise ValueError("indexer_logits_decode: block_table must have unit last-dim stride")
    if tuple(context_lens.shape) != (b,) or context_lens.dtype != torch.int32:
        raise ValueError(f"indexer_logits_decode: context_lens must be [B]=({b},) int32, got {tuple(context_lens.shape)} {context_lens.dtype}")
    if max_len < 0 or max_len > block_table.shape[1] * PAGE:
        raise ValueError(f"indexer_logits_decode: max_len={max_len} must be in [0, max_pages*64={block_table.shape[1] * PAGE}]")


def indexer_logits_decode(q_fp8, w, kv_cache, block_table, context_lens, max_len: int, *, out=None,
                          config: dict | None = None):
    """logits [B, max_len] fp32 over the paged indexer key cache; -inf at positions >= context_lens[b].

    kv_cache: uint8 [num_pages, 8448] (64 fp8 keys of 128 B, then 64 fp32 scales; see ``formats``);
    block_table [B, max_pages] int32 physical page ids; context_lens [B] int32 (must be <= max_len to be fully
    scored; positions >= max_len are not computed). ``config`` overrides the Triton launch parameters (keys of
    ``triton.decode_config``).
    """
    _check_decode_inputs(q_fp8, w, kv_cache, block_table, context_lens, max_len)
    if use_triton(q_fp8):
        from indexcache.kernels.indexer.triton import indexer_logits_decode_triton

        return indexer_logits_decode_triton(q_fp8, w, kv_cache, block_table, context_lens, max_len, out=out,
                                            config=config)
    return _into(out, indexer_logits_decode_ref(q_fp8, w, kv_cache, block_table, context_lens, max_len))


def indexer_topk_decode(q_fp8, w, kv_cache, block_table, context_lens, max_len: int, topk: int, *, topk_fn=None):
    """[B, topk] int32 logical token positions (0..context_len-1) with the largest decode logits, -1 padded."""
    logits = indexer_logits_decode(q_fp8, w, kv_cache, block_table, context_lens, max_len)
    topk_fn = topk_fn or default_topk_fn()
    return topk_fn(logits, topk, row_start=None, row_end=context_lens.clamp(max=max_len))
