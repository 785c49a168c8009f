"""Build this rank's shard straight from a checkpoint: the model is made on the meta device, sharded, and each
tensor is read through ``safe_open(...).get_slice`` so a rank reads only its slices (FP8 weights in whole
128x128 blocks with their scales). Presets small enough to build whole are built whole and sliced (the same
weights as TP=1); larger presets get random shards, with replicated weights broadcast from rank 0."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

from ..checkpoint import CheckpointError, checkpoint_files, dequantize_fp8_blocks, load_model
from ..config import ConfigError, ModelConfig
from ..model import DSAModel
from ..presets import preset_config, preset_names
from ..progress import Progress
from .comm import broadcast_
from .context import ParallelContext, ParallelError
from .plan import Shard, check_divisible, local_experts, param_shard
from .shard import shard_model

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
                 index_pattern=None, seed: int = 0, progress: bool | None = None) -> tuple[DSAModel, LoadReport]:
    """This rank's shard of a checkpoint folder or preset, on ``ctx.device``, and what loading it read."""
    is_dir = os.path.isdir(path_or_preset)
    if is_dir:
        cfg = ModelConfig.from_checkpoint(path_or_preset)
    elif path_or_preset in preset_names():
        cfg = preset_config(path_or_preset)
    else:
        raise ConfigError(f"{path_or_preset!r} is neither a checkpoint folder nor a preset "
                          f"({', '.join(preset_names())})")
    if index_pattern is not None:
        cfg = cfg.with_pattern(index_pattern)
    check_divisible(cfg, ctx)
    if not is_dir:
        return _preset_shard(path_or_preset, cfg, ctx, dtype, index_pattern, seed)
    model = _empty_shard(cfg, ctx, dtype)
    report = _read_slices(model, path_or_preset, ctx, progress)
    return model.eval(), report


def _empty_shard(cfg: ModelConfig, ctx: ParallelContext, dtype: torch.dtype) -> DSAModel:
    with torch.device("meta"):
        model = shard_model(DSAModel(cfg), ctx)
    model.to_empty(device=ctx.device)
    for name, p in model.named_parameters():
        if not name.endswith("indexer.weights_proj.weight"):  # kept fp32 like the references
            p.data = p.data.to(dtype)
    model.rotary.reset(ctx.device)
    return model


def _preset_shard(name, cfg, ctx, dtype, index_pattern, seed):
    with torch.device("meta"):
        full_bytes = sum(p.numel() for p in DSAModel(cfg).parameters()) * torch.finfo(dtype).bits // 8
    if full_bytes <= _WHOLE_PRESET_BYTES:
        model = load_model(name, device=ctx.device, dtype=dtype, index_pattern=index_pattern, seed=seed)
        return shard_model(model, ctx), LoadReport(ctx.rank, 0, 0, 0, 0)
    return random_shard(cfg, ctx, dtype, seed), LoadReport(ctx.rank, 0, 0, 0, 0)


def random_shard(cfg: ModelConfig, ctx: ParallelContext, dtype: torch.dtype, seed: int = 0) -> DSAModel:
    """This rank's shard with random weights, never building the whole model (benchmarks of full-size presets):
    split weights are drawn per rank, replicated ones broadcast from rank 0 so that every rank holds the same."""
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
                pname, dst, shard = target
                scale_key = key + "_scale_inv" if key + "_scale_inv" in keys else None
                t, n = read_slice(h, key, shard, scale_key, cfg.fp8_block_size or (128, 128), ctx)
                nbytes += n
                ntensors += 1
                if tuple(t.shape) != tuple(dst.shape):
                    problems.append(f"{key}: slice {tuple(t.shape)} vs model {tuple(dst.shape)}")
                    continue
                dst.copy_(t.to(dst.dtype))
                filled.add(pname)
    missing = expected - {p.split("#")[0] for p in filled}
    missing |= _missing_experts(filled, cfg, e0, e1)
    if missing:
        problems.append(f"{len(missing)} missing: " + ", ".join(sorted(missing)[:20]))
    if problems:
        raise CheckpointError(f"checkpoint {path!r} does not match its config (rank {ctx.rank}):\n  "
                              + "\n  ".join(problems[:40]))
    return LoadReport(ctx.rank, nbytes, sum(os.path.getsize(f) for f in files), ntensors, skipped)


