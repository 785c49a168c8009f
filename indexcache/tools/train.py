"""Train a small DSA model on the stdlib corpus, DeepSeek-V3.2's DSA recipe in miniature:

0. (optional, ``copy_steps``) copy warm-up: dense attention on short windows of random text in which a segment
   repeats (tasks.copy_windows), so the heads that copy from context form first, cheaply;
1. dense pre-training: attention over all causal tokens, LM loss, indexers unused;
2. indexer warm-up: only the indexers train, KL(p_t || softmax(I_t)), p_t = head-averaged dense attention;
3. sparse training: top-k on; indexer loss over the selected set (indexer input detached) + LM loss for the rest.

Reproducible from ``seed`` for a given device (step counts fixed; ``time_budget_s`` only cuts a stage short and the
steps actually done are recorded in the checkpoint's config.json under ``"training"``).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch

from ..checkpoint import build_empty, save_checkpoint
from ..config import ModelConfig
from ..distributed.training import any_rank, clip_grad_norm_, reduce_gradients
from ..progress import Progress
from .corpus import ByteTokenizer, load_corpus
from .probe import copy_reach
from .tasks import COPY_GAPS, COPY_SEGMENT, copy_alphabet_of, copy_episode_windows, copy_windows, mixed_windows
from .trainfwd import forward_train


@dataclass
class TrainConfig:
    layers: int = 16
    hidden: int = 64
    heads: int = 2
    q_lora: int = 64
    kv_lora: int = 64
    nope: int = 16
    rope: int = 16
    v: int = 32
    mlp: int = 192
    index_heads: int = 2
    index_dim: int = 32
    topk: int = 32
    context: int = 512
    batch: int = 8
    dense_steps: int = 300
    warmup_steps: int = 40
    sparse_steps: int = 60
    lr: float = 3e-3
    warmup_lr: float = 2e-3
    sparse_lr: float = 1e-3
    index_coef: float = 1.0
    # query rows per window that the warm-up and sparse stages' indexer loss covers, drawn at random each step
    # (None: all). The loss needs [B,T,T] indexer scores with their gradient and [B,heads,T,T] attention
    # probabilities per layer; at 8192 tokens those made an indexer step ~8x a dense one (H200 run 72)
    index_rows: int | None = None
    seed: int = 0
    # weights start N(0, init_std). From scratch, this MLA stack learns to copy from context (induction) late:
    # benchmarks/induction_toy.py learns it faster at 0.08 than at 0.02, and at lr 1e-3 than at 3e-3 or 1e-2
    init_std: float = 0.02
    # std of the MLP output projections (None: init_std). 0 starts every MLP at zero: a random MLP's output
    # swamps the token identity in a small model's residual stream, and the toy then forms the
    # previous-token + induction heads that copying needs late or never (results/induction_toy_cpu.log)
    init_mlp_out_std: float | None = None
    max_train_bytes: int | None = None
    task_ratio: float = 0.0  # share of training windows that are synthetic retrieval tasks (tools/tasks.py)
    tasks_packed: bool = False  # task windows hold many episodes each (tasks.packed_window), not one item
    task_tokens_per_episode: int = 256  # packed windows: one episode per this many tokens ...
    task_share: float = 0.5             # ... filling at most this share of the window
    # ((task, weight), ...): tasks drawn with these weights (tasks.task_weights_for; None: alike). The testbed's
    # model solved the passkey and multi-needle tasks, whose query repeats the fact's words, and ~10% of the
    # lookups, whose query asks in other words (H200 run 75)
    task_weights: tuple | None = None
    # window lengths cycled step by step (None: ``context`` always); batch scales so tokens per step stay
    # batch x context. The warm-up and sparse stages skip lengths above ``context``: their masked training
    # forward holds [B, heads, T, T] attention per layer for the backward
    contexts: tuple | None = None
    # copy warm-up stage before the dense one (0: none): dense attention on ``copy_batch`` pure copy windows of
    # ``copy_length`` tokens per step (tasks.copy_windows). From scratch, the testbed's model never formed
    # copying heads from code and packed task windows within its dense budget. A 4-layer model learned to copy
    # from 64-token windows of letters with one repeated segment in ~1500 steps (not from longer or mixed ones)
    copy_steps: int = 0
    copy_length: int = 64
    copy_batch: int = 256
    copy_lr: float = 1e-3
    # share of each dense-stage batch made of copy windows packed end to end (0: none): keeps the copying heads
    # of the copy stage alive while the model meets the corpus (without it they collapsed within 100 dense steps)
    copy_share: float = 0.0
    # what those rows hold: "short" copy windows packed end to end, or "episodes": one window of the batch's length
    # holding a copy per copy_length tokens at distances spread over it as copy_long_gaps says (the long phase's
    # windows, text in copy_rows_alphabet): the short windows keep the copier working only within copy_length tokens
    copy_rows: str = "short"
    # the copy windows' random text (bytes); letters are what the copying heads form on from scratch
    copy_alphabet: str = "abcdefghijklmnopqrstuvwxyz"
    copy_inner: int | None = None  # the copy inside a random sub-window of this many tokens (tasks.copy_windows)
    # the copy stage's last ``copy_long_share`` of steps on windows of ``copy_long_length`` tokens (None: none)
    # holding one copy episode per copy_length tokens at distances spread over the window (``copy_batch``), as many
    # tokens per step. Copying learned on copy_length-token windows works only there: RoPE makes a head's logit a
    # sum of cosines of the distance, pinned down only at the distances training showed, so the previous-token
    # heads' logits at unseen distances rise to and above the one at distance 1. After the short windows, 200
    # steps of such 512-token windows made a 4-layer CPU model copy at any offset and distance up to 512 tokens,
    # less surely beyond (benchmarks/results/copy_position_cpu.log): make it the longest length that must work.
    # From scratch, long windows formed no copying in 2000 steps. Increasing lengths run in turn (the phase's steps
    # split evenly): one jump from 64 to 2048 (CPU) or 16384 tokens (H200) erased the copying even at 64 tokens,
    # steps of 2-4x extended it (benchmarks/results/copy_long_cpu.log)
    copy_long_length: int | tuple | None = None
    copy_long_share: float = 0.25
    # the long windows' copy distances: "uniform" over the window, or "log"-uniform (as many short copies as long
    # ones: with the curriculum, short copies deep in a 2048-token window 0.45 nats instead of 1.39)
    copy_long_gaps: str = "uniform"
    copy_long_mix: float = 0.0  # share of each long-phase step's tokens given to short copy windows (copy_batches)
    # the long windows' random text: this many distinct byte tokens (tasks.copy_alphabet_of), None: copy_alphabet.
    # Matching one previous token, an induction head meets a false match about every alphabet-size tokens
    copy_long_alphabet: int | None = None
    # near-copies of each long-window copy before it (tasks.copy_distractor_spans): they repeat the segment's runs of
    # ``copy_long_distract_match`` tokens, each followed by a wrong token, so a copier matching that many previous
    # tokens is punished and one matching one more is not. In random letters a 2-token look-alike comes only every
    # ~676 tokens, and the 4-layer CPU copier stays a ~2-token matcher (benchmarks/results/copy_reach_cpu.log)
    copy_long_distract: int = 0
    copy_long_distract_match: int = 2
    # RoPE base. Only RoPE makes a logit depend on the distance; on the CPU base 1e4 did not limit a 4-layer induction
    # copier (it copies 1536 tokens back at 0.47 nats after the 2x curriculum), 1e6 formed no copying in 3200 steps
    # of 64-token windows where 1e4 did, and switching 1e4 -> 1e6 for the long phase extended less
    # (benchmarks/results/copy_theta_cpu.log)
    rope_theta: float = 10000.0
    # after the copy stage: while the copied NLL in held-out windows of the longest copy_long_length
    # (probe.copy_reach) is above ``copy_reach_nats``, up to ``copy_reach_blocks`` more blocks of
    # ``copy_reach_block`` steps on such windows (None: no check). The induction copier forms in a phase change late
    # in the stage (H200 run 70: 16 layers at step 1200-1500 of 1500, 8 layers not by 1500), and a model that copies
    # only a few dozen tokens back cannot retrieve
    copy_reach_nats: float | None = None
    copy_reach_block: int = 100
    copy_reach_blocks: int = 0  # per phase (letters, then each of copy_reach_alphabets)
    # then the same check and blocks on windows of these alphabet sizes in turn (tasks.copy_alphabet_of: letters,
    # capitals, digits, punctuation): the letters' copier copies letters only. The testbed's model copied letters
    # 1024 tokens back at 0.14 nats after the dense stage and digits or hex not at all (2.66, 2.99: chance 2.30,
    # 2.77), and retrieved nothing (run 71); on the CPU a jump from 26 to 64 symbols erased the letter copier
    copy_reach_alphabets: tuple = ()
    time_budget_s: float | None = None  # for the whole run; split 70/10/20 across the stages (a copy stage
    #                                     gets at most the first 15%, and the dense stage the rest of its 70%)

    def training_windows(self, corpus, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
        """``n`` windows of ``length`` tokens in this config's mix of corpus code and retrieval tasks."""
        return mixed_windows(corpus, n, length, self.task_ratio, gen, packed=self.tasks_packed,
                             tokens_per_episode=self.task_tokens_per_episode, task_share=self.task_share,
                             weights=self.task_weights)

    def init_weights(self, model):
        """This config's random initialisation of a freshly built model (returns it)."""
        return model.init_random(self.seed, std=self.init_std, mlp_out_std=self.init_mlp_out_std)

    def model_config(self) -> ModelConfig:
        tok = ByteTokenizer
        d = dict(model_type="glm_moe_dsa", vocab_size=tok.vocab_size, hidden_size=self.hidden,
                 intermediate_size=self.mlp, moe_intermediate_size=self.mlp, num_hidden_layers=self.layers,
                 num_attention_heads=self.heads, q_lora_rank=self.q_lora, kv_lora_rank=self.kv_lora,
                 qk_nope_head_dim=self.nope, qk_rope_head_dim=self.rope, v_head_dim=self.v, n_routed_experts=8,
                 n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
                 first_k_dense_replace=self.layers,  # all-dense MLPs: small models gain nothing from MoE
                 index_n_heads=self.index_heads, index_head_dim=self.index_dim, index_topk=self.topk,
                 rope_theta=self.rope_theta, max_position_embeddings=max(4 * self.context, 4096), rms_norm_eps=1e-5,
                 bos_token_id=tok.BOS, eos_token_id=tok.EOS, tie_word_embeddings=False)
        return ModelConfig.from_hf_dict(d, name="stdlib-dsa")


