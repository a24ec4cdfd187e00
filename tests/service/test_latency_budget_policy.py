"""Latency budgets, the policy without a model: a fake clock, a model of known latency per plan
(overhead + per row), the real micro-batcher and backlog. `auto` takes the least compressed plan
whose predicted completion (waited + work ahead + the batch it joins) fits, the most compressed
when none does (or 503 under `reject`); it never picks a plan the model lacks; a flood of one
level neither starves an `auto` request nor hides in the metrics. Nothing asserts on how fast
anything runs."""

from __future__ import annotations

import asyncio
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.backlog import Backlog, CostTable
from app.batching import MicroBatcher
from app.budget import Budgeted, Calibration, auto_plans, choose, state_of
from app.errors import Overloaded
from app.http_errors import headers_of, status_of
from app.metrics import Metrics

# seconds of one batch: overhead + per row, per plan (the model of known latency)
LATENCY = {"none": (0.100, 0.020), "low": (0.070, 0.015), "medium": (0.045, 0.010), "high": (0.030, 0.005)}
FLOPS = {"none": 4.0, "low": 3.0, "medium": 2.0, "high": 1.0}
KEY = 16  # the task's batch key (a padded text length)


def known(plan: str, rows: int) -> float:
    overhead, per_row = LATENCY[plan]
    return overhead + per_row * rows if rows else 0.0


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class Held:
    """The model: records the plan and item of every row it runs; held until `gate` is set."""

    def __init__(self):
        self.log: list[tuple[str, object]] = []
        self.gate = threading.Event()

    def __call__(self, key, items):
        self.gate.wait(10)
        self.log.extend((key[0], item) for item in items)
        return list(items)


class FakeService:
    """What the budget policy reads of a task service, over a model of known latency."""

    def __init__(self, levels=("none", "low", "medium", "high"), clock=None, max_batch=4, model=None):
        self.offered = tuple(levels)
        self.backend = self  # backend.levels()
        self.model = self  # model.flops(plan)
        self.task = self  # task.name
        self.name = "vqa"
        self.metrics = Metrics()
        self.backlog = Backlog(clock=clock or Clock())
        self.model_call = model or Held()
        self.batcher = MicroBatcher(
            self.model_call,
            ThreadPoolExecutor(1),
            max_batch=max_batch,
            max_wait_s=0.0,
            max_queue=1000,
            backlog=self.backlog,
            cost=lambda key, rows: known(key[0], rows),
        )

    def levels(self):
        return self.offered

    def plan_for(self, level, method):
        return level

    def flops(self, plan):
        return FLOPS[plan]

    def level_label(self, plan):
        return plan


def run(coro):
    return asyncio.run(coro)


def latency_calibration(svc) -> float:
    return state_of(svc).calibration.factor


def budgeted(
    budget_ms: int | None, clock: Clock, waited_s: float = 0.0, policy="degrade", auto=True
) -> Budgeted:
    return Budgeted(
        None if budget_ms is None else budget_ms / 1000, auto, policy, clock.now - waited_s, clock=clock
    )


def samples(metrics: Metrics) -> dict:
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# ------------------------------------------------------------------ the choice itself


def test_choose_takes_the_least_compressed_plan_that_fits_else_the_most_compressed():
    options = [("none", 0.30), ("low", 0.20), ("medium", 0.12), ("high", 0.08)]
    assert choose(options, 1.0).plan == "none"
    assert choose(options, 0.20) == choose(options, 0.2) and choose(options, 0.2).plan == "low"
    assert choose(options, 0.19).plan == "medium"
    assert choose(options, 0.08).plan == "high" and choose(options, 0.08).fits
    starved = choose(options, 0.05)
    assert (starved.plan, starved.fits, starved.predicted_s) == ("high", False, 0.08)
    # with headroom, every plan but the most compressed must leave it free
    assert choose(options, 0.35, headroom_s=0.05).plan == "none"
    assert choose(options, 0.34, headroom_s=0.05).plan == "low"
    assert choose(options, 0.09, headroom_s=0.05) == choose(options, 0.08)  # high: no headroom
    with pytest.raises(ValueError):
        choose([], 1.0)


# ------------------------------------------------------------------ prediction and plan per budget and queue


