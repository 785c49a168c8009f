"""Sparse MLA attention in absorbed (MQA) mode: checks, launch planning and dispatch for ``triton.py``.

Prefill over a flat latent KV, decode over a paged cache. Triton on CUDA tensors (or on CPU under
TRITON_INTERPRET=1), the PyTorch reference otherwise.
"""
from __future__ import annotations

import torch
import triton

from indexcache.kernels._dispatch import interpreting, use_triton
from indexcache.kernels.formats import LATENT_DIM, LATENT_FP8_BYTES, NOPE, dequant_latent_fp8
from indexcache.kernels.sparse_mla.reference import sparse_mla_decode_reference, sparse_mla_prefill_reference

_FLOATS = (torch.bfloat16, torch.float16, torch.float32)
# launch parameters: heads per program cap, tokens per step, warps, pipeline stages (docs/kernels_attention.md)
PREFILL_CFG = {"hb_max": 64, "bt": 64, "num_warps": 8, "num_stages": 2}
PREFILL_CFG_FEW_HEADS = {"hb_max": 64, "bt": 64, "num_warps": 4, "num_stages": 2}  # HB <= 32
# fp32 q / kv: 4-byte rows need 280 KB of shared memory at 64 heads a program even with 32-token tiles and no
# pipelining (the fallback of _launch), more than an H100 / H200 SM has; 32 heads a program at 32-token tiles
# need 200 KB
PREFILL_CFG_4BYTE = {"hb_max": 32, "bt": 32, "num_warps": 4, "num_stages": 1}
# FP8 cache (kv_format "fp8"): same keys. Triton keeps one buffer of the gathered rows, so the loads of one program
# overlap only with another program's work: 4 warps at <= 255 registers and ~100 KB of shared memory let two
# programs share an SM (8 warps at 255 registers, as the first FP8 kernel had, allow one)
PREFILL_FP8_CFG = {"hb_max": 64, "bt": 32, "num_warps": 8, "num_stages": 2}
PREFILL_FP8_CFG_FEW_HEADS = {"hb_max": 64, "bt": 32, "num_warps": 4, "num_stages": 2}  # HB <= 32
# "fp8": the selected rows are gathered + dequantised once (dq_rows rows per program, dq_warps warps), then the
# bf16 attention runs over them with a head-major grid
DECODE_CFG = {"bf16": {"hb_max": 64, "bt": 64, "num_warps": 8, "num_stages": 2, "target_programs": 264},
              "fp8": {"hb_max": 64, "bt": 64, "num_warps": 8, "num_stages": 2, "target_programs": 264,
                      "dq_rows": 16, "dq_warps": 4}}
# fp32 q (4-byte rows, also the dequantised ones): as PREFILL_CFG_4BYTE, 64 heads a program do not fit an SM's
# shared memory at any tile (280 KB at 32-token tiles); separate dicts, so that the launchers' fallbacks, which
# update the dict they were given, never leave the bf16 launches on smaller tiles
DECODE_CFG_4BYTE = {fmt: {**cfg, "hb_max": 32, "bt": 32, "num_stages": 1} for fmt, cfg in DECODE_CFG.items()}
_WS_ALIGN = 256


# (kernel, device, launch config, constexprs) -> index in ``_steps`` of the first launch that fitted: the step-down
# on OutOfResources is found once per process and kind of launch, and never written into the caller's config (the
# module-level dicts above: a fallback there would slow every later call that shares the dict)
_FITTING: dict = {}


def _steps(cfg: dict, every_step: bool) -> list[tuple[int, int]]:
    """(BT, num_stages) to try in order: cfg's own, then 32-token tiles (with fewer stages when ``every_step``,
    else straight to one stage), never larger than cfg's."""
    first = (cfg["bt"], cfg["num_stages"])
    chain = [first]
    for c in (((32, first[1]), (32, 2), (32, 1)) if every_step else ((32, 1),)):
        if c[0] <= first[0] and c[1] <= first[1] and c not in chain:
            chain.append(c)
    return chain


