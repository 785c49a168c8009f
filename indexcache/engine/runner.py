"""One forward pass of the DSA model over a batch of prefill chunks and decode tokens, against the paged cache.

Every token is one row ("flat batch", no padding): MLA runs in its absorbed (MQA) form over gathered latent rows.
Layers that run their indexer (the plan's F layers) turn its top-k (logical positions) into global slot ids once;
the layers that reuse it (S) take those slot ids as they are. The cache-facing operations go through the attention
backend (attention_backend.py), the plain-PyTorch rest through glue.py. Nothing here syncs with the host on the
decode path, so it can be captured in a CUDA graph (see cuda_graph.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..distributed.comm import gather_strided, strided_rows
from ..model import DSAModel
from ..pattern import LayerPlan
from .attention_backend import TorchBackend, to_slots
from .config import EngineConfig
from .glue import GLUE, compile_glue, prefill_glue
from .kv_cache import KVCache
from .timer import Timer

__all__ = ["ForwardBatch", "ModelRunner", "Timer"]


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor      # [T] int64
    positions: torch.Tensor      # [T] int64
    slot_mapping: torch.Tensor   # [T] int64: where each token's KV goes
    block_table: torch.Tensor    # [B, max_blocks] int32, one row per segment (padded with the scratch page)
    context_lens: torch.Tensor   # [B] int32: tokens in the cache after this step
    last_index: torch.Tensor     # [B] int64: row of each segment's last token (its logits are returned)
    segments: list[tuple[int, int, int]]  # host: (first row, tokens, context length after the step) per segment
    decode: bool                 # every segment is one token: the batched, graph-capturable path
    max_len: int                 # decode: key positions scored by the indexer (a multiple of the page size)


class ModelRunner:
    def __init__(self, model: DSAModel, plan: LayerPlan, cfg: EngineConfig, kv: KVCache, backend: TorchBackend,
                 x_proj: list[tuple[torch.Tensor, tuple[int, ...]]]):
        """``x_proj``: each layer's fused x-projection weight and its row splits (``glue.fuse_x_projections``)."""
        self.model, self.plan, self.cfg, self.kv, self.backend = model, plan, cfg, kv, backend
        self.parallel = getattr(model, "parallel", None)  # a tensor-parallel shard: the prefill indexer splits rows
        self.device = model.embed_tokens.weight.device
        self.page = cfg.page_size
        self._absorbed = [layer.self_attn.absorbed_weights() for layer in model.layers]
        self._x_proj = x_proj
        self._moe_kernel = cfg.moe_small_batch_kernel
        # decode glue (norms, projections, RoPE, MoE routing) compiled: eager decode launches ~100 small kernels
        # per layer, and at batch 1 their launch gaps, not their work, set the step time
        compile_on = cfg.compile_decode
        if compile_on is None:
            compile_on = self.device.type == "cuda" and not cfg.enforce_eager
        self._decode_fns = compile_glue(cfg.compile_backend) if compile_on else None
        # prefill glue: the Triton norm and RoPE kernels on CUDA, their PyTorch references elsewhere
        self._prefill_fns = prefill_glue(fused=self.device.type == "cuda")

    @property
    def timer(self) -> Timer | None:
        """Per-section timing of the forwards (benchmarks set it; None = off)."""
        return self.backend.timer

    @timer.setter
    def timer(self, timer: Timer | None) -> None:
        self.backend.timer = timer

    def _t(self, name: str):
        return self.backend._t(name)

    # ----- batch building (host) --------------------------------------------------------------------------------
    def prepare(self, work: list[tuple[list[int], int, int, "list[int] | np.ndarray"]]) -> ForwardBatch:
        """work: (token ids of the sequence, first position, tokens this step, block table) per segment.

        Block tables may be lists or int32 arrays (``Sequence.table_array()``, which the engine passes: at long
        context the table has thousands of entries, and converting lists every step dominated host time)."""
        ids, pos, slots, last, segs, ctx = [], [], [], [], [], []
        page, width = self.page, self.cfg.max_blocks_per_seq
        rows = np.full((len(work), width), self.kv.scratch_block, dtype=np.int32)
        for j, (tokens, start, n, table) in enumerate(work):
            t0 = len(ids)
            ids += tokens[start:start + n]
            p = range(start, start + n)
            pos += p
            slots += [int(table[q // page]) * page + q % page for q in p]
            segs.append((t0, n, start + n))
            last.append(t0 + n - 1)
            rows[j, :len(table)] = table
            ctx.append(start + n)
        decode = all(n == 1 for _, n, _ in segs)
        max_len = -(-max(ctx) // page) * page
        dev = self.device

        def t(x, dt):
            return torch.tensor(x, dtype=dt).to(dev, non_blocking=True)

        return ForwardBatch(t(ids, torch.int64), t(pos, torch.int64), t(slots, torch.int64),
                            torch.from_numpy(rows).to(dev, non_blocking=True), t(ctx, torch.int32),
                            t(last, torch.int64), segs, decode, max_len)

    # ----- forward ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, b: ForwardBatch) -> torch.Tensor:
        """Logits [B, vocab] (fp32) at the last token of each segment."""
        m = self.model
        h = m.embed_tokens(b.input_ids)
        cos, sin = m.rope(b.positions[None], h.dtype)
        # the top-k in flight (slot ids) and the last F layer's candidate pool for R layers: (slot ids, positions)
        slots = pool = None
        if b.decode:
            for i, layer in enumerate(m.layers):
                h, slots, pool = self._layer(i, layer, h, cos, sin, b, slots, pool)
            last = h[b.last_index]
        else:
            pending = None  # the last layer's MLP output, added to h by the next layer's input norm
            self.backend.begin_prefill(b.segments, b.block_table)
            try:
                for i, layer in enumerate(m.layers):
                    h, pending, slots, pool = self._prefill_layer(i, layer, h, pending, cos[0], sin[0], b, slots,
                                                                  pool)
            finally:
                self.backend.end_prefill()
            last = h[b.last_index] + pending[b.last_index] if pending is not None else h[b.last_index]
        with self._t("rest"):
            return m.head(last).float()

    def _layer(self, i, layer, h, cos, sin, b: ForwardBatch, slots, pool):
        attn, be = layer.self_attn, self.backend
        fn = self._decode_fns if self._decode_fns else GLUE
        w_uk, w_uv = self._absorbed[i]
        with self._t("attention"):
            x, q, q_resid, c_kv, k_pe, index_pre = fn["pre"](layer, h, cos, sin, w_uk, *self._x_proj[i])
            be.store_latent(i, b.slot_mapping, c_kv, k_pe)
        slots, pool = self._top_k(i, attn, x, q_resid, cos, sin, b, fn, index_pre, slots, pool)
        with self._t("attention"):
            o_lat = be.attend_decode(i, q, slots)
            h = fn["attn_out"](attn, h, o_lat, w_uv)
        with self._t("moe"):
            h = fn["ffn"](layer, h, self._moe_kernel)
        return h, slots, pool

    def _prefill_layer(self, i, layer, h, pending, cos, sin, b: ForwardBatch, slots, pool):
        """``_layer`` for prefill rows (``glue.prefill_glue``): returns (h, MLP output not yet added, slots, pool)."""
        attn, be, fn = layer.self_attn, self.backend, self._prefill_fns
        w_uk, w_uv = self._absorbed[i]
        with self._t("attention"):
            h, x, q, q_resid, c_kv, k_pe, index_pre = fn["pre"](layer, h, pending, cos, sin, w_uk, *self._x_proj[i])
            be.store_latent(i, b.slot_mapping, c_kv, k_pe)
        slots, pool = self._top_k(i, attn, x, q_resid, cos, sin, b, fn, index_pre, slots, pool)
        with self._t("attention"):
            a = fn["attn_out"](attn, be.attend_prefill(i, q, slots), w_uv)
        with self._t("moe"):
            h, pending = fn["ffn"](layer, h, a, self._moe_kernel)
        return h, pending, slots, pool

    def _top_k(self, i, attn, x, q_resid, cos, sin, b: ForwardBatch, fn, index_pre, slots, pool):
        """(top-k slot ids this layer attends with, candidate pool in flight) by the layer's role in the plan."""
        role = self.plan[i]
        if role.reranks:
            slots = self._rerank(i, attn.indexer, x, q_resid, cos, sin, b, fn, index_pre, pool)
        elif role.runs_indexer:
            slots = self._select(i, attn.indexer, x, q_resid, cos, sin, b, fn, index_pre, role.publishes_pool)
            if role.publishes_pool:
                slots, pool = slots
        elif slots is None:
            raise RuntimeError(f"layer {i} is shared but no full layer precedes it")
        return slots, pool

    def _select(self, i, indexer, x, q_resid, cos, sin, b: ForwardBatch, fn, index_pre, pool: int = 0):
        """Top-k of this layer as global slot ids [T, k] (-1 = none); with ``pool`` > 0 (an F layer serving
        re-rank layers) also its top-``pool`` candidates: (top-k, (pool slot ids, pool positions)); R layers break
        their ties by position, as the model does."""
        be = self.backend
        with self._t("indexer"):
            q, k, w = fn["index_proj"](indexer, x, q_resid, cos, sin, index_pre)
            be.store_index_k(i, b.slot_mapping, k)
        if not b.decode:
            return self._select_prefill(i, indexer, q, w, b, pool)
        logical = be.topk_decode(i, indexer, q, w, b.block_table, b.context_lens, b.max_len, pool)
        with self._t("topk"):
            if pool:
                top, cand = logical
                return to_slots(top, b.block_table, self.page), (to_slots(cand, b.block_table, self.page), cand)
            return to_slots(logical, b.block_table, self.page)

    def _select_prefill(self, i, indexer, q, w, b: ForwardBatch, pool: int):
        """``_select`` over prefill segments: each segment's top-k turned into slot ids through its own block-table
        row (a broadcast view, not a [T, max_blocks] copy); one concatenation only when there are several."""
        be, par = self.backend, self.parallel
        out = []
        for s, (t0, n, ctx) in enumerate(b.segments):
            if par is None or par.is_single:
                mine = be.topk_prefill(i, indexer, q[t0:t0 + n], w[t0:t0 + n], b.positions[t0:t0 + n], ctx,
                                       b.block_table[s], pool)
            else:  # tensor parallel: each rank scores every N-th query row, the top-k rows are all-gathered
                rows = t0 + strided_rows(n, par, q.device)
                mine = be.topk_prefill(i, indexer, q[rows], w[rows], b.positions[rows], ctx, b.block_table[s], pool)
                mine = tuple(gather_strided(m, n, par) for m in mine) if pool else gather_strided(mine, n, par)
            table = b.block_table[s].expand(n, -1)
            with self._t("topk"):  # the backend's kernel (decode keeps the PyTorch form its compiled step traces)
                if pool:  # (top-k slots, pool slots, pool positions)
                    out.append((be.prefill_slots(mine[0], table), be.prefill_slots(mine[1], table), mine[1]))
                else:
                    out.append(be.prefill_slots(mine, table))
        if not pool:
            return out[0] if len(out) == 1 else torch.cat(out)
        top, cand, cand_pos = out[0] if len(out) == 1 else tuple(torch.cat(parts) for parts in zip(*out))
        return top, (cand, cand_pos)

    def _rerank(self, i, indexer, x, q_resid, cos, sin, b: ForwardBatch, fn, index_pre, pool) -> torch.Tensor:
        """A re-rank layer: its own indexer over the last F layer's candidate pool -> top-k slot ids [T, k]."""
        if pool is None:
            raise RuntimeError(f"layer {i} re-ranks but no full layer before it published a candidate pool")
        with self._t("indexer"):
            q, k, w = fn["index_proj"](indexer, x, q_resid, cos, sin, index_pre)
            self.backend.store_index_k(i, b.slot_mapping, k)
        return self.backend.rerank(i, indexer, q, w, *pool)
