"""Gluon (Triton's explicit-layout dialect) grouped GEMM of 1x128-quantised fp8 rows against FP8 block-scaled
expert weights for Hopper: the Triton kernel's semantics (``fp8_grouped_mm_triton``) with the fp32 promotion of
each 128-deep K block overlapped with the tensor-core work of the next.

Why: DeepSeek block scaling multiplies each 128-deep K block's product by its row's activation scale and its
column block's weight scale before adding it to an fp32 accumulator (the fp8 wgmma accumulates with reduced
precision inside the block). Triton's compiled loop issues a block's wgmmas, waits for all of them
(``wgmma.wait_group 0``) and only then promotes, so the tensor cores idle during every promotion. Here:
- a 1-warp producer partition streams the activation tile [BLOCK_M, 128] and the weight tile [BLOCK_N, 128] of
  each K block into a NUM_STAGES shared-memory ring with TMA (``ready``/``empty`` mbarriers per stage);
- the consumer warpgroup(s) (the default partition, one warpgroup per 64 rows) issue block k+1's wgmma into a
  fresh register accumulator, then ``wgmma.wait_group 1`` (block k's MMA is done while k+1's still runs),
  release block k's stage to the producer and promote it: acc += d_k * a_scale[row, k] * w_scale[k]. The
  scales of block k are loaded from global memory when block k is issued, one block before they are used.
- the epilogue weights each row (``row_weight``), casts, and stores with 16-byte rows through a blocked layout,
  scattered to ``out_rows`` when given.
Tiles are the Triton kernel's: rows of one expert (tile map of the layer's ``expert_plan`` or
``tile_map_reference``), a 1-D grid over (tile, column block) in GROUP_M groups, spare tiles exit at once. TMA
reads past the expert's rows (another expert's rows, or zeros past M) and past N inside the flattened [E*N, K]
weight; those rows and columns are computed and never stored. K tails are zero-filled by TMA.

Limits (checked with clear errors): a must not be gathered (``a_rows``: TMA has no row gather on Hopper; the
gate/up projection stays on Triton), a and w K-contiguous with 16-byte-aligned rows (K % 16 == 0), w [E, N, K]
contiguous, BLOCK_N 64 or 128 (one weight block per column tile). Compiles without a GPU for sm_90a (tests);
numerics are checked on the GPU only (Gluon has no interpreter).
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from indexcache.kernels.expert_plan.reference import tile_map_reference

BLOCK_K = 128  # one activation group and one weight block per K step
GROUP_M = 8


def config_for(m: int, num_experts: int) -> dict:
    """Tile and pipeline: 64-row tiles (one consumer warpgroup, the row tile the expert plan already holds for
    the down projection), 128 columns, 4 stages of 24 KB (on the H200 within 4% of 128x128 tiles and of 3 stages
    at the MoE shapes, run 55; 128x128 is 1.26x faster on a dense 8192^3); two CTAs
    fit on an SM (96 KB of shared memory and 128 registers a thread on average each), so one CTA's epilogue
    overlaps the other's main loop. A single expert with many rows (a dense GEMM) takes 128-row tiles."""
    if num_experts == 1 and m >= 128 * 132:
        return {"block_m": 128, "block_n": 128, "num_stages": 4, "maxnreg": 168}
    return {"block_m": 64, "block_n": 128, "num_stages": 4, "maxnreg": 128}


