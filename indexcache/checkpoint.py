"""Loading and saving checkpoints: a folder with config.json and *.safetensors (one file or sharded with
model.safetensors.index.json), bf16/fp32 weights or DeepSeek-style FP8 e4m3 weights with 128x128 block scales
(``weight_scale_inv``), kept in FP8 or dequantised on load (``weight_dtype``). Names follow the Hugging Face layout
of both DSA families."""
from __future__ import annotations

import json
import os
import re

import torch

from .config import ConfigError, ModelConfig
from .kernels.fp8_linear import FP8, dequantize_weight, quantize_weight
from .model import DSAModel
from .model.linear import is_fp8_model, resolve_weight_dtype, use_fp8_storage
from .presets import preset_config, preset_names
from .progress import Progress

_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_PACKED = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_LAYER = re.compile(r"^layers\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint whose tensors do not match the model built from its config.json."""


def resolve_config(path_or_preset: str, index_pattern=None) -> tuple[ModelConfig, bool]:
    """(the model's config with ``index_pattern`` applied, whether it is a checkpoint folder) for a checkpoint
    folder or a preset name."""
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
    return cfg, is_dir


def load_model(path_or_preset: str, *, device="cpu", dtype: torch.dtype = torch.float32, index_pattern=None,
               seed: int = 0, progress: bool | None = None, weight_dtype: str = "auto") -> DSAModel:
    """Build a DSA model from a checkpoint folder (or a preset name, with random weights from ``seed``).

    ``index_pattern`` (an F/S string, an IndexPattern, "1/N" or a list of indexer types) overrides the
    pattern keys of config.json. Shared layers get no indexer and their indexer weights are skipped.
    ``weight_dtype``: "fp8" keeps the linear and expert weights in FP8 e4m3 with 128x128 block scales (an FP8
    checkpoint's as they are, others quantised; see model/linear.py for which stay in ``dtype``), "bf16"
    dequantises to ``dtype``, "auto" keeps an FP8 checkpoint in FP8 where the GPU has the block-scaled FP8 GEMM
    (presets count as bf16 checkpoints: "auto" builds them in ``dtype``).
    """
    cfg, is_dir = resolve_config(path_or_preset, index_pattern)
    fp8 = resolve_weight_dtype(weight_dtype, device, is_dir and checkpoint_is_fp8(path_or_preset))
    if is_dir:
        model = build_empty(cfg, device, dtype, fp8=fp8)
        load_weights(model, path_or_preset, progress=progress)
    else:
        model = build_empty(cfg, device, dtype)
        model.init_random(seed)
        if fp8:
            use_fp8_storage(model, quantize=True)
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()  # the bf16 weights' memory back to the driver (the KV cache sizes from it)
    return model.eval()


def checkpoint_is_fp8(path: str) -> bool:
    """The checkpoint declares FP8 weights (config.json's quantization_config, as DeepSeek and GLM ship them)."""
    with open(os.path.join(path, "config.json")) as f:
        q = json.load(f).get("quantization_config") or {}
    return q.get("quant_method") == "fp8" or "e4m3" in str(q.get("fmt", ""))


def build_empty(cfg: ModelConfig, device, dtype: torch.dtype, fp8: bool = False) -> DSAModel:
    """The model with uninitialised storage on ``device`` (no time spent on random init); ``fp8``: FP8 storage
    for the linear and expert weights that FP8 models hold (model/linear.py)."""
    with torch.device("meta"):
        model = DSAModel(cfg)
        if fp8:
            use_fp8_storage(model, quantize=False)
    model.to_empty(device=device)
    for name, p in model.named_parameters():
        if not name.endswith("indexer.weights_proj.weight") and p.dtype != FP8:  # kept fp32 like the references
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
    handles = [_open_safetensors(f, safe_open) for f in checkpoint_files(path)]
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
                scale = h.get_tensor(key + "_scale_inv") if key + "_scale_inv" in keys else None
                _place(name, tensor, scale, params, cfg, filled, unexpected, bad_shape)
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


def _place(name, tensor, scale, params, cfg, filled, unexpected, bad_shape):
    """Copy one checkpoint tensor (with its FP8 block scale or None) into the model."""
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
            sdst = params.get(target + "_scale_inv")
            sview = None if sdst is None else sdst[e]
        else:
            target = f"layers.{layer}.mlp.experts.gate_up"
            dst = params.get(target)
            half = slice(0, inter) if part == "gate_proj" else slice(inter, 2 * inter)
            view = None if dst is None else dst[e, half]
            sdst = params.get(target + "_scale_inv")
            ib = -(-inter // 128)
            sview = None if sdst is None else sdst[e, :ib] if part == "gate_proj" else sdst[e, ib:]
        if view is None:
            unexpected.append(name)
            return
        filled.add((target, e, part))  # a wrong shape is reported once, as wrongly shaped, not also as missing
        if tuple(view.shape) != tuple(tensor.shape):
            bad_shape.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(view.shape)}")
            return
        _copy_weight(name, tensor, scale, view, sview, bad_shape)
        return
    m = _PACKED.match(name)
    if m:  # transformers' in-memory layout: gate_up_proj [E, 2I, D], down_proj [E, D, I]
        layer, kind = int(m.group(1)), m.group(2)
        target = f"layers.{layer}.mlp.experts." + ("gate_up" if kind == "gate_up_proj" else "down")
        parts = ("gate_proj", "up_proj") if kind == "gate_up_proj" else ("down_proj",)
        if params.get(target) is not None:
            filled.update((target, e, p) for e in range(cfg.n_routed_experts) for p in parts)
        dst, sdst = params.get(target), params.get(target + "_scale_inv")
        if scale is not None:  # no FP8 checkpoint ships experts packed; dequantise such a tensor per block
            unexpected.append(name + "_scale_inv")
            return
        if sdst is None:
            _copy(name, tensor, dst, unexpected, bad_shape)
        elif tuple(dst.shape) != tuple(tensor.shape):
            bad_shape.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(dst.shape)}")
        else:  # a bf16 packed tensor into FP8 storage: quantised per expert (gate and up apart)
            inter = cfg.moe_intermediate_size
            ib = -(-inter // 128)
            halves = ([(slice(0, inter), slice(0, ib)), (slice(inter, None), slice(ib, None))]
                      if kind == "gate_up_proj" else [(slice(None), slice(None))])
            for e in range(dst.shape[0]):
                for rows, srows in halves:
                    q, sc = quantize_weight(tensor[e, rows])
                    dst[e, rows].copy_(q)
                    sdst[e, srows].copy_(sc)
        return
    dst = params.get(name)
    if dst is not None:
        filled.add(name)
    if dst is None:
        unexpected.append(name)
        return
    _copy_weight(name, tensor, scale, dst, params.get(name + "_scale_inv") if name.endswith(".weight") else None,
                 bad_shape)


def _copy_weight(name, tensor, scale, dst, sdst, bad_shape) -> None:
    """A weight into its destination: FP8 bytes and scales as they are into FP8 storage (``sdst`` given), a
    bf16/fp32 weight quantised into it, or an FP8 one dequantised into bf16/fp32 storage."""
    if tuple(dst.shape) != tuple(tensor.shape):
        bad_shape.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(dst.shape)}")
        return
    if tensor.dtype == FP8 and scale is None:  # its values mean nothing without the block scales
        bad_shape.append(f"{name}: a float8 weight without {name}_scale_inv")
        return
    want_s = (-(-tensor.shape[0] // 128), -(-tensor.shape[-1] // 128)) if tensor.dim() == 2 else None
    if scale is not None and (tensor.dim() != 2 or tuple(scale.shape) != want_s):
        bad_shape.append(f"{name}_scale_inv: checkpoint {tuple(scale.shape)} does not fit a weight of shape "
                         f"{tuple(tensor.shape)} in 128x128 blocks (expected {want_s})")
        return
    if sdst is None:
        dst.copy_(tensor.to(dst.dtype) if scale is None else dequantize_weight(tensor, scale, dst.dtype))
    elif scale is not None and tensor.dtype == FP8:
        dst.copy_(tensor)
        sdst.copy_(scale)
    else:
        q, s = quantize_weight(tensor if scale is None else dequantize_weight(tensor, scale))
        dst.copy_(q)
        sdst.copy_(s)


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
        if name.startswith("rotary.") or name.endswith("_scale_inv"):  # scales are filled with their weight
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
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def inspect_safetensors(file: str) -> dict:
    """Read and check a .safetensors header without loading tensors; a CheckpointError names the file and what is
    wrong (truncated, not safetensors, bad header). Returns {"tensors": count, "bytes": tensor data bytes}."""
    def bad(msg):
        return CheckpointError(f"{file}: {msg}")

    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"not a safetensors file: {size} bytes, shorter than the 8-byte header length (truncated?)")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise bad(f"not a safetensors file or truncated: the header claims {n:,} bytes but the file holds "
                      f"{size - 8:,} after the length field")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError) as e:
            raise bad(f"the {n:,}-byte header is not valid JSON ({e}): not a safetensors file, or corrupt") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object: corrupt")
    data_bytes, count = size - 8 - n, 0
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(x) for x in t["data_offsets"])
            numel = 1
            for d in t["shape"]:
                numel *= int(d)
            item = _ST_ITEMSIZE[t["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r} has a malformed header entry {t!r:.200}") from None
        if stop - begin != numel * item:
            raise bad(f"tensor {name!r}: {t['dtype']} {t['shape']} needs {numel * item:,} bytes, its offsets span "
                      f"{stop - begin:,}: corrupt header")
        end, count = max(end, stop), count + 1
    if end > data_bytes:
        raise bad(f"truncated: the header describes {end:,} bytes of tensor data, the file holds {data_bytes:,} "
                  f"({end - data_bytes:,} missing; was the download or copy cut short?)")
    if end < data_bytes:
        raise bad(f"{data_bytes - end:,} bytes after the last tensor: corrupt or not written by safetensors")
    return {"tensors": count, "bytes": end}


def _open_safetensors(file: str, safe_open):
    inspect_safetensors(file)  # names the file and the problem where safetensors' own error would not
    try:
        return safe_open(file, framework="pt", device="cpu")
    except Exception as e:  # SafetensorError is not importable from a stable place across versions
        raise CheckpointError(f"{file}: cannot be read as safetensors ({e})") from e


def dequantize_fp8_blocks(w: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """W = fp8 * scale_inv[i // 128, j // 128] (DeepSeek's ``weight_dequant``), returned in fp32."""
    try:
        return dequantize_weight(w, scale_inv)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def quantize_fp8_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse, as DeepSeek's checkpoints are made: per block amax / 448 -> (fp8 e4m3 weight, scale_inv)."""
    return quantize_weight(w)


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
        inter, ib = cfg.moe_intermediate_size, -(-cfg.moe_intermediate_size // 128)
        if name.endswith("mlp.experts.gate_up") or name.endswith("mlp.experts.gate_up_scale_inv"):
            base = prefix + name.rsplit(".", 1)[0]
            sfx, cut = ("_scale_inv", ib) if name.endswith("_scale_inv") else ("", inter)
            for e in range(t.shape[0]):
                out[f"{base}.{e}.gate_proj.weight{sfx}"] = t[e, :cut].clone()
                out[f"{base}.{e}.up_proj.weight{sfx}"] = t[e, cut:].clone()
        elif name.endswith("mlp.experts.down") or name.endswith("mlp.experts.down_scale_inv"):
            base = prefix + name.rsplit(".", 1)[0]
            sfx = "_scale_inv" if name.endswith("_scale_inv") else ""
            for e in range(t.shape[0]):
                out[f"{base}.{e}.down_proj.weight{sfx}"] = t[e].clone()
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
    if is_fp8_model(model):  # DeepSeek's format: FP8 weights with weight_scale_inv
        cfg_dict.setdefault("quantization_config", {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme":
                                                    "dynamic", "weight_block_size": [128, 128]})
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(cfg_dict, f, indent=2)
    if dtype is not None:  # FP8 weights and their fp32 scales stay as they are
        tensors = {k: (v.to(dtype) if v.is_floating_point() and v.dtype != FP8 and not k.endswith("_scale_inv")
                       and not k.endswith("e_score_correction_bias") else v)
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
    mode = os.stat(os.path.join(path, "config.json")).st_mode & 0o777  # what the umask gives a new file
    for n, s in zip(names, shards):
        save_file(s, os.path.join(path, n), metadata={"format": "pt"})
        os.chmod(os.path.join(path, n), mode)  # safetensors writes 0600 whatever the umask
    return [os.path.join(path, n) for n in names]
