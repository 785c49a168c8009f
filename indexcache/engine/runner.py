"""One forward pass of the DSA model over a batch of prefill chunks and decode tokens, against the paged cache.

Every token is one row ("flat batch", no padding): MLA runs in its absorbed (MQA) form over gathered latent rows.
Full (F) layers run the indexer over the sequence's cached keys and turn its top-k (logical positions) into global
slot ids once; Shared (S) layers reuse those slot ids as they are. Nothing here syncs with the host on the decode
path, so it can be captured in a CUDA graph (see cuda_graph.py).
"""
from __future__ import annotations

import functools
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from ..model import DSAModel
from ..model.indexer import select_topk
from ..model.linear import Fp8Linear, fuse_fp8_linears
from ..pattern import IndexPattern
from .config import EngineConfig
from .kv_cache import KVCache


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


class Timer:
    """Per-section GPU (CUDA events) or CPU time, summed over a run; off unless the benchmark switches it on."""

    def __init__(self, cuda: bool):
        self.cuda, self.events, self.cpu = cuda, [], {}

    @contextmanager
    def section(self, name: str):
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            yield
            b.record()
            self.events.append((name, a, b))
        else:
            t = time.perf_counter()
            yield
            self.cpu[name] = self.cpu.get(name, 0.0) + (time.perf_counter() - t) * 1e3

    def summary_ms(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
            for name, a, b in self.events:
                self.cpu[name] = self.cpu.get(name, 0.0) + a.elapsed_time(b)
            self.events = []
        return dict(self.cpu)


class ModelRunner:
    def __init__(self, model: DSAModel, pattern: IndexPattern, cfg: EngineConfig, kv: KVCache):
        self.model, self.pattern, self.cfg, self.kv = model, pattern, cfg, kv
        self.mcfg = model.config
        self.device = model.embed_tokens.weight.device
        self.dtype = model.embed_tokens.weight.dtype
        self.page = cfg.page_size
        self.timer: Timer | None = None
        self._absorbed = [layer.self_attn.absorbed_weights() for layer in model.layers]
        self._x_proj = [fuse_x_projections(layer.self_attn, pattern.is_full(i)) for i, layer in enumerate(model.layers)]
        self._kernels = _load_kernels() if self.device.type == "cuda" else {}
        # decode glue (norms, projections, RoPE, MoE routing) compiled: eager decode launches ~100 small kernels
        # per layer, and at batch 1 their launch gaps, not their work, set the step time
        compile_on = cfg.compile_decode
        if compile_on is None:
            compile_on = self.device.type == "cuda" and not cfg.enforce_eager
        self._decode_fns = compile_glue(cfg.compile_backend) if compile_on else None

    def _t(self, name: str):
        return self.timer.section(name) if self.timer is not None else nullcontext()

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
        slots = None
        for i, layer in enumerate(m.layers):
            h, slots = self._layer(i, layer, h, cos, sin, b, slots)
        with self._t("rest"):
            return m.head(h[b.last_index]).float()

    def _layer(self, i, layer, h, cos, sin, b: ForwardBatch, slots):
        attn = layer.self_attn
        fn = self._decode_fns if b.decode and self._decode_fns else _GLUE
        w_uk, w_uv = self._absorbed[i]
        with self._t("attention"):
            x, q, q_resid, c_kv, k_pe, index_pre = fn["pre"](layer, h, cos, sin, w_uk, *self._x_proj[i])
            self.kv.store_latent(i, b.slot_mapping, c_kv, k_pe)
        if self.pattern.is_full(i):
            slots = self._select(i, attn.indexer, x, q_resid, cos, sin, b, fn, index_pre)
        elif slots is None:
            raise RuntimeError(f"layer {i} is shared but no full layer precedes it")
        with self._t("attention"):
            o_lat = self._sparse_attention(i, q, slots, b)
            h = fn["attn_out"](attn, h, o_lat, w_uv)
        with self._t("moe"):
            h = fn["ffn"](layer, h)
        return h, slots

    # ----- indexer + top-k (Full layers) ------------------------------------------------------------------------
    def _select(self, i, indexer, x, q_resid, cos, sin, b: ForwardBatch, fn, index_pre) -> torch.Tensor:
        """Top-k of this layer as global slot ids [T, k] (-1 = none)."""
        with self._t("indexer"):
            q, k, w = fn["index_proj"](indexer, x, q_resid, cos, sin, index_pre)
            self.kv.store_index_k(i, b.slot_mapping, k)
        fp8 = self.kv.indexer_format == "fp8"
        if b.decode:
            logical = (self._topk_decode_fp8 if fp8 else self._topk_decode_exact)(i, indexer, q, w, b)
            table = b.block_table
        else:
            parts, tables = [], []
            for s, (t0, n, ctx) in enumerate(b.segments):
                fn = self._topk_prefill_fp8 if fp8 else self._topk_prefill_exact
                parts.append(fn(i, indexer, q[t0:t0 + n], w[t0:t0 + n], b.positions[t0:t0 + n], ctx,
                                b.block_table[s]))
                tables.append(b.block_table[s].expand(n, -1))
            logical, table = torch.cat(parts), torch.cat(tables)
        with self._t("topk"):
            return to_slots(logical, table, self.page)

    def _ctx_slots(self, row: torch.Tensor, ctx: int) -> torch.Tensor:
        """Slots of positions 0..ctx-1 of the sequence whose block table is ``row``."""
        return to_slots(torch.arange(ctx, device=row.device)[None], row[None], self.page)[0]

    def _topk_prefill_exact(self, i, indexer, q, w, pos, ctx, row):
        keys = self.kv.gather_index_k(i, self._ctx_slots(row, ctx))[None]  # [1, ctx, D]
        n, heads = q.shape[:2]
        per = max(1, self.cfg.workspace_bytes // (8 * heads * ctx))  # fp32 per-head logits (+ relu copy)
        kpos = torch.arange(ctx, device=q.device)
        out = []
        for r0 in range(0, n, per):
            r1 = min(n, r0 + per)
            with self._t("indexer"):
                s = indexer.scores(q[None, r0:r1], keys, w[None, r0:r1])
            with self._t("topk"):
                out.append(select_topk(s, (kpos[None] <= pos[r0:r1, None])[None], indexer.topk)[0])
        return torch.cat(out)

    def _topk_decode_exact(self, i, indexer, q, w, b):
        L = b.max_len
        p = torch.arange(L, device=q.device)
        slots = to_slots(p.expand(len(b.context_lens), L), b.block_table, self.page)  # [B, L]
        with self._t("indexer"):
            s = indexer.scores(q[:, None], self.kv.gather_index_k(i, slots), w[:, None])  # [B,1,L]
        with self._t("topk"):
            return select_topk(s, (p[None] < b.context_lens[:, None])[:, None], indexer.topk)[:, 0]

    def _topk_prefill_fp8(self, i, indexer, q, w, pos, ctx, row):
        kx = self._kernels
        from ..kernels.indexer import plan_prefill_chunks, selection_slot_bytes
        from ..kernels.kv_store import gather_indexer_k
        with self._t("indexer"):
            q8, wf = kx["quantize_indexer_q"](q, w * indexer.n_heads ** 0.5)
            k8, ks = gather_indexer_k(self.kv.index[i], self._ctx_slots(row, ctx))
        n = q.shape[0]
        rs = torch.zeros(n, dtype=torch.int32, device=q.device)
        re = (pos + 1).to(torch.int32)
        topk_fn = kx["topk_rows"]
        out = torch.empty(n, indexer.topk, dtype=torch.int32, device=q.device)
        slot_bytes = selection_slot_bytes(topk_fn, indexer.topk, ctx)
        for r0, r1, c0, c1 in plan_prefill_chunks(rs, re, indexer.topk, self.cfg.workspace_bytes, slot_bytes):
            with self._t("indexer"):
                logits = kx["indexer_logits"](q8[r0:r1], wf[r0:r1], k8[c0:c1], ks[c0:c1], rs[r0:r1] - c0,
                                              (re[r0:r1] - c0).clamp(min=0))
            with self._t("topk"):
                idx = topk_fn(logits, indexer.topk, row_start=None, row_end=(re[r0:r1] - c0).clamp(min=0))
                out[r0:r1] = torch.where(idx >= 0, idx + c0, idx)
        return out

    def _topk_decode_fp8(self, i, indexer, q, w, b):
        kx = self._kernels
        with self._t("indexer"):
            q8, wf = kx["quantize_indexer_q"](q, w * indexer.n_heads ** 0.5)
            logits = kx["indexer_logits_decode"](q8, wf, self.kv.index[i], b.block_table, b.context_lens, b.max_len)
        with self._t("topk"):
            return kx["topk_rows"](logits, indexer.topk, row_start=None, row_end=b.context_lens)

    # ----- sparse MLA over the paged latent cache ---------------------------------------------------------------
    def _sparse_attention(self, i, q, slots, b: ForwardBatch) -> torch.Tensor:
        """q [T,h,width], slots [T,k] global ids -> o_lat [T,h,kv_lora]."""
        d_v, scale = self.mcfg.kv_lora_rank, self.mcfg.softmax_scale
        kx = self._kernels
        if q.shape[-1] == 576 and "sparse_mla_decode" in kx and (b.decode or self.kv.latent_format == "fp8"):
            fmt = "fp8" if self.kv.latent_format == "fp8" else "bf16"
            return kx["sparse_mla_decode"](q, self.kv.latent[i], slots.to(torch.int32), scale, d_v=d_v,
                                           kv_format=fmt)[0]
        if q.shape[-1] == 576 and "sparse_mla_prefill" in kx and self.kv.latent_format == "bf16":
            return kx["sparse_mla_prefill"](q, self.kv.latent[i].view(-1, 576), slots.to(torch.int32), scale,
                                            d_v=d_v)[0]
        T, k = slots.shape
        cdt = torch.float32 if q.dtype == torch.float32 else q.dtype
        per = T if b.decode else max(1, self.cfg.workspace_bytes // (k * q.shape[-1] * 4 * 2))
        out = []
        for r0 in range(0, T, per):
            sl = slots[r0:r0 + per]
            rows = self.kv.gather_latent(i, sl.clamp(min=0), cdt)  # [n,k,width]
            s = torch.einsum("thc,tkc->thk", q[r0:r0 + per].to(cdt), rows).float() * scale
            s = s.masked_fill((sl < 0)[:, None], float("-inf"))
            p = torch.softmax(s, -1).nan_to_num(0.0)
            out.append(torch.einsum("thk,tkc->thc", p.to(cdt), rows[..., :d_v]))
        return torch.cat(out).to(q.dtype)


# ----- the plain-PyTorch pieces of a layer between the kernels (decode compiles them) ---------------------------
def fuse_x_projections(attn, with_indexer: bool) -> tuple[torch.Tensor, tuple[int, ...]]:
    """One weight for every projection of the layer input x: q_a, kv_a and, on F layers, the indexer's wk and
    weights_proj. At decode each is a small GEMV whose launch and latency cost more than its bytes; one GEMM reads
    them all at once. The modules' weights become views of the fused tensor (no extra memory, same values).
    FP8 models fuse q_a and kv_a into one FP8 GEMM (a module; model/linear.py); their indexer stays apart (bf16)."""
    if isinstance(attn.q_a_proj, Fp8Linear):
        fused = fuse_fp8_linears([attn.q_a_proj, attn.kv_a_proj_with_mqa])
        return fused, (attn.q_a_proj.out_features, attn.kv_a_proj_with_mqa.out_features)
    mods = [attn.q_a_proj, attn.kv_a_proj_with_mqa]
    if with_indexer and attn.indexer is not None:
        mods += [attn.indexer.wk, attn.indexer.weights_proj]
    dtype = attn.q_a_proj.weight.dtype
    mods = [m for m in mods if m.weight.dtype == dtype]  # weights_proj may be kept in fp32: it stays apart
    w = torch.cat([m.weight.detach() for m in mods])
    start = 0
    for m in mods:
        n = m.weight.shape[0]
        m.weight = torch.nn.Parameter(w[start:start + n], requires_grad=m.weight.requires_grad)
        start += n
    return w, tuple(m.weight.shape[0] for m in mods)


def _pre_attention(layer, h, cos, sin, w_uk, w_x, splits):
    """Input norm, MLA projections with RoPE, and the absorbed query [T, h, kv_lora + rope]; also the indexer's
    x-projections (wk(x), weights_proj(x)) on F layers, else None."""
    x = layer.input_layernorm(h)
    parts = (w_x(x) if isinstance(w_x, torch.nn.Module) else torch.nn.functional.linear(x, w_x)).split(splits, dim=-1)
    q_nope, q_pe, q_resid, c_kv, k_pe = layer.self_attn.project(x[None], cos, sin, pre=(parts[0][None], parts[1][None]))
    q = torch.cat([torch.einsum("thd,hdc->thc", q_nope[0], w_uk), q_pe[0]], -1)
    # F layers: wk(x) and, when it was fused (same dtype), weights_proj(x); the indexer computes what is missing
    index_pre = (parts[2][None], parts[3][None] if len(parts) > 3 else None) if len(parts) > 2 else None
    return x, q, q_resid, c_kv[0], k_pe[0], index_pre


def _index_projection(indexer, x, q_resid, cos, sin, pre=None):
    q, k, w = indexer.project(x[None], q_resid, cos, sin, pre=pre)
    return q[0], k[0], w[0]


def _attention_out(attn, h, o_lat, w_uv):
    return h + attn.o_proj(torch.einsum("thc,hdc->thd", o_lat, w_uv).flatten(1))


def _ffn(layer, h):
    return h + layer.mlp(layer.post_attention_layernorm(h))


_GLUE = {"pre": _pre_attention, "index_proj": _index_projection, "attn_out": _attention_out, "ffn": _ffn}


@functools.lru_cache(maxsize=None)
def compile_glue(backend: str = "inductor") -> dict:
    """torch.compile'd glue, one compiled graph per (layer kind, batch bucket) shared by all layers of that kind
    (and by every engine in the process: the wrappers are made once per backend)."""
    import torch._dynamo
    # one entry per CUDA-graph batch bucket and layer kind (dense/MoE MLP, with/without indexer)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 512)
    return {k: torch.compile(f, backend=backend, dynamic=False) for k, f in _GLUE.items()}


def to_slots(logical: torch.Tensor, table: torch.Tensor, page: int) -> torch.Tensor:
    """Logical key positions [T,k] (-1 = none) -> global slot ids through each row's block table [T, max_blocks]."""
    lg = logical.long()
    blk = table.gather(1, lg.clamp(min=0) // page).long()
    return torch.where(lg < 0, -1, blk * page + lg % page)


def _load_kernels() -> dict:
    """The Triton kernels that exist in this checkout (other engineers land them independently)."""
    found = {}
    for mod, names in (("indexcache.kernels.indexer", ("quantize_indexer_q", "indexer_logits", "indexer_logits_decode")),
                       ("indexcache.kernels.topk", ("topk_rows",)),
                       ("indexcache.kernels.sparse_mla", ("sparse_mla_prefill", "sparse_mla_decode"))):
        try:
            m = __import__(mod, fromlist=list(names))
        except Exception:  # noqa: BLE001 - a kernel module that is absent or broken is simply not used
            continue
        for name in names:
            if hasattr(m, name):
                found[name] = getattr(m, name)
    if "topk_rows" not in found and "indexer_logits" in found:
        from indexcache.kernels.indexer import default_topk_fn
        found["topk_rows"] = default_topk_fn()
    return found
