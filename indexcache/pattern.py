"""IndexCache layer patterns: which layers run their own indexer over every token (F, "full"), which reuse a
selection (S, "shared"), and which re-rank a candidate pool (R, "re-rank").

A pattern has one letter per decoder layer, dense-MLP layers included (the convention of the reference SGLang and
vLLM patches and of transformers' ``glm_moe_dsa``). Layer 0 is always F. Each S layer reuses the top-k indices of
the nearest preceding F or R layer (with F and S only: the nearest preceding F layer, the paper's rule).

R layers go beyond the paper: when a pattern has any, every F layer also publishes a candidate pool, its top-c
(c = ``pool``, by default 4 x top-k), and an R layer runs its own indexer only over the pool of the nearest
preceding F layer and keeps its own top-k: O(L*c) scoring instead of O(L^2). R needs the layer's indexer weights.
vLLM, SGLang and transformers have no R layers.
"""
from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import NamedTuple

# The reference SGLang patch marks layers 0 and 1 full and then every freq-th layer: offset 2 in the
# transformers formula. We use the same default so "keep 1/4" means what users of those engines expect.
DEFAULT_SKIP_OFFSET = 2

_TYPE_TO_LETTER = {"full": "F", "shared": "S"}
DEFAULT_POOL_FACTOR = 4  # an F layer's candidate pool for R layers: 4 x top-k unless the pattern or call says


class PatternError(ValueError):
    """A layer pattern or its configuration keys are invalid."""


