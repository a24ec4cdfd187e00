"""Latency budgets: `compression: "auto"` picks each request's plan from its budget and the server's
load (docs/latency-budgets.md).

A request with a budget (`latency_budget_ms`, or the server's `latency_budget_ms` setting when it
sends no compression) is `auto` unless it names a level: the plans of its method (every named level
the backend runs) are tried from the least compressed to the most, each with its predicted
completion time from the request's arrival (what it waited so far, the work queued ahead of it,
the batch it would join at that batch's size: app/batching.py `completion_seconds`, from the
task's latency profile, app/backlog.py), and the first that fits is taken. When none fits, the
overload policy decides: `degrade` runs the most compressed plan anyway, `reject` answers 503 with
Retry-After. A request with a fixed level keeps it; its budget is only predicted, reported and
counted (met or missed).

`choose` is the policy, pure; `Budgeted` carries one request through it (before decoding:
whether it is `auto` and its budget; after decoding: its plan; after its answer: the report and
the metrics). No torch, no HTTP here."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from app.batching import arrived_at
from app.errors import InvalidInput, Overloaded

if TYPE_CHECKING:
    from app.service import TaskService

AUTO = "auto"
PROFILE_SIZES = (1, 2, 4, 8, 16)  # batch sizes GET /v1/models shows the profile at


@dataclass(frozen=True)
class Choice:
    plan: Any
    predicted_s: float  # from the request's arrival to its answer
    fits: bool  # within the budget


def choose(options: Sequence[tuple[Any, float]], budget_s: float) -> Choice:
    """The least compressed plan whose predicted completion fits the budget, else the most
    compressed one (fits=False). `options`: (plan, predicted seconds), least compressed first."""
    if not options:
        raise ValueError("no plan to choose from")
    for plan, predicted in options:
        if predicted <= budget_s:
            return Choice(plan, predicted, True)
    plan, predicted = options[-1]
    return Choice(plan, predicted, False)


_PLANS: WeakKeyDictionary = WeakKeyDictionary()  # service -> {method: its auto plans}


def auto_plans(svc: TaskService, method: str | None) -> tuple:
    """The plans `auto` may give a request of this method: one per named level the backend runs,
    least compressed first (by the model's FLOPs), duplicates dropped. InvalidInput for a method
    the model does not have."""
    known = _PLANS.setdefault(svc, {})
    if method not in known:
        plans = {}
        for level in svc.backend.levels():
            plan = svc.plan_for(level, method)
            plans.setdefault(plan, svc.model.flops(plan))
        known[method] = tuple(sorted(plans, key=lambda p: -plans[p]))
    return known[method]


@dataclass
class Budgeted:
    """One request's budget, from parsing to its answer."""

    budget_s: float | None
    auto: bool
    overload_policy: str = "degrade"
    arrived: float = 0.0
    predicted_s: float | None = None
    clock: Callable[[], float] = field(default=time.perf_counter, repr=False)

    @classmethod
    def of(cls, body, default_budget_ms: int | None, overload_policy: str) -> Budgeted:
        """What the request asks: `auto` when it says so, or when it sends no compression but has
        a budget (its own or the server's). InvalidInput: `auto` with no budget anywhere."""
        requested = body.compression
        own = getattr(body, "latency_budget_ms", None)
        budget_ms = own if own is not None else default_budget_ms
        auto = isinstance(requested, str) and requested.strip().lower() == AUTO
        if auto and budget_ms is None:
            raise InvalidInput(
                "compression: auto needs a latency budget: send latency_budget_ms (1-600000), "
                "or set the server's default (TOKENLEAN_LATENCY_BUDGET_MS)"
            )
        if requested is None and budget_ms is not None:
            auto = True
        budget_s = budget_ms / 1000 if budget_ms is not None else None
        return cls(budget_s, auto, overload_policy, arrived_at())

    def plan(self, svc: TaskService, key: Hashable, weight: int, fixed: Any, method: str | None) -> Any:
        """The plan the request runs at: `auto`'s choice, or `fixed`. Every budgeted request gets
        its prediction; Overloaded when `auto` finds no plan within the budget under `reject`."""
        if self.budget_s is None:
            return fixed
        waited = max(self.clock() - self.arrived, 0.0)
        predict = svc.batcher.completion_seconds
        if not self.auto:
            self.predicted_s = waited + predict((fixed, key), weight)
            return fixed
        options = [(p, waited + predict((p, key), weight)) for p in auto_plans(svc, method)]
        choice = choose(options, self.budget_s)
        self.predicted_s = choice.predicted_s
        task = svc.task.name
        if not choice.fits and self.overload_policy == "reject":
            svc.metrics.latency_budget.labels(task, "rejected").inc()
            raise Overloaded(
                f"no plan fits the latency budget of {self.budget_s * 1e3:g} ms (the most compressed "
                f"is predicted to answer in {choice.predicted_s * 1e3:.0f} ms); retry later",
                max(1, math.ceil(choice.predicted_s - self.budget_s)),  # when the excess has run
            )
        svc.metrics.auto_level.labels(task, svc.level_label(choice.plan)).inc()
        return choice.plan

    def settle(self, svc: TaskService) -> dict | None:
        """After the answer: the report's `latency` section, and the budget and prediction
        metrics."""
        if self.budget_s is None:
            return None
        measured = self.clock() - self.arrived
        met = measured <= self.budget_s
        m, task = svc.metrics, svc.task.name
        m.latency_budget.labels(task, "met" if met else "missed").inc()
        if self.predicted_s is not None:
            m.prediction_error.labels(task).observe(measured / max(self.predicted_s, 1e-6))
        return {
            "auto": self.auto,
            "budget_ms": round(self.budget_s * 1e3, 3),
            "predicted_ms": None if self.predicted_s is None else round(self.predicted_s * 1e3, 3),
            "measured_ms": round(measured * 1e3, 3),
            "met": met,
        }


def latency_profile(svc: TaskService) -> dict:
    """GET /v1/models: per named level of the model's method, the predicted milliseconds of one
    batch at each of PROFILE_SIZES (conservative: the fitted line times the recent spread) and
    how many batches taught it."""
    out = {}
    for level in svc.backend.levels():
        profile = svc.costs.profile(svc.plan_for(level, None), PROFILE_SIZES)
        if profile is not None:
            out[level] = {
                "batch_ms": {str(n): round(s * 1e3, 3) for n, s in profile["seconds"].items()},
                "batches": profile["batches"],
            }
    return {"levels": out, "spread": round(svc.costs.spread, 3)}