def _target(name, cfg, ctx, params, e0, e1, inter):
    """(slot name, destination view, shard of the checkpoint tensor) for checkpoint tensor ``name``; "skip" for
    another rank's expert; None when the model has no such tensor."""
    m = _EXPERT.match(name)
    if m:
        layer, e, part = int(m.group(1)), int(m.group(2)), m.group(3)
        if e >= cfg.n_routed_experts:
            return None
        if not e0 <= e < e1:
            return "skip"
        prefix = f"layers.{layer}.mlp.experts."
        pname = prefix + ("down" if part == "down_proj" else "gate_up")
        dst = params.get(pname)
        if dst is None:
            return None
        full_inter = cfg.moe_intermediate_size
        a, b = (0, full_inter) if ctx.expert_parallel or ctx.is_single else ctx.even_range(full_inter, "moe_intermediate_size")
        if part == "down_proj":
            return f"{pname}#{e}.{part}", dst[e - e0], Shard(1, ((a, b),))
        half = slice(0, inter) if part == "gate_proj" else slice(inter, 2 * inter)
        return f"{pname}#{e}.{part}", dst[e - e0, half], Shard(0, ((a, b),))
    m = _PACKED.match(name)
    if m:  # transformers' layout: gate_up_proj [E, 2I, D], down_proj [E, D, I], like ours
        pname = f"layers.{m.group(1)}.mlp.experts." + ("gate_up" if m.group(2) == "gate_up_proj" else "down")
        dst = params.get(pname)
        return None if dst is None else (pname, dst, param_shard(pname, cfg, ctx))
    dst = params.get(name)
    return None if dst is None else (name, dst, param_shard(name, cfg, ctx))


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


def read_slice(handle, key: str, shard: Shard | None, scale_key: str | None, block: tuple[int, int],
               ctx: ParallelContext) -> tuple[torch.Tensor, int]:
    """The ``shard`` of tensor ``key`` (whole when None) and the bytes read. FP8 weights (``scale_key`` set) are
    read in whole blocks with the matching rows/columns of their scales and dequantised to fp32."""
    sl = handle.get_slice(key)
    shape = sl.get_shape()
    if shard is None:
        t = sl[tuple(slice(None) for _ in shape)]
        parts = [(t, None)]
        if scale_key is not None:
            parts = [(t, handle.get_tensor(scale_key))]
    else:
        if scale_key is not None and len(shape) != 2:
            raise CheckpointError(f"{key}: FP8 block scales on a {len(shape)}-D tensor cannot be sharded")
        parts = []
        for a, b in shard.ranges:
            index = [slice(None)] * len(shape)
            index[shard.dim] = slice(a, b)
            t = sl[tuple(index)]
            s = None
            if scale_key is not None:
                bs = block[shard.dim]
                if a % bs or (b % bs and b != shape[shard.dim]):
                    raise ParallelError(
                        f"{key}: rank {ctx.rank}'s slice [{a}, {b}) of dim {shard.dim} (size {shape[shard.dim]}) "
                        f"does not fall on {bs}-wide FP8 block boundaries at tensor-parallel size {ctx.world_size}")
                sidx = [slice(None)] * 2
                sidx[shard.dim] = slice(a // bs, -(-b // bs))
                s = handle.get_slice(scale_key)[tuple(sidx)]
            parts.append((t, s))
    nbytes = sum(t.numel() * t.element_size() + (0 if s is None else s.numel() * s.element_size()) for t, s in parts)
    tensors = [t if s is None else dequantize_fp8_blocks(t, s, block) for t, s in parts]
    out = tensors[0] if len(tensors) == 1 else torch.cat(tensors, shard.dim)
    return out, nbytes