class IndexPattern:
    """An immutable F/S/R string with helpers to describe it and to export it to other engines.

    ``pool``: the candidate-pool size F layers publish for R layers (None: 4 x the model's top-k)."""

    __slots__ = ("_letters", "_pool")

    def __init__(self, letters: str, num_layers: int | None = None, *, pool: int | None = None):
        if not isinstance(letters, str) or not letters:
            raise PatternError(f"index pattern must be a non-empty string of 'F'/'S'/'R', got {letters!r}")
        bad = [(i, c) for i, c in enumerate(letters) if c not in "FSR"]
        if bad:
            where = ", ".join(f"{c!r} at layer {i}" for i, c in bad[:5])
            raise PatternError(f"index pattern {letters!r} may only contain 'F', 'S' and 'R'; found {where}")
        if pool is not None and (isinstance(pool, bool) or not isinstance(pool, int) or pool < 1):
            raise PatternError(f"candidate pool size must be a positive integer, got {pool!r}")
        if num_layers is not None and len(letters) != num_layers:
            raise PatternError(
                f"index pattern {letters!r} has {len(letters)} letters but the model has {num_layers} layers "
                "(one letter per decoder layer, dense-MLP layers included)")
        if letters[0] != "F":
            raise PatternError(f"index pattern {letters!r} starts with {letters[0]!r}: layer 0 has no earlier layer "
                               "to reuse or re-rank")
        self._letters = letters
        self._pool = pool

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
        """Accept an IndexPattern, an F/S/R string, "1/N", "keep 1/N", "all"/"full", or a list of indexer types.
        A string may end in "@c" to set the candidate pool of its R layers (``FRRRFRRR@4096``)."""
        if isinstance(spec, str) and "@" in spec:
            body, _, pool = spec.rpartition("@")
            if not pool.strip().isdigit() or int(pool) < 1:
                raise PatternError(f"the candidate pool after '@' in {spec!r} must be a positive integer, "
                                   f"got {pool!r}")
            return cls.parse(body, num_layers).with_pool(int(pool))
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
                           "give an F/S/R string, '1/N', or a list of 'full'/'shared'")

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
        return f"IndexPattern({self._letters!r})" if self._pool is None else \
            f"IndexPattern({self._letters!r}, pool={self._pool})"

    def __len__(self) -> int:
        return len(self._letters)

    def __eq__(self, other) -> bool:
        return isinstance(other, IndexPattern) and other._letters == self._letters and other._pool == self._pool

    def __hash__(self) -> int:
        return hash((self._letters, self._pool))

    @property
    def pool(self) -> int | None:
        """The candidate-pool size set on the pattern (None: the default, 4 x top-k)."""
        return self._pool

    def with_pool(self, pool: int | None) -> "IndexPattern":
        return IndexPattern(self._letters, pool=pool)

    def is_full(self, layer: int) -> bool:
        return self._letters[layer] == "F"

    def is_rerank(self, layer: int) -> bool:
        return self._letters[layer] == "R"

    def has_indexer(self, layer: int) -> bool:
        """F and R layers run (and need the weights of) their own indexer."""
        return self._letters[layer] != "S"

    @property
    def has_rerank(self) -> bool:
        return "R" in self._letters

    @property
    def rerank_layers(self) -> list[int]:
        return [i for i, c in enumerate(self._letters) if c == "R"]

    @property
    def indexer_layers(self) -> list[int]:
        return [i for i, c in enumerate(self._letters) if c != "S"]

    @property
    def num_rerank(self) -> int:
        return self._letters.count("R")

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
        """The layer whose top-k this layer uses: itself when it is F or R, else the nearest preceding F or R."""
        return max(self._letters.rfind("F", 0, layer + 1), self._letters.rfind("R", 0, layer + 1))

    def pool_source(self, layer: int) -> int:
        """The F layer whose candidate pool an R layer re-ranks (for F: itself; S: the F layer before it)."""
        return self._letters.rindex("F", 0, layer + 1)

    def served_by(self, full_layer: int) -> list[int]:
        """The S layers that reuse ``full_layer``'s top-k (an F or R layer), in order."""
        if not self.has_indexer(full_layer):
            raise PatternError(f"layer {full_layer} is shared (S), it serves no layer")
        out = []
        for i in range(full_layer + 1, len(self)):
            if self.has_indexer(i):
                break
            out.append(i)
        return out

    def reranked_by(self, full_layer: int) -> list[int]:
        """The R layers that re-rank ``full_layer``'s candidate pool, in order."""
        if not self.is_full(full_layer):
            raise PatternError(f"layer {full_layer} is not full (F), it publishes no candidate pool")
        out = []
        for i in range(full_layer + 1, len(self)):
            if self.is_full(i):
                break
            if self.is_rerank(i):
                out.append(i)
        return out

    def _with(self, layer: int, letter: str) -> "IndexPattern":
        s = list(self._letters)
        s[layer] = letter
        return IndexPattern("".join(s), pool=self._pool)

    def with_shared(self, layer: int) -> "IndexPattern":
        """A copy with ``layer`` turned into S (greedy search step)."""
        return self._with(layer, "S")

    def with_rerank(self, layer: int) -> "IndexPattern":
        """A copy with ``layer`` turned into R (greedy search step)."""
        return self._with(layer, "R")

    def indexer_types(self) -> list[str]:
        if self.has_rerank:
            raise PatternError(f"pattern {self._letters} has re-rank (R) layers {self.rerank_layers}: transformers' "
                               "indexer_types has no equivalent (only 'full' and 'shared')")
        return ["full" if c == "F" else "shared" for c in self._letters]

    def indexer_cost(self, context: int, pool: int) -> float:
        """Indexer scoring work relative to full DSA at ``context`` tokens: F scores all keys, R ``pool`` of them."""
        c = min(pool, context)
        return (self.num_full + self.num_rerank * c / context) / len(self)

    def describe(self) -> str:
        n = len(self)
        if not self.has_rerank:
            lines = [f"pattern {self._letters}",
                     f"{self.num_full} of {n} layers run the indexer (keep {self.num_full}/{n} = "
                     f"{self.num_full / n:.1%}); {n - self.num_full} reuse top-k"]
        else:
            pool = "4 x top-k" if self._pool is None else str(self._pool)
            lines = [f"pattern {self._letters}",
                     f"{self.num_full} of {n} layers run the indexer over every token, {self.num_rerank} re-rank "
                     f"their F layer's candidate pool (top-{pool}), {n - self.num_full - self.num_rerank} reuse top-k"]
        for f in self.indexer_layers:
            served = self.served_by(f)
            if served:
                span = f"{served[0]}" if len(served) == 1 else f"{served[0]}-{served[-1]}"
                lines.append(f"  {self._letters[f]}{f} -> S {span}")
            if self.is_full(f) and self.reranked_by(f):
                lines.append(f"  F{f} pool -> R {', '.join(map(str, self.reranked_by(f)))}")
        return "\n".join(lines)

    def engine_flags(self) -> dict[str, str]:
        """The exact flags that make vLLM, SGLang and transformers use this pattern (R layers: none exist)."""
        import json

        if self.has_rerank:
            why = (f"not supported: pattern {self._letters} has re-rank (R) layers {self.rerank_layers}, which have "
                   "no equivalent there (only F and S); run it with indexcache's engine, or export an F/S pattern")
            return {"vllm": why, "sglang": why, "transformers": why}

        override = json.dumps({"index_topk_pattern": self._letters})
        return {
            "vllm": f"--hf-overrides '{json.dumps({'use_index_cache': True, 'index_topk_pattern': self._letters})}'",
            "sglang": f"--json-model-override-args '{override}'",
            "transformers": f"config.index_topk_pattern = {self._letters!r}  # GlmMoeDsaConfig(index_topk_pattern=...)",
        }