def test_an_idle_server_gives_each_budget_the_least_compressed_plan_that_fits():
    clock = Clock()
    svc = FakeService(clock=clock)
    # idle: a batch of one row alone: none 120 ms, low 85, medium 55, high 35
    cases = {500: "none", 121: "none", 119: "low", 86: "low", 60: "medium", 40: "high", 36: "high"}
    for budget_ms, level in cases.items():
        b = budgeted(budget_ms, clock)
        assert b.plan(svc, KEY, 1, None, None) == level, budget_ms
        assert b.predicted_s == pytest.approx(known(level, 1))
    # what the request already waited (reading, decoding) counts against its budget
    b = budgeted(120, clock, waited_s=0.010)
    assert b.plan(svc, KEY, 1, None, None) == "low" and b.predicted_s == pytest.approx(0.010 + 0.085)
    # several rows (a retrieval request with 4 candidates) cost their batch
    assert budgeted(120, clock).plan(svc, KEY, 4, None, None) == "medium"  # none 180, low 130, medium 85


def test_the_work_queued_and_running_ahead_moves_auto_to_higher_compression():
    clock = Clock()
    svc = FakeService(clock=clock)

    def picks(*budgets_ms):
        out = {}
        for budget_ms in budgets_ms:
            b = budgeted(budget_ms, clock)
            out[budget_ms] = (b.plan(svc, KEY, 1, None, None), b.predicted_s)
        return out

    async def scenario():
        jobs = [asyncio.ensure_future(svc.batcher.submit(("none", KEY), i)) for i in range(4)]
        await asyncio.sleep(0)
        svc.backlog.reserve("running", 0.200)  # a batch of 200 ms on the model thread
        svc.backlog.start("running")
        clock.now += 0.050  # 150 ms of it left
        # ahead: one full batch of none (180 ms) and the running batch's rest
        full = picks(500, 490, 480, 440, 400, 360)
        # two more rows of none: a partial batch, which a `none` request would join
        jobs += [asyncio.ensure_future(svc.batcher.submit(("none", KEY), i)) for i in (4, 5)]
        await asyncio.sleep(0)
        partial = picks(530)
        for job in jobs:
            job.cancel()
        await asyncio.sleep(0)
        return full, partial

    full, partial = run(scenario())
    ahead = 0.180 + 0.150
    # the server is busy: a lighter plan must leave room for one batch of `high` (35 ms) behind it
    headroom = 0.035
    assert full[500] == ("none", pytest.approx(ahead + 0.120))
    assert full[490] == ("none", pytest.approx(ahead + 0.120))  # 450 + 35 <= 490
    assert full[480] == ("low", pytest.approx(ahead + 0.085))
    assert full[440] == ("medium", pytest.approx(ahead + 0.055))
    assert full[400] == ("high", pytest.approx(ahead + 0.035))  # the last needs no headroom
    assert full[360][0] == "high"  # nothing fits: degraded to the most compressed
    # joining the partial batch (140 ms for 2 rows -> 160 ms for 3) costs `none` 20 ms, less than
    # any other plan's batch of its own (low: 85 ms)
    ahead += 0.140
    assert partial[530] == ("none", pytest.approx(ahead - 0.140 + 0.160))
    assert ahead - 0.140 + 0.160 + headroom <= 0.530 < ahead + 0.085 + headroom


def test_behind_other_work_a_batch_is_predicted_at_the_size_recent_batches_grew_to():
    clock = Clock()
    svc = FakeService(clock=clock)
    svc.batcher._batch_rows = 4.0  # as after a stretch of batches of 4 rows
    idle = budgeted(1000, clock)
    assert idle.plan(svc, KEY, 1, None, None) == "none"
    assert idle.predicted_s == pytest.approx(known("none", 1))  # starts at once, alone
    svc.backlog.reserve("running", 0.100)
    busy = budgeted(1000, clock)
    assert busy.plan(svc, KEY, 1, None, None) == "none"
    # while it waits, later requests join its batch: it runs with 4 rows
    assert busy.predicted_s == pytest.approx(0.100 + known("none", 4))


