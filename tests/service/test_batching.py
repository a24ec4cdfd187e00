"""The micro-batcher: same plan shares a call, different plans never do, the queue is bounded,
shutdown finishes queued work."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.batching import MicroBatcher
from app.errors import Overloaded, Unavailable
from app.http_errors import headers_of, status_of


class Recorder:
    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None):
        self.calls: list[tuple[str, list]] = []
        self.delay, self.gate = delay, gate

    def __call__(self, key, items):
        if self.gate is not None:
            self.gate.wait(5)
        time.sleep(self.delay)
        self.calls.append((key, list(items)))
        return [f"{key}:{item}" for item in items]


def run(coro):
    return asyncio.run(coro)


def test_same_plan_shares_a_call_and_different_plans_never_do():
    recorder = Recorder(delay=0.05)

    async def scenario():
        b = MicroBatcher(recorder, ThreadPoolExecutor(1), max_batch=8, max_wait_s=0.02, max_queue=100)
        b.start()
        jobs = [b.submit("low" if i % 2 else "high", i) for i in range(10)]
        results = await asyncio.gather(*jobs)
        await b.close(1)
        return results

    results = run(scenario())
    assert [r for r, _ in results] == [f"{'low' if i % 2 else 'high'}:{i}" for i in range(10)]
    for key, items in recorder.calls:
        assert all((i % 2 == 1) == (key == "low") for i in items)
    assert max(len(items) for _, items in recorder.calls) > 1  # batching happened
    assert all(
        info.size == len(next(items for k, items in recorder.calls if r.split(":")[1] in map(str, items)))
        for r, info in results
    )


def test_batches_respect_max_batch_rows_and_weights():
    recorder = Recorder(delay=0.02)

    async def scenario():
        b = MicroBatcher(recorder, ThreadPoolExecutor(1), max_batch=4, max_wait_s=0.05, max_queue=100)
        b.start()
        await asyncio.gather(*[b.submit("p", i, weight=3 if i == 0 else 1) for i in range(6)])
        await b.close(1)

    run(scenario())
    weights = [sum(3 if i == 0 else 1 for i in items) for _, items in recorder.calls]
    assert all(w <= 4 for w in weights) and sum(weights) == 8


def test_full_queue_is_refused_with_503_and_retry_after():
    gate = threading.Event()
    recorder = Recorder(gate=gate)

    async def scenario():
        b = MicroBatcher(recorder, ThreadPoolExecutor(1), max_batch=1, max_wait_s=0.0, max_queue=2)
        b.start()
        first = asyncio.ensure_future(b.submit("p", 0))
        await asyncio.sleep(0.05)  # the first item is running, the gate holds it
        queued = [asyncio.ensure_future(b.submit("p", i)) for i in (1, 2)]
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as refused:
            await b.submit("p", 3)
        gate.set()
        await asyncio.gather(first, *queued)
        await b.close(1)
        return refused.value

    error = run(scenario())
    assert status_of(error)[0] == 503 and headers_of(error)["Retry-After"]


def test_close_finishes_queued_requests_then_refuses_new_ones():
    recorder = Recorder(delay=0.05)

    async def scenario():
        b = MicroBatcher(recorder, ThreadPoolExecutor(1), max_batch=1, max_wait_s=0.0, max_queue=10)
        b.start()
        pending = [asyncio.ensure_future(b.submit("p", i)) for i in range(3)]
        await asyncio.sleep(0.01)
        await b.close(5)
        with pytest.raises(Unavailable) as refused:
            await b.submit("p", 9)
        return [p.result()[0] for p in pending], refused.value

    results, refused = run(scenario())
    assert results == ["p:0", "p:1", "p:2"]
    assert status_of(refused)[0] == 503


def test_a_failing_batch_fails_its_requests_and_the_loop_survives():
    def flaky(key, items):
        if key == "bad":
            raise RuntimeError("boom")
        return items

    async def scenario():
        b = MicroBatcher(flaky, ThreadPoolExecutor(1), max_batch=4, max_wait_s=0.0, max_queue=10)
        b.start()
        with pytest.raises(RuntimeError):
            await b.submit("bad", 1)
        ok = await b.submit("good", 2)
        await b.close(1)
        return ok[0]

    assert run(scenario()) == 2


def test_close_fails_a_batch_still_in_the_model_when_time_runs_out():
    recorder = Recorder(delay=0.5)

    async def scenario():
        b = MicroBatcher(recorder, ThreadPoolExecutor(1), max_batch=1, max_wait_s=0.0, max_queue=10)
        b.start()
        pending = asyncio.ensure_future(b.submit("p", 0))
        await asyncio.sleep(0.05)
        await b.close(0.05)
        with pytest.raises(Unavailable) as failed:
            await asyncio.wait_for(pending, 1)
        return failed.value

    assert status_of(run(scenario()))[0] == 503


def test_a_cancelled_request_leaves_the_queue_at_once():
    gate = threading.Event()
    recorder = Recorder(gate=gate)
    depths = []

    async def scenario():
        b = MicroBatcher(
            recorder, ThreadPoolExecutor(1), max_batch=1, max_wait_s=0.0, max_queue=2, on_depth=depths.append
        )
        b.start()
        first = asyncio.ensure_future(b.submit("p", 0))
        await asyncio.sleep(0.05)  # the first item is running, the gate holds it
        gone = asyncio.ensure_future(b.submit("p", 1, weight=2))
        await asyncio.sleep(0.01)
        assert b.depth == 2
        gone.cancel()
        await asyncio.sleep(0.01)
        depth_after_cancel = b.depth
        kept = asyncio.ensure_future(b.submit("p", 2, weight=2))  # fits only because 1 left
        gate.set()
        results = await asyncio.gather(first, kept)
        await b.close(1)
        return depth_after_cancel, [r for r, _ in results]

    depth_after_cancel, results = run(scenario())
    assert depth_after_cancel == 0 and depths[-1] == 0
    assert results == ["p:0", "p:2"]
    assert [items for _, items in recorder.calls] == [[0], [2]]