PRESETS = {
    # committed test fixture (tests/fixtures/stdlib-dsa-tiny): CPU, a few minutes
    "fixture": TrainConfig(),
    # the results model (docs/quality.md): one H200, ~5 minutes; top-k 128 of a 4096-token context
    "gpu": TrainConfig(layers=16, hidden=256, heads=4, q_lora=128, kv_lora=128, nope=48, rope=16, v=64, mlp=768,
                       index_heads=4, index_dim=32, topk=128, context=4096, batch=8, dense_steps=1500,
                       warmup_steps=150, sparse_steps=300, lr=2e-3, warmup_lr=2e-3, sparse_lr=5e-4),
    # the retrieval testbed (benchmarks/retrieval_testbed.py): half the windows are synthetic retrieval tasks,
    # 4K-16K tokens; step counts are set there from a time budget. Width 128 (4 heads of 32 + 16 rope): at width
    # 256 the copy stage built a positional copier that reached ~64 tokens back; at 128 the same stage forms an
    # induction copier that copies at every distance to 4096 (H200 run 70, docs/quality.md)
    "retrieval": TrainConfig(layers=16, hidden=128, heads=4, q_lora=128, kv_lora=128, nope=32, rope=16, v=32,
                             mlp=384, index_heads=4, index_dim=32, topk=128, context=8192, batch=4,
                             contexts=(4096, 8192, 16384), task_ratio=0.5, tasks_packed=True, init_std=0.06,
                             # tasks drawn alike: run 75 (alike) retrieved 0.39 at 8K; run 79, weighted toward
                             # the lookups (its state.json has the weights), 0.13, and the lookups did not improve
                             init_mlp_out_std=0.0,  # MLPs start at zero: induction forms (see TrainConfig)
                             copy_steps=1500, copy_length=64, copy_batch=256, copy_lr=1e-3,
                             # 64-token windows, then 2x steps of length with log-uniform copy distances
                             copy_long_length=(128, 256, 512, 1024, 2048, 4096), copy_long_share=0.4,
                             copy_long_gaps="log",
                             copy_reach_nats=0.5, copy_reach_block=100, copy_reach_blocks=4,
                             copy_reach_alphabets=(40, 52, 62, 80, 95),  # capitals, digits, punctuation in turn
                             # a quarter of each dense batch keeps copying across the window (the CPU copier
                             # collapsed within 100 plain dense steps and was kept with such rows)
                             copy_share=0.25, copy_rows="episodes",
                             # the indexer loss on 1024 query rows of each window: 1/8 of its work at 8192 tokens
                             index_rows=1024,
                             dense_steps=3000, warmup_steps=200,
                             sparse_steps=500, lr=1e-3, warmup_lr=2e-3, sparse_lr=5e-4),
}