def test_answers_later_than_predicted_raise_later_predictions():
    clock = Clock()
    svc = FakeService(clock=clock)
    for _ in range(8):  # each answered in twice its predicted 120 ms (8 answers: the minimum)
        b = budgeted(1000, clock)
        assert b.plan(svc, KEY, 1, None, None) == "none"
        clock.now += 2 * b.predicted_s
        assert b.settle(svc)["met"] is True
    b = budgeted(200, clock)  # 120 ms fitted; now 240: low's 2 x 85 ms is what fits
    assert b.plan(svc, KEY, 1, None, None) == "low"
    assert b.predicted_s == pytest.approx(2 * known("low", 1))
    assert latency_calibration(svc) == pytest.approx(2.0)


def test_the_calibration_waits_for_enough_answers_and_is_bounded():
    calibration = Calibration(min_samples=4, bounds=(0.5, 3.0))
    for _ in range(3):
        calibration.observe(10.0, 1.0)
    assert calibration.factor == 1.0
    calibration.observe(10.0, 1.0)
    assert calibration.factor == 3.0
    for _ in range(64):  # the window turns: predictions twice too long
        calibration.observe(1.0, 2.0)
    assert calibration.factor == 0.5


def test_a_fixed_level_keeps_its_plan_and_only_gets_its_prediction():
    clock = Clock()
    svc = FakeService(clock=clock)
    b = budgeted(1, clock, auto=False)
    assert b.plan(svc, KEY, 1, "none", None) == "none"
    assert b.predicted_s == pytest.approx(known("none", 1))
    clock.now += 0.2
    report = b.settle(svc)
    assert report["auto"] is False and report["met"] is False and report["measured_ms"] == pytest.approx(200)
    m = samples(svc.metrics)
    assert m[("tokenlean_latency_budget_total", (("outcome", "missed"), ("task", "vqa")))] == 1
    assert ("tokenlean_auto_level_total", (("level", "none"), ("task", "vqa"))) not in m
    # without a budget nothing is predicted, reported or counted
    free = budgeted(None, clock, auto=False)
    assert free.plan(svc, KEY, 1, "low", None) == "low" and free.settle(svc) is None


def test_the_report_and_metrics_of_an_auto_request():
    clock = Clock()
    svc = FakeService(clock=clock)
    b = budgeted(100, clock)
    assert b.plan(svc, KEY, 1, None, None) == "low"
    clock.now += 0.0425  # answered in half the predicted 85 ms
    report = b.settle(svc)
    assert report == {"auto": True, "budget_ms": 100, "predicted_ms": 85.0, "measured_ms": 42.5, "met": True}
    m = samples(svc.metrics)
    assert m[("tokenlean_auto_level_total", (("level", "low"), ("task", "vqa")))] == 1
    assert m[("tokenlean_latency_budget_total", (("outcome", "met"), ("task", "vqa")))] == 1
    assert m[("tokenlean_latency_prediction_error_ratio_sum", (("task", "vqa"),))] == pytest.approx(0.5)


def test_under_reject_an_auto_request_no_plan_fits_is_503_with_retry_after():
    clock = Clock()
    svc = FakeService(clock=clock)
    svc.backlog.reserve("running", 2.5)  # 2.5 s of work ahead
    with pytest.raises(Overloaded) as refused:
        budgeted(100, clock, policy="reject").plan(svc, KEY, 1, None, None)
    status, _ = status_of(refused.value)
    assert status == 503 and headers_of(refused.value)["Retry-After"] == "3"  # 2.535 s - 0.1 s, rounded up
    m = samples(svc.metrics)
    assert m[("tokenlean_latency_budget_total", (("outcome", "rejected"), ("task", "vqa")))] == 1
    # the same request under degrade runs at the most compressed plan; fixed levels are never refused
    assert budgeted(100, clock).plan(svc, KEY, 1, None, None) == "high"
    assert budgeted(100, clock, policy="reject", auto=False).plan(svc, KEY, 1, "none", None) == "none"


# ------------------------------------------------------------------ never a plan the model lacks


@pytest.mark.parametrize("levels", [("none", "low", "medium", "high"), ("none", "high"), ("medium",)])
def test_auto_only_ever_picks_a_plan_the_backend_runs(levels):
    clock = Clock()
    svc = FakeService(levels=levels, clock=clock)
    assert auto_plans(svc, None) == tuple(sorted(levels, key=lambda p: -FLOPS[p]))
    rng = random.Random(0)
    for _ in range(200):
        svc.backlog.reserve("running", rng.uniform(0, 1))
        b = budgeted(rng.randint(1, 1500), clock, waited_s=rng.uniform(0, 0.2))
        assert b.plan(svc, KEY, rng.randint(1, 6), None, None) in levels
    assert set(auto_plans(svc, None)) == set(levels)


