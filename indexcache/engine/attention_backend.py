"""The engine's one seam to the kernels: the cache formats, decided once, and the attention backend that serves
them (store the latent row and the indexer key, select top-k, sparse MLA; prefill and decode).

``TorchBackend`` runs every operation in PyTorch (any device, any format; the CPU engine). ``TritonBackend``
(CUDA) runs the kernels package: the FP8 indexer (quantise, paged logits, top-k) when indexer keys are FP8, and
the latent-store and sparse-MLA kernels when the latent row is the kernels' 512 + 64; what its formats leave to
PyTorch (exact indexer keys, other latent widths, fp16/fp32 latent stores) is decided once, when it is built.
The kernels are imported at the top of this module: a kernel that is missing or fails to import is an ImportError
that names it, never a silent fallback to a slower path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..kernels.candidate_topk import candidate_topk
from ..kernels.indexer import (indexer_logits_decode, indexer_topk_prefill, indexer_topk_prefill_two_pass,
                               quantize_indexer_q)
from ..kernels.kv_store import (dequant_latent_fp8, gather_indexer_k, quantize_latent_fp8, store_indexer_k,
                                store_latent_bf16, store_latent_fp8)
from ..kernels.slots import to_slots as slots_kernel
from ..kernels.slots.reference import to_slots_reference as to_slots  # int32 slot ids, made once per F layer
from ..kernels.formats import LATENT_DIM
from ..kernels.sparse_mla import dequant_latent_rows, sparse_mla_decode, sparse_mla_prefill
from ..kernels.topk import (DecodeTopkWorkspace, topk_and_pool_rows, topk_and_pool_scratch_bytes_per_row,
                            topk_pool_rows, topk_rows, topk_rows_decode)
from ..model.indexer import select_topk
from .config import EngineConfig
from .kv_cache import FP8_LATENT_BYTES, KVCache
from .timer import Timer, section

KERNEL_LATENT = (512, 64)  # (kv_lora_rank, qk_rope_head_dim) of the sparse-MLA and latent-store kernels
FP8_INDEX_DIM, FP8_INDEX_PAGE = 128, 64  # the paged FP8 indexer-key layout (DeepGEMM's)


@dataclass(frozen=True)
class CacheFormats:
    latent: str   # "bf16" | "fp16" | "fp32" | "fp8" (FlashMLA's 656-byte rows)
    indexer: str  # "exact" (model-dtype keys, fp32 scores) | "fp8" (132 B/token, FP8 kernels)


def resolve_formats(cfg: EngineConfig, mc: ModelConfig, model_dtype: torch.dtype,
                    device: torch.device) -> CacheFormats:
    """The cache formats after 'auto' and the shape and device checks; the one place they are decided.

    kv_cache_dtype 'auto' is the model dtype. indexer_cache 'auto' is 'fp8' on CUDA when the model's indexer keys
    fit the FP8 layout (index_head_dim 128, page_size 64), else 'exact'; 'fp8' asked for elsewhere is an error."""
    latent = cfg.kv_cache_dtype
    if latent == "auto":
        latent = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(model_dtype, "fp32")
    if latent == "fp8" and (mc.kv_lora_rank, mc.qk_rope_head_dim) != KERNEL_LATENT:
        raise ValueError(f"kv_cache_dtype='fp8' is FlashMLA's 656-byte format for a 512+64 latent; this model's "
                         f"latent is {mc.kv_lora_rank}+{mc.qk_rope_head_dim}")
    index = cfg.indexer_cache
    fp8_ok = mc.index_head_dim == FP8_INDEX_DIM and cfg.page_size == FP8_INDEX_PAGE
    if index == "auto":
        index = "fp8" if (device.type == "cuda" and fp8_ok) else "exact"
    if index == "fp8" and not fp8_ok:
        raise ValueError(f"indexer_cache='fp8' needs index_head_dim 128 and page_size 64 (DeepGEMM's paged layout); "
                         f"got index_head_dim {mc.index_head_dim}, page_size {cfg.page_size}")
    if index == "fp8" and device.type != "cuda":
        raise ValueError(f"indexer_cache='fp8' runs the FP8 indexer kernels and needs a CUDA device, got {device}; "
                         f"use indexer_cache='exact' (or 'auto')")
    return CacheFormats(latent, index)


def decode_topk_rows(cfg: EngineConfig, indexer_format: str) -> int:
    """Rows of the TritonBackend's decode top-k workspace (0: none): decode batches of up to this many sequences
    select with ``topk_rows_decode``, larger ones with ``topk_rows``. Only the FP8 indexer path scores decode
    rows with the kernels; at most ``decode_topk_max_rows`` and ``max_num_seqs`` rows, and no more than
    ``workspace_bytes`` in all (rows of ``max_model_len`` keys, rounded up to pages)."""
    if indexer_format != "fp8":
        return 0
    per_row = DecodeTopkWorkspace.bytes_per_row(cfg.max_blocks_per_seq * cfg.page_size)
    return min(cfg.decode_topk_max_rows, cfg.max_num_seqs, cfg.workspace_bytes // per_row)


def decode_topk_bytes(cfg: EngineConfig, indexer_format: str) -> int:
    """Device bytes of that workspace (the engine leaves them free when it sizes the KV cache)."""
    return decode_topk_rows(cfg, indexer_format) * DecodeTopkWorkspace.bytes_per_row(
        cfg.max_blocks_per_seq * cfg.page_size)


def make_backend(kv: KVCache, cfg: EngineConfig, mc: ModelConfig) -> "TorchBackend":
    """TritonBackend for a cache on a CUDA device, TorchBackend elsewhere."""
    cls = TritonBackend if kv.latent[0].is_cuda else TorchBackend
    return cls(kv, cfg, mc)


class TorchBackend:
    """Every cache-facing operation in PyTorch: exact indexer keys and any latent format (FP8 rows are quantised and
    dequantised by the kernels package's references)."""

    name = "torch"

    def __init__(self, kv: KVCache, cfg: EngineConfig, mc: ModelConfig):
        if kv.indexer_format == "fp8" and type(self) is TorchBackend:
            raise ValueError("indexer_cache='fp8' needs the Triton backend (a CUDA device)")
        self.kv, self.cfg = kv, cfg
        self.page = cfg.page_size
        self.d_v, self.scale = mc.kv_lora_rank, mc.softmax_scale
        self.timer: Timer | None = None  # benchmarks set it (ModelRunner.timer)

    def _t(self, name: str):
        return section(self.timer, name)

    # ----- stores -------------------------------------------------------------------------------------------------
    def store_latent(self, layer: int, slots: torch.Tensor, ckv: torch.Tensor, kpe: torch.Tensor) -> None:
        cache = self.kv.latent[layer]
        if self.kv.latent_format == "fp8":
            cache.view(-1, FP8_LATENT_BYTES)[slots] = quantize_latent_fp8(ckv, kpe)
        else:
            cache.view(-1, self.kv.width)[slots] = torch.cat([ckv, kpe], -1).to(cache.dtype)

    def store_index_k(self, layer: int, slots: torch.Tensor, k: torch.Tensor) -> None:
        cache = self.kv.index_cache(layer)
        cache.view(-1, cache.shape[-1])[slots] = k.to(cache.dtype)

    def begin_prefill(self, segments: list[tuple[int, int, int]], block_table: torch.Tensor) -> None:
        """Before a prefill forward's layers: its segments (first row, tokens, context after the step) and their
        block-table rows. Nothing to prepare here."""

    def end_prefill(self) -> None:
        """After a prefill forward's layers."""

    # ----- top-k (logical key positions, -1 = none) -----------------------------------------------------------
    def prefill_slots(self, logical: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """A prefill selection's positions [T,k] -> int32 slot ids through ``table`` [T, blocks] (a broadcast row
        is fine)."""
        return to_slots(logical, table, self.page)

    def _ctx_slots(self, row: torch.Tensor, ctx: int) -> torch.Tensor:
        """Slots of positions 0..ctx-1 of the sequence whose block table is ``row``."""
        return to_slots(torch.arange(ctx, device=row.device)[None], row[None], self.page)[0]

    def topk_prefill(self, layer: int, indexer, q, w, positions, ctx: int, table_row, pool: int = 0):
        """One sequence's prefill chunk: q [n,H,D], w [n,H], positions [n]; keys 0..ctx-1 -> [n, topk] int32.
        ``pool`` > 0 (an F layer serving re-rank layers): (top-k, top-``pool`` candidates)."""
        keys = self.kv.gather_index_k(layer, self._ctx_slots(table_row, ctx))[None]  # [1, ctx, D]
        n, heads = q.shape[:2]
        per = max(1, self.cfg.workspace_bytes // (8 * heads * ctx))  # fp32 per-head logits (+ relu copy)
        kpos = torch.arange(ctx, device=q.device)
        out, cands = [], []
        for r0 in range(0, n, per):
            r1 = min(n, r0 + per)
            with self._t("indexer"):
                s = indexer.scores(q[None, r0:r1], keys, w[None, r0:r1])
            with self._t("topk"):
                valid = (kpos[None] <= positions[r0:r1, None])[None]
                out.append(select_topk(s, valid, indexer.topk)[0])
                if pool:
                    cands.append(select_topk(s, valid, pool)[0])
        return (torch.cat(out), torch.cat(cands)) if pool else torch.cat(out)

    def topk_decode(self, layer: int, indexer, q, w, block_table, context_lens, max_len: int, pool: int = 0):
        """One token per sequence: q [B,H,D], w [B,H]; keys 0..max_len-1, masked past context_lens -> [B, topk].
        ``pool`` > 0: (top-k, top-``pool`` candidates)."""
        p = torch.arange(max_len, device=q.device)
        slots = to_slots(p.expand(len(context_lens), max_len), block_table, self.page)  # [B, L]
        with self._t("indexer"):
            s = indexer.scores(q[:, None], self.kv.gather_index_k(layer, slots), w[:, None])  # [B,1,L]
        with self._t("topk"):
            valid = (p[None] < context_lens[:, None])[:, None]
            topk = select_topk(s, valid, indexer.topk)[:, 0]
            return (topk, select_topk(s, valid, pool)[:, 0]) if pool else topk

    def rerank(self, layer: int, indexer, q, w, cand: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """A re-rank layer: q [T,H,D], w [T,H] score only each row's candidates (global slot ids [T,c], -1 = none;
        ``positions`` [T,c] their key positions) with this layer's indexer keys -> the top-k as global slot ids
        [T, topk] (-1 = none). The pool is scored in position order, whatever its order as published, and ties
        are left to torch.topk as the model leaves them (TritonBackend: the lower position)."""
        T, c = cand.shape
        # the pool in position order (-1 last), as the model scores its pool-masked row
        order = torch.where(positions < 0, torch.iinfo(torch.int32).max, positions).argsort(dim=1, stable=True)
        cand = cand.gather(1, order)
        per = max(1, self.cfg.workspace_bytes // (8 * q.shape[1] * max(c, 1)))
        out = []
        for r0 in range(0, T, per):
            cd = cand[r0:r0 + per]
            with self._t("indexer"):
                keys = self.kv.gather_index_k(layer, cd.clamp(min=0))  # [n, c, D]
                s = indexer.scores(q[r0:r0 + per, None], keys, w[r0:r0 + per, None])  # [n, 1, c]
            with self._t("topk"):
                col = select_topk(s, (cd >= 0)[:, None], indexer.topk)[:, 0]
                out.append(torch.where(col < 0, -1, cd.gather(1, col.clamp(min=0).long())))
        return torch.cat(out)

    # ----- sparse MLA over the paged latent cache: q [T,h,width], slots [T,k] global ids -> o_lat [T,h,kv_lora] --
    def attend_prefill(self, layer: int, q: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        T, k = slots.shape
        return self._attend(layer, q, slots, max(1, self.cfg.workspace_bytes // (k * q.shape[-1] * 4 * 2)))

    def attend_decode(self, layer: int, q: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return self._attend(layer, q, slots, slots.shape[0])

    def _attend(self, layer, q, slots, per):
        cdt = torch.float32 if q.dtype == torch.float32 else q.dtype
        out = []
        for r0 in range(0, slots.shape[0], per):
            sl = slots[r0:r0 + per]
            rows = self._gather_latent(layer, sl.clamp(min=0), cdt)  # [n,k,width]
            s = torch.einsum("thc,tkc->thk", q[r0:r0 + per].to(cdt), rows).float() * self.scale
            s = s.masked_fill((sl < 0)[:, None], float("-inf"))
            p = torch.softmax(s, -1).nan_to_num(0.0)
            out.append(torch.einsum("thk,tkc->thc", p.to(cdt), rows[..., :self.d_v]))
        return torch.cat(out).to(q.dtype)

    def _gather_latent(self, layer: int, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows [..., width] of the given slots (all >= 0), dequantised to ``dtype``."""
        cache = self.kv.latent[layer]
        if self.kv.latent_format == "fp8":
            return dequant_latent_fp8(cache.view(-1, FP8_LATENT_BYTES)[slots], dtype)
        return cache.view(-1, self.kv.width)[slots].to(dtype)


# heads per rank up to which FP8-cache prefill runs sparse_mla_prefill(kv_format="fp8") (the Gluon kernel on Hopper,
# Triton elsewhere): at 20 heads 8.7 ms (Gluon, run 77) and 10.1 (Triton) against 16.7 for the decode kernel's
# gather-and-dequantise (H200 runs 73, 77, 8192 queries x top-k 2048); more heads were not compared (at 128 the
# Triton prefill kernel takes 54 ms), and TP ranks of the real models hold 8-16
FP8_PREFILL_MAX_HEADS = 32
# FP8 latent cache, prefill: each layer's context rows are dequantised once into a copy that the bf16-cache kernel
# reads, when the forward's top-k reads each context row at least this many times on average and the copy fits in
# workspace_bytes. A row's copy moves 1.8 KB (~0.45 ns at 4 TB/s); each read of the copy instead of the 656-B row
# saves ~0.18 ns at 20 heads (H200 run 132: 5.64 against 8.66 ms for 8192 x 2048 reads), so the copy pays from
# ~3 reads a row; a 16K-token chunk at 200K reads each row ~170 times
FP8_PREFILL_DEQUANT_MIN_READS = 4


class _ContextRows:
    """The context rows a prefill forward's layers dequantise (``TritonBackend.begin_prefill``): their slots, the
    query rows that attend over the copy and the others (None, None: all rows attend over it), and slot -> row
    of the copy."""

    def __init__(self, slots: torch.Tensor, query_rows: torch.Tensor | None, other_rows: torch.Tensor | None,
                 num_slots: int):
        self.slots, self.query_rows, self.other_rows = slots, query_rows, other_rows
        self.row_of = torch.full((num_slots,), -1, dtype=torch.int32, device=slots.device)
        # a page shared by two segments (a common prefix) appears twice: either row holds its values
        self.row_of[slots.long()] = torch.arange(slots.numel(), dtype=torch.int32, device=slots.device)
        self._last = self._rows = None

    def rows(self, slots: torch.Tensor) -> torch.Tensor:
        """Top-k slot ids [T, k] (-1 = none) -> rows of the copy [len(query_rows), k] int32 for the query rows
        that attend over it. Shared layers pass the same tensor, so it is mapped once per full layer."""
        if slots is not self._last:
            mine = slots if self.query_rows is None else slots[self.query_rows]
            n = self.row_of.numel()
            ok = (mine >= 0) & (mine < n)
            self._rows = torch.where(ok, self.row_of[torch.where(ok, mine, 0).long()], -1).to(torch.int32)
            self._last = slots
        return self._rows


def _topk_then_pool(k: int):
    """A ``topk_fn`` for ``indexer_topk_prefill_two_pass`` asked for k + c columns: [top-k | top-c pool] of each
    chunk's logits, from one read of each row (``topk_and_pool_rows``: the wider selected, the narrower from the
    same candidates), both with ``topk_rows``' exact rule, ties to the lower column."""
    def select(logits, n, *, row_start=None, row_end=None):
        return topk_and_pool_rows(logits, k, n - k, row_start=row_start, row_end=row_end)

    # the chunk planner's budget: the wider selection's scratch and both outputs
    select.scratch_bytes_per_row = lambda width, n: topk_and_pool_scratch_bytes_per_row(k, width - k, n)
    return select


class TritonBackend(TorchBackend):
    """The kernels package on a CUDA device (see the module docstring for what stays on PyTorch)."""

    name = "triton"

    def __init__(self, kv: KVCache, cfg: EngineConfig, mc: ModelConfig):
        super().__init__(kv, cfg, mc)
        self.fp8_index = kv.indexer_format == "fp8"
        self.latent_kernels = (mc.kv_lora_rank, mc.qk_rope_head_dim) == KERNEL_LATENT
        fmt = kv.latent_format
        self._store_latent = (None if not self.latent_kernels else
                              store_latent_fp8 if fmt == "fp8" else store_latent_bf16 if fmt == "bf16" else None)
        self._mla_format = "fp8" if fmt == "fp8" else "bf16"  # sparse_mla_decode reads any float cache as "bf16"
        # One decode top-k workspace, allocated here (never inside a graph capture), serves every decode forward:
        # eager ones and each captured batch bucket use its first rows (``head``). They run one at a time on one
        # stream (engine steps are sequential; a replay never overlaps another forward), and every call leaves
        # the scratch zeroed for the next, so sharing it is safe. Rows hold max_model_len keys: the graphs score
        # all of them, eager decode a page-rounded prefix.
        rows = decode_topk_rows(cfg, kv.indexer_format)
        self._dtopk = (DecodeTopkWorkspace.new(rows, cfg.max_blocks_per_seq * cfg.page_size, kv.latent[0].device)
                       if rows else None)
        self._dtopk_heads: dict[int, DecodeTopkWorkspace] = {}
        self._topk = mc.index_topk
        self._ctx_rows: _ContextRows | None = None

    def begin_prefill(self, segments, block_table):
        """FP8 latent cache: pick the segments whose layers attend over a dequantised copy of their context rows
        (their top-k reads each row FP8_PREFILL_DEQUANT_MIN_READS times or more; the most-read first, while the
        copy fits in workspace_bytes) and map their slots. The other segments' rows read the FP8 rows."""
        self._ctx_rows = None
        if not (self.latent_kernels and self.kv.latent_format == "fp8"):
            return
        row_bytes = LATENT_DIM * self.kv.model_dtype.itemsize
        reads = [(n * min(ctx, self._topk) / ctx, s) for s, (_, n, ctx) in enumerate(segments) if ctx > 0]
        chosen, copy_bytes = [], 0
        for per_row, s in sorted(reads, reverse=True):
            ctx = segments[s][2]
            if per_row >= FP8_PREFILL_DEQUANT_MIN_READS and copy_bytes + ctx * row_bytes <= self.cfg.workspace_bytes:
                chosen.append(s)
                copy_bytes += ctx * row_bytes
        if not chosen:
            return
        chosen.sort()
        dev = block_table.device
        slots = torch.cat([self._ctx_slots(block_table[s], segments[s][2]) for s in chosen]).to(torch.int32)
        query_rows = other_rows = None
        if len(chosen) < len(segments):
            def rows_of(segs):
                return torch.cat([torch.arange(segments[s][0], segments[s][0] + segments[s][1], device=dev)
                                  for s in segs])
            query_rows = rows_of(chosen)
            other_rows = rows_of([s for s in range(len(segments)) if s not in chosen])
        self._ctx_rows = _ContextRows(slots, query_rows, other_rows, self.kv.latent[0].shape[0] * self.page)

    def end_prefill(self):
        self._ctx_rows = None

    def decode_topk_workspace(self, rows: int) -> DecodeTopkWorkspace | None:
        """The workspace for a decode batch of ``rows`` sequences, or None when that batch selects with
        ``topk_rows`` (no workspace, or more rows than it holds)."""
        if self._dtopk is None or not 1 <= rows <= self._dtopk.rows:
            return None
        if rows not in self._dtopk_heads:
            self._dtopk_heads[rows] = self._dtopk.head(rows)
        return self._dtopk_heads[rows]

    def store_latent(self, layer, slots, ckv, kpe):
        if self._store_latent is None:
            return super().store_latent(layer, slots, ckv, kpe)
        self._store_latent(self.kv.latent[layer], slots, ckv, kpe)

    def store_index_k(self, layer, slots, k):
        if not self.fp8_index:
            return super().store_index_k(layer, slots, k)
        store_indexer_k(self.kv.index_cache(layer), slots, k)

    def prefill_slots(self, logical, table):
        return slots_kernel(logical, table, self.page)  # one launch, not ~8 PyTorch passes over [T, k]

    def topk_prefill(self, layer, indexer, q, w, positions, ctx, table_row, pool: int = 0):
        if not self.fp8_index:
            return super().topk_prefill(layer, indexer, q, w, positions, ctx, table_row, pool)
        # logits and top-k in row chunks bounded by workspace_bytes; timed as one section (indexer + top-k)
        with self._t("indexer"):
            q8, wf = quantize_indexer_q(q, w * indexer.n_heads ** 0.5)
            k8, ks = gather_indexer_k(self.kv.index_cache(layer), self._ctx_slots(table_row, ctx))
            starts = torch.zeros(q.shape[0], dtype=torch.int32, device=q.device)
            ends = (positions + 1).to(torch.int32)
            if not pool:
                return indexer_topk_prefill(q8, wf, k8, ks, starts, ends, indexer.topk,
                                            workspace_bytes=self.cfg.workspace_bytes, topk_fn=topk_rows)
            # with a pool: [top-k | top-c] per row from each chunk's logits. The two-pass path: the fused one
            # selects from candidate lists it reorders on ties, which would mix the two parts
            k = indexer.topk
            sel = indexer_topk_prefill_two_pass(q8, wf, k8, ks, starts, ends, k + pool,
                                                workspace_bytes=self.cfg.workspace_bytes,
                                                topk_fn=_topk_then_pool(k))
            return sel[:, :k], sel[:, k:]

    def topk_decode(self, layer, indexer, q, w, block_table, context_lens, max_len, pool: int = 0):
        if not self.fp8_index:
            return super().topk_decode(layer, indexer, q, w, block_table, context_lens, max_len, pool)
        # indexer_logits_decode + top-k (indexer_topk_decode's two steps, timed apart; context_lens <= max_len
        # always holds here, so its clamp is left out of the decode graph). Top-k: topk_rows_decode (a row over
        # many programs) for batches the workspace holds, topk_rows otherwise; the same selection either way
        with self._t("indexer"):
            q8, wf = quantize_indexer_q(q, w * indexer.n_heads ** 0.5)
            logits = indexer_logits_decode(q8, wf, self.kv.index_cache(layer), block_table, context_lens, max_len)
        with self._t("topk"):
            ws = self.decode_topk_workspace(logits.shape[0])
            if ws is not None:
                topk = topk_rows_decode(logits, indexer.topk, row_end=context_lens, workspace=ws)
            else:
                topk = topk_rows(logits, indexer.topk, row_start=None, row_end=context_lens)
            if not pool:
                return topk
            # the pool: a second exact selection of the same logits (the workspace is free again)
            return topk, topk_pool_rows(logits, pool, row_end=context_lens, workspace=ws)

    def rerank(self, layer, indexer, q, w, cand, positions):
        if not self.fp8_index:
            return super().rerank(layer, indexer, q, w, cand, positions)
        with self._t("indexer"):
            q8, wf = quantize_indexer_q(q, w * indexer.n_heads ** 0.5)
            return candidate_topk(q8, wf, self.kv.index_cache(layer), cand, indexer.topk, tie_ids=positions)

    def attend_prefill(self, layer, q, slots):
        if self.latent_kernels and self.kv.latent_format == "fp8":
            cr = self._ctx_rows
            if cr is None:
                return self._attend_fp8_rows(layer, q, slots)
            # the context dequantised once, then the bf16-cache kernel (begin_prefill)
            copy = dequant_latent_rows(self.kv.latent[layer], cr.slots, q.dtype)
            if cr.query_rows is None:
                return sparse_mla_prefill(q, copy, cr.rows(slots), self.scale, d_v=self.d_v)[0]
            out = q.new_empty(q.shape[0], q.shape[1], self.d_v)
            out[cr.query_rows] = sparse_mla_prefill(q[cr.query_rows], copy, cr.rows(slots), self.scale,
                                                    d_v=self.d_v)[0]
            out[cr.other_rows] = self._attend_fp8_rows(layer, q[cr.other_rows], slots[cr.other_rows])
            return out
        if self.latent_kernels and self.kv.latent_format == "bf16":
            return sparse_mla_prefill(q, self.kv.latent[layer].view(-1, self.kv.width), slots.to(torch.int32),
                                      self.scale, d_v=self.d_v)[0]
        return super().attend_prefill(layer, q, slots)

    def _attend_fp8_rows(self, layer, q, slots):
        """Prefill rows straight from the FP8 latent rows."""
        if q.shape[1] <= FP8_PREFILL_MAX_HEADS:  # the 656-B rows read in the kernel, no bf16 copy
            return sparse_mla_prefill(q, self.kv.latent[layer], slots.to(torch.int32), self.scale, d_v=self.d_v,
                                      kv_format="fp8")[0]
        return self.attend_decode(layer, q, slots)  # the FP8 paged kernel serves prefill rows too

    def attend_decode(self, layer, q, slots):
        if not self.latent_kernels:
            return super().attend_decode(layer, q, slots)
        return sparse_mla_decode(q, self.kv.latent[layer], slots.to(torch.int32), self.scale, d_v=self.d_v,
                                 kv_format=self._mla_format)[0]
