"""Loading and saving checkpoints: a folder with config.json and *.safetensors (one file or sharded with
model.safetensors.index.json), bf16/fp32 weights or DeepSeek-style FP8 e4m3 weights with 128x128 block scales
(``weight_scale_inv``), dequantised on load. Names follow the Hugging Face layout of both DSA families."""
from __future__ import annotations

import json
import os
import re

import torch

from .config import ConfigError, ModelConfig
from .model import DSAModel
from .presets import preset_config, preset_names
from .progress import Progress

_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_PACKED = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_LAYER = re.compile(r"^layers\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint whose tensors do not match the model built from its config.json."""


def load_model(path_or_preset: str, *, device="cpu", dtype: torch.dtype = torch.float32, index_pattern=None,
               seed: int = 0, progress: bool | None = None) -> DSAModel:
    """Build a DSA model from a checkpoint folder (or a preset name, with random weights from ``seed``).

    ``index_pattern`` (an F/S string, an IndexPattern, "1/N" or a list of indexer types) overrides the
    pattern keys of config.json. Shared layers get no indexer and their indexer weights are skipped.
    """
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
    model = build_empty(cfg, device, dtype)
    if is_dir:
        load_weights(model, path_or_preset, progress=progress)
    else:
        model.init_random(seed)
    return model.eval()


def build_empty(cfg: ModelConfig, device, dtype: torch.dtype) -> DSAModel:
    """The model with uninitialised storage on ``device`` (no time spent on random init)."""
    with torch.device("meta"):
        model = DSAModel(cfg)
    model.to_empty(device=device)
    for name, p in model.named_parameters():
        if not name.endswith("indexer.weights_proj.weight"):  # kept fp32 like the references
            p.data = p.data.to(dtype)
    model.rotary.reset(device)
    return model


def checkpoint_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise CheckpointError(f"{index} lists shard files that do not exist: {missing}")
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {path!r}")
    return [os.path.join(path, f) for f in files]


@torch.no_grad()
def load_weights(model: DSAModel, path: str, *, progress: bool | None = None) -> dict:
    """Copy every tensor of the checkpoint into ``model``; one error lists all problems. Returns counts."""
    from safetensors import safe_open

    cfg = model.config
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    expected = _expected_slots(model)
    filled: set = set()
    unexpected, bad_shape = [], []
    skipped = {"shared_indexer": 0, "beyond_num_layers": 0}
    handles = [safe_open(f, framework="pt", device="cpu") for f in checkpoint_files(path)]
    total = sum(len(h.keys()) for h in handles)
    with Progress(total, f"loading {os.path.basename(os.path.normpath(path))}", " tensors", progress) as bar:
        for h in handles:
            keys = set(h.keys())
            for key in sorted(keys):
                bar.update()
                if key.endswith("_scale_inv"):
                    if key[: -len("_scale_inv")] not in keys:
                        unexpected.append(key)
                    continue
                name = key[len("model."):] if key.startswith("model.") else key
                m = _LAYER.match(name)
                if m and int(m.group(1)) >= cfg.num_layers:
                    skipped["beyond_num_layers"] += 1  # MTP / next-n layers are not served here
                    continue
                if m and ".self_attn.indexer." in name and not cfg.pattern.has_indexer(int(m.group(1))):
                    skipped["shared_indexer"] += 1
                    continue
                tensor = h.get_tensor(key)
                if key + "_scale_inv" in keys:
                    tensor = dequantize_fp8_blocks(tensor, h.get_tensor(key + "_scale_inv"))
                _place(name, tensor, params, cfg, filled, unexpected, bad_shape)
    missing = sorted(expected - filled, key=str)
    if missing or unexpected or bad_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: " + ", ".join(map(_slot_str, missing[:20]))
                         + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: " + ", ".join(unexpected[:20])
                         + (" ..." if len(unexpected) > 20 else ""))
        if bad_shape:
            parts.append(f"{len(bad_shape)} wrongly shaped: " + "; ".join(bad_shape[:20]))
        raise CheckpointError(f"checkpoint {path!r} does not match its config:\n  " + "\n  ".join(parts))
    return {"tensors": total, **skipped}


def _place(name, tensor, params, cfg, filled, unexpected, bad_shape):
    m = _EXPERT.match(name)
    if m:
        layer, e, part = int(m.group(1)), int(m.group(2)), m.group(3)
        inter = cfg.moe_intermediate_size
        if e >= cfg.n_routed_experts:
            unexpected.append(name)
            return
        if part == "down_proj":
            target, dst = f"layers.{layer}.mlp.experts.down", params.get(f"layers.{layer}.mlp.experts.down")
            view = None if dst is None else dst[e]
        else:
            target = f"layers.{layer}.mlp.experts.gate_up"
            dst = params.get(target)
            half = slice(0, inter) if part == "gate_proj" else slice(inter, 2 * inter)
            view = None if dst is None else dst[e, half]
        if view is None:
            unexpected.append(name)
            return
        filled.add((target, e, part))  # a wrong shape is reported once, as wrongly shaped, not also as missing
        if tuple(view.shape) != tuple(tensor.shape):
            bad_shape.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(view.shape)}")
            return
        view.copy_(tensor.to(view.dtype))
        return
    m = _PACKED.match(name)
    if m:  # transformers' in-memory layout: gate_up_proj [E, 2I, D], down_proj [E, D, I]
        layer, kind = int(m.group(1)), m.group(2)
        target = f"layers.{layer}.mlp.experts." + ("gate_up" if kind == "gate_up_proj" else "down")
        parts = ("gate_proj", "up_proj") if kind == "gate_up_proj" else ("down_proj",)
        if params.get(target) is not None:
            filled.update((target, e, p) for e in range(cfg.n_routed_experts) for p in parts)
        _copy(name, tensor, params.get(target), unexpected, bad_shape)
        return
    if params.get(name) is not None:
        filled.add(name)
    _copy(name, tensor, params.get(name), unexpected, bad_shape)