@gluon.constexpr_function
def _store_layout(block_n, num_warps):
    """8 bf16 (16 bytes) per thread along a row, the warp's lanes across the row first."""
    tpw_n = min(block_n // 8, 32)
    return gl.BlockedLayout([1, 8], [32 // tpw_n, tpw_n], [num_warps, 1], [1, 0])


@gluon.constexpr_function
def _mma_layout(block_n, num_warps):
    """wgmma accumulator: warps stacked along M (16 rows each, a warpgroup per 64 rows), one n=BLOCK_N
    instruction per 64 x BLOCK_N x 32 fp8 step."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, block_n, 32])


@gluon.jit
def _tile_coords(pid, N, NUM_TILES, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr):
    """(tile, column block) of program ``pid``, GROUP_M row tiles at a time (as the Triton kernel)."""
    nb = gl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * nb
    first = (pid // per_group) * GROUP_M
    size = gl.minimum(NUM_TILES - first, GROUP_M)
    return first + (pid % per_group) % size, (pid % per_group) // size


@gluon.jit
def _load_partition(a_desc, w_desc, a_bufs, w_bufs, ready, empty, row0, wrow0, num_k,
                    NUM_STAGES: gl.constexpr):
    """Producer (1 warp): K block i into stage i % NUM_STAGES once the consumer released it. A fresh mbarrier
    counts as having completed the phase before phase 0, so the first pass over the ring waits for parity 1 and
    goes straight through."""
    for i in range(num_k):
        s = i % NUM_STAGES
        mbarrier.wait(empty.index(s), ((i // NUM_STAGES) & 1) ^ 1)
        bar = ready.index(s)
        mbarrier.expect(bar, a_desc.block_type.nbytes + w_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(a_desc, [row0, i * 128], bar, a_bufs.index(s))
        tma.async_copy_global_to_shared(w_desc, [wrow0, i * 128], bar, w_bufs.index(s))


@gluon.jit
def _issue(a_bufs, w_bufs, ready, i, acc, sa_rows, rmask, sw_ptr, stride_sak, stride_sk, NUM_STAGES: gl.constexpr):
    """Wait for K block i's operands, start its MMA and load its scales (used one block later).
    The MMA is handed the promoted accumulator as its input (use_acc=False: its values are ignored; the MMA gets
    a copy of the registers): that data dependency orders the previous block's promotion before this issue.
    Without it the compiler sinks the promotion below the issue and copies the registers of an MMA still in
    flight, and ptxas then serialises every wgmma (its C7514 note)."""
    s = i % NUM_STAGES
    mbarrier.wait(ready.index(s), (i // NUM_STAGES) & 1)
    d = warpgroup_mma(a_bufs.index(s), w_bufs.index(s).permute((1, 0)), acc, use_acc=False, is_async=True)
    scale = gl.load(sa_rows + i * stride_sak, mask=rmask, other=0.0) * gl.load(sw_ptr + i * stride_sk)
    return d, scale


@gluon.jit
def _promote(acc, d, scale, empty, i, OUTSTANDING: gl.constexpr, NUM_STAGES: gl.constexpr):
    """Wait for K block i's MMA (OUTSTANDING later ones may still run), hand its stage back to the producer and
    add it, scaled, to the fp32 accumulator."""
    d = warpgroup_mma_wait(num_outstanding=OUTSTANDING, deps=(d, ))
    mbarrier.arrive(empty.index(i % NUM_STAGES), count=1)
    return acc + d * gl.expand_dims(scale, 1)


@gluon.jit
def _mma_partition(a_bufs, w_bufs, ready, empty, sa_ptr, sw_ptr, out_ptr, out_row_ptr, row_w_ptr,
                   row0, row_end, n0, N, num_k, stride_sam, stride_sak, stride_sk, stride_om, stride_on,
                   SCATTER_OUT: gl.constexpr, NUM_STAGES: gl.constexpr, MMA_LAYOUT: gl.constexpr,
                   STORE_LAYOUT: gl.constexpr):
    """Consumer: block k+1's wgmma in flight while block k is promoted (wait_group 1), then the epilogue.
    ``sw_ptr`` points at this tile's weight-scale row (expert, column block), K blocks stride_sk apart.
    K blocks go two at a time (x: even blocks, y: odd ones) so that the value carried round the loop is the
    MMA issued last in the body, never a copy of it."""
    BLOCK_M: gl.constexpr = a_bufs.type.shape[1]
    BLOCK_N: gl.constexpr = w_bufs.type.shape[1]
    rows = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, MMA_LAYOUT))
    rmask = rows < row_end
    sa_rows = sa_ptr + rows.to(gl.int64) * stride_sam
    acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, MMA_LAYOUT)

    dx, sx = _issue(a_bufs, w_bufs, ready, 0, acc, sa_rows, rmask, sw_ptr, stride_sak, stride_sk, NUM_STAGES)
    # at the loop head: block i (even) in flight in x
    for j in range((num_k - 1) // 2):
        i = 2 * j
        dy, sy = _issue(a_bufs, w_bufs, ready, i + 1, acc, sa_rows, rmask, sw_ptr, stride_sak, stride_sk,
                        NUM_STAGES)
        acc = _promote(acc, dx, sx, empty, i, 1, NUM_STAGES)
        dx, sx = _issue(a_bufs, w_bufs, ready, i + 2, acc, sa_rows, rmask, sw_ptr, stride_sak, stride_sk,
                        NUM_STAGES)
        acc = _promote(acc, dy, sy, empty, i + 1, 1, NUM_STAGES)
    last = ((num_k - 1) // 2) * 2  # the block in x
    if last + 1 < num_k:  # an even number of blocks: one more in y
        dy, sy = _issue(a_bufs, w_bufs, ready, last + 1, acc, sa_rows, rmask, sw_ptr, stride_sak, stride_sk,
                        NUM_STAGES)
        acc = _promote(acc, dx, sx, empty, last, 1, NUM_STAGES)
        acc = _promote(acc, dy, sy, empty, last + 1, 0, NUM_STAGES)
    else:
        acc = _promote(acc, dx, sx, empty, last, 0, NUM_STAGES)

    if SCATTER_OUT:
        acc = acc * gl.expand_dims(gl.load(row_w_ptr + rows, mask=rmask, other=0.0), 1)
    y = gl.convert_layout(acc.to(out_ptr.dtype.element_ty), STORE_LAYOUT)
    srows = row0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, STORE_LAYOUT))
    smask = srows < row_end
    cols = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, STORE_LAYOUT))
    if SCATTER_OUT:
        dst = gl.load(out_row_ptr + srows, mask=smask, other=0).to(gl.int64)
    else:
        dst = srows.to(gl.int64)
    ptrs = out_ptr + gl.expand_dims(dst * stride_om, 1) + gl.expand_dims(cols * stride_on, 0)
    gl.store(ptrs, y, mask=gl.expand_dims(smask, 1) & gl.expand_dims(cols < N, 0))


# the tile count and the activation scales' column stride (M) vary with the batch: one compile per weight shape
@gluon.jit(do_not_specialize=["NUM_TILES", "stride_sak"])
def _grouped_fp8_ws_kernel(a_desc, w_desc, sa_ptr, s_ptr, out_ptr, out_row_ptr, row_w_ptr,
                           tile_e_ptr, tile_row_ptr, row_end_ptr, N, K, E, NUM_TILES,
                           stride_sam, stride_sak, stride_se, stride_sn, stride_sk, stride_om, stride_on,
                           GROUP_M: gl.constexpr, NUM_STAGES: gl.constexpr, SCATTER_OUT: gl.constexpr,
                           num_warps: gl.constexpr):
    BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    t, pn = _tile_coords(gl.program_id(0), N, NUM_TILES, BLOCK_N, GROUP_M)
    e = gl.load(tile_e_ptr + t)
    if e < E:
        row0 = gl.load(tile_row_ptr + t)
        row_end = gl.load(row_end_ptr + e)
        n0 = pn * BLOCK_N
        num_k = gl.cdiv(K, 128)
        # one weight block row per column tile (BLOCK_N divides 128)
        sw_ptr = s_ptr + e.to(gl.int64) * stride_se + (n0 // 128) * stride_sn

        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [NUM_STAGES, BLOCK_M, 128], a_desc.layout)
        w_bufs = gl.allocate_shared_memory(w_desc.dtype, [NUM_STAGES, BLOCK_N, 128], w_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(NUM_STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=1)

        MMA_LAYOUT: gl.constexpr = _mma_layout(BLOCK_N, num_warps)
        STORE_LAYOUT: gl.constexpr = _store_layout(BLOCK_N, num_warps)
        gl.warp_specialize([
            (_mma_partition, (a_bufs, w_bufs, ready, empty, sa_ptr, sw_ptr, out_ptr, out_row_ptr, row_w_ptr, row0,
                              row_end, n0, N, num_k, stride_sam, stride_sak, stride_sk, stride_om, stride_on,
                              SCATTER_OUT, NUM_STAGES, MMA_LAYOUT, STORE_LAYOUT)),
            (_load_partition, (a_desc, w_desc, a_bufs, w_bufs, ready, empty, row0, e * N + n0, num_k, NUM_STAGES)),
        ], [1], [40])


def _tiles(plan, counts, m, block_m):
    if plan is not None and block_m in plan.tiles:
        return (*plan.tiles[block_m], plan.expert_end)
    return (*tile_map_reference(counts, m, block_m), counts.cumsum(0).to(torch.int32))


def operand_layouts(block_m: int, block_n: int):
    """Shared-memory layouts of the activation and weight tiles (128-byte swizzle: rows of 128 fp8)."""
    return (gl.NVMMASharedLayout.get_default_for([block_m, BLOCK_K], gl.float8e4nv),
            gl.NVMMASharedLayout.get_default_for([block_n, BLOCK_K], gl.float8e4nv))


def check_gluon_inputs(a, w, a_rows, block_m, block_n):
    if a_rows is not None:
        raise ValueError("fp8_grouped_mm_gluon: a_rows (a row gather) is not supported: TMA loads whole row "
                         "ranges; gather the rows first or use the Triton kernel")
    if block_m not in (64, 128) or block_n not in (64, 128):
        raise ValueError(f"fp8_grouped_mm_gluon: block_m and block_n must be 64 or 128, got {block_m}, {block_n}")
    k = a.shape[1]
    if k % 16:
        raise ValueError(f"fp8_grouped_mm_gluon: K must be a multiple of 16 (16-byte TMA rows), got {k}")
    if a.stride(1) != 1 or a.stride(0) % 16 or a.data_ptr() % 16:
        raise ValueError(f"fp8_grouped_mm_gluon: a must be K-contiguous with 16-byte aligned rows, got strides "
                         f"{a.stride()}")
    if not w.is_contiguous() or w.data_ptr() % 16:
        raise ValueError(f"fp8_grouped_mm_gluon: w must be a contiguous [E, N, K] tensor, got strides {w.stride()}")


def fp8_grouped_mm_gluon(a, counts, w, scale_inv, a_scale, *, out=None, out_dtype=torch.bfloat16, config=None,
                         a_rows=None, out_rows=None, row_weight=None, plan=None):
    """``fp8_grouped_mm_triton``'s contract (inputs already checked by ``fp8_grouped_mm``) on Hopper, without
    ``a_rows`` (see the module docstring). ``config``: block_m, block_n (64 or 128), num_stages, maxnreg."""
    m = a.shape[0]
    k = a.shape[1]
    E, n, _ = w.shape
    cfg = dict(config or config_for(m, E))
    block_m, block_n = cfg.pop("block_m"), cfg.pop("block_n")
    check_gluon_inputs(a, w, a_rows, block_m, block_n)
    if out is None:
        out = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0:
        return out
    a_layout, w_layout = operand_layouts(block_m, block_n)
    a_desc = TensorDescriptor.from_tensor(a, [block_m, BLOCK_K], a_layout)
    w_desc = TensorDescriptor.from_tensor(w.view(E * n, k), [block_n, BLOCK_K], w_layout)
    te, row, ends = _tiles(plan, counts, m, block_m)
    grid = (te.shape[0] * triton.cdiv(n, block_n),)
    _grouped_fp8_ws_kernel[grid](a_desc, w_desc, a_scale, scale_inv, out,
                                 out if out_rows is None else out_rows, out if row_weight is None else row_weight,
                                 te, row, ends, n, k, E, te.shape[0], *a_scale.stride(), *scale_inv.stride(),
                                 out.stride(0), out.stride(1), GROUP_M=GROUP_M, NUM_STAGES=cfg["num_stages"],
                                 SCATTER_OUT=out_rows is not None, num_warps=block_m // 16,
                                 maxnreg=cfg["maxnreg"])
    return out