def _launch(kernel, grid, args, kw, cfg, every_step=False):
    """Launch with cfg's tile and stages; if the compiled kernel needs more shared memory than the chip has,
    step down (``_steps``) and remember the launch that fitted for later calls of the same kind."""
    key = (kernel, args[0].device, tuple(sorted(cfg.items())), tuple(sorted(kw.items())))
    chain = _steps(cfg, every_step)
    for i in range(_FITTING.get(key, 0), len(chain)):
        bt, stages = chain[i]
        try:
            kernel[grid](*args, **kw, BT=16 if interpreting() else bt, num_warps=cfg["num_warps"],
                         num_stages=stages)
        except triton.runtime.errors.OutOfResources:
            if i == len(chain) - 1:
                raise
            continue
        _FITTING[key] = i
        return


def _hb(h, cap):
    return min(cap, max(16, 1 << (h - 1).bit_length()))


def _check_q(fn, q, d_v):
    if q.dim() != 3 or q.shape[-1] != LATENT_DIM:
        raise ValueError(f"{fn}: q must be [*, h, {LATENT_DIM}], got shape {tuple(q.shape)}")
    if q.dtype not in _FLOATS:
        raise ValueError(f"{fn}: q dtype must be bf16/fp16/fp32, got {q.dtype}")
    if d_v != 512:
        raise ValueError(f"{fn}: only d_v=512 is supported, got d_v={d_v}")


def _check_idx(fn, indices, n, device):
    if indices.dim() != 2 or indices.shape[0] != n:
        raise ValueError(f"{fn}: indices must be [{n}, topk], got shape {tuple(indices.shape)}")
    if indices.dtype != torch.int32:
        raise ValueError(f"{fn}: indices must be int32, got {indices.dtype}")
    if indices.device != device:
        raise ValueError(f"{fn}: indices on {indices.device}, q on {device}")