def test_a_plan_offered_twice_is_one_option():
    svc = FakeService()
    svc.plan_for = lambda level, method: "high" if level in ("medium", "high") else level
    assert auto_plans(svc, None) == ("none", "low", "high")


# ------------------------------------------------------------------ no starvation, and visible


def test_a_flood_of_none_neither_starves_auto_requests_nor_hides_in_the_metrics():
    clock = Clock()
    svc = FakeService(clock=clock, max_batch=2)
    svc.metrics.queued.sources["vqa"] = lambda: {
        k[0]: s for k, s in svc.batcher.queued_seconds().items()
    }  # as TaskService wires it

    async def scenario():
        svc.batcher.start()
        first = asyncio.ensure_future(svc.batcher.submit(("none", KEY), "n0"))  # runs, held
        await asyncio.sleep(0.05)
        flood = [asyncio.ensure_future(svc.batcher.submit(("none", KEY), f"n{i}")) for i in range(1, 7)]
        await asyncio.sleep(0)
        # ahead: 6 rows of none (3 batches of 140 ms) and the running one (120 ms); within 640 ms
        # none would take 660, low 625, medium 595, each + 35 ms of headroom for a `high` batch
        plan = budgeted(640, clock).plan(svc, KEY, 1, None, None)
        visible = samples(svc.metrics)
        auto = asyncio.ensure_future(svc.batcher.submit((plan, KEY), "auto"))
        await asyncio.sleep(0)
        later = [asyncio.ensure_future(svc.batcher.submit(("none", KEY), f"m{i}")) for i in range(8)]
        await asyncio.sleep(0)
        svc.model_call.gate.set()
        await asyncio.gather(first, *flood, auto, *later)
        await svc.batcher.close(1)
        return plan, visible

    plan, visible = run(scenario())
    assert plan == "medium"  # the flood pushed it up
    order = [item for _, item in svc.model_call.log]
    assert len(order) == 16  # every request ran
    # the auto request ran before every `none` request that arrived after it, however many
    assert all(order.index("auto") < order.index(f"m{i}") for i in range(8))
    # and the metrics say why: the queue it saw was none's, and it was given a higher level
    assert visible[("tokenlean_queued_seconds", (("level", "none"), ("task", "vqa")))] == pytest.approx(0.42)
    assert visible[("tokenlean_auto_level_total", (("level", plan), ("task", "vqa")))] == 1


# ------------------------------------------------------------------ the latency profile


def test_the_profile_per_plan_is_robust_to_a_stall_and_follows_a_lasting_change():
    table = CostTable(group=lambda key: key[0])
    for _ in range(20):
        for rows in (1, 16):
            table.observe(("high", 8), rows, known("high", rows))
            table.observe(("none", 8), rows, known("none", rows))
    steady = table.profile("high", (1, 16))
    assert steady["seconds"][1] == pytest.approx(known("high", 1), rel=0.01)
    assert steady["seconds"][16] == pytest.approx(known("high", 16), rel=0.01)
    assert table.profile("none", (1,))["seconds"][1] == pytest.approx(known("none", 1), rel=0.01)
    assert table.profile("low", (1,)) is None  # never ran
    # a key never seen (another text length) predicts from its plan's line, not the pool's
    assert table.model(("high", 24)).seconds(1) == pytest.approx(known("high", 1), rel=0.01)
    table.observe(("high", 8), 1, 100 * known("high", 1))  # one stall of 100x
    stalled = table.profile("high", (1, 16))
    assert stalled["seconds"][1] < 1.3 * steady["seconds"][1]  # clipped: it moves by a fifth
    for _ in range(40):  # the machine got twice as slow, for good
        for rows in (1, 16):
            table.observe(("high", 8), rows, 2 * known("high", rows))
    assert table.model(("high", 24)).seconds(16) == pytest.approx(2 * known("high", 16), rel=0.1)
