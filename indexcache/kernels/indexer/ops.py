"""Lightning indexer dispatch and planning: q / k quantisation, logits (prefill and paged decode), bounded-memory
prefill top-k.

Public functions dispatch to Triton for CUDA tensors (or CPU tensors under TRITON_INTERPRET=1) and to the PyTorch
references in ``reference.py`` otherwise; the prefill's logits run the Gluon kernel (``gluon.py``) on Hopper
(``prefill_logits_kernel``). Top-k selection uses ``indexcache.kernels.topk.topk_rows`` when it
imports (Triton present), else ``reference.topk_rows_torch``; both have the signature
``topk_rows(logits [R,N] fp32, k, *, row_start=None, row_end=None) -> int32 [R,k]`` (column ids, -1 padding).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from indexcache.kernels._dispatch import use_triton
from indexcache.kernels.formats import PAGE, check_indexer_cache
from indexcache.kernels.indexer.reference import (
    check_logits_inputs,
    check_quantize_k_inputs,
    check_quantize_q_inputs,
    indexer_logits_decode_ref,
    indexer_logits_ref,
    prefill_candidates_ref,
    q_weight_fold,
    quantize_indexer_k_ref,
    quantize_indexer_q_ref,
    topk_rows_torch,
)


def quantize_indexer_q(q, weights, *, hadamard: bool = False):
    """q [T,H,128], weights [T,H] (raw weights_proj output) -> (q_fp8 [T,H,128] e4m3, w_folded [T,H] fp32).

    w_folded = weights * q_scale * 128^-0.5 * H^-0.5, so that logits = k_scale * sum_h w_folded * relu(q_fp8 . k_fp8).
    One Triton launch (quantise and fold) on CUDA, bit-identical to ``reference.quantize_indexer_q_ref`` (checked
    on the H200). With ``hadamard`` the reference runs: on the H200 the kernel's output over the transformed rows
    differed from it on one row of extreme magnitude (~1e38) for a reason not found, and no caller rotates here.
    """
    check_quantize_q_inputs(q, weights)
    if use_triton(q) and not hadamard:
        from indexcache.kernels.indexer.triton import quantize_rows_triton  # noqa: PLC0415

        return quantize_rows_triton(q, weights, q_weight_fold(q.shape[1]))
    return quantize_indexer_q_ref(q, weights, hadamard=hadamard)


def quantize_indexer_k(k, *, hadamard: bool = False):
    """k [S,128] -> (k_fp8 [S,128] e4m3, k_scale [S] fp32), one power-of-two scale per token (Triton on CUDA; the
    reference with ``hadamard``, as for q)."""
    check_quantize_k_inputs(k)
    if use_triton(k) and not hadamard:
        from indexcache.kernels.indexer.triton import quantize_rows_triton  # noqa: PLC0415

        return quantize_rows_triton(k)
    return quantize_indexer_k_ref(k, hadamard=hadamard)


def indexer_logits(q_fp8, w, k_fp8, k_scale, row_start, row_end, *, out=None, config: dict | None = None,
                   kernel: str = "triton"):
    """logits [T,S] fp32: k_scale[s]·Σ_h w[t,h]·relu(q_fp8[t,h]·k_fp8[s]) for row_start[t] <= s < row_end[t], else -inf.

    q_fp8 [T,H,128] e4m3, w [T,H] fp32 (folded, see quantize_indexer_q), k_fp8 [S,128] e4m3, k_scale [S] fp32,
    row_start/row_end [T] int32 (clamped to [0,S]). ``out`` (optional) is a [T,S] fp32 buffer with unit column stride.
    ``kernel``: "triton", or "gluon" for the warp-specialised Hopper kernel (gluon.py: CUDA only, H a power of
    two in [16, 128]); ``prefill_logits_kernel`` says which one a device runs faster. ``config`` overrides the
    launch parameters (keys of ``triton.prefill_config``, or of ``gluon.config_for``; benchmarks sweep them).
    """
    t, _, s = check_logits_inputs(q_fp8, w, k_fp8, k_scale, row_start, row_end)
    if out is not None and (tuple(out.shape) != (t, s) or out.dtype != torch.float32 or out.stride(1) != 1):
        raise ValueError(f"indexer_logits: out must be [T,S]=({t},{s}) fp32 with unit column stride, got {tuple(out.shape)}")
    if kernel not in LOGITS_KERNELS:
        raise ValueError(f"indexer_logits: kernel must be 'triton' or 'gluon', got {kernel!r}")
    if kernel == "gluon":
        if not q_fp8.is_cuda:
            raise ValueError(f"indexer_logits: kernel='gluon' needs CUDA tensors (Gluon has no CPU interpreter), "
                             f"got {q_fp8.device}")
        from indexcache.kernels.indexer.gluon import indexer_logits_gluon  # noqa: PLC0415

        return indexer_logits_gluon(q_fp8, w, k_fp8, k_scale, row_start, row_end, out=out, config=config)
    if use_triton(q_fp8):
        from indexcache.kernels.indexer.triton import indexer_logits_triton

        return indexer_logits_triton(q_fp8, w, k_fp8, k_scale, row_start, row_end, out=out, config=config)
    return _into(out, indexer_logits_ref(q_fp8, w, k_fp8, k_scale, row_start, row_end))


LOGITS_KERNELS = ("triton", "gluon")


def prefill_logits_kernel(capability: tuple[int, int] | None, heads: int) -> str:
    """"gluon" or "triton": the prefill logits kernel (``indexer_logits``'s ``kernel``) for a CUDA device of
    compute ``capability`` (None: not a CUDA device) and ``heads`` indexer heads. Hopper (9.x) runs the Gluon
    ping-pong kernel wherever it takes H (1.13x / 1.10x the Triton kernel at 200K, 32 / 64 heads, run 61);
    other devices and head counts run Triton."""
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"prefill_logits_kernel: heads must be a positive int, got {heads!r}")
    if capability is None:
        return "triton"
    if (not isinstance(capability, tuple) or len(capability) != 2
            or not all(isinstance(c, int) and not isinstance(c, bool) for c in capability)):
        raise ValueError(f"prefill_logits_kernel: capability must be a (major, minor) pair of ints or None, "
                         f"got {capability!r}")
    if capability[0] != 9:
        return "triton"
    from indexcache.kernels.indexer.gluon import supports_heads  # noqa: PLC0415

    return "gluon" if supports_heads(heads) else "triton"


def logits_wave_rows(kernel: str, heads: int, device) -> int:
    """Query rows the prefill logits kernel ``kernel`` covers in one wave of programs on ``device``: the Gluon
    kernel runs one program of 256 / H rows per SM (168 registers x 12 warps fill an SM's register file). 1 for the
    Triton kernel (its occupancy depends on the config) and off CUDA: no wave alignment."""
    if kernel != "gluon" or torch.device(device).type != "cuda":
        return 1
    from indexcache.kernels.indexer.gluon import N_COLS  # noqa: PLC0415

    return (N_COLS // heads) * torch.cuda.get_device_properties(device).multi_processor_count


def _logits_kernel_for(q_fp8) -> str:
    """``prefill_logits_kernel`` for q_fp8's device and head count."""
    cap = tuple(torch.cuda.get_device_capability(q_fp8.device)) if q_fp8.is_cuda else None
    return prefill_logits_kernel(cap, q_fp8.shape[1])


def indexer_prefill_candidates(q_fp8, w, k_fp8, k_scale, row_start, row_end, thr, cap: int, *, out=None,
                               config: dict | None = None, kernel: str = "triton"):
    """The fused filter of the prefill top-k: per row, the valid scores >= thr[row] of its window.

    Returns (values [T,cap] fp32, columns [T,cap] int32, counts [T,2] int32): min(count, cap) candidates (entries
    past the kept count are never written), counts = (all candidates, valid scores in the window). The kernels
    keep them in no particular order (an overflowing list: any ``cap`` of the candidates); the PyTorch path keeps
    the first ``cap`` in column order. ``out``: the three buffers to write into. ``kernel``: "triton" (the
    Triton logits kernel's tile code; ``config`` overrides its launch parameters, keys of
    ``triton.candidates_config``) or "gluon" (the Hopper logits kernel with the filter as its epilogue; CUDA
    only, H a power of two in [16, 128]; ``config``: keys of ``gluon.config_for``, num_stages and maxnreg).
    Scores are those of ``indexer_logits`` with the same ``kernel`` (bit-identical on GPU).
    """
    t, _, _ = check_logits_inputs(q_fp8, w, k_fp8, k_scale, row_start, row_end)
    if tuple(thr.shape) != (t,) or thr.dtype != torch.float32:
        raise ValueError(f"indexer_prefill_candidates: thr must be [T]=({t},) float32, "
                         f"got {tuple(thr.shape)} {thr.dtype}")
    if cap < 1:
        raise ValueError(f"indexer_prefill_candidates: cap must be >= 1, got {cap}")
    if out is None:
        out = (torch.empty(t, cap, dtype=torch.float32, device=q_fp8.device),
               torch.empty(t, cap, dtype=torch.int32, device=q_fp8.device),
               torch.empty(t, 2, dtype=torch.int32, device=q_fp8.device))
    for buf, shape, dt in zip(out, ((t, cap), (t, cap), (t, 2)), (torch.float32, torch.int32, torch.int32)):
        if tuple(buf.shape) != shape or buf.dtype != dt or not buf.is_contiguous():
            raise ValueError(f"indexer_prefill_candidates: out buffers must be contiguous {shape} {dt}, "
                             f"got {tuple(buf.shape)} {buf.dtype}")
    if kernel not in LOGITS_KERNELS:
        raise ValueError(f"indexer_prefill_candidates: kernel must be 'triton' or 'gluon', got {kernel!r}")
    if kernel == "gluon":
        from indexcache.kernels.indexer.gluon import indexer_candidates_gluon  # noqa: PLC0415

        indexer_candidates_gluon(q_fp8, w, k_fp8, k_scale, row_start, row_end, thr, *out, config=config)
        return out
    if use_triton(q_fp8):
        from indexcache.kernels.indexer.triton import indexer_candidates_triton  # noqa: PLC0415

        indexer_candidates_triton(q_fp8, w, k_fp8, k_scale, row_start, row_end, thr, *out, config=config)
        return out
    logits = indexer_logits_ref(q_fp8, w, k_fp8, k_scale, row_start, row_end)
    for buf, res in zip(out, prefill_candidates_ref(logits, thr, cap)):
        buf.copy_(res)
    return out


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
                        slot_bytes: int = SLOT_BYTES, wave_rows: int = 1) -> list[tuple[int, int, int, int]]:
    """Split rows into chunks [r0, r1) whose logits over their column span [c0, c1) and whose selection fit in
    workspace_bytes together: rows * (span * 4 + slot_bytes * topk) <= workspace_bytes, the fp32 logits of a
    chunk beside the selection's temporaries (``slot_bytes`` per top-k slot per row; default SLOT_BYTES for the
    torch fallback: torch.topk values + int64 ids, output, index shift), and the logits alone at most 3/4 of it.
    Returns (r0, r1, c0, c1) tuples.

    Why both: a fixed quarter for the selection halved the rows per chunk of an F layer with a pool of 8192 (run
    66: 43 vs 27 ms per 8192-row chunk at 200K, 1 GiB), while letting the logits take more than 3/4 made the plain
    F chunk slower at 1 GiB (run 67/68: 1152-row chunks 29 ms per 8192 rows against 18.5 for 960-row ones; cause
    not isolated; likely the wave count: 144 programs of 8 rows on 132 SMs run as two waves, 120 as one. With
    chunks aligned to waves the engine-default stage at 200K ran 1.23x faster, run 103).

    ``wave_rows``: the rows the logits kernel runs in one wave of programs over the device (``logits_wave_rows``).
    A chunk with room for more than that many rows takes a multiple of it (its last wave full), and no chunk but
    a segment's last is left with a partial wave.
    """
    if isinstance(wave_rows, bool) or not isinstance(wave_rows, int) or wave_rows < 1:
        raise ValueError(f"plan_prefill_chunks: wave_rows must be a positive int, got {wave_rows!r}")
    row_bytes = slot_bytes * topk
    if row_bytes >= workspace_bytes:
        raise ValueError(f"indexer_topk_prefill: workspace_bytes={workspace_bytes} is too small for topk={topk}; "
                         f"the selection of one row alone needs {row_bytes}")
    return _greedy_row_chunks(
        row_start, row_end, workspace_bytes, row_bytes, None,
        lambda cost, span: f"indexer_topk_prefill: workspace_bytes={workspace_bytes} cannot hold one row of "
                           f"{span} logits and its selection; raise it to at least {cost * 4 // 3 + 1}",
        logits_cap=workspace_bytes - workspace_bytes // 4, multiple=wave_rows)


def _greedy_row_chunks(row_start, row_end, budget: int, row_bytes: int, max_rows: int | None,
                       too_small, logits_cap: int | None = None,
                       multiple: int = 1) -> list[tuple[int, int, int, int]]:
    """Consecutive rows [r0, r1), each chunk as long as rows * (span * 4 + row_bytes) <= budget (span: the chunk's
    column range [c0, c1) of the windows), rows * span * 4 <= ``logits_cap`` when given, and at most ``max_rows``;
    ``too_small(cost, span)`` words the error when one row does not fit; a chunk with room for more than
    ``multiple`` rows that does not end the rows takes a multiple of it. Returns (r0, r1, c0, c1). Needs the
    windows on the host (one device sync)."""
    rs = row_start.long().cpu().numpy()
    re = np.maximum(row_end.long().cpu().numpy(), rs)
    t = len(rs)
    chunks = []
    r0 = 0
    while r0 < t:
        seg = slice(r0, t if max_rows is None else min(t, r0 + max_rows))
        lo = np.minimum.accumulate(rs[seg])
        hi = np.maximum.accumulate(re[seg])
        cost = np.arange(1, len(lo) + 1) * ((hi - lo) * 4 + row_bytes)
        n = int(np.searchsorted(cost, budget, side="right"))  # cost is non-decreasing
        if logits_cap is not None:
            n = min(n, int(np.searchsorted(np.arange(1, len(lo) + 1) * (hi - lo) * 4, logits_cap, side="right")))
        if n == 0:
            raise ValueError(too_small(int(cost[0]), int(hi[0] - lo[0])))
        if n > multiple and r0 + n < t:
            n -= n % multiple
        chunks.append((r0, r0 + n, int(lo[n - 1]), int(hi[n - 1])))
        r0 += n
    return chunks


# Path of indexer_topk_prefill by (context, heads): the fused path from this many keys on. The choice is made per
# call, i.e. per prefill step of the engine, so what counts is a step's cost at S keys, not a whole prefill's.
# The two-pass logits chunk of a long context holds few rows (3/4 of the workspace: at 4 GiB, as benchmarks.e2e
# runs, ~2700 rows at 300K and ~800 at 1M; a quarter of that at the engine's default 1 GiB), too few programs to
# fill the GPU; the fused pass has no chunk. `python -m benchmarks.indexer_fused --steps` times one step per S
# (H200 runs 104-105, index sets equal), fused / two-pass speedup at 250K, 300K, 400K, 600K, 1M:
#   H=32, 1 GiB, 8192-row steps (engine defaults): 0.94, 1.17, 1.51, 2.31, 3.77
#   H=32, 4 GiB, 16384-row steps (benchmarks.e2e): 0.86, 0.99, 1.01, 1.08, 1.33
#   H=64, 1 GiB: 0.67, 0.71, 0.81, 1.19, 1.93;  H=64, 4 GiB: 0.78, 0.82, 0.88, 0.93, 0.97
# so 300K and 600K: right at the engine's default, within 1% (H=32) and 7% (H=64, >= 600K) of the faster path
# at 4 GiB. The 200K prefill never reaches either.
FUSED_MIN_CONTEXT_UP_TO_32_HEADS = 300_000
FUSED_MIN_CONTEXT_OVER_32_HEADS = 600_000


def choose_prefill_path(ctx: int, heads: int) -> str:
    """"fused" or "two_pass": the faster prefill top-k path for ``ctx`` keys and ``heads`` indexer heads."""
    limit = FUSED_MIN_CONTEXT_UP_TO_32_HEADS if heads <= 32 else FUSED_MIN_CONTEXT_OVER_32_HEADS
    return "fused" if ctx >= limit else "two_pass"


def indexer_topk_prefill(q_fp8, w, k_fp8, k_scale, row_start, row_end, topk: int, *,
                         workspace_bytes: int = 2 << 30, topk_fn=None, out=None):
    """idx [T, topk] int32 of the key indices (columns of k_fp8) with the largest logits in each row's window.

    Logits of the whole prefill are never materialised; ``workspace_bytes`` bounds the temporaries.
    ``topk_fn(logits [R,N], k, row_start=, row_end=)`` selects per row (default: ``default_topk_fn()``); rows with
    fewer than topk valid keys are padded with -1. Runs ``indexer_topk_prefill_fused`` or
    ``indexer_topk_prefill_two_pass`` as ``choose_prefill_path(S, H)`` says (two-pass without Triton); both give
    the same index sets.
    """
    _, h, s = check_logits_inputs(q_fp8, w, k_fp8, k_scale, row_start, row_end)
    if use_triton(q_fp8) and choose_prefill_path(s, h) == "fused":
        return indexer_topk_prefill_fused(q_fp8, w, k_fp8, k_scale, row_start, row_end, topk,
                                          workspace_bytes=workspace_bytes, topk_fn=topk_fn, out=out)
    return indexer_topk_prefill_two_pass(q_fp8, w, k_fp8, k_scale, row_start, row_end, topk,
                                         workspace_bytes=workspace_bytes, topk_fn=topk_fn, out=out)


def _prefill_setup(q_fp8, w, k_fp8, k_scale, row_start, row_end, topk, topk_fn, out):
    """Checks; (topk_fn, out, row_start, row_end clamped to [0, S] as int32) of either prefill path."""
    t, _, s = check_logits_inputs(q_fp8, w, k_fp8, k_scale, row_start, row_end)
    if topk <= 0:
        raise ValueError(f"indexer_topk_prefill: topk must be positive, got {topk}")
    if out is None:
        out = torch.empty(t, topk, dtype=torch.int32, device=q_fp8.device)
    return (topk_fn or default_topk_fn(), out, row_start.clamp(0, s).to(torch.int32),
            row_end.clamp(0, s).to(torch.int32))


def indexer_topk_prefill_two_pass(q_fp8, w, k_fp8, k_scale, row_start, row_end, topk: int, *,
                                  workspace_bytes: int = 2 << 30, topk_fn=None, out=None,
                                  logits_kernel: str | None = None, wave_rows: int | None = None):
    """``indexer_topk_prefill`` by two passes: rows in chunks whose logits over the chunk's column span fit in
    ``workspace_bytes`` (``plan_prefill_chunks``), each chunk's logits written, then selected by ``topk_fn``.
    ``logits_kernel``: ``indexer_logits``'s ``kernel``; None: ``prefill_logits_kernel`` for q's device and H.
    ``wave_rows``: the planner's wave alignment; None: ``logits_wave_rows`` of that kernel (1: none)."""
    topk_fn, out, rs_all, re_all = _prefill_setup(q_fp8, w, k_fp8, k_scale, row_start, row_end, topk, topk_fn, out)
    if logits_kernel is None:
        logits_kernel = _logits_kernel_for(q_fp8)
    elif logits_kernel not in LOGITS_KERNELS:
        raise ValueError(f"indexer_topk_prefill: logits_kernel must be 'triton', 'gluon' or None, "
                         f"got {logits_kernel!r}")
    s = k_fp8.shape[0]
    if wave_rows is None:
        wave_rows = logits_wave_rows(logits_kernel, q_fp8.shape[1], q_fp8.device)
    chunks = plan_prefill_chunks(rs_all, re_all, topk, workspace_bytes, selection_slot_bytes(topk_fn, topk, s),
                                 wave_rows=wave_rows)
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
        indexer_logits(q_fp8[r0:r1], w[r0:r1], k_fp8[c0:c1], k_scale[c0:c1], rs, re, out=logits,
                       kernel=logits_kernel)
        dst = out[r0:r1]
        dst.copy_(topk_fn(logits, topk, row_start=rs, row_end=re))
        if c0:
            dst.add_((dst >= 0).to(dst.dtype), alpha=c0)
    return out


# ------------------------------------------------------------------------------------------ fused prefill top-k
# Per row: a threshold T from a sample of the row's scores (every SAMPLE_STRIDE-th key, jittered), then ONE fused
# pass keeps the scores >= T (candidates) and an exact top-k among them (ties by column). Exact whenever the row
# has at least min(topk, valid) candidates and at most CAP of them (every top-k score is then >= T); other rows
# (a sample that missed, thousands of ties at T) are redone by the two-pass path.
SAMPLE_STRIDE = 32
_Z = 5.0            # the sample rank sits _Z standard deviations above topk/stride: few rows fall short


def fused_params(topk: int, stride: int | None = None, cap: int | None = None) -> tuple[int, int, int]:
    """(sample stride P, sample rank r of the threshold, candidate capacity CAP) for ``topk``.

    The r-th largest of a 1/P sample has about r*P scores above it (sd sqrt(r)*P): r = topk/P + _Z*sqrt(topk/P)
    + 2 keeps that >= topk in all but ~1e-6 of rows, and CAP = the power of two >= 2*r*P bounds it from above.
    """
    p = stride or SAMPLE_STRIDE
    if p < 1:
        raise ValueError(f"indexer_topk_prefill: sample stride must be >= 1, got {p}")
    kp = topk / p
    r = int(math.ceil(kp + _Z * math.sqrt(kp))) + 2
    cap = cap or 1 << (max(2 * r * p, (r + 2) * p, topk) - 1).bit_length()
    return p, r, cap


def sample_columns(s: int, stride: int, device) -> torch.Tensor:
    """Sorted int64 sample of [0, s): one column per block of ``stride``, at a fixed hashed offset in the block
    (jittered, so periodic score patterns do not bias the sample)."""
    j = torch.arange(-(-s // stride), device=device, dtype=torch.int64)
    col = j * stride + ((j * 2654435761) & 0xFFFFFFFF) % stride
    return col[col < s]


def _scratch(k: int, n: int) -> int:
    """Device bytes per row of one ``topk_rows(k)`` call over n entries plus its index temporaries here."""
    try:
        from indexcache.kernels.topk import scratch_bytes_per_row  # noqa: PLC0415
    except ImportError:
        return 2 * SLOT_BYTES * k
    return scratch_bytes_per_row(k, max(n, 1)) + SLOT_BYTES * k


def plan_fused_chunks(row_start, row_end, row_bytes: int, workspace_bytes: int) -> list[tuple[int, int, int, int]]:
    """Split rows into chunks [r0, r1) with rows * (span * 4 + row_bytes) <= workspace_bytes, where span is the
    chunk's column range [c0, c1) of the (sample) windows. Returns (r0, r1, c0, c1)."""
    return _greedy_row_chunks(
        row_start, row_end, workspace_bytes, row_bytes, None,
        lambda cost, span: f"indexer_topk_prefill: workspace_bytes={workspace_bytes} cannot hold one fused row; "
                           f"raise it to at least {cost}")


def _take_rows(x, idx):
    """x[idx] for an fp8 tensor, through a uint8 view (index kernels need not support float8 dtypes)."""
    return x.view(torch.uint8)[idx].view(x.dtype)


def indexer_topk_prefill_fused(q_fp8, w, k_fp8, k_scale, row_start, row_end, topk: int, *,
                               workspace_bytes: int = 2 << 30, topk_fn=None, out=None, sample_stride: int | None = None,
                               cap: int | None = None, stats: dict | None = None, config: dict | None = None,
                               candidates_kernel: str | None = None):
    """``indexer_topk_prefill`` by the fused logits + candidate filter (see the comment above ``SAMPLE_STRIDE``).

    Budget: the candidate lists of an outer chunk of rows take 1/2 of the workspace (large chunks keep the
    fused kernel's grid many waves deep); the sample logits + threshold select and the final select run in
    sub-chunks of 1/4 each. ``sample_stride`` / ``cap`` override ``fused_params`` (tests); ``stats`` receives
    the counters (fallback rows, mean candidates per row, chunks, thresholds); ``candidates_kernel``: the
    filter's kernel, "triton" or "gluon" (``indexer_prefill_candidates``' kernel; None = the prefill logits
    kernel of q's device and heads, ``prefill_logits_kernel``); rows redone by the two-pass path are scored by
    the same kernel's logits. ``config`` overrides the filter's launch parameters (keys of
    ``triton.candidates_config`` for the Triton filter, of ``gluon.config_for`` for the Gluon one)."""
    topk_fn, out, rs_all, re_all = _prefill_setup(q_fp8, w, k_fp8, k_scale, row_start, row_end, topk, topk_fn, out)
    t, s = q_fp8.shape[0], k_fp8.shape[0]
    dev = q_fp8.device
    if candidates_kernel is None:
        candidates_kernel = _logits_kernel_for(q_fp8)
    elif candidates_kernel not in LOGITS_KERNELS:
        raise ValueError(f"indexer_topk_prefill_fused: candidates_kernel must be 'triton', 'gluon' or None, "
                         f"got {candidates_kernel!r}")
    p, r, cap = fused_params(topk, sample_stride, cap)
    sel = sample_columns(s, p, dev)
    k8s, kss = _take_rows(k_fp8, sel), k_scale[sel]
    srs = torch.searchsorted(sel, rs_all.long()).to(torch.int32)
    sre = torch.searchsorted(sel, re_all.long()).to(torch.int32)
    srs = torch.where(re_all - rs_all > cap, srs, sre)  # rows of <= CAP keys: no sample, every valid score
    quarter = workspace_bytes // 4
    outer = (2 * quarter) // (cap * 8 + 24)
    inner = quarter // _scratch(topk, cap)
    if outer < 1 or inner < 1:
        raise ValueError(f"indexer_topk_prefill: workspace_bytes={workspace_bytes} is too small for the fused path "
                         f"(topk={topk}, cap={cap}); need at least {4 * max(cap * 8 + 24, _scratch(topk, cap))}")
    sample_chunks = plan_fused_chunks(srs, sre, _scratch(r, len(sel)) + 16, quarter)
    sbuf = torch.empty(max([(b - a) * (c1 - c0) for a, b, c0, c1 in sample_chunks] + [1]), dtype=torch.float32,
                       device=dev)
    sample_kernel = _logits_kernel_for(q_fp8)  # any threshold is exact (see above): the faster kernel
    thr = torch.full((t,), float("-inf"), dtype=torch.float32, device=dev)
    for a, b, c0, c1 in sample_chunks:  # thresholds: the r-th largest sampled score of each row
        if c1 == c0:
            continue
        lg = sbuf[:(b - a) * (c1 - c0)].view(b - a, c1 - c0)
        sa, sb = srs[a:b] - c0, sre[a:b] - c0
        indexer_logits(q_fp8[a:b], w[a:b], k8s[c0:c1], kss[c0:c1], sa, sb, out=lg, kernel=sample_kernel)
        idx = topk_fn(lg, r, row_start=sa, row_end=sb)
        got = idx >= 0
        v = torch.where(got, torch.gather(lg, 1, idx.clamp(min=0).long()), float("inf")).amin(1)
        thr[a:b] = torch.where(got.all(1), v, float("-inf"))  # fewer than r sampled scores: take every one
    del sbuf
    rows = min(outer, t)
    cand_val = torch.empty(rows, cap, dtype=torch.float32, device=dev)
    cand_col = torch.empty(rows, cap, dtype=torch.int32, device=dev)
    counts = torch.empty(rows, 2, dtype=torch.int32, device=dev)
    bad = torch.empty(t, dtype=torch.bool, device=dev)
    for r0 in range(0, t, outer):
        r1 = min(t, r0 + outer)
        n = r1 - r0
        cv, cc, cnt = indexer_prefill_candidates(q_fp8[r0:r1], w[r0:r1], k_fp8, k_scale, rs_all[r0:r1],
                                                 re_all[r0:r1], thr[r0:r1], cap,
                                                 out=(cand_val[:n], cand_col[:n], counts[:n]), config=config,
                                                 kernel=candidates_kernel)
        for a in range(0, n, inner):
            b = min(n, a + inner)
            kept = cnt[a:b, 0].clamp(max=cap)
            pos = topk_fn(cv[a:b], topk, row_start=torch.zeros_like(kept), row_end=kept)
            out[r0 + a:r0 + b] = _select_by_column(cv[a:b], cc[a:b], kept, pos)
        # exact iff the list holds every candidate and at least min(topk, valid) of them
        bad[r0:r1] = (cnt[:, 0] > cap) | (cnt[:, 0] < cnt[:, 1].clamp(max=topk))
        if stats is not None:
            stats.setdefault("candidates", []).append(cnt[:, 0].clone())
    redo = bad.nonzero().flatten()  # one sync for the whole call
    if redo.numel():
        # scored by the candidates' kernel, bit for bit: a row's set does not depend on being redone
        out[redo] = indexer_topk_prefill_two_pass(_take_rows(q_fp8, redo), w[redo], k_fp8, k_scale, rs_all[redo],
                                                  re_all[redo], topk, workspace_bytes=workspace_bytes,
                                                  topk_fn=topk_fn, logits_kernel=candidates_kernel)
    if stats is not None:
        found = torch.cat(stats.pop("candidates")) if t else torch.zeros(0)
        stats.update(fallback_rows=int(redo.numel()), redo=redo, thr=thr, sample_stride=p, sample_rank=r, cap=cap,
                     chunks=-(-t // outer), sample_chunks=len(sample_chunks),
                     mean_candidates=float(found.float().mean()) if t else 0.0)
    return out


def _select_by_column(cv, cc, kept, pos):
    """Columns of the candidates at list positions ``pos`` (a top-k of cv[:, :kept], -1 padded), with ties at the
    k-th value broken by the lower column instead of the lower list position (the lists need not be in column
    order). Rows whose k-th value has tied candidates left out of the selection (found with one pass over the
    lists; rare unless keys repeat) get their tied picks replaced by the lowest tied columns."""
    got = pos >= 0
    p = pos.clamp(min=0).long()
    v = torch.gather(cv, 1, p)
    cols = torch.where(got, torch.gather(cc, 1, p), -1)
    vk = torch.where(got, v, float("inf")).amin(1, keepdim=True)  # the k-th value (+inf: nothing selected)
    in_list = torch.arange(cv.shape[1], device=cv.device)[None, :] < kept[:, None]
    tied = (cv == vk) & in_list
    picked = (got & (v == vk)).sum(1)
    amb = (tied.sum(1) > picked).nonzero().flatten()
    if amb.numel() == 0:
        return cols
    k = pos.shape[1]
    low = torch.where(tied[amb], cc[amb], torch.iinfo(torch.int32).max).sort(1).values[:, :k]  # lowest first
    j = torch.arange(low.shape[1], device=cv.device)[None, :]
    above = torch.where(got[amb] & (v[amb] > vk[amb]), cols[amb], -1)
    both = torch.cat([above, torch.where(j < picked[amb, None], low, -1)], 1)
    first = torch.argsort((both < 0).to(torch.int8), dim=1, stable=True)[:, :k]  # the picks, then -1 padding
    cols[amb] = torch.gather(both, 1, first)
    return cols


def selection_slot_bytes(topk_fn, topk: int, n: int) -> int:
    """Temporary bytes per top-k slot of one selected row: the Triton top-k's own scratch bound plus the output
    copy and index shift here; a ``topk_fn`` that declares ``scratch_bytes_per_row(width, n)`` (its own bound for
    rows of ``width`` selected columns out of ``n``) is budgeted by that; SLOT_BYTES for the torch fallback."""
    own = getattr(topk_fn, "scratch_bytes_per_row", None)
    if own is not None:
        return -(-(own(topk, n) + 8 * topk) // topk)
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