STAGE_ORDER = ("copy", "dense", "warmup", "sparse")


def indexer_params(model):
    return [p for n, p in model.named_parameters() if ".indexer." in n]


def main_params(model):
    return [p for n, p in model.named_parameters() if ".indexer." not in n]


def _lr_at(step: int, total: int, base: float, warm: int = 20, decay: bool = True) -> float:
    """Linear warm-up, then cosine decay to 0 at ``total`` (``decay``) or constant. The copy warm-up keeps its rate:
    copying forms suddenly after many steps at full rate, and the dense stage brings its own schedule."""
    if step < warm:
        return base * (step + 1) / warm
    if not decay:
        return base
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


def run_stage(model, corpus, stage: str, steps: int, lr: float, tc: TrainConfig, gen: torch.Generator,
              pattern=None, params=None, deadline: float | None = None, progress: bool | None = None,
              log_every: int = 10, start_step: int = 0, opt_state: dict | None = None, checkpoint=None,
              checkpoint_every_s: float | None = None) -> dict:
    """Train ``steps`` steps of ``stage``; returns a log with the loss curve (every ``log_every`` steps).

    Resuming: ``start_step`` and ``opt_state`` (an optimizer state_dict) continue a stage cut short (the learning
    rate schedule follows the step index). ``checkpoint(next_step, optimizer)`` is called every
    ``checkpoint_every_s`` seconds and once when the stage ends or hits the deadline."""
    device = next(model.parameters()).device
    if stage not in STAGE_ORDER:
        raise ValueError(f"stage must be one of {STAGE_ORDER}, got {stage!r}")
    train_indexer = stage in ("warmup", "sparse")
    if params is None:
        params = {"copy": main_params, "dense": main_params, "warmup": indexer_params,
                  "sparse": lambda m: list(m.parameters())}[stage](model)
    wanted = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
    amp = device.type == "cuda"
    # fused: one kernel for all parameters (a small model's optimizer step is otherwise launch-bound)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01 if stage != "warmup" else 0.0,
                            fused=amp)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    curve, done, t0 = [], 0, time.perf_counter()
    last_ck = t0
    model.train()
    with Progress(steps - start_step, f"train/{stage}", " steps", progress) as bar:
        for step in range(start_step, steps):
            if deadline is not None and any_rank(time.perf_counter() > deadline, getattr(model, "parallel", None)):
                break  # all ranks stop at the same step
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, steps, lr, decay=stage != "copy")
            if stage == "copy":
                batches = copy_batches(tc, step, steps, gen)
            else:
                length, batch = _window(tc, step, stage)
                batches = [_with_copy_rows(tc, tc.training_windows(corpus, batch, length + 1, gen), gen, stage)]
            # a long-phase step mixed with short copy windows: two forwards, losses weighted by their token shares
            weights = [1.0] if len(batches) == 1 else [1.0 - tc.copy_long_mix, tc.copy_long_mix]
            opt.zero_grad(set_to_none=True)
            lm_parts = []
            for ids, w in zip(batches, weights):
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    lm, idx = forward_train(model, ids.to(device), "dense" if stage == "copy" else stage, pattern,
                                            index_backward=train_indexer,
                                            index_coef=tc.index_coef, index_rows=tc.index_rows, gen=gen)
                if lm is not None and stage != "warmup":
                    (lm if len(batches) == 1 else w * lm).backward()
                if lm is not None:
                    lm_parts.append(w * lm.detach())
            lm = sum(lm_parts) if lm_parts else None
            reduce_gradients(model, params)  # a sharded model's (distill -tp N); nothing on one process
            clip_grad_norm_(model, params, 1.0)
            opt.step()
            done += 1
            rec = {"step": step, "lm": None if lm is None else float(lm.detach()), "index_kl": idx}
            if step % log_every == 0 or step == steps - 1:
                curve.append(rec)
            bar.update(note=" ".join(f"{name} {v:.3f}" for name, v in (("lm", rec["lm"]), ("kl", idx))
                                     if v is not None))  # the warm-up computes no LM loss, dense training no KL
            if checkpoint is not None and checkpoint_every_s is not None \
                    and time.perf_counter() - last_ck > checkpoint_every_s:
                checkpoint(step + 1, opt)
                last_ck = time.perf_counter()
    if checkpoint is not None:
        checkpoint(start_step + done, opt)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return {"stage": stage, "steps_planned": steps, "steps_done": done, "seconds": time.perf_counter() - t0,
            "lr": lr, "curve": curve, "start_step": start_step}