class LayerRole(NamedTuple):
    """One layer's part in a forward: run its own indexer (over all keys, or re-ranking a pool), or reuse the
    top-k of layer ``source``."""
    runs_indexer: bool
    source: int  # the layer whose top-k this layer attends with (itself when it runs its indexer)
    reranks: bool = False  # R: its indexer scores only the candidate pool of F layer ``pool_source``
    pool_source: int = -1  # R: the F layer whose pool it re-ranks
    publishes_pool: int = 0  # F: how many candidates it publishes for later R layers (0: none)


class LayerPlan:
    """An IndexPattern resolved once into per-layer roles, for code that runs the layers (the engine's KV cache
    and runner). It is made by ``DSAModel.layer_plan``, which also checks that every F layer has indexer weights."""

    __slots__ = ("pattern", "layers", "pool")

    def __init__(self, pattern: IndexPattern, pool: int | None = None):
        """``pool``: the candidate-pool size F layers publish when the pattern has R layers (default: the
        pattern's own ``pool``; one of them is required then)."""
        self.pattern = pattern
        pool = pool if pool is not None else pattern.pool
        if pattern.has_rerank and (pool is None or isinstance(pool, bool) or not isinstance(pool, int) or pool < 1):
            raise PatternError(f"pattern {pattern} has re-rank (R) layers: give the candidate pool size "
                               f"(a positive integer), got {pool!r}")
        self.pool = pool if pattern.has_rerank else None
        self.layers = tuple(
            LayerRole(pattern.has_indexer(i), pattern.source(i), pattern.is_rerank(i),
                      pattern.pool_source(i) if pattern.is_rerank(i) else -1,
                      self.pool if pattern.is_full(i) and pattern.reranked_by(i) else 0)
            for i in range(len(pattern)))

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
        return isinstance(other, LayerPlan) and other.pattern == self.pattern and other.pool == self.pool

    def __hash__(self) -> int:
        return hash((self.pattern, self.pool))

    def runs_indexer(self, layer: int) -> bool:
        return self.layers[layer].runs_indexer

    @property
    def num_full(self) -> int:
        return self.pattern.num_full

    @property
    def full_layers(self) -> list[int]:
        return self.pattern.full_layers

    @property
    def num_indexed(self) -> int:
        """Layers that keep indexer keys (F and R)."""
        return len(self.pattern.indexer_layers)


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