def _copy(name, tensor, dst, unexpected, bad_shape) -> bool:
    if dst is None:
        unexpected.append(name)
        return False
    if tuple(dst.shape) != tuple(tensor.shape):
        bad_shape.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(dst.shape)}")
        return False
    dst.copy_(tensor.to(dst.dtype))
    return True


def _expected_slots(model: DSAModel) -> set:
    cfg = model.config
    slots = set()
    for name, _ in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith("rotary."):
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name.endswith("mlp.experts.gate_up"):
            slots.update((name, e, p) for e in range(cfg.n_routed_experts) for p in ("gate_proj", "up_proj"))
        elif name.endswith("mlp.experts.down"):
            slots.update((name, e, "down_proj") for e in range(cfg.n_routed_experts))
        else:
            slots.add(name)
    return slots


def _slot_str(slot) -> str:
    if isinstance(slot, tuple):
        name, e, part = slot
        return f"{name.rsplit('.', 1)[0]}.{e}.{part}.weight"
    return slot


# ----- FP8 block quantisation ------------------------------------------------------------------------------------
def dequantize_fp8_blocks(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)):
    """W = fp8 * scale_inv[i // 128, j // 128] (DeepSeek's ``weight_dequant``), returned in fp32."""
    if w.dim() != 2 or scale_inv.dim() != 2:
        raise CheckpointError(f"FP8 block dequantisation needs 2-D tensors, got {tuple(w.shape)} and "
                              f"{tuple(scale_inv.shape)}")
    bm, bn = block
    rows, cols = -(-w.shape[0] // bm), -(-w.shape[1] // bn)
    if tuple(scale_inv.shape) != (rows, cols):
        raise CheckpointError(f"weight_scale_inv shape {tuple(scale_inv.shape)} does not fit a weight of shape "
                              f"{tuple(w.shape)} in {bm}x{bn} blocks (expected {(rows, cols)})")
    s = scale_inv.float().repeat_interleave(bm, 0)[: w.shape[0]].repeat_interleave(bn, 1)[:, : w.shape[1]]
    return w.float() * s


def quantize_fp8_blocks(w: torch.Tensor, block: tuple[int, int] = (128, 128)):
    """The inverse, as DeepSeek's checkpoints are made: per block amax / 448 -> (fp8 e4m3 weight, scale_inv)."""
    bm, bn = block
    rows, cols = -(-w.shape[0] // bm), -(-w.shape[1] // bn)
    padded = torch.zeros(rows * bm, cols * bn, dtype=torch.float32)
    padded[: w.shape[0], : w.shape[1]] = w.float()
    blocks = padded.view(rows, bm, cols, bn)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).view(rows * bm, cols * bn)[: w.shape[0], : w.shape[1]]
    return q.to(torch.float8_e4m3fn), scale


# ----- saving ----------------------------------------------------------------------------------------------------
def hf_state_dict(model: DSAModel) -> dict[str, torch.Tensor]:
    """The model's tensors under Hugging Face names, experts split per expert (what both families ship)."""
    cfg = model.config
    out = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith("rotary.") or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        t = t.detach().cpu().contiguous()
        prefix = "" if name.startswith("lm_head.") else "model."
        if name.endswith("mlp.experts.gate_up"):
            base = prefix + name.rsplit(".", 1)[0]
            inter = cfg.moe_intermediate_size
            for e in range(t.shape[0]):
                out[f"{base}.{e}.gate_proj.weight"] = t[e, :inter].clone()
                out[f"{base}.{e}.up_proj.weight"] = t[e, inter:].clone()
        elif name.endswith("mlp.experts.down"):
            base = prefix + name.rsplit(".", 1)[0]
            for e in range(t.shape[0]):
                out[f"{base}.{e}.down_proj.weight"] = t[e].clone()
        else:
            out[prefix + name] = t
    return out


def save_checkpoint(model: DSAModel, path: str, *, max_shard_bytes: int | None = None,
                    dtype: torch.dtype | None = None, extra_config: dict | None = None) -> list[str]:
    """Write config.json and safetensors (sharded with an index file when ``max_shard_bytes`` is given)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    cfg_dict = model.config.to_hf_dict()
    cfg_dict.update(extra_config or {})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg_dict, f, indent=2)
    tensors = hf_state_dict(model)
    if dtype is not None:
        tensors = {k: (v.to(dtype) if v.is_floating_point() and not k.endswith("e_score_correction_bias") else v)
                   for k, v in tensors.items()}
    shards, cur, size = [], {}, 0
    for k in sorted(tensors):
        nbytes = tensors[k].numel() * tensors[k].element_size()
        if max_shard_bytes and cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = tensors[k]
        size += nbytes
    shards.append(cur)
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {k: n for n, s in zip(names, shards) for k in s}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                       "weight_map": weight_map}, f, indent=1)
    for n, s in zip(names, shards):
        save_file(s, os.path.join(path, n), metadata={"format": "pt"})
    return [os.path.join(path, n) for n in names]
