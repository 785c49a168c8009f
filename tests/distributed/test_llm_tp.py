"""LLM(tensor_parallel_size=2) on two CPU worker processes: the same greedy tokens as TP=1 (chunked prefill and
continuous batching, preemption in a small cache, seeded sampling, shared pattern, with and without expert
parallelism), and faults: a worker that raises or is
killed makes the driver raise an error naming the rank within seconds, and every worker ends."""
import os
import signal
import threading
import time

import pytest
import torch

from indexcache.distributed.launch import RankProcesses, WorkerError
from indexcache.llm import LLM
from indexcache.sampling import SamplingParams

from .workers import pid_then_collective, raise_on_rank

PATTERN = "FSFSSFFS"
OPTS = dict(max_model_len=256, max_prefill_tokens=32, max_num_seqs=4)  # prompts of 40 and 70 tokens are chunked


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 512, (n,), generator=g).tolist() for n in (40, 70, 5)]


SAMPLED = SamplingParams(max_tokens=6, temperature=0.9, top_k=20, seed=3, ignore_eos=True)


@pytest.fixture(scope="module")
def reference():
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    llm = LLM("tiny", PATTERN, **OPTS)
    return [o.outputs[0].token_ids for o in llm.generate(_prompts(), sp)]


LONG = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)


def _preempting_prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 512, (n,), generator=g).tolist() for n in (20, 30, 25)]


@pytest.fixture(scope="module")
def reference_long():
    return [o.outputs[0].token_ids for o in LLM("tiny", PATTERN, **OPTS).generate(_preempting_prompts(), LONG)]


@pytest.fixture(scope="module")
def reference_sampled():
    return [o.outputs[0].token_ids for o in LLM("tiny", PATTERN, **OPTS).generate(_prompts(), SAMPLED)]


def _gone(pids, within_s=10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            return True
        time.sleep(0.1)
    return False


def test_tp2_same_tokens_and_clean_close(reference, reference_sampled):
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    with LLM("tiny", PATTERN, tensor_parallel_size=2, **OPTS) as llm:
        pids = llm.workers.pids
        assert str(llm.pattern) == PATTERN
        assert [o.outputs[0].token_ids for o in llm.generate(_prompts(), sp)] == reference
        # sampled on rank 0 and broadcast: the same seeded draws as one process
        assert [o.outputs[0].token_ids for o in llm.generate(_prompts(), SAMPLED)] == reference_sampled
    assert _gone(pids) and all(p.exitcode == 0 for p in llm.workers.procs)


def test_tp2_expert_parallel_small_cache_and_a_killed_worker(reference, reference_long):
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    # 3 pages of 32 tokens: the requests queue and preempt each other (the ranks' schedulers must agree)
    llm = LLM("tiny", PATTERN, tensor_parallel_size=2, enable_expert_parallel=True,
              **{**OPTS, "num_kv_blocks": 3, "page_size": 32})
    try:
        assert [o.outputs[0].token_ids for o in llm.generate(_prompts(), sp)] == reference
        outs = llm.generate(_preempting_prompts(), LONG)
        assert [o.outputs[0].token_ids for o in outs] == reference_long
        assert sum(o.metrics["preemptions"] for o in outs) > 0
        victim = llm.workers.pids[1]
        threading.Timer(1.0, os.kill, (victim, signal.SIGKILL)).start()
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match=r"rank 1: died from signal SIGKILL"):
            llm.collective_rpc(pid_then_collective)  # rank 0 is asleep, then blocked in a barrier
        assert time.monotonic() - t0 < 10
        assert _gone(llm.workers.pids)
        with pytest.raises(RuntimeError, match="closed"):
            llm.generate(_prompts(), sp)
    finally:
        llm.close()


def test_a_raising_rank_is_named_and_every_rank_ends():
    ranks = RankProcesses(2)  # no model: the fault handling is the launcher's
    try:
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match=r"rank 1: raised RuntimeError: boom on rank 1") as e:
            ranks.collective_rpc(raise_on_rank, 1)  # rank 0 waits in a barrier for rank 1
        assert e.value.rank == 1 and time.monotonic() - t0 < 10
        assert _gone(ranks.pids)
    finally:
        ranks.close()