def _with_copy_rows(tc: TrainConfig, ids: torch.Tensor, gen: torch.Generator, stage: str) -> torch.Tensor:
    """The dense stage's batch with its first round(copy_share x rows) rows replaced by copy windows: ``copy_rows``
    "short": windows of ``copy_length`` tokens packed end to end; "episodes": one copy per ``copy_length`` tokens
    at ``copy_long_gaps`` distances across the row (tasks.copy_episode_windows)."""
    rows = round(tc.copy_share * ids.shape[0]) if stage == "dense" else 0
    if rows <= 0:
        return ids
    ids, L = ids.clone(), ids.shape[1]
    if tc.copy_rows == "episodes":
        ids[:rows] = copy_episode_windows(rows, L, gen, every=tc.copy_length, max_gap=L - 1 - 2 * COPY_SEGMENT,
                                          alphabet=copy_rows_alphabet(tc), gaps=tc.copy_long_gaps)
    elif tc.copy_rows == "short":
        per = -(-L // tc.copy_length)
        ids[:rows] = copy_windows(rows * per, tc.copy_length, gen,
                                  alphabet=tc.copy_alphabet.encode()).view(rows, -1)[:, :L]
    else:
        raise ValueError(f"copy_rows must be one of {COPY_ROWS}, got {tc.copy_rows!r}")
    return ids


COPY_ROWS = ("short", "episodes")


def copy_long_lengths(tc: TrainConfig) -> tuple:
    """The long phase's window lengths in order (``copy_long_length``: one length or increasing lengths), checked."""
    if tc.copy_long_length is None:
        return ()
    lengths = tuple(tc.copy_long_length) if isinstance(tc.copy_long_length, (tuple, list)) else (tc.copy_long_length,)
    if not lengths or any(isinstance(L, bool) or not isinstance(L, int) for L in lengths) \
            or lengths[0] <= tc.copy_length or any(b <= a for a, b in zip(lengths, lengths[1:])):
        raise ValueError(f"copy_long_length must be a length or increasing lengths, each above copy_length "
                         f"({tc.copy_length}), got {tc.copy_long_length!r}")
    if not 0.0 <= tc.copy_long_share <= 1.0:
        raise ValueError(f"copy_long_share must be in [0, 1], got {tc.copy_long_share!r}")
    if tc.copy_long_gaps not in COPY_GAPS:  # refused at the first step, not when the long phase starts
        raise ValueError(f"copy_long_gaps must be one of {COPY_GAPS}, got {tc.copy_long_gaps!r}")
    if not 0.0 <= tc.copy_long_mix < 1.0:
        raise ValueError(f"copy_long_mix must be in [0, 1), got {tc.copy_long_mix!r}")
    if isinstance(tc.copy_long_distract, bool) or not isinstance(tc.copy_long_distract, int) \
            or tc.copy_long_distract < 0:
        raise ValueError(f"copy_long_distract must be an integer >= 0 (near-copies per copy), "
                         f"got {tc.copy_long_distract!r}")
    if isinstance(tc.copy_long_distract_match, bool) or not isinstance(tc.copy_long_distract_match, int) \
            or not 1 <= tc.copy_long_distract_match <= COPY_SEGMENT - 2:
        raise ValueError(f"copy_long_distract_match must be an integer in [1, {COPY_SEGMENT - 2}] (tokens a "
                         f"distractor shares before each wrong one), got {tc.copy_long_distract_match!r}")
    if tc.copy_long_alphabet is not None:
        try:
            copy_alphabet_of(tc.copy_long_alphabet)
        except ValueError as e:
            raise ValueError(f"copy_long_alphabet: {e}") from None
    return lengths


def copy_window_length(tc: TrainConfig, step: int, steps: int) -> int:
    """The copy stage's window length at ``step`` of ``steps``: ``copy_length``, and in the last
    ``copy_long_share`` of the steps ``copy_long_length`` (several lengths: those steps split evenly among them,
    shortest first: a copier formed on 64 tokens and moved to far longer windows at once lost its copying even at
    64, while 4x steps kept and extended it; benchmarks/results/copy_long_cpu.log)."""
    lengths = copy_long_lengths(tc)
    n_long = round(tc.copy_long_share * steps) if lengths else 0
    if n_long and step >= steps - n_long:
        return lengths[min(len(lengths) - 1, (step - (steps - n_long)) * len(lengths) // n_long)]
    return tc.copy_length


def copy_batch(tc: TrainConfig, step: int, steps: int, gen: torch.Generator) -> torch.Tensor:
    """The copy stage's windows [batch, length + 1] at ``step`` of ``steps`` (``copy_window_length``):
    ``copy_batch`` copy windows of ``copy_length`` tokens (tasks.copy_windows), or in the long phase windows holding
    one copy episode per ``copy_length`` tokens (the short windows' copy density), copy distances spread over the
    window as ``copy_long_gaps`` says, their text in ``copy_long_alphabet`` when set, ``copy_long_distract``
    near-copies before each copy (tasks.copy_episode_windows),
    as many tokens per step less the ``copy_long_mix`` share that ``copy_batches`` gives to short windows."""
    alphabet = tc.copy_alphabet.encode()
    length = copy_window_length(tc, step, steps)
    if length != tc.copy_length:
        if tc.copy_long_alphabet is not None:
            alphabet = copy_alphabet_of(tc.copy_long_alphabet)
        batch = max(1, round((1.0 - tc.copy_long_mix) * tc.copy_batch * tc.copy_length / length))
        return copy_episode_windows(batch, length + 1, gen, every=tc.copy_length,
                                    max_gap=length - 2 * COPY_SEGMENT, alphabet=alphabet, gaps=tc.copy_long_gaps,
                                    distract=tc.copy_long_distract, distract_match=tc.copy_long_distract_match)
    return copy_windows(tc.copy_batch, tc.copy_length + 1, gen, alphabet=alphabet, inner=tc.copy_inner)


def copy_batches(tc: TrainConfig, step: int, steps: int, gen: torch.Generator) -> list[torch.Tensor]:
    """A copy-stage step's batches: ``copy_batch``'s, and in the long phase with ``copy_long_mix`` > 0 also that
    share of the step's tokens as short copy windows (``copy_length``; a second batch, its own forward), so the
    copying that works on short windows keeps its gradient while the long windows teach the long distances."""
    ids = copy_batch(tc, step, steps, gen)
    if tc.copy_long_mix > 0 and copy_window_length(tc, step, steps) != tc.copy_length:
        return [ids, copy_windows(max(1, round(tc.copy_long_mix * tc.copy_batch)), tc.copy_length + 1, gen,
                                  alphabet=tc.copy_alphabet.encode(), inner=tc.copy_inner)]
    return [ids]


def copy_reach_config(tc: TrainConfig, alphabet: int | None = None) -> TrainConfig:
    """The copy stage's extension (``copy_reach_nats``): every step on windows of the longest ``copy_long_length``,
    as many tokens a step as the stage, their text in ``alphabet`` symbols (tasks.copy_alphabet_of; None: the
    stage's long-window text)."""
    lengths = copy_long_lengths(tc)
    if not lengths:
        raise ValueError("copy_reach_nats needs copy_long_length: the reach is measured on the longest long windows")
    return dataclasses.replace(tc, copy_long_length=lengths[-1], copy_long_share=1.0,
                               copy_long_alphabet=tc.copy_long_alphabet if alphabet is None else alphabet)


def copy_rows_alphabet(tc: TrainConfig) -> bytes:
    """The text of the dense stage's copy rows: the widest alphabet the copy stage taught (``copy_alphabet`` or the
    last of ``copy_reach_alphabets``)."""
    return copy_alphabet_of(tc.copy_reach_alphabets[-1]) if tc.copy_reach_alphabets else tc.copy_alphabet.encode()


def extend_copy(model, corpus, tc: TrainConfig, gen: torch.Generator, state: dict, opt_state: dict | None = None,
                deadline: float | None = None, checkpoint=None, progress: bool | None = None) -> tuple[bool, dict]:
    """After the copy stage, in phases (the stage's own long windows, then each of ``copy_reach_alphabets``):
    measure the copy reach (probe.copy_reach on the longest long windows in the phase's alphabet) and, while it is
    above ``copy_reach_nats``, train blocks of ``copy_reach_block`` more long-window steps in that alphabet, at most
    ``copy_reach_blocks`` a phase, with the stage's optimizer (``opt_state``) and rate. Resumable: ``state``
    ({"phase", "blocks" in the phase, "step" over all phases, "reach": per phase the NLL before each block and after
    the last}) is updated in place, ``checkpoint(next_step, opt)`` as in ``run_stage``. Returns (finished, the
    optimizer's state); not finished when ``deadline`` cut a block."""
    for key, value in (("phase", 0), ("blocks", 0), ("step", 0), ("reach", [])):
        state.setdefault(key, value)
    longest = copy_long_lengths(tc)[-1]
    phases = [tc.copy_long_alphabet] + list(tc.copy_reach_alphabets)
    box = {"opt": opt_state}

    def keep(next_step, opt):
        box["opt"] = opt.state_dict()
        state["step"] = next_step
        if checkpoint is not None:
            checkpoint(next_step, opt)

    while state["phase"] < len(phases):
        size = phases[state["phase"]]
        alphabet = tc.copy_alphabet.encode() if size is None else copy_alphabet_of(size)
        if len(state["reach"]) <= state["phase"]:
            state["reach"].append([])
        reach = state["reach"][state["phase"]]
        if len(reach) <= state["blocks"]:
            reach.append(copy_reach(model, longest, alphabet=alphabet, gaps=tc.copy_long_gaps))
        if reach[-1] <= tc.copy_reach_nats or state["blocks"] >= tc.copy_reach_blocks:
            state["phase"], state["blocks"] = state["phase"] + 1, 0
            continue
        end = state["step"] - state["step"] % tc.copy_reach_block + tc.copy_reach_block
        run_stage(model, corpus, "copy", end, tc.copy_lr, copy_reach_config(tc, size), gen, start_step=state["step"],
                  opt_state=box["opt"], deadline=deadline, checkpoint=keep, progress=progress)
        if state["step"] < end:
            return False, box["opt"]
        state["blocks"] += 1
    return True, box["opt"]


def _window(tc: TrainConfig, step: int, stage: str = "dense") -> tuple[int, int]:
    """(window length, batch) of a step: ``contexts`` cycled (only those <= ``context`` outside the dense stage),
    tokens per step kept at batch x context; the copy stage has its own (``copy_window_size``)."""
    lengths = [L for L in (tc.contexts or ()) if stage == "dense" or L <= tc.context]
    if not lengths:
        return tc.context, tc.batch
    length = lengths[step % len(lengths)]
    return length, max(1, tc.batch * tc.context // length)


def stages(tc: TrainConfig) -> list[tuple[str, int, float]]:
    """(stage, steps, lr) of ``tc``'s recipe in order: the copy warm-up (when ``copy_steps`` > 0), dense, warm-up,
    sparse. A resumable run counts its position in this list."""
    if tc.copy_rows not in COPY_ROWS:
        raise ValueError(f"copy_rows must be one of {COPY_ROWS}, got {tc.copy_rows!r}")
    if tc.copy_reach_nats is not None:
        if tc.copy_steps <= 0 or not copy_long_lengths(tc):
            raise ValueError(f"copy_reach_nats={tc.copy_reach_nats!r} needs a copy stage with copy_long_length "
                             f"(copy_steps={tc.copy_steps}, copy_long_length={tc.copy_long_length!r})")
        for size in tc.copy_reach_alphabets:
            try:
                copy_alphabet_of(size)
            except ValueError as e:
                raise ValueError(f"copy_reach_alphabets: {e}") from None
        for name in ("copy_reach_block", "copy_reach_blocks"):
            v = getattr(tc, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "copy_reach_block" else 0):
                raise ValueError(f"{name} must be an integer >= {1 if name == 'copy_reach_block' else 0}, got {v!r}")
    out = [("copy", tc.copy_steps, tc.copy_lr)] if tc.copy_steps > 0 else []
    return out + [("dense", tc.dense_steps, tc.lr), ("warmup", tc.warmup_steps, tc.warmup_lr),
                  ("sparse", tc.sparse_steps, tc.sparse_lr)]


# cumulative share of ``time_budget_s`` at which each stage is cut short (a copy stage only caps itself: the dense
# stage keeps the time it leaves)
BUDGET_SHARES = {"copy": 0.15, "dense": 0.70, "warmup": 0.80, "sparse": 1.0}


def train(tc: TrainConfig, device="cpu", out_dir: str | None = None, progress: bool | None = None) -> tuple:
    """Train the stages (``stages``); save to ``out_dir`` (GLM-family checkpoint) when given. Returns (model, log)."""
    torch.manual_seed(tc.seed)
    device = torch.device(device)
    cfg = tc.model_config()
    model = tc.init_weights(build_empty(cfg, device, torch.float32))
    corpus = load_corpus("train", max_bytes=tc.max_train_bytes)
    gen = torch.Generator().manual_seed(tc.seed)
    t0 = time.perf_counter()
    budget = tc.time_budget_s
    logs = []
    for stage, steps, lr in stages(tc):
        deadline = None if budget is None else t0 + BUDGET_SHARES[stage] * budget
        box = {}
        logs.append(run_stage(model, corpus, stage, steps, lr, tc, gen, deadline=deadline, progress=progress,
                              checkpoint=lambda _step, opt: box.update(opt=opt.state_dict())))
        if stage == "copy" and tc.copy_reach_nats is not None:
            reach = {}
            extend_copy(model, corpus, tc, gen, reach, box["opt"], deadline=deadline, progress=progress)
            logs[-1]["copy_reach"] = reach
    log = {"train_config": dataclasses.asdict(tc), "stages": logs, "corpus_train_files": len(corpus.files),
           "corpus_train_bytes": len(corpus), "device": str(device), "seconds": time.perf_counter() - t0}
    if out_dir:
        save_checkpoint(model, out_dir, extra_config={"tokenizer": ByteTokenizer.description(),
                                                      "training": _summary(log)})
    return model, log


def _summary(log: dict) -> dict:
    return {"recipe": ("copy warm-up -> " if log["train_config"]["copy_steps"] > 0 else "")
            + "dense pre-training -> indexer warm-up -> sparse (DSA, indexer input detached)",
            "corpus": "python stdlib .py files, byte-level, 5% of files held out (crc32 of path)",
            "train_config": log["train_config"], "device": log["device"],
            "steps_done": {s["stage"]: s["steps_done"] for s in log["stages"]},
            "final": {s["stage"]: (s["curve"][-1] if s["curve"] else None) for s in log["stages"]}}
