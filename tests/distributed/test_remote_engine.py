"""``RemoteEngine`` (the server's handle on the tensor-parallel ranks) over one in-process rank: adds and aborts
reach the rank with the next step, the driver's sequences get rank 0's tokens, log-probabilities and finish
states, and the page counts follow the rank's. (Across real processes: tests/server/test_server_tp.py.)"""
from types import SimpleNamespace

import pytest

from indexcache import LLM, SamplingParams
from indexcache.engine.block_manager import OutOfBlocks
from indexcache.engine.multiproc import RemoteEngine, serve_step
from indexcache.engine.sequence import Status


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", device="cpu", max_model_len=128, num_kv_blocks=12, page_size=16)


def _remote(engine):
    rank = SimpleNamespace(engine=engine, rank=0)
    info = {"engine_config": engine.cfg, "vocab_size": engine.model.config.vocab_size, "eos_ids": engine.eos_ids,
            "num_blocks": engine.blocks.num_blocks}
    workers = SimpleNamespace(infos=[info], collective_rpc=lambda fn, *a: [fn(rank, *a)], closed=False)
    return RemoteEngine(workers), rank


def test_remote_engine_mirrors_rank_zero(llm):
    eng = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=1, ignore_eos=True)
    ref = eng.add_request([3, 1, 4, 1, 5], params)
    while eng.has_unfinished():
        eng.step()

    remote, rank = _remote(eng)
    a = remote.add_request([3, 1, 4, 1, 5], params, request_id="a")
    b = remote.add_request([2, 7, 1, 8], SamplingParams(temperature=0.0, max_tokens=50), request_id="b")
    assert len(remote.scheduler.waiting) == 2 and remote.has_unfinished()
    remote.step()  # both prefilled on the rank, one token each
    assert len(a.output_ids) == 1 and len(b.output_ids) == 1 and remote.blocks.num_free < remote.blocks.num_blocks
    remote.abort(b)
    assert b.status is Status.FINISHED and b.finish_reason == "abort"
    finished = []
    while remote.has_unfinished():
        finished += remote.step()
    assert finished == [a] and a.finish_reason == "length"
    assert a.output_ids == ref.output_ids
    assert [lp[0] for lp in a.logprobs] == pytest.approx([lp[0] for lp in ref.logprobs])
    assert [lp[1] for lp in a.logprobs] == [lp[1] for lp in ref.logprobs]
    assert rank.served == {}  # the aborted request left the rank's engine too
    assert not eng.has_unfinished()
    assert remote.blocks.num_free == remote.blocks.num_blocks and len(remote.scheduler.running) == 0


def test_remote_engine_checks_requests_like_the_engine(llm):
    remote, _ = _remote(llm.engine)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        remote.add_request([1, 10 ** 6], SamplingParams())
    with pytest.raises(ValueError, match="at least one token"):
        remote.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="max_model_len"):
        remote.add_request([1] * 128, SamplingParams())
    with pytest.raises(OutOfBlocks, match="KV pages"):
        pages = remote.blocks.num_blocks * remote.blocks.page_size
        remote.cfg = SimpleNamespace(max_model_len=pages * 2, page_size=remote.cfg.page_size)
        remote.add_request([1, 2], SamplingParams(max_tokens=pages))
    assert not remote.has_unfinished()


def test_server_loop_is_down_once_the_ranks_are_gone(llm):
    from indexcache.server.engine_loop import EngineLoop
    from indexcache.server.metrics import Metrics

    remote, _ = _remote(llm.engine)
    loop = EngineLoop(remote, Metrics(remote, "tiny"), max_waiting=4)
    loop.start()
    try:
        assert loop.alive()
        remote.workers.closed = True  # what a failed rank leaves: /health answers 503, submit refuses
        assert not loop.alive()
    finally:
        loop.shutdown()
