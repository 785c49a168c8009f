"""Build this rank's shard straight from a checkpoint: the model is made on the meta device, sharded, and each
tensor is read through ``safe_open(...).get_slice`` so a rank reads only its slices (FP8 weights in whole
128x128 blocks with their scales). Presets small enough to build whole are built whole and sliced (the same
weights as TP=1); larger presets get random shards, with replicated weights broadcast from rank 0."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from ..checkpoint import (CheckpointError, checkpoint_files, checkpoint_is_fp8, dequantize_fp8_blocks, load_model,
                          quantize_fp8_blocks, resolve_config)
from ..config import ModelConfig
from ..kernels.fp8_linear.reference import BLOCK, FP8
from ..model import DSAModel
from ..model.linear import resolve_weight_dtype
from ..progress import Progress
from .comm import broadcast_
from .context import ParallelContext, ParallelError
from .plan import Shard, check_divisible, local_experts, param_shard
from .shard import shard_model, use_fp8_shard_storage

_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_PACKED = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_LAYER = re.compile(r"^layers\.(\d+)\.")
_WHOLE_PRESET_BYTES = 2 << 30  # presets up to this size are built whole on every rank, then sliced


@dataclass
class LoadReport:
    rank: int
    bytes_read: int          # tensor bytes this rank read from the files (FP8 weights and scales as stored)
    bytes_in_files: int      # size of the checkpoint's safetensors files
    tensors_read: int
    tensors_skipped: int     # other ranks' experts, shared layers' indexers, layers past num_layers


def load_sharded(path_or_preset: str, ctx: ParallelContext, *, dtype: torch.dtype = torch.float32,
                 index_pattern=None, seed: int = 0, progress: bool | None = None,
                 weight_dtype: str = "auto") -> tuple[DSAModel, LoadReport]:
    """This rank's shard of a checkpoint folder or preset, on ``ctx.device``, and what loading it read.
    ``weight_dtype`` as for ``load_model``: FP8 storage keeps the checkpoint's FP8 blocks of this rank's slices
    as they are (no dequantise / requantise)."""
    cfg, is_dir = resolve_config(path_or_preset, index_pattern)
    check_divisible(cfg, ctx)
    if cfg.fp8_block_size not in (None, (BLOCK, BLOCK)):
        raise CheckpointError(f"FP8 weight_block_size {list(cfg.fp8_block_size)} is not supported "
                              f"(only {BLOCK}x{BLOCK})")
    fp8 = resolve_weight_dtype(weight_dtype, ctx.device, is_dir and checkpoint_is_fp8(path_or_preset))
    if not is_dir:
        model = _preset_shard(path_or_preset, cfg, ctx, dtype, index_pattern, seed)
        if fp8:
            use_fp8_shard_storage(model, quantize=True)
        return model, LoadReport(ctx.rank, 0, 0, 0, 0)
    model = _empty_shard(cfg, ctx, dtype, fp8)
    report = _read_slices(model, path_or_preset, ctx, progress)
    return model.eval(), report


def _empty_shard(cfg: ModelConfig, ctx: ParallelContext, dtype: torch.dtype, fp8: bool = False) -> DSAModel:
    with torch.device("meta"):
        model = shard_model(DSAModel(cfg), ctx)
        if fp8:  # FP8 storage in the shard's own shapes
            use_fp8_shard_storage(model, quantize=False)
    model.to_empty(device=ctx.device)
    for name, p in model.named_parameters():
        if not name.endswith("indexer.weights_proj.weight") and p.dtype != FP8:  # kept fp32 like the references
            p.data = p.data.to(dtype)
    model.rotary.reset(ctx.device)
    return model


def _preset_shard(name, cfg, ctx, dtype, index_pattern, seed) -> DSAModel:
    with torch.device("meta"):
        full_bytes = sum(p.numel() for p in DSAModel(cfg).parameters()) * torch.finfo(dtype).bits // 8
    if full_bytes <= _WHOLE_PRESET_BYTES:
        model = load_model(name, device=ctx.device, dtype=dtype, index_pattern=index_pattern, seed=seed,
                           weight_dtype="bf16")
        return shard_model(model, ctx)
    return random_shard(cfg, ctx, dtype, seed)


def random_shard(cfg: ModelConfig, ctx: ParallelContext, dtype: torch.dtype, seed: int = 0) -> DSAModel:
    """This rank's shard with random weights, never building the whole model (benchmarks of full-size presets):
    split weights are drawn per rank, replicated ones broadcast from rank 0 so that every rank holds the same.
    (``use_fp8_shard_storage(model, quantize=True)`` after it gives the FP8 form.)"""
    check_divisible(cfg, ctx)
    model = _empty_shard(cfg, ctx, dtype).init_random(seed + 1000 * ctx.rank)
    with torch.no_grad():
        for pname, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not pname.startswith("rotary.") and param_shard(pname, cfg, ctx) is None:
                broadcast_(t.data, ctx)
    return model.eval()


@torch.no_grad()
def _read_slices(model: DSAModel, path: str, ctx: ParallelContext, progress) -> LoadReport:
    from safetensors import safe_open

    cfg = model.config
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    e0, e1 = local_experts(cfg, ctx)
    moe = [layer.mlp for layer, kind in zip(model.layers, cfg.mlp_layer_types) if kind == "sparse"]
    inter = moe[0].experts.inter if moe else 0  # this rank's intermediate size per expert
    expected = {n for n in params if not n.startswith("rotary.")
                and not (n == "lm_head.weight" and cfg.tie_word_embeddings)}
    filled, problems = set(), []
    nbytes = ntensors = skipped = 0
    files = checkpoint_files(path)
    handles = [safe_open(f, framework="pt", device="cpu") for f in files]
    total = sum(len(h.keys()) for h in handles)
    label = f"rank {ctx.rank}: loading {os.path.basename(os.path.normpath(path))}"
    with Progress(total, label, " tensors", progress if ctx.rank == 0 else False) as bar:
        for h in handles:
            keys = set(h.keys())
            for key in sorted(keys):
                bar.update()
                if key.endswith("_scale_inv"):
                    continue
                name = key[len("model."):] if key.startswith("model.") else key
                m = _LAYER.match(name)
                if m and (int(m.group(1)) >= cfg.num_layers or
                          (".self_attn.indexer." in name and not cfg.pattern.is_full(int(m.group(1))))):
                    skipped += 1
                    continue
                target = _target(name, cfg, ctx, params, e0, e1, inter)
                if target is None:
                    problems.append(f"unexpected tensor {key}")
                    continue
                if target == "skip":
                    skipped += 1
                    continue
                slot, dst, scale_dst, shard = target
                scale_key = key + "_scale_inv" if key + "_scale_inv" in keys else None
                keep_fp8 = scale_dst is not None and scale_key is not None  # FP8 blocks copied as they are
                t, s, n = read_slice(h, key, shard, scale_key, ctx, dequantize=not keep_fp8)
                nbytes += n
                ntensors += 1
                if scale_dst is not None and s is None:  # a bf16 checkpoint into FP8 storage: quantise the slice
                    t, s = quantize_fp8_blocks(t.float())
                bad = [f"{key}: slice {tuple(x.shape)} vs model {tuple(y.shape)}"
                       for x, y in ((t, dst), (s, scale_dst)) if y is not None and tuple(x.shape) != tuple(y.shape)]
                if bad:
                    problems += bad
                    continue
                dst.copy_(t.to(dst.dtype))
                filled.add(slot)
                if scale_dst is not None:
                    scale_dst.copy_(s)
                    filled.add(slot.replace("#", "_scale_inv#") if "#" in slot else slot + "_scale_inv")
    missing = expected - {p.split("#")[0] for p in filled}
    missing |= _missing_experts(filled, cfg, e0, e1)
    if missing:
        problems.append(f"{len(missing)} missing: " + ", ".join(sorted(missing)[:20]))
    if problems:
        raise CheckpointError(f"checkpoint {path!r} does not match its config (rank {ctx.rank}):\n  "
                              + "\n  ".join(problems[:40]))
    return LoadReport(ctx.rank, nbytes, sum(os.path.getsize(f) for f in files), ntensors, skipped)


def _target(name, cfg, ctx, params, e0, e1, inter):
    """(slot name, destination view, its FP8 scale view or None, shard of the checkpoint tensor) for checkpoint
    tensor ``name``; "skip" for another rank's expert; None when the model has no such tensor."""
    m = _EXPERT.match(name)
    if m:
        layer, e, part = int(m.group(1)), int(m.group(2)), m.group(3)
        if e >= cfg.n_routed_experts:
            return None
        if not e0 <= e < e1:
            return "skip"
        pname = f"layers.{layer}.mlp.experts." + ("down" if part == "down_proj" else "gate_up")
        dst, scales = params.get(pname), params.get(pname + "_scale_inv")
        if dst is None:
            return None
        full = cfg.moe_intermediate_size
        a, b = (0, full) if ctx.expert_parallel or ctx.is_single else ctx.even_range(full, "moe_intermediate_size")
        slot = f"{pname}#{e}.{part}"
        if part == "down_proj":
            return slot, dst[e - e0], None if scales is None else scales[e - e0], Shard(1, ((a, b),))
        ib = -(-inter // BLOCK)  # FP8 scales hold gate's row blocks, then up's
        half, shalf = (slice(0, inter), slice(0, ib)) if part == "gate_proj" else (slice(inter, 2 * inter),
                                                                                   slice(ib, 2 * ib))
        return slot, dst[e - e0, half], None if scales is None else scales[e - e0, shalf], Shard(0, ((a, b),))
    m = _PACKED.match(name)
    if m:  # transformers' layout: gate_up_proj [E, 2I, D], down_proj [E, D, I], like ours
        pname = f"layers.{m.group(1)}.mlp.experts." + ("gate_up" if m.group(2) == "gate_up_proj" else "down")
        dst = params.get(pname)
        if dst is not None and dst.dtype == FP8:
            raise CheckpointError(f"{name}: packed expert tensors cannot be loaded into FP8 storage; "
                                  "use weight_dtype='bf16'")
        return None if dst is None else (pname, dst, None, param_shard(pname, cfg, ctx))
    dst = params.get(name)
    scales = params.get(name + "_scale_inv") if dst is not None and dst.dtype == FP8 else None
    return None if dst is None else (name, dst, scales, param_shard(name, cfg, ctx))


def _missing_experts(filled: set, cfg: ModelConfig, e0: int, e1: int) -> set:
    """Expert slots never filled, per expert and part (a packed tensor fills a whole slot at once)."""
    missing = set()
    for layer, kind in enumerate(cfg.mlp_layer_types):
        if kind != "sparse":
            continue
        for pname, parts in ((f"layers.{layer}.mlp.experts.gate_up", ("gate_proj", "up_proj")),
                             (f"layers.{layer}.mlp.experts.down", ("down_proj",))):
            if pname in filled:
                continue
            missing |= {f"layers.{layer}.mlp.experts.{e}.{p}" for e in range(e0, e1) for p in parts
                        if f"{pname}#{e}.{p}" not in filled}
    return missing


def read_slice(handle, key: str, shard: Shard | None, scale_key: str | None, ctx: ParallelContext,
               dequantize: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(the ``shard`` of tensor ``key`` (whole when None), its FP8 scales or None, bytes read). FP8 weights
    (``scale_key`` set) are read in whole 128x128 blocks with the matching rows/columns of their scales, and
    dequantised to fp32 unless ``dequantize`` is False."""
    sl = handle.get_slice(key)
    shape = sl.get_shape()
    if scale_key is not None and len(shape) != 2:
        raise CheckpointError(f"{key}: FP8 block scales are supported on 2-D weights only, got shape {shape}")
    if shard is None:  # replicated: the whole tensor (and its whole scales)
        t = handle.get_tensor(key)
        parts = [(t, None if scale_key is None else handle.get_tensor(scale_key))]
        ranges, dim = (), 0
    else:
        parts, ranges, dim = [], shard.ranges, shard.dim
    for a, b in ranges:
        index = [slice(None)] * len(shape)
        index[dim] = slice(a, b)
        t, s = sl[tuple(index)], None
        if scale_key is not None:
            if a % BLOCK or (b % BLOCK and b != shape[dim]):
                raise ParallelError(
                    f"{key}: rank {ctx.rank}'s slice [{a}, {b}) of dim {dim} (size {shape[dim]}) does not fall on "
                    f"{BLOCK}-wide FP8 block boundaries at tensor-parallel size {ctx.world_size}")
            sidx = [slice(None)] * 2
            sidx[dim] = slice(a // BLOCK, -(-b // BLOCK))
            s = handle.get_slice(scale_key)[tuple(sidx)]
        parts.append((t, s))
    nbytes = sum(t.numel() * t.element_size() + (0 if s is None else s.numel() * s.element_size()) for t, s in parts)
    if dequantize:
        parts = [(t if s is None else dequantize_fp8_blocks(t, s), None) for t, s in parts]
    t = torch.cat([p[0] for p in parts], dim) if len(parts) > 1 else parts[0][0]
    s = None if parts[0][1] is None else (torch.cat([p[1] for p in parts], dim) if len(parts) > 1 else parts[0][1])
    return t, s, nbytes
