"""The engine thread in-process: events reach asyncio, aborts free pages, a failing step fails only its requests."""
import asyncio

import pytest
import torch

from indexcache.checkpoint import build_empty
from indexcache.engine import EngineConfig, LLMEngine
from indexcache.presets import preset_config
from indexcache.sampling import SamplingParams
from indexcache.server.engine_loop import EngineLoop, Handle
from indexcache.server.metrics import Metrics
from indexcache.server.protocol import APIError


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(1)
    model = build_empty(preset_config("tiny"), "cpu", torch.float32).init_random(0).eval()
    return LLMEngine(model, EngineConfig(max_model_len=256, page_size=16, max_num_seqs=4))


def run(engine, coro_fn, max_waiting=8):
    loop_ = EngineLoop(engine, Metrics(engine, "t"), max_waiting)
    loop_.start()
    try:
        return asyncio.run(asyncio.wait_for(coro_fn(loop_), 60))
    finally:
        loop_.shutdown()


_ids = iter(range(1 << 30))


def handles(n, out, max_tokens=5):
    loop = asyncio.get_running_loop()
    return [Handle(f"r{next(_ids)}", i, [1 + i, 2, 3, 4], SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                          ignore_eos=True), out, loop)
            for i in range(n)]


async def drain(out, n):
    toks, done = {}, 0
    while done < n:
        ev = await out.get()
        assert ev.error is None, ev.error.message
        toks.setdefault(ev.index, []).extend(ev.token_ids)
        done += ev.finish_reason is not None
    return toks


def test_events_abort_and_failure(engine):
    async def body(lp):
        out = asyncio.Queue()
        lp.submit(handles(3, out))
        toks = await drain(out, 3)
        assert sorted(toks) == [0, 1, 2] and all(len(t) == 5 for t in toks.values())
        # a long request aborted mid-way: its pages come back before the next step
        out = asyncio.Queue()
        (h,) = handles(1, out, max_tokens=200)
        lp.submit([h])
        await out.get()
        lp.abort([h])
        for _ in range(100):
            if engine.blocks.num_free == engine.blocks.num_blocks and not engine.has_unfinished():
                break
            await asyncio.sleep(0.02)
        assert engine.blocks.num_free == engine.blocks.num_blocks and not engine.has_unfinished()
        # a step that raises fails the requests in it with a 500, and the loop keeps serving
        orig = engine.step

        def broken():  # fails once, when both requests have joined
            if len(engine.scheduler.waiting) < 2:
                return orig()
            engine.step = orig
            raise RuntimeError("boom")

        engine.step = broken
        out = asyncio.Queue()
        lp.submit(handles(2, out))
        errs = [await out.get(), await out.get()]
        assert all(e.error is not None and e.error.status == 500 and "boom" in e.error.message for e in errs)
        out = asyncio.Queue()
        lp.submit(handles(1, out))
        assert len((await drain(out, 1))[0]) == 5
        assert engine.blocks.num_free == engine.blocks.num_blocks

    run(engine, body)


def test_full_queue_refuses_whole_request(engine):
    async def body(lp):
        out = asyncio.Queue()
        lp.submit(handles(2, out, max_tokens=3))
        with pytest.raises(APIError) as e:
            lp.submit(handles(2, asyncio.Queue()))  # 2 waiting + 2 > 3: all refused, none queued
        assert e.value.status == 503 and e.value.headers == {"Retry-After": "1"}
        await drain(out, 2)

    run(engine, body, max_waiting=3)
