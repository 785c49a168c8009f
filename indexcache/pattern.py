"""IndexCache layer patterns: which layers run their own indexer (F, "full") and which reuse one (S, "shared").

A pattern has one letter per decoder layer, dense-MLP layers included (the convention of the reference SGLang and
vLLM patches and of transformers' ``glm_moe_dsa``). Layer 0 is always F. Each S layer reuses the top-k indices of
the nearest preceding F layer.
"""
from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import NamedTuple

# The reference SGLang patch marks layers 0 and 1 full and then every freq-th layer: offset 2 in the
# transformers formula. We use the same default so "keep 1/4" means what users of those engines expect.
DEFAULT_SKIP_OFFSET = 2

_TYPE_TO_LETTER = {"full": "F", "shared": "S"}


class PatternError(ValueError):
    """A layer pattern or its configuration keys are invalid."""


class IndexPattern:
    """An immutable F/S string with helpers to describe it and to export it to other engines."""

    __slots__ = ("_letters",)

    def __init__(self, letters: str, num_layers: int | None = None):
        if not isinstance(letters, str) or not letters:
            raise PatternError(f"index pattern must be a non-empty string of 'F'/'S', got {letters!r}")
        bad = [(i, c) for i, c in enumerate(letters) if c not in "FS"]
        if bad:
            where = ", ".join(f"{c!r} at layer {i}" for i, c in bad[:5])
            raise PatternError(f"index pattern {letters!r} may only contain 'F' and 'S'; found {where}")
        if num_layers is not None and len(letters) != num_layers:
            raise PatternError(
                f"index pattern {letters!r} has {len(letters)} letters but the model has {num_layers} layers "
                "(one letter per decoder layer, dense-MLP layers included)")
        if letters[0] != "F":
            raise PatternError(f"index pattern {letters!r} starts with 'S': layer 0 has no earlier layer to reuse")
        self._letters = letters

    # ----- constructors ---------------------------------------------------------------------------------------
    @classmethod
    def all_full(cls, num_layers: int) -> "IndexPattern":
        return cls("F" * _check_layers(num_layers))

    @classmethod
    def uniform(cls, num_layers: int, freq: int, offset: int = DEFAULT_SKIP_OFFSET) -> "IndexPattern":
        """transformers' ``glm_moe_dsa`` rule: layer i is full iff max(i - offset + 1, 0) % freq == 0."""
        _check_layers(num_layers)
        if isinstance(freq, bool) or not isinstance(freq, int) or freq < 1:
            raise PatternError(f"index_topk_freq must be an integer >= 1, got {freq!r}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise PatternError(f"index_skip_topk_offset must be an integer >= 0, got {offset!r}")
        return cls("".join("F" if max(i - offset + 1, 0) % freq == 0 else "S" for i in range(num_layers)))

    @classmethod
    def from_indexer_types(cls, types: Sequence[str], num_layers: int | None = None) -> "IndexPattern":
        if isinstance(types, str):
            raise PatternError(f"indexer_types must be a list like ['full', 'shared', ...], got the string {types!r}")
        bad = [(i, t) for i, t in enumerate(types) if t not in _TYPE_TO_LETTER]
        if bad:
            where = ", ".join(f"{t!r} at layer {i}" for i, t in bad[:5])
            raise PatternError(f"indexer_types may only contain 'full' and 'shared'; found {where}")
        return cls("".join(_TYPE_TO_LETTER[t] for t in types), num_layers)

    @classmethod
    def keep(cls, num_layers: int, fraction: str | int | Fraction) -> "IndexPattern":
        """Uniform "keep 1/N of the indexers": freq N with the reference offset (layers 0, 1, 1+N, 1+2N, ... full)."""
        n = _parse_keep(fraction)
        return cls.uniform(num_layers, n, DEFAULT_SKIP_OFFSET)

    @classmethod
    def parse(cls, spec, num_layers: int) -> "IndexPattern":
        """Accept an IndexPattern, an F/S string, "1/N", "keep 1/N", "all"/"full", or a list of indexer types."""
        if isinstance(spec, IndexPattern):
            if len(spec) != num_layers:
                raise PatternError(f"index pattern {spec} has {len(spec)} layers but the model has {num_layers}")
            return spec
        if isinstance(spec, (list, tuple)):
            return cls.from_indexer_types(spec, num_layers)
        if isinstance(spec, str):
            s = spec.strip()
            if s.lower() in ("all", "full", "dsa"):
                return cls.all_full(num_layers)
            if s.lower().startswith("keep"):
                s = s[4:].strip()
            if "/" in s or s.isdigit():
                return cls.keep(num_layers, s)
            return cls(s, num_layers)
        raise PatternError(f"cannot read an index pattern from {spec!r} (type {type(spec).__name__}); "
                           "give an F/S string, '1/N', or a list of 'full'/'shared'")

    @classmethod
    def from_hf_config(cls, cfg: dict, num_layers: int) -> "IndexPattern":
        """Read ``index_topk_pattern``, ``indexer_types`` and ``index_topk_freq``/``index_skip_topk_offset``.

        Keys that are present must agree; when none is present every layer is full.
        """
        found: dict[str, IndexPattern] = {}
        if cfg.get("index_topk_pattern") is not None:
            p = cfg["index_topk_pattern"]
            found["index_topk_pattern"] = (cls.from_indexer_types(p, num_layers) if isinstance(p, (list, tuple))
                                           else cls(p, num_layers))
        if cfg.get("indexer_types") is not None:
            found["indexer_types"] = cls.from_indexer_types(cfg["indexer_types"], num_layers)
        if cfg.get("index_topk_freq") is not None or cfg.get("index_skip_topk_offset") is not None:
            freq = cfg.get("index_topk_freq", 1)
            offset = cfg.get("index_skip_topk_offset", DEFAULT_SKIP_OFFSET)
            found[f"index_topk_freq={freq}, index_skip_topk_offset={offset}"] = cls.uniform(num_layers, freq, offset)
        if not found:
            return cls.all_full(num_layers)
        distinct = {str(p) for p in found.values()}
        if len(distinct) > 1:
            listing = "; ".join(f"{k} -> {p}" for k, p in found.items())
            raise PatternError(f"conflicting index pattern keys in config.json: {listing}")
        return next(iter(found.values()))

    # ----- queries --------------------------------------------------------------------------------------------
    def __str__(self) -> str:
        return self._letters

    def __repr__(self) -> str:
        return f"IndexPattern({self._letters!r})"

    def __len__(self) -> int:
        return len(self._letters)

    def __eq__(self, other) -> bool:
        return isinstance(other, IndexPattern) and other._letters == self._letters

    def __hash__(self) -> int:
        return hash(self._letters)

    def is_full(self, layer: int) -> bool:
        return self._letters[layer] == "F"

    @property
    def full_layers(self) -> list[int]:
        return [i for i, c in enumerate(self._letters) if c == "F"]

    @property
    def shared_layers(self) -> list[int]:
        return [i for i, c in enumerate(self._letters) if c == "S"]

    @property
    def num_full(self) -> int:
        return self._letters.count("F")

    def source(self, layer: int) -> int:
        """The F layer whose top-k this layer uses (itself when it is F)."""
        return self._letters.rindex("F", 0, layer + 1)

    def served_by(self, full_layer: int) -> list[int]:
        """The S layers that reuse ``full_layer``'s top-k, in order."""
        if not self.is_full(full_layer):
            raise PatternError(f"layer {full_layer} is shared (S), it serves no layer")
        out = []
        for i in range(full_layer + 1, len(self)):
            if self.is_full(i):
                break
            out.append(i)
        return out

    def with_shared(self, layer: int) -> "IndexPattern":
        """A copy with ``layer`` turned into S (greedy search step)."""
        s = list(self._letters)
        s[layer] = "S"
        return IndexPattern("".join(s))

    def indexer_types(self) -> list[str]:
        return ["full" if c == "F" else "shared" for c in self._letters]

    def describe(self) -> str:
        n = len(self)
        lines = [f"pattern {self._letters}",
                 f"{self.num_full} of {n} layers run the indexer (keep {self.num_full}/{n} = {self.num_full / n:.1%}); "
                 f"{n - self.num_full} reuse top-k"]
        for f in self.full_layers:
            served = self.served_by(f)
            if served:
                span = f"{served[0]}" if len(served) == 1 else f"{served[0]}-{served[-1]}"
                lines.append(f"  F{f} -> S {span}")
        return "\n".join(lines)

    def engine_flags(self) -> dict[str, str]:
        """The exact flags that make vLLM, SGLang and transformers use this pattern."""
        import json

        override = json.dumps({"index_topk_pattern": self._letters})
        return {
            "vllm": f"--hf-overrides '{json.dumps({'use_index_cache': True, 'index_topk_pattern': self._letters})}'",
            "sglang": f"--json-model-override-args '{override}'",
            "transformers": f"config.index_topk_pattern = {self._letters!r}  # GlmMoeDsaConfig(index_topk_pattern=...)",
        }


class LayerRole(NamedTuple):
    """One layer's part in a forward: run its own indexer, or reuse the top-k of layer ``source``."""
    runs_indexer: bool
    source: int  # the F layer whose top-k this layer attends with (itself when it runs its indexer)


class LayerPlan:
    """An IndexPattern resolved once into per-layer roles, for code that runs the layers (the engine's KV cache
    and runner). It is made by ``DSAModel.layer_plan``, which also checks that every F layer has indexer weights."""

    __slots__ = ("pattern", "layers")

    def __init__(self, pattern: IndexPattern):
        self.pattern = pattern
        self.layers = tuple(LayerRole(pattern.is_full(i), pattern.source(i)) for i in range(len(pattern)))

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer: int) -> LayerRole:
        return self.layers[layer]

    def __iter__(self):
        return iter(self.layers)

    def __str__(self) -> str:
        return str(self.pattern)

    def __repr__(self) -> str:
        return f"LayerPlan({str(self.pattern)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, LayerPlan) and other.pattern == self.pattern

    def __hash__(self) -> int:
        return hash(self.pattern)

    def runs_indexer(self, layer: int) -> bool:
        return self.layers[layer].runs_indexer

    @property
    def num_full(self) -> int:
        return self.pattern.num_full

    @property
    def full_layers(self) -> list[int]:
        return self.pattern.full_layers


def _check_layers(num_layers) -> int:
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise PatternError(f"number of layers must be a positive integer, got {num_layers!r}")
    return num_layers


def _parse_keep(fraction) -> int:
    if isinstance(fraction, Fraction):
        frac = fraction
    elif isinstance(fraction, int) and not isinstance(fraction, bool):
        frac = Fraction(1, fraction) if fraction >= 1 else None
    else:
        try:
            frac = Fraction(str(fraction).strip())
        except (ValueError, ZeroDivisionError):
            frac = None
    if frac is None or frac <= 0 or frac > 1 or frac.numerator != 1:
        raise PatternError(f"keep fraction must look like '1/N' with N >= 1, got {fraction!r}")
    return frac.denominator
