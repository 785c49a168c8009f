"""The engine: owns the KV cache, the scheduler and the runner; ``step()`` is its one primitive."""
from __future__ import annotations

import random

import torch

from ..distributed.comm import broadcast_, min_over_ranks
from ..model import DSAModel
from ..sampling import SamplingParams
from .attention_backend import decode_topk_bytes, make_backend, resolve_formats
from .block_manager import BlockManager, OutOfBlocks
from .config import EngineConfig
from .glue import fuse_x_projections
from .kv_cache import KVCache, bytes_per_token
from .runner import ModelRunner
from .sampler import sample
from .scheduler import Scheduler
from .sequence import Sequence, Status


class LLMEngine:
    """Serves ``model`` with the paged cache.

    ``index_pattern`` (None: the model's own, ``model.config.pattern``) is resolved once into the per-layer plan
    (``self.plan``) that the KV cache and the runner follow; it can turn F layers into S, never S into F (an S layer
    has no indexer weights). ``LLM(path, index_pattern)`` passes its pattern to ``load_model`` instead, which
    builds the model with it (and skips the S layers' indexer weights): the layers that run are the same.

    Building an engine fuses each layer's x-projection weights in place (``glue.fuse_x_projections``: the
    model's q_a / kv_a / indexer wk / weights_proj weights become views of one tensor, same values, no extra
    memory), so decode reads them with one GEMM.
    """

    def __init__(self, model: DSAModel, cfg: EngineConfig, index_pattern=None, tokenizer=None):
        self.model, self.cfg, self.tokenizer = model, cfg, tokenizer
        # a tensor-parallel shard (distributed.shard_model): every rank runs this engine in step (SPMD)
        self.parallel = getattr(model, "parallel", None)
        self.plan = model.layer_plan(index_pattern)
        mc = model.config
        w = model.embed_tokens.weight
        self.device, self.dtype = w.device, w.dtype
        if cfg.max_model_len > mc.max_position_embeddings:
            raise ValueError(f"max_model_len={cfg.max_model_len} exceeds the model's max_position_embeddings "
                             f"({mc.max_position_embeddings})")
        fmt = resolve_formats(cfg, mc, self.dtype, self.device)
        self.cache_bytes = bytes_per_token(mc, self.plan, fmt.latent, fmt.indexer, self.dtype)
        num_blocks = cfg.num_kv_blocks or self._auto_blocks(self.cache_bytes["total"] * cfg.page_size,
                                                            decode_topk_bytes(cfg, fmt.indexer))
        self.kv = KVCache(mc, self.plan, num_blocks, cfg.page_size, fmt.latent, fmt.indexer, self.dtype, self.device)
        self.backend = make_backend(self.kv, cfg, mc)
        self.blocks = BlockManager(num_blocks, cfg.page_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(cfg, self.blocks)
        x_proj = fuse_x_projections(model, self.plan)  # an explicit step: the model's weights become views (above)
        self.runner = ModelRunner(model, self.plan, cfg, self.kv, self.backend, x_proj)
        self.graphs = None
        if self.device.type == "cuda" and not cfg.enforce_eager and self.dtype == torch.bfloat16:
            from .cuda_graph import DecodeGraphs
            self.graphs = DecodeGraphs(self.runner, min(cfg.max_num_seqs, cfg.cuda_graph_max_bs))
        eos = mc.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
        self._rng = random.Random(cfg.seed)
        self._next_id = 0
        self.num_computed_tokens = 0  # tokens run through the model (prefix-cache hits are not)

    @property
    def pattern(self):
        """The IndexPattern the engine runs (``self.plan.pattern``)."""
        return self.plan.pattern

    def _auto_blocks(self, bytes_per_page: int, reserved: int = 0) -> int:
        """Pages that fit in free GPU memory after ``gpu_memory_utilization``'s margin, twice workspace_bytes
        (prefill temporaries) and ``reserved`` bytes (the backend's decode top-k workspace)."""
        want = self.cfg.max_num_seqs * self.cfg.max_blocks_per_seq
        if self.device.type != "cuda":
            return want
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info(self.device)
        budget = int(free - (1 - self.cfg.gpu_memory_utilization) * total - self.cfg.workspace_bytes * 2 - reserved)
        n = min(want, budget // bytes_per_page - 1)
        if n < 1:
            raise OutOfBlocks(f"no GPU memory left for the KV cache ({free / 2**30:.1f} GiB free of "
                              f"{total / 2**30:.1f}); raise gpu_memory_utilization or shorten max_model_len")
        if self.parallel is not None:  # the ranks' schedulers must see the same number of pages
            n = min_over_ranks(int(n), self.parallel, self.device)
        return int(n)

    # ----- requests ---------------------------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    prompt: str | None = None) -> Sequence:
        check_request(prompt_ids, params, self.model.config.vocab_size, self.cfg.max_model_len, self.tokenizer)
        if request_id is None:
            request_id = str(self._next_id)
            self._next_id += 1
        seed = params.seed if params.seed is not None else self._rng.getrandbits(31)
        seq = Sequence(request_id, prompt_ids, params, seed, prompt)
        self.blocks.check_fits(seq, min(len(prompt_ids) + params.max_tokens, self.cfg.max_model_len))
        self.scheduler.add(seq)
        return seq

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ----- one step ---------------------------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Schedule, run one forward, sample, update; returns the sequences that finished in this step."""
        work = self.scheduler.schedule()
        if not work:
            if self.scheduler.has_work():
                raise OutOfBlocks("no request can be scheduled: the KV cache is full")
            return []
        batch = self.runner.prepare([(s.token_ids, s.num_computed, n, s.table_array()) for s, n in work])
        if self.graphs is not None and batch.decode and self.graphs.bucket(len(work)) is not None:
            logits = self.graphs.run(batch)
        else:
            logits = self.runner.forward(batch)
        rows = [j for j, (s, n) in enumerate(work) if s.num_computed + n == s.num_tokens]
        tokens = self._sample(logits, [work[j][0] for j in rows], rows) if rows else []
        for s, n in work:
            s.num_computed += n
            self.blocks.commit(s)
        self.num_computed_tokens += sum(n for _, n in work)
        finished = []
        for j, tok in zip(rows, tokens):
            seq = work[j][0]
            seq.token_ids.append(tok)
            if seq.first_token_time is None:
                import time
                seq.first_token_time = time.perf_counter()
            self.scheduler.promote(seq)
            reason = self._stop_reason(seq, tok)
            if reason:
                self.scheduler.finish(seq, reason)
                finished.append(seq)
        return finished

    def _sample(self, logits, seqs: list[Sequence], rows: list[int]) -> list[int]:
        par = self.parallel
        if par is None or par.is_single:
            return self._sample_here(logits, seqs, rows)
        # tensor parallel: rank 0 samples, every rank appends its tokens (the schedulers stay identical)
        toks = self._sample_here(logits, seqs, rows) if par.rank == 0 else [0] * len(rows)
        return broadcast_(torch.tensor(toks, dtype=torch.int64, device=self.device), par).tolist()

    def _sample_here(self, logits, seqs: list[Sequence], rows: list[int]) -> list[int]:
        dev = logits.device
        sel = logits[torch.tensor(rows, device=dev)] if len(rows) != logits.shape[0] else logits

        def t(vals, dt):
            return torch.tensor(vals, dtype=dt).to(dev, non_blocking=True)

        p = [s.params for s in seqs]
        if all(x.temperature == 0 for x in p):  # all greedy (known on the host): one argmax, no sampling kernels
            out = sel.argmax(-1)
        else:
            filtered = any(x.top_k > 0 or x.top_p < 1 for x in p)  # else the vocabulary sort is skipped
            out = sample(sel, t([x.temperature for x in p], torch.float32), t([x.top_p for x in p], torch.float32),
                         t([x.top_k for x in p], torch.int64), t([s.seed for s in seqs], torch.int64),
                         t([s.num_tokens - s.num_prompt for s in seqs], torch.int64), filtered=filtered)
        want = [x.logprobs for x in p if x.logprobs is not None]
        if want:
            return self._with_logprobs(sel, out, seqs, max(want))
        return out.tolist()  # the step's one host sync: the scheduler needs the tokens

    @staticmethod
    def _with_logprobs(sel, tokens, seqs: list[Sequence], k: int) -> list[int]:
        """Tokens, recording each asking sequence's log-probabilities of the model's distribution (before temperature
        and filtering) for its sampled token and its top ``params.logprobs`` tokens; still one host sync."""
        lp = torch.log_softmax(sel.float(), -1)
        parts = [tokens[:, None].double(), lp.gather(1, tokens[:, None]).double()]
        if k:
            top_v, top_i = lp.topk(min(k, lp.shape[-1]), -1)
            parts += [top_v.double(), top_i.double()]  # ids < 2^53 are exact in float64
        packed = torch.cat(parts, 1).cpu().tolist()
        k = (len(packed[0]) - 2) // 2
        for s, row in zip(seqs, packed):
            n = s.params.logprobs
            if n is not None:
                s.logprobs.append((row[1], [int(i) for i in row[2 + k:2 + k + n]], row[2:2 + n]))
        return [int(row[0]) for row in packed]

    def _stop_reason(self, seq: Sequence, tok: int) -> str | None:
        p = seq.params
        if (not p.ignore_eos and tok in self.eos_ids) or tok in p.stop_token_ids:
            seq.stop_reason = tok if tok in p.stop_token_ids else None
            return "stop"
        if p.stop_strings:
            text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
            for s in p.stop_strings:
                at = text.find(s)
                if at >= 0:
                    seq.text, seq.stop_reason = text[:at], s
                    return "stop"
        if len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.cfg.max_model_len:
            return "length"
        return None

    def abort(self, seq: Sequence) -> None:
        if seq.status is not Status.FINISHED:
            self.scheduler.finish(seq, "abort")


def check_request(prompt_ids: list[int], params: SamplingParams, vocab: int, max_model_len: int, tokenizer) -> None:
    """A request the engine can run, or a ValueError naming what is wrong (the in-process and the TP engine)."""
    if not prompt_ids:
        raise ValueError("a prompt needs at least one token")
    bad = [t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < vocab]
    if bad:
        raise ValueError(f"token id {bad[0]!r} is outside the vocabulary [0, {vocab})")
    if len(prompt_ids) >= max_model_len:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit max_model_len={max_model_len} "
                         "(the prompt plus at least one generated token must fit)")
    if params.stop_strings and tokenizer is None:
        raise ValueError("stop strings need a tokenizer; this model has none (use stop token ids)")
