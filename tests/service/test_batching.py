"""The micro-batcher: same plan shares a call, different plans never do, the queue is bounded,
shutdown finishes queued work."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.backlog import Backlog, BatchCost
from app.batching import MicroBatcher
from app.errors import DeadlineExceeded, Overloaded, Unavailable
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


# ------------------------------------------------------------------ admission by predicted time


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_batch_cost_fits_overhead_and_per_row_and_resists_outliers():
    cost = BatchCost()
    for rows in (1, 4, 8, 16) * 5:
        cost.observe(rows, 0.010 + 0.002 * rows)
    assert cost.overhead == pytest.approx(0.010, rel=1e-6) and cost.per_row == pytest.approx(0.002, rel=1e-6)
    assert cost.conservative(4) == pytest.approx(0.010 + 0.002 * 4)  # no batch ran over its line
    cost.observe(16, 100.0)  # one stall: clipped to 3x the prediction before it enters the line
    assert cost.seconds(16) < 0.2
    for _ in range(200):  # a slower machine: the fit follows (older batches decay)
        for rows in (1, 16):
            cost.observe(rows, 2 * (0.010 + 0.002 * rows))
    assert cost.per_row == pytest.approx(0.004, rel=0.05)


def test_backlog_counts_queued_work_and_running_work_down():
    clock = FakeClock()
    backlog = Backlog(clock)
    backlog.admit(1.0)
    backlog.admit(0.5)
    assert backlog.seconds() == pytest.approx(1.5)
    backlog.withdraw(1.0)  # 1 s of it leaves its queue for the model thread ...
    backlog.reserve("a", 1.0)
    clock.now = 0.1  # ... and counts whole until the thread starts it
    assert backlog.seconds() == pytest.approx(1.5)
    backlog.start("a")
    clock.now = 0.35
    assert backlog.seconds() == pytest.approx(1.25)
    clock.now = 5.0  # overran its prediction: its end is unknown, a quarter of it counts as left
    assert backlog.seconds() == pytest.approx(0.5 + 0.25)
    backlog.finish("a")
    backlog.withdraw(0.5)
    assert backlog.seconds() == 0
    backlog.admit(3.7)
    assert backlog.retry_after(2.0) == 2 and backlog.retry_after(10.0) == 1


def test_admission_refuses_at_once_when_the_predicted_wait_is_too_long_whatever_the_size():
    gate = threading.Event()
    recorder = Recorder(gate=gate)

    async def scenario():
        backlog = Backlog()
        b = MicroBatcher(
            recorder,
            ThreadPoolExecutor(1),
            max_batch=4,
            max_wait_s=0.0,
            max_queue=1000,
            backlog=backlog,
            cost=lambda key, rows: 0.5 * rows,  # a batch: half a second of model time per row
            max_queue_wait_s=2.0,
        )
        b.start()
        first = asyncio.ensure_future(b.submit("p", "big", weight=4))  # admitted: nothing ahead
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(b.submit("p", "small"))  # 2 s ahead: still within the limit
        await asyncio.sleep(0.01)
        refused = []
        for weight in (1, 8):  # 2.5 s ahead now: refused, one row or eight alike
            with pytest.raises(Overloaded) as err:
                await b.submit("p", f"w{weight}", weight=weight)
            refused.append(err.value)
        gate.set()
        await asyncio.gather(first, second)
        await b.close(1)
        return refused, backlog.seconds()

    refused, left = run(scenario())
    assert all(status_of(e)[0] == 503 and int(headers_of(e)["Retry-After"]) >= 1 for e in refused)
    assert "queued ahead" in refused[0].message
    assert [items for _, items in recorder.calls] == [["big"], ["small"]]  # the refused never ran
    assert left == pytest.approx(0.0, abs=1e-9)


def test_a_request_not_started_by_its_deadline_is_answered_504_and_not_run():
    gate = threading.Event()
    recorder = Recorder(gate=gate)

    async def scenario():
        b = MicroBatcher(recorder, ThreadPoolExecutor(1), max_batch=1, max_wait_s=0.0, max_queue=10)
        b.start()
        first = asyncio.ensure_future(b.submit("p", 0))
        await asyncio.sleep(0.05)  # running, held by the gate
        late = asyncio.ensure_future(b.submit("p", 1, deadline_s=0.01))
        patient = asyncio.ensure_future(b.submit("p", 2))
        await asyncio.sleep(0.1)  # the short deadline passes while the first batch holds the thread
        gate.set()
        await first
        with pytest.raises(DeadlineExceeded) as err:
            await late
        result = await patient
        await b.close(1)
        return err.value, result[0], b.backlog.seconds()

    error, patient, left = run(scenario())
    assert status_of(error) == (504, "deadline_exceeded")
    assert patient == "p:2" and [items for _, items in recorder.calls] == [[0], [2]]
    assert left == 0


def test_tasks_sharing_the_model_thread_share_one_backlog():
    gate = threading.Event()
    executor = ThreadPoolExecutor(1)  # one model thread, as in the service

    async def scenario():
        backlog = Backlog()
        common = dict(max_wait_s=0.0, max_queue=100, backlog=backlog, max_queue_wait_s=1.0)
        # two batches of 1 s each: one running, one queued
        busy = MicroBatcher(Recorder(gate=gate), executor, max_batch=1, cost=lambda key, rows: 1.0, **common)
        other = MicroBatcher(Recorder(), executor, max_batch=4, cost=lambda key, rows: 0.01, **common)
        busy.start(), other.start()
        jobs = [asyncio.ensure_future(busy.submit("p", i)) for i in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded):  # the other task's 2 s of work is ahead on the same thread
            await other.submit("p", "x")
        gate.set()
        await asyncio.gather(*jobs)
        ok = await other.submit("p", "y")
        await busy.close(1), await other.close(1)
        return ok[0]

    assert run(scenario()) == "p:y"