def sparse_mla_prefill(q: torch.Tensor, kv: torch.Tensor, indices: torch.Tensor, sm_scale: float,
                       d_v: int = 512, *, kv_format: str = "bf16", config: dict | None = None,
                       backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, h, 576]; kv [S, 576] of q's dtype (kv_format "bf16") or the FP8 latent cache (kv_format "fp8",
    FlashMLA layout): uint8 [S, 656] or paged [num_blocks, page_size, 656], contiguous (index = row of the flattened
    cache); indices [T, topk] int32 rows of kv (-1 or >= S: skipped).

    Returns out [T, h, 512] in q.dtype and lse [T, h] fp32 (natural log); rows with no valid index give 0 / -inf.
    An FP8 cache is read straight from its 656-B rows (no dequantised copy). ``config`` overrides the launch
    parameters (keys of PREFILL_CFG / PREFILL_FP8_CFG; benchmarks sweep them).
    ``backend`` "gluon": the Hopper Gluon kernel (``gluon.py``: cp.async ring + wgmma) for kv_format "fp8" on
    sm_90 CUDA tensors; it has one launch, so ``config`` must then be None or empty. "triton": the Triton kernels
    (any GPU, and the CPU interpreter). "auto": "gluon" for an FP8 cache where it runs (sm_90 CUDA tensors, no
    interpreter, a 16-byte aligned cache, no ``config``: 8.7 ms against Triton's 10.1 for 20 heads, 8192 queries,
    top-k 2048 on the H200, run 77), else "triton". "dequant" (kv_format "fp8"): every row of the cache dequantised
    once into a q.dtype copy (``dequant_latent_rows``), then the bf16-cache kernel; it pays when each row is read
    several times (T * topk well above S) and the copy (S * 576 elements) fits in memory, as in a long prefill
    chunk (the engine's FP8-cache prefill does this over the sequence's context rows).
    """
    _check_q("sparse_mla_prefill", q, d_v)
    if kv_format not in ("bf16", "fp8"):
        raise ValueError(f"sparse_mla_prefill: kv_format must be 'bf16' or 'fp8', got {kv_format!r}")
    if backend not in ("auto", "triton", "gluon", "dequant"):
        raise ValueError(f"sparse_mla_prefill: backend must be 'auto', 'triton', 'gluon' or 'dequant', got "
                         f"{backend!r}")
    if backend in ("gluon", "dequant") and kv_format != "fp8":
        raise ValueError(f"sparse_mla_prefill: backend {backend!r} needs kv_format 'fp8', got {kv_format!r}")
    if kv_format == "fp8":
        return _prefill_fp8(q, kv, indices, sm_scale, d_v, config, backend)
    if kv.dim() != 2 or kv.shape[1] != LATENT_DIM:
        raise ValueError(f"sparse_mla_prefill: kv must be [S, {LATENT_DIM}], got shape {tuple(kv.shape)}")
    if kv.dtype != q.dtype:
        raise ValueError(f"sparse_mla_prefill: kv dtype {kv.dtype} differs from q dtype {q.dtype}")
    T, H, _ = q.shape
    _check_idx("sparse_mla_prefill", indices, T, q.device)
    if not use_triton(q):
        return sparse_mla_prefill_reference(q, kv, indices, sm_scale, d_v)
    from indexcache.kernels.sparse_mla.triton import _sparse_mla_prefill_kernel

    q = q if q.stride(-1) == 1 else q.contiguous()
    kv = kv if kv.stride(-1) == 1 else kv.contiguous()
    indices = indices.contiguous()
    out, lse = _prefill_outputs(q)
    if T == 0:
        return out, lse
    args = (q, kv, indices, out, lse, kv.shape[0], H, indices.shape[1], sm_scale * 1.4426950408889634,
            q.stride(0), q.stride(1), kv.stride(0), indices.stride(0), out.stride(0), out.stride(1))
    cfg, hb = _prefill_bf16_launch(H, kv.element_size(), config)
    _launch(_sparse_mla_prefill_kernel, (T, triton.cdiv(H, hb)), args, dict(HB=hb, UPCAST=interpreting()), cfg)
    return out, lse


def _prefill_outputs(q):
    """Uninitialised (out [T, h, 512] of q's dtype, lse [T, h] fp32) of a prefill launch."""
    T, H, _ = q.shape
    return (torch.empty((T, H, NOPE), dtype=q.dtype, device=q.device),
            torch.empty((T, H), dtype=torch.float32, device=q.device))


def _prefill_launch(H: int, cfg: dict, few_heads: dict, config: dict | None) -> tuple[dict, int]:
    """(launch parameters, heads per program): ``few_heads`` when a program holds at most 32 heads, ``config``
    overriding either."""
    cfg = few_heads if _hb(H, cfg["hb_max"]) <= 32 else cfg
    if config:
        cfg = {**cfg, **config}
    return cfg, _hb(H, cfg["hb_max"])


def _prefill_bf16_launch(H: int, itemsize: int, config: dict | None) -> tuple[dict, int]:
    """``_prefill_launch`` of the bf16-cache kernel for rows of ``itemsize``-byte elements (4: PREFILL_CFG_4BYTE)."""
    if itemsize == 4:
        return _prefill_launch(H, PREFILL_CFG_4BYTE, PREFILL_CFG_4BYTE, config)
    return _prefill_launch(H, PREFILL_CFG, PREFILL_CFG_FEW_HEADS, config)


def _prefill_fp8(q, kv, indices, sm_scale, d_v, config, backend="triton"):
    if kv.dim() not in (2, 3) or kv.shape[-1] != LATENT_FP8_BYTES or kv.dtype != torch.uint8:
        raise ValueError(f"sparse_mla_prefill: an fp8 kv must be uint8 [S, {LATENT_FP8_BYTES}] or [num_blocks, "
                         f"page_size, {LATENT_FP8_BYTES}], got shape {tuple(kv.shape)} {kv.dtype}")
    if not kv.is_contiguous():
        raise ValueError("sparse_mla_prefill: an fp8 kv must be contiguous (index = row of the flattened cache)")
    if kv.device != q.device:
        raise ValueError(f"sparse_mla_prefill: kv on {kv.device}, q on {q.device}")
    T, H, _ = q.shape
    _check_idx("sparse_mla_prefill", indices, T, q.device)
    flat = kv.view(-1, LATENT_FP8_BYTES)
    if backend == "dequant":
        rows = dequant_latent_rows(flat, torch.arange(flat.shape[0], device=q.device, dtype=torch.int32), q.dtype)
        return sparse_mla_prefill(q, rows, indices, sm_scale, d_v, config=config)
    if backend == "auto":
        backend = "gluon" if not config and _gluon_runs(q, flat) else "triton"
    if backend == "gluon":
        return _prefill_fp8_gluon(q, flat, indices, sm_scale, config)
    if not use_triton(q):
        return sparse_mla_prefill_reference(q, flat, indices, sm_scale, d_v, kv_format="fp8")
    from indexcache.kernels.sparse_mla import triton as tm

    q = q if q.stride(-1) == 1 else q.contiguous()
    indices = indices.contiguous()
    out, lse = _prefill_outputs(q)
    if T == 0:
        return out, lse
    cfg, hb = _prefill_launch(H, PREFILL_FP8_CFG, PREFILL_FP8_CFG_FEW_HEADS, config)
    args = (q, flat, flat.view(torch.float32), flat.view(torch.bfloat16), indices, out, lse, flat.shape[0], H,
            indices.shape[1], sm_scale * 1.4426950408889634, q.stride(0), q.stride(1), indices.stride(0),
            out.stride(0), out.stride(1))
    _launch(tm._sparse_mla_prefill_fp8_kernel, (T, triton.cdiv(H, hb)), args, dict(HB=hb, UPCAST=interpreting()),
            cfg, every_step=True)
    return out, lse


def dequant_latent_rows(cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FP8 latent rows by slot: cache uint8 [S, 656] or paged [num_blocks, page_size, 656] (contiguous), slots
    int [n] (-1 or >= S: a row of zeros) -> [n, 576] in ``dtype`` (c_kv dequantised | k_pe). The scales are powers
    of two, so bf16 / fp16 / fp32 rows hold the dequantised values exactly."""
    if cache.dtype != torch.uint8 or cache.shape[-1] != LATENT_FP8_BYTES or not cache.is_contiguous():
        raise ValueError(f"dequant_latent_rows: cache must be contiguous uint8 [..., {LATENT_FP8_BYTES}], got "
                         f"{tuple(cache.shape)} {cache.dtype}")
    if slots.dim() != 1 or slots.dtype not in (torch.int32, torch.int64) or slots.device != cache.device:
        raise ValueError(f"dequant_latent_rows: slots must be int32/int64 [n] on {cache.device}, got "
                         f"{tuple(slots.shape)} {slots.dtype} on {slots.device}")
    if dtype not in _FLOATS:
        raise ValueError(f"dequant_latent_rows: dtype must be bf16/fp16/fp32, got {dtype}")
    flat = cache.view(-1, LATENT_FP8_BYTES)
    S, n = flat.shape[0], slots.shape[0]
    if not use_triton(cache):
        valid = (slots >= 0) & (slots < S)
        rows = dequant_latent_fp8(flat[torch.where(valid, slots, 0).long()], dtype)
        return torch.where(valid[:, None], rows, torch.zeros((), dtype=dtype, device=cache.device))
    from indexcache.kernels.sparse_mla import triton as tm

    out = torch.empty((n, LATENT_DIM), dtype=dtype, device=cache.device)
    _gather_dequant(tm, flat, slots.contiguous(), out, None, DECODE_CFG["fp8"])
    return out


def _gather_dequant(tm, flat, slots, rows, idx_out, cfg):
    """rows[r] = the dequantised row of slot slots[r] (zeros for an invalid slot) over the flat FP8 cache; with
    ``idx_out``, also idx_out[r] = r or -1. ``cfg``: the dq_rows / dq_warps launch keys."""
    n = slots.numel()
    if n == 0:
        return
    r = cfg["dq_rows"]
    tm._fp8_gather_dequant_kernel[(triton.cdiv(n, r),)](
        flat, flat.view(torch.float32), flat.view(torch.bfloat16), slots, rows, rows if idx_out is None else idx_out,
        flat.shape[0], n, R=r, WRITE_IDX=idx_out is not None, num_warps=cfg["dq_warps"])


def _gluon_runs(q, flat) -> bool:
    """Whether the Gluon FP8 prefill can take these tensors (the checks ``_prefill_fp8_gluon`` makes)."""
    return (q.is_cuda and not interpreting() and torch.cuda.get_device_capability(q.device)[0] == 9
            and flat.data_ptr() % 16 == 0)


def _prefill_fp8_gluon(q, flat, indices, sm_scale, config):
    """The Gluon FP8 prefill (Hopper only: Gluon has no interpreter and the kernel is sm_90 wgmma)."""
    if config:
        raise ValueError(f"sparse_mla_prefill: backend 'gluon' takes no config keys (one launch), got "
                         f"{sorted(config, key=str)}")
    if not q.is_cuda or interpreting():
        raise ValueError(f"sparse_mla_prefill: backend 'gluon' needs CUDA tensors without TRITON_INTERPRET, got "
                         f"{q.device}")
    cap = torch.cuda.get_device_capability(q.device)
    if cap[0] != 9:
        raise ValueError(f"sparse_mla_prefill: backend 'gluon' needs a Hopper GPU (sm_90), got capability {cap}")
    if flat.data_ptr() % 16:
        raise ValueError(f"sparse_mla_prefill: backend 'gluon' needs the fp8 kv 16-byte aligned (16-byte row "
                         f"copies), got address {flat.data_ptr()} (offset {flat.data_ptr() % 16})")
    from indexcache.kernels.sparse_mla.gluon import sparse_mla_prefill_fp8_gluon

    q = q if q.stride(-1) == 1 else q.contiguous()
    indices = indices.contiguous()
    out, lse = _prefill_outputs(q)
    if q.shape[0] == 0 or q.shape[1] == 0:
        return out, lse
    return sparse_mla_prefill_fp8_gluon(q, flat, indices, out, lse, sm_scale)


def _decode_plan(B, H, topk, kv_format, num_splits, bt=None, itemsize=2):
    """(cfg, hb, nhb, chunk, ns) of one decode call; bt overrides the tile used to size splits; ``itemsize``: bytes
    of an element of q (4: ``DECODE_CFG_4BYTE``)."""
    cfg = (DECODE_CFG_4BYTE if itemsize == 4 else DECODE_CFG)[kv_format]
    hb = _hb(H, cfg["hb_max"])
    nhb = triton.cdiv(H, hb)
    if bt is None:
        bt = 16 if interpreting() else cfg["bt"]
    if num_splits is None:
        num_splits = max(1, min(triton.cdiv(topk, bt), triton.cdiv(cfg["target_programs"], B * nhb)))
    chunk = triton.cdiv(triton.cdiv(max(topk, 1), num_splits), bt) * bt
    ns = triton.cdiv(max(topk, 1), chunk)
    return cfg, hb, nhb, chunk, ns


def _ws_parts(B, H, topk, dtype, kv_format, ns):
    """Byte sizes of the scratch pieces: dequantised rows, their index list, split partials (o, lse)."""
    dq = kv_format == "fp8"
    n = B * topk
    split = ns > 1
    return [max(n, 1) * LATENT_DIM * dtype.itemsize if dq else 0, n * 4 if dq else 0,
            B * ns * H * 512 * 4 if split else 0, B * ns * H * 4 if split else 0]


def _align(n):
    return (n + _WS_ALIGN - 1) // _WS_ALIGN * _WS_ALIGN


def sparse_mla_decode_workspace_bytes(B: int, h: int, topk: int, *, dtype: torch.dtype = torch.bfloat16,
                                      kv_format: str = "bf16", num_splits: int | None = None) -> int:
    """Bytes of a uint8 `workspace` big enough for sparse_mla_decode with these settings (sized for the smallest
    token tile, so it stays big enough if a launch falls back to smaller tiles)."""
    _, _, _, _, ns = _decode_plan(B, h, topk, kv_format, num_splits, bt=16, itemsize=dtype.itemsize)
    return sum(_align(x) for x in _ws_parts(B, h, topk, dtype, kv_format, ns))


def sparse_mla_decode(q: torch.Tensor, cache: torch.Tensor, indices: torch.Tensor, sm_scale: float,
                      d_v: int = 512, *, kv_format: str = "bf16", num_splits: int | None = None,
                      workspace: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, h, 576]; cache [num_blocks, page_size, 576] (kv_format "bf16", dtype of q) or uint8
    [num_blocks, page_size, 656] ("fp8", FlashMLA layout); indices [B, topk] int32 global slot ids
    (block * page_size + offset), -1 = invalid. Returns out [B, h, 512] (q.dtype), lse [B, h] fp32 natural log.

    An FP8 cache is first gathered + dequantised (the selected rows, once each) into a [B, topk, 576] q.dtype
    scratch, then the bf16 attention runs over it. workspace: optional flat uint8 CUDA tensor of at least
    sparse_mla_decode_workspace_bytes(...) bytes for all scratch (rows, split partials), e.g. for CUDA graphs;
    without it the scratch comes from torch.empty on each call.
    """
    _check_q("sparse_mla_decode", q, d_v)
    if kv_format not in ("bf16", "fp8"):
        raise ValueError(f"sparse_mla_decode: kv_format must be 'bf16' or 'fp8', got {kv_format!r}")
    width = LATENT_FP8_BYTES if kv_format == "fp8" else LATENT_DIM
    if cache.dim() != 3 or cache.shape[-1] != width:
        raise ValueError(f"sparse_mla_decode: cache must be [num_blocks, page_size, {width}] for kv_format="
                         f"{kv_format!r}, got shape {tuple(cache.shape)}")
    if kv_format == "fp8" and cache.dtype != torch.uint8:
        raise ValueError(f"sparse_mla_decode: fp8 cache must be uint8, got {cache.dtype}")
    if kv_format == "bf16" and cache.dtype != q.dtype:
        raise ValueError(f"sparse_mla_decode: cache dtype {cache.dtype} differs from q dtype {q.dtype}")
    if not cache.is_contiguous():
        raise ValueError("sparse_mla_decode: cache must be contiguous (slot id = row of the flattened cache)")
    B, H, _ = q.shape
    _check_idx("sparse_mla_decode", indices, B, q.device)
    if workspace is not None and (workspace.dtype != torch.uint8 or workspace.dim() != 1
                                  or not workspace.is_contiguous() or workspace.device != q.device):
        raise ValueError("sparse_mla_decode: workspace must be a contiguous 1-D uint8 tensor on q's device")
    if not use_triton(q):
        return sparse_mla_decode_reference(q, cache, indices, sm_scale, d_v, kv_format=kv_format)
    from indexcache.kernels.sparse_mla import triton as tm

    q = q if q.stride(-1) == 1 else q.contiguous()
    indices = indices.contiguous()
    topk = indices.shape[1]
    S = cache.shape[0] * cache.shape[1]
    out = torch.empty((B, H, NOPE), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H), dtype=torch.float32, device=q.device)
    if B == 0:
        return out, lse
    cfg, hb, nhb, chunk, ns = _decode_plan(B, H, topk, kv_format, num_splits, itemsize=q.element_size())
    sizes = _ws_parts(B, H, topk, q.dtype, kv_format, ns)
    if workspace is not None and workspace.numel() < sum(_align(x) for x in sizes):
        raise ValueError(f"sparse_mla_decode: workspace has {workspace.numel()} bytes, needs "
                         f"{sum(_align(x) for x in sizes)} (sparse_mla_decode_workspace_bytes)")
    offs = [0]
    for x in sizes:
        offs.append(offs[-1] + _align(x))

    def scratch(i, shape, dtype):
        if workspace is None:
            return torch.empty(shape, dtype=dtype, device=q.device)
        return workspace[offs[i]:offs[i] + sizes[i]].view(dtype).view(shape)

    flat = cache.reshape(-1, cache.shape[-1])
    # head-major grid for the dequantised rows: the head blocks of one (batch, split) read them back to back
    head_major = kv_format == "fp8"
    if head_major:
        n = B * topk
        rows = scratch(0, (max(n, 1), LATENT_DIM), q.dtype)
        idx2 = scratch(1, (B, topk), torch.int32)
        _gather_dequant(tm, flat, indices, rows, idx2, cfg)
        flat, indices, S = rows, idx2, n
    kw = dict(HB=hb, UPCAST=interpreting(), HEAD_MAJOR=head_major)
    tail = (S, H, topk, chunk, sm_scale * 1.4426950408889634, q.stride(0), q.stride(1), flat.stride(0),
            indices.stride(0), ns)
    def grid(nsplit):
        return (nhb, nsplit, B) if head_major else (B, nsplit, nhb)

    if ns == 1:
        _launch(tm._sparse_mla_decode_kernel, grid(1), (q, flat, indices, out, lse, *tail), dict(DIRECT=True, **kw),
                cfg, every_step=head_major)
        return out, lse
    part_o = scratch(2, (B, ns, H, NOPE), torch.float32)
    part_l = scratch(3, (B, ns, H), torch.float32)
    _launch(tm._sparse_mla_decode_kernel, grid(ns), (q, flat, indices, part_o, part_l, *tail),
            dict(DIRECT=False, **kw), cfg, every_step=head_major)
    tm._combine_kernel[(B, H)](part_o, part_l, out, lse, H, ns, NSP=triton.next_power_of_2(ns), num_warps=4)
    return out, lse

