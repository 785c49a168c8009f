"""Exact per-row top-k over (masked) logits: ``topk_rows``.

Triton on CUDA tensors (or on CPU under TRITON_INTERPRET=1), ``topk_rows_reference`` otherwise.
Output order within a row is unspecified unless ``sorted=True`` (then value-descending, ties by column).
"""
from __future__ import annotations

import torch

from indexcache.kernels._dispatch import interpreting, use_triton
from indexcache.kernels.topk.reference import topk_rows_reference

MAX_K = 4096
_SAMPLE = 1024          # entries sampled per row to place the bracket (power of two); H200 sweep 4096/2048/1024 chose 1024
DEBUG: dict | None = None  # set to {} to keep the last call's per-row state (tests, benchmarks)


def _check(logits, k, row_start, row_end):
    if logits.dim() != 2:
        raise ValueError(f"topk_rows: logits must be 2-D [R, N], got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"topk_rows: logits dtype must be float32/bfloat16/float16, got {logits.dtype}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or k > MAX_K:
        raise ValueError(f"topk_rows: k must be an int in [1, {MAX_K}], got {k!r}")
    R = logits.shape[0]
    for name, t in (("row_start", row_start), ("row_end", row_end)):
        if t is None:
            continue
        if t.dim() != 1 or t.shape[0] != R:
            raise ValueError(f"topk_rows: {name} must have shape [{R}], got {tuple(t.shape)}")
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"topk_rows: {name} must be int32/int64, got {t.dtype}")
        if t.device != logits.device:
            raise ValueError(f"topk_rows: {name} is on {t.device}, logits on {logits.device}")


def _sort_out(logits, idx):
    vals = torch.gather(logits.float(), 1, idx.clamp(min=0).long())
    vals = torch.where(idx < 0, torch.full_like(vals, float("-inf")), vals + 0.0)
    # order: value desc, column asc, -1 last
    col_key = torch.where(idx < 0, torch.full_like(idx, 2**31 - 1), idx)
    o1 = torch.argsort(col_key, dim=1, stable=True)
    v1 = torch.gather(vals, 1, o1)
    o2 = torch.argsort(v1, dim=1, descending=True, stable=True)
    return torch.gather(torch.gather(idx, 1, o1), 1, o2)


def topk_rows(logits: torch.Tensor, k: int, *, row_start: torch.Tensor | None = None,
              row_end: torch.Tensor | None = None, sorted: bool = False, _cap: int | None = None,
              _chunk: int | None = None) -> torch.Tensor:
    """Column ids (int32 [R, k]) of the k largest values of each row among columns in [row_start, row_end).

    NaN and -inf never count; rows with fewer than k valid entries are padded with -1 (after the valid ids).
    Exact, with ties at the threshold broken towards the lower column index. ``_cap``/``_chunk`` are test hooks.
    """
    _check(logits, k, row_start, row_end)
    if not use_triton(logits):
        return topk_rows_reference(logits, k, row_start=row_start, row_end=row_end)
    from indexcache.kernels.topk import triton_topk as tk

    R, N = logits.shape
    if R == 0:
        return torch.empty((0, k), dtype=torch.int32, device=logits.device)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    dev = logits.device
    starts = (torch.zeros(R, dtype=torch.int32, device=dev) if row_start is None
              else row_start.to(torch.int32).clamp(0, N))
    ends = (torch.full((R,), N, dtype=torch.int32, device=dev) if row_end is None
            else row_end.to(torch.int32).clamp(0, N))
    cap = _cap or max(4096, 4 * triton.next_power_of_2(k))
    interp = interpreting()
    block = 256 if interp else 4096
    if _chunk is not None:
        chunk = _chunk
    elif interp:
        chunk = 1024
    else:
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        progs_per_row = max(1, (4 * sms + R - 1) // R)
        chunk = max(block, triton.cdiv(triton.cdiv(N, progs_per_row), block) * block)
    nc = triton.cdiv(max(N, 1), chunk)
    state = torch.empty((R, 8), dtype=torch.int32, device=dev)
    cc = torch.empty((R, nc, 4), dtype=torch.int32, device=dev)
    ncp = triton.next_power_of_2(nc)
    out = torch.empty((R, k), dtype=torch.int32, device=dev)
    scr = torch.empty((R, cap), dtype=torch.int64, device=dev)
    s = logits.stride(0)
    tk._topk_sample_kernel[(R,)](logits, s, starts, ends, state, k, S=256 if interp else _SAMPLE, RUN=8, num_warps=8)
    tk._topk_count_kernel[(R, nc)](logits, s, starts, ends, state, cc, nc, CHUNK=chunk, BLOCK=block, num_warps=8)
    tk._topk_compact_kernel[(R, nc)](logits, s, starts, ends, state, cc, nc, out, scr, k, CAP=cap, CHUNK=chunk,
                                     BLOCK=block, NCP=ncp, num_warps=8)
    tk._topk_final_kernel[(R,)](logits, s, starts, ends, state, cc, nc, out, scr, k, CAP=cap, BLOCK=block,
                                FB=256 if interp else 1024, NB=16, NCP=ncp, num_warps=4)
    if DEBUG is not None:
        DEBUG.update(state=state, cc=cc, cap=cap, chunk=chunk, nc=nc)
    return _sort_out(logits, out) if sorted else out


import triton  # noqa: E402

__all__ = ["topk_rows", "topk_rows_reference", "MAX_K"]
