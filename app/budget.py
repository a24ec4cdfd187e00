"""Latency budgets: `compression: "auto"` picks each request's plan from its budget and the server's
load (docs/latency-budgets.md).

A request with a budget (`latency_budget_ms`, or the server's `latency_budget_ms` setting when it
sends no compression) is `auto` unless it names a level: the plans of its method (every named level
the backend runs) are tried from the least compressed to the most, each with its predicted
completion time from the request's arrival (what it waited so far, the work queued ahead of it,
the batch it would join at the size it will run at: app/batching.py `completion_seconds`, from
the task's latency profile, app/backlog.py; all but the wait so far multiplied by the task's
`Calibration`, how far recent answers ran over their predictions), and the first that fits is
taken; while the model thread is busy, a plan lighter than the most compressed must also leave
room for one batch of the most compressed behind it (the requests arriving meanwhile wait for
it, and have budgets too). When none fits, the overload policy decides: `degrade` runs the most
compressed plan anyway, `reject` answers 503 with Retry-After. A request with a fixed level keeps
it; its budget is only predicted, reported and counted (met or missed).

`choose` is the policy, pure; `Budgeted` carries one request through it (before decoding:
whether it is `auto` and its budget; after decoding: its plan; after its answer: the report and
the metrics). No torch, no HTTP here."""

from __future__ import annotations

import math
import time
from collections import deque
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


def choose(options: Sequence[tuple[Any, float]], budget_s: float, headroom_s: float = 0.0) -> Choice:
    """The least compressed plan whose predicted completion fits the budget, else the most
    compressed one (fits=False). `options`: (plan, predicted seconds), least compressed first.
    `headroom_s`: what every plan but the most compressed must leave of the budget (for the
    requests that will wait behind it)."""
    if not options:
        raise ValueError("no plan to choose from")
    *lighter, (most, most_predicted) = options
    for plan, predicted in lighter:
        if predicted + headroom_s <= budget_s:
            return Choice(plan, predicted, True)
    return Choice(most, most_predicted, most_predicted <= budget_s)


class Calibration:
    """How far answers run over what was predicted for them once their plan was chosen: the
    `quantile` of the last `window` ratios (measured / predicted seconds from the choice to the
    answer), by which later predictions are multiplied, within `bounds`; 1 until `min_samples`
    came in. It catches what the batch costs alone miss (the answer's own way out, batches that
    grow or slow down more than their lines foresaw), and it forgets as fast as the window turns."""

    def __init__(self, quantile: float = 0.95, window: int = 64, min_samples: int = 8, bounds=(0.25, 4.0)):
        self.quantile, self.min_samples, self.bounds = quantile, min_samples, bounds
        self._ratios: deque[float] = deque(maxlen=window)
        self.factor = 1.0

    def observe(self, measured_s: float, predicted_s: float) -> None:
        self._ratios.append(measured_s / max(predicted_s, 1e-6))
        if len(self._ratios) >= self.min_samples:
            ordered = sorted(self._ratios)
            q = ordered[min(len(ordered) - 1, int(self.quantile * len(ordered)))]
            self.factor = min(max(q, self.bounds[0]), self.bounds[1])


@dataclass
class _State:  # per task service
    plans: dict = field(default_factory=dict)  # method -> its auto plans
    calibration: Calibration = field(default_factory=Calibration)


_STATE: WeakKeyDictionary = WeakKeyDictionary()


def state_of(svc: TaskService) -> _State:
    return _STATE.setdefault(svc, _State())


def auto_plans(svc: TaskService, method: str | None) -> tuple:
    """The plans `auto` may give a request of this method: one per named level the backend runs,
    least compressed first (by the model's FLOPs), duplicates dropped. InvalidInput for a method
    the model does not have."""
    known = state_of(svc).plans
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
    predicted_s: float | None = None  # from arrival: waited + calibrated prediction
    clock: Callable[[], float] = field(default=time.perf_counter, repr=False)
    waited_s: float = 0.0  # at the choice
    factor: float = 1.0  # the calibration the prediction was multiplied by

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
        self.waited_s = waited = max(self.clock() - self.arrived, 0.0)
        self.factor = factor = state_of(svc).calibration.factor

        def predict(plan) -> float:
            return waited + factor * svc.batcher.completion_seconds((plan, key), weight)

        if not self.auto:
            self.predicted_s = predict(fixed)
            return fixed
        plans = auto_plans(svc, method)
        # Under load a lighter plan must leave room for a batch of the most compressed one behind
        # it: the requests arriving while it runs wait for it, and they too have budgets.
        headroom = factor * svc.batcher.follower_seconds((plans[-1], key))
        choice = choose([(p, predict(p)) for p in plans], self.budget_s, headroom)
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
            uncalibrated = (self.predicted_s - self.waited_s) / self.factor
            state_of(svc).calibration.observe(measured - self.waited_s, uncalibrated)
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
    calibration = round(state_of(svc).calibration.factor, 3)
    return {"levels": out, "spread": round(svc.costs.spread, 3), "calibration": calibration}
