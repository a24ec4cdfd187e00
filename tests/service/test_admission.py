"""Admission by predicted wait: batch costs measured per key and batch size with a conservative
spread, queued work priced as the batches it will make, every task's work in one backlog and run
oldest request first, waits counted from arrival and re-checked at the head of the queue, and
refusals (admission and connection cap) answered in JSON before routing and before the body.
Fake costs and held batches; nothing asserts on how fast anything happens."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import png_bytes, wait_ready
from fastapi.testclient import TestClient

from app.backlog import Backlog, CostTable
from app.batching import MicroBatcher, arrival, reservation
from app.errors import Overloaded
from app.http_errors import status_of
from app.main import create_app
from app.settings import Settings

B64 = base64.b64encode(png_bytes()).decode()
KEY = "Bearer s3cret"


def run(coro):
    return asyncio.run(coro)


class Held:
    """A model call that records what ran, in order, and can be held until released."""

    def __init__(self, log: list, name: str = "", hold_first: bool = False):
        self.log, self.name = log, name
        self.gate = threading.Event()
        if not hold_first:
            self.gate.set()

    def __call__(self, key, items):
        self.gate.wait(10)
        self.log.extend((self.name, item) for item in items)
        return [f"{key}:{item}" for item in items]


# ------------------------------------------------------------------ the cost model


def idle_batcher(backlog: Backlog, **kwargs) -> MicroBatcher:
    """A batcher over a held model, sharing `backlog`; not started, so what is submitted stays
    queued."""
    return MicroBatcher(
        Held([]), ThreadPoolExecutor(1), max_batch=4, max_wait_s=0.0, max_queue=100, backlog=backlog, **kwargs
    )


def test_a_key_predicts_from_its_own_line_once_it_has_enough_batches_and_from_the_pool_before():
    table = CostTable(min_observed=4)
    for rows in (1, 16) * 4:  # the task's pool: 10 ms + 1 ms per row
        table.observe("medium", rows, 0.010 + 0.001 * rows)
    assert table.seconds("none", 8) == pytest.approx(0.018)  # never ran: the pool's line
    for rows in (1, 16, 1):  # three batches of a costlier key: not enough to trust its own line
        table.observe("none", rows, 2 * (0.010 + 0.001 * rows))
    assert table.model("none") is table.pooled
    table.observe("none", 16, 2 * (0.010 + 0.001 * 16))
    assert table.model("none").seconds(8) == pytest.approx(2 * 0.018, rel=0.02)
    # what the pool mispredicted for the new key counts as overrun for a while: conservative
    assert table.seconds("none", 8) >= table.model("none").seconds(8) and table.spread > 1
    assert table.seconds("none", 0) == 0


def test_the_spread_is_a_high_quantile_of_how_far_batches_ran_over_their_prediction():
    table = CostTable(min_observed=1, window=20, quantile=0.9)
    for _ in range(30):
        table.observe("k", 4, 0.1)
    assert table.spread == pytest.approx(1.0) and table.seconds("k", 4) == pytest.approx(0.1)
    table.observe("k", 4, 0.3)  # one slow batch in 20: above the 90th percentile
    assert table.spread == pytest.approx(1.0)
    for _ in range(2):  # a few more: now it is the 90th percentile, and every key pays it
        table.observe("k", 4, 0.3)
    assert table.spread > 2.0
    assert table.seconds("k", 4) > 0.2 and table.seconds("other", 4) > 0.2
    for _ in range(20):  # the contention is over: the window forgets it
        table.observe("k", 4, table.model("k").seconds(4))
    assert table.spread == pytest.approx(1.0, abs=0.05)


# ------------------------------------------------------------------ the backlog


def test_queued_work_is_priced_as_the_batches_it_will_make():
    async def scenario():
        backlog = Backlog()
        b = idle_batcher(
            backlog, cost=lambda key, rows: (1.0 if key == "a" else 10.0) + rows
        )  # overhead + per row
        jobs = [asyncio.ensure_future(b.submit("a", i, weight=2)) for i in range(3)]
        jobs.append(asyncio.ensure_future(b.submit("b", "x")))
        await asyncio.sleep(0)
        queued = backlog.seconds()  # a: 6 rows = a batch of 4 (5 s) + one of 2 (3 s); b: 11 s
        jobs[1].cancel()  # a client goes away: a is 4 rows, one batch
        await asyncio.sleep(0)
        after_cancel = backlog.seconds()
        for job in jobs:
            job.cancel()
        await asyncio.sleep(0)
        return queued, after_cancel, backlog.seconds(), b.depth

    queued, after_cancel, left, depth = run(scenario())
    assert queued == pytest.approx(5 + 3 + 11)
    assert after_cancel == pytest.approx(5 + 11)
    assert left == 0 and depth == 0


def test_every_task_waits_behind_all_work_and_the_oldest_request_runs_first():
    executor = ThreadPoolExecutor(1)  # one model thread, as in the service
    log: list = []

    async def scenario():
        backlog = Backlog()
        common = dict(max_batch=4, max_wait_s=0.0, max_queue=100, backlog=backlog, max_queue_wait_s=5.0)
        first = Held(log, "A", hold_first=True)
        a = MicroBatcher(first, executor, cost=lambda key, rows: 1.0, **common)
        b = MicroBatcher(Held(log, "B"), executor, cost=lambda key, rows: 1.0, **common)
        a.start(), b.start()
        jobs = [asyncio.ensure_future(a.submit("p", 0))]
        await asyncio.sleep(0.05)  # A's first batch holds the model thread
        for lane, key, item in ((b, "q", 1), (a, "p", 2), (b, "r", 3), (a, "s", 4)):
            jobs.append(asyncio.ensure_future(lane.submit(key, item)))
            await asyncio.sleep(0.01)
        ahead = backlog.seconds()  # what a new request of either task would wait behind
        first.gate.set()
        await asyncio.gather(*jobs)
        left = backlog.seconds()
        await a.close(1), await b.close(1)
        return ahead, left

    ahead, left = run(scenario())
    assert 4.0 < ahead <= 5.0  # the running batch (what is left of it) and four queued batches
    assert [item for _, item in log] == [0, 1, 2, 3, 4]  # by arrival, not by turns of the tasks
    assert left == 0


def test_an_admitted_request_that_waits_past_the_max_wait_still_runs():
    """Admission is a prediction: a request admitted on a short one is run late, not refused
    after seconds of waiting; only its deadline stops it."""
    log: list = []
    model = Held(log, hold_first=True)

    async def scenario():
        b = MicroBatcher(
            model, ThreadPoolExecutor(1), max_batch=1, max_wait_s=0.0, max_queue=10, max_queue_wait_s=0.05
        )
        b.start()
        first = asyncio.ensure_future(b.submit("p", 0))
        await asyncio.sleep(0.05)
        late = asyncio.ensure_future(b.submit("p", 1))  # nothing predicted ahead: admitted
        await asyncio.sleep(0.2)  # ... but the running batch holds the thread past the max wait
        model.gate.set()
        await first
        answer, info = await late
        await b.close(1)
        return answer, info, b.backlog.seconds()

    answer, info, left = run(scenario())
    assert answer == "p:1" and info.queue_s > 0.05
    assert [item for _, item in log] == [0, 1]
    assert left == 0


def test_the_time_since_arrival_counts_against_the_max_wait():
    async def scenario():
        backlog = Backlog()
        b = idle_batcher(backlog, max_queue_wait_s=2.0)
        backlog.admit(0.6)  # work ahead
        arrival.set(time.perf_counter() - 1.5)  # its body took 1.5 s to arrive and decode
        with pytest.raises(Overloaded) as late:
            b.check_admission()
        arrival.set(time.perf_counter())  # a request arriving now is within the max wait
        b.check_admission()
        return late.value

    assert "queued ahead" in run(scenario()).message


# ------------------------------------------------------------------ over HTTP


@pytest.fixture(scope="module")
def client():
    settings = Settings(api_key="s3cret", models={"vqa": {"enabled": False}, "retrieval": {"enabled": False}})
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


def metric(client, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = client.get("/metrics").text
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


def test_admission_refuses_before_routing_in_json_with_retry_after_and_counts_it(client, monkeypatch):
    backlog = client.app.state.services["classify"].batcher.backlog
    limit = client.app.state.settings.batching.max_queue_wait_ms / 1000
    reached = []
    monkeypatch.setattr("app.routes.service", lambda *a: reached.append(a))  # must not be reached
    before = metric(client, "tokenlean_requests_total", task="classify", status="503")
    rejected = metric(client, "tokenlean_rejected_total", task="classify")
    backlog.admit(limit + 3.0)
    try:
        r = client.post("/v1/classify", json={"image": B64}, headers={"Authorization": KEY})
        # without the token it is the route's 401, overloaded or not
        unauthenticated = client.post("/v1/classify", json={"image": B64})
    finally:
        backlog.withdraw(limit + 3.0)
        monkeypatch.undo()
    assert r.status_code == 503 and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == "overloaded" and "busy" in r.json()["error"]["message"]
    assert int(r.headers["retry-after"]) >= 3
    assert unauthenticated.status_code == 401
    assert not reached  # the route never saw the refused request
    assert metric(client, "tokenlean_requests_total", task="classify", status="503") == before + 1
    assert metric(client, "tokenlean_rejected_total", task="classify") == rejected + 1
    assert client.post("/v1/classify", json={"image": B64}, headers={"Authorization": KEY}).status_code == 200


def test_past_the_connection_cap_the_refusal_is_json_with_retry_after_and_closes(client):
    cap = client.app.state.settings.max_connections
    client.app.state.connections = set(range(cap))  # what `tokenlean serve` hands over: all taken
    try:
        r = client.post("/v1/classify", json={"image": B64}, headers={"Authorization": KEY})
        health = client.get("/healthz")
    finally:
        del client.app.state.connections
    assert r.status_code == 503 and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["code"] == "overloaded" and "connections" in r.json()["error"]["message"]
    assert r.headers["retry-after"] == "1" and r.headers["connection"] == "close"
    assert health.status_code == 503  # as uvicorn's cap did: every request
    assert client.post("/v1/classify", json={"image": B64}, headers={"Authorization": KEY}).status_code == 200


V2_INFER = json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [B64]}]})


def test_a_v2_infer_is_refused_before_routing_in_the_protocols_body(client, monkeypatch):
    """POST /v2/models/<task>/infer (the model name is the task's) meets the admission of
    POST /v1/<task>: refused before routing and counted under its task, with the protocol's
    error body and the same Retry-After."""
    backlog = client.app.state.services["classify"].batcher.backlog
    ahead = client.app.state.settings.batching.max_queue_wait_ms / 1000 + 3.0
    reached = []
    monkeypatch.setattr("app.routes.service", lambda *a: reached.append(a))  # must not be reached
    refusals = metric(client, "tokenlean_rejected_total", task="classify")
    backlog.admit(ahead)
    try:
        refused = client.post("/v2/models/classify/infer", content=V2_INFER, headers={"Authorization": KEY})
        anonymous = client.post("/v2/models/classify/infer", content=V2_INFER)
    finally:
        backlog.withdraw(ahead)
        monkeypatch.undo()
    assert (refused.status_code, refused.headers["content-type"]) == (503, "application/json")
    assert list(refused.json()) == ["error"] and "busy" in refused.json()["error"]
    assert int(refused.headers["retry-after"]) >= 3 and not reached
    assert anonymous.status_code == 401 and isinstance(anonymous.json()["error"], str)
    assert metric(client, "tokenlean_rejected_total", task="classify") == refusals + 1


@pytest.mark.parametrize(
    "path, body",
    [("/v1/classify", json.dumps({"image": B64})), ("/v2/models/classify/infer", V2_INFER)],
    ids=["v1", "v2"],
)
def test_a_task_request_holds_its_early_reservation_from_before_its_body_until_it_is_queued(
    client, monkeypatch, path, body
):
    svc = client.app.state.services["classify"]
    seen = []
    plan_for = svc.plan_for

    def spy(*args):  # runs once the body is read and parsed, before the request is queued
        held = reservation.get()
        seen.append((held, held is not None and held.held, svc.batcher.backlog.seconds()))
        return plan_for(*args)

    monkeypatch.setattr(svc, "plan_for", spy)
    headers = {"Authorization": KEY, "content-type": "application/json"}
    assert client.post(path, content=body, headers=headers).status_code == 200
    [(held, was_held, backlog)] = seen
    assert was_held and backlog >= held.seconds > 0
    assert not held.held  # handed over to the queue (or released) once queued


# ------------------------------------------------------------------ before the body is read


def test_an_early_admission_holds_a_typical_request_cost_until_the_request_is_queued():
    async def scenario():
        backlog = Backlog()
        b = idle_batcher(backlog, cost=lambda key, rows: 4.0, max_queue_wait_s=10.0)  # 1 s a row

        async def request(item, keep: bool):
            held = b.admit_early()  # what the HTTP layer does before reading the body
            try:
                if keep:
                    await b.submit("p", item)
            finally:
                held.release()  # idempotent: submit released it already

        early = asyncio.ensure_future(request("a", keep=True))
        gone = asyncio.ensure_future(request("b", keep=False))
        await asyncio.sleep(0)  # both ran up to their submit
        seen = backlog.seconds()  # a: queued (1 batch of 1 row: 4 s); b: released unqueued
        early.cancel()
        await asyncio.gather(early, gone, return_exceptions=True)
        return seen, backlog.seconds()

    seen, left = run(scenario())
    assert seen == pytest.approx(4.0)
    assert left == 0


def test_early_admission_reserves_and_later_checks_count_the_reservation():
    async def scenario():
        backlog = Backlog()
        b = idle_batcher(backlog, cost=lambda key, rows: 4.0, max_queue_wait_s=1.5)

        async def early():
            return b.admit_early()

        first = await asyncio.create_task(early())  # reserves 1 s (a row of a full batch)
        reserved = backlog.seconds()
        refused = None
        try:
            await asyncio.create_task(early())  # another task: 1 s ahead, within 1.5 s
            await asyncio.create_task(early())  # 2 s ahead: refused
        except Overloaded as exc:
            refused = exc
        first.release()
        return reserved, refused

    reserved, refused = run(scenario())
    assert reserved == pytest.approx(1.0)
    assert refused is not None and "queued ahead" in refused.message


def test_early_admission_stops_while_the_event_loop_is_behind_or_its_budget_is_spent():
    async def scenario():
        b = MicroBatcher(
            Held([]), ThreadPoolExecutor(1), max_batch=4, max_wait_s=0.0, max_queue=100, max_loop_lag_s=0.03
        )
        b.start()
        d = b.dispatcher
        d.lag = 0.5  # the loop runs half a second late
        with pytest.raises(Overloaded) as behind:
            b.admit_early()
        b.check_admission()  # the model thread has room: only new HTTP work is refused
        d.lag = 0.0
        b.admit_early().release()
        d._budget, d._budget_at = -1.0, time.perf_counter()  # a second of admitted HTTP work done
        with pytest.raises(Overloaded):
            b.admit_early()
        await b.close(1)
        return behind.value

    error = run(scenario())
    assert status_of(error) == (503, "overloaded") and "busy" in error.message
