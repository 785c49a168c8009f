"""Triton kernel of ``to_slots``: one read of the positions, one gather from the block table (a few KB per row, in
L1/L2), one write of int32 slot ids. The PyTorch form makes about eight passes over [T,k] (an int64 index among
them), which at an F layer's pool of 8192 per row is most of the cost of turning it into slot ids."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from indexcache.kernels._dispatch import interpreting


@triton.jit(do_not_specialize=["K", "s_lg", "s_tab", "s_out"])
def _to_slots_kernel(lg_ptr, tab_ptr, out_ptr, K, s_lg, s_tab, s_out, PAGE: tl.constexpr, BK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BK + tl.arange(0, BK)
    m = c < K
    lg = tl.load(lg_ptr + r * s_lg + c, mask=m, other=-1).to(tl.int32)
    ok = lg >= 0
    p = tl.where(ok, lg, 0)
    blk = tl.load(tab_ptr + r * s_tab + p // PAGE, mask=m & ok, other=0).to(tl.int32)
    tl.store(out_ptr + r * s_out + c, tl.where(ok, blk * PAGE + p % PAGE, -1), mask=m)


def to_slots_triton(logical: torch.Tensor, table: torch.Tensor, page: int, *, out=None) -> torch.Tensor:
    """``out``: a contiguous int32 [T,k] to write into (tests poison it)."""
    t, k = logical.shape
    if out is None:
        out = torch.empty(t, k, dtype=torch.int32, device=logical.device)
    if t == 0 or k == 0:
        return out
    if logical.stride(1) != 1:
        logical = logical.contiguous()
    if table.stride(1) != 1:
        table = table.contiguous()
    bk = 128 if interpreting() else 1024
    # a row stride of 0 (one block-table row broadcast over a prefill segment's rows) is passed as it is
    _to_slots_kernel[(t, triton.cdiv(k, bk))](logical, table, out, k, logical.stride(0), table.stride(0), k,
                                              PAGE=page, BK=bk, num_warps=4)
    return out
