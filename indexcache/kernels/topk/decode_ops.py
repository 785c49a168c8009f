"""Decode top-k (``topk_rows_decode``): the same selection as ``topk_rows`` with one row spread over many programs
(``decode_triton.py``), for a few long rows (decode: batch 1..64, 64K..1M keys) replayed in a CUDA graph.

Pass a ``DecodeTopkWorkspace`` made once per (rows, row length) when capturing a graph: its histograms and
counters stay zero between calls, so the graph holds only the four launches. Without one each call allocates a
zeroed workspace (a memset per call).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from indexcache.kernels._dispatch import interpreting, use_triton
from indexcache.kernels.topk.ops import _check
from indexcache.kernels.topk.reference import topk_rows_reference

_NB = 4096          # bins per radix digit (12 bits); the kernels hard-code the digit positions
_BLOCK = 1024       # entries per block of the hist / filter1 passes
_BLOCK2 = 256       # list1 entries per block of the filter2 pass
_PROGS_PER_SM = 4   # target programs per SM over all rows
_HMIN = 64          # threshold-bin entries in a block above which hist2 is built locally first
_TB, _TI = 256, 32  # final select: rank by counting up to _TB entries, _TI at a time
_FB = 1024          # final select tile (16-ary path, padding, reset)
_WARPS = 4


@dataclass
class DecodeTopkWorkspace:
    """Scratch of ``topk_rows_decode`` for ``rows`` rows of up to ``n`` entries (16 B per entry per row plus
    32 KiB per row). ``hist`` and ``ctr`` must be zero between calls; the kernels leave them so."""
    rows: int
    n: int
    hist: torch.Tensor      # int32 [rows, 2 * 4096]: hist1 | hist2
    ctr: torch.Tensor       # int64 [rows, 2]: packed slot counters of filter1 / filter2
    state: torch.Tensor     # int32 [rows, 8]: m, above1, n1, above, n2
    lists: torch.Tensor     # int64 [rows, 2, n]: list1 | list2 composites

    @classmethod
    def new(cls, rows: int, n: int, device) -> "DecodeTopkWorkspace":
        if rows < 1 or n < 1:
            raise ValueError(f"DecodeTopkWorkspace: rows and n must be >= 1, got rows={rows}, n={n}")
        return cls(rows, n, torch.zeros((rows, 2 * _NB), dtype=torch.int32, device=device),
                   torch.zeros((rows, 2), dtype=torch.int64, device=device),
                   torch.empty((rows, 8), dtype=torch.int32, device=device),
                   torch.empty((rows, 2, n), dtype=torch.int64, device=device))


def topk_rows_decode(logits: torch.Tensor, k: int, *, row_start: torch.Tensor | None = None,
                     row_end: torch.Tensor | None = None, workspace: DecodeTopkWorkspace | None = None,
                     _slice: int | None = None) -> torch.Tensor:
    """Column ids (int32 [R, k]) of the k largest values of each row among columns in [row_start, row_end);
    exactly ``topk_rows``'s selection (NaN / -inf never count, ties to the lower column, -1 padding after the
    valid ids; order within a row unspecified). ``_slice``: entries per program (test hook)."""
    _check(logits, k, row_start, row_end)
    if not use_triton(logits):
        return topk_rows_reference(logits, k, row_start=row_start, row_end=row_end)
    from indexcache.kernels.topk import decode_triton as dk

    R, N = logits.shape
    dev = logits.device
    out = torch.empty((R, k), dtype=torch.int32, device=dev)
    if R == 0:
        return out
    if workspace is None:
        workspace = DecodeTopkWorkspace.new(R, max(N, 1), dev)
    elif workspace.rows != R or workspace.n < N or workspace.hist.device != dev:
        raise ValueError(f"topk_rows_decode: workspace is for {workspace.rows} rows of <= {workspace.n} entries on "
                         f"{workspace.hist.device}, got logits {tuple(logits.shape)} on {dev}")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    starts = (torch.zeros(R, dtype=torch.int32, device=dev) if row_start is None
              else row_start.to(torch.int32).clamp(0, N))
    ends = (torch.full((R,), N, dtype=torch.int32, device=dev) if row_end is None
            else row_end.to(torch.int32).clamp(0, N))
    interp = interpreting()
    block = 128 if interp else _BLOCK
    if _slice is not None:
        sl = _slice
    elif interp:
        sl = 512
    else:   # ~_PROGS_PER_SM programs per SM over all rows, whole blocks each
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        per_row = max(1, triton.cdiv(_PROGS_PER_SM * sms, R))
        sl = triton.cdiv(triton.cdiv(max(N, 1), per_row), block) * block
    P = triton.cdiv(max(N, 1), sl)
    ws, cap = workspace, workspace.n
    dk._dtopk_hist_kernel[(R, P)](logits, logits.stride(0), starts, ends, ws.hist, sl, BLOCK=block, NB=_NB,
                                  num_warps=_WARPS)
    dk._dtopk_filter1_kernel[(R, P)](logits, logits.stride(0), starts, ends, ws.hist, ws.ctr, ws.state, out,
                                     ws.lists, k, sl, cap, BLOCK=block, NB=_NB, HMIN=_HMIN, num_warps=_WARPS)
    dk._dtopk_filter2_kernel[(R, P)](ws.hist, ws.ctr, ws.state, out, ws.lists, k, cap,
                                     BLOCK=64 if interp else _BLOCK2, NB=_NB, num_warps=_WARPS)
    dk._dtopk_final_kernel[(R,)](ws.hist, ws.ctr, ws.state, out, ws.lists, k, cap, NB=_NB,
                                 TB=64 if interp else _TB, TI=16 if interp else _TI, FB=256 if interp else _FB,
                                 ZB=1024, num_warps=_WARPS)
    return out
