"""How long the model thread is busy: what one batch costs, learnt from the batches that ran, and
the process-wide backlog of admitted work that admission control reads.

Every model call of a process runs on one thread (app/service.py), so a request's wait is the work
of every task admitted before it, not only its own task's queue: the batch running now (what is
left of it) and every batch the queues will form (app/batching.py runs them oldest request
first, whatever the task). The backlog counts that work in predicted seconds; a request is
admitted when the backlog ahead of it is within the configured maximum wait, whatever its own
size, so a retrieval request with many candidates is treated like a one-row question.

Predictions are conservative on purpose: a batch's time is predicted as the fitted line times a
high quantile of how far recent batches ran over it, because an admitted request that waits
longer than predicted is still run (it answers past the maximum wait), while one refused too
early only costs a retry.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable

QUANTILE = 0.95  # of the recent observed / fitted ratios: how much slower than the fit a batch may run
WINDOW = 64  # recent batches those ratios are taken from
# A running batch past its predicted time is in the tail, where its end is unknown: it counts as
# this share of its prediction still to run, not as done.
OVERRUN_LEFT = 0.25
PRIOR = 20  # fewer ratios than this: the quantile is taken as if the rest were 1 (on time)


class BatchCost:
    """Seconds one batch of `rows` rows takes.

    `seconds(rows)` ~ overhead + per_row * rows, fitted by exponentially weighted least squares
    over the batches seen (older batches decay, so a change of load or machine shows). Each
    observation is clipped to 3x the current prediction before it enters the fit, so one stall does
    not move the line much; the stall still counts in the spread. `conservative(rows)` is the line
    times the `quantile` of the last `window` observed / predicted ratios (at least 1): what a
    batch takes when the machine is as busy as it recently was."""

    def __init__(
        self, decay: float = 0.95, clip: float = 3.0, quantile: float = QUANTILE, window: int = WINDOW
    ):
        self.decay, self.clip, self.quantile = decay, clip, quantile
        self._w = self._x = self._y = self._xx = self._xy = 0.0
        self.overhead, self.per_row = 0.0, 0.0
        self.observed = 0
        self._ratios: deque[float] = deque(maxlen=window)
        self.spread = 1.0  # the quantile of the recent ratios, at least 1

    def seconds(self, rows: int) -> float:
        return self.overhead + self.per_row * rows

    def conservative(self, rows: int) -> float:
        return self.seconds(rows) * self.spread

    def observe(self, rows: int, seconds: float) -> None:
        if self.observed >= 3:
            predicted = max(self.seconds(rows), 1e-6)
            self._ratios.append(seconds / predicted)
            ordered = sorted(self._ratios)
            self.spread = max(1.0, ordered[min(len(ordered) - 1, int(self.quantile * len(ordered)))])
            seconds = min(seconds, self.clip * predicted)
        d = self.decay
        self._w = d * self._w + 1
        self._x = d * self._x + rows
        self._y = d * self._y + seconds
        self._xx = d * self._xx + rows * rows
        self._xy = d * self._xy + rows * seconds
        self.observed += 1
        mean_x, mean_y = self._x / self._w, self._y / self._w
        var = self._xx / self._w - mean_x**2
        if var > 1e-9:
            slope = (self._xy / self._w - mean_x * mean_y) / var
            self.per_row = max(slope, 0.0)
            self.overhead = max(mean_y - self.per_row * mean_x, 0.0)
        else:  # one batch size seen so far: all of it per row
            self.per_row, self.overhead = mean_y / max(mean_x, 1.0), 0.0


class CostTable:
    """One task's batch costs, per batch key (the plan and the padded text length: levels and text
    lengths cost differently). A key predicts from its own line once it has `min_observed`
    batches; until then from its group's line when `group` (key -> group: the plan) is given and
    the group has `min_group` batches, else from the line of every key of the task pooled. The
    groups' lines are the task's latency profile (`profile`: seconds per plan and batch size),
    calibrated at warm-up and learnt from every batch, like every line here: decaying, and robust
    to a stall (clipped before it enters the fit). The spread is the task's:
    the `quantile` of how far the last `window` batches ran over what their key predicted before
    they ran (a contention slows every key alike, and shows after a few batches of any of them).
    At most `max_keys` keys are kept (numeric compression targets make many plans), the least
    recently used go first."""

    def __init__(
        self,
        min_observed: int = 8,
        max_keys: int = 64,
        quantile: float = QUANTILE,
        window: int = WINDOW,
        group: Callable[[Hashable], Hashable] | None = None,
        min_group: int = 2,
    ):
        self.min_observed, self.max_keys, self.quantile = min_observed, max_keys, quantile
        self.group, self.min_group = group, min_group
        self.pooled = BatchCost()
        self._by_key: OrderedDict[Hashable, BatchCost] = OrderedDict()
        self._by_group: OrderedDict[Hashable, BatchCost] = OrderedDict()
        self._ratios: deque[float] = deque(maxlen=window)
        self.spread = 1.0
        self._lock = threading.Lock()  # observed on the model thread, read on the event loop

    def observe(self, key: Hashable, rows: int, seconds: float) -> None:
        with self._lock:
            model = self.model(key)
            # A key's first batch pays for lazy initialisation (a plan never run before): not an
            # overrun the next batches will see.
            if model.observed >= 3 and key in self._by_key:
                self._ratios.append(seconds / max(model.seconds(rows), 1e-6))
                # Until PRIOR ratios are in, the missing ones count as on time, so that one or two
                # stalls right after start-up are not taken for the 90th percentile.
                ordered = sorted([*self._ratios, *[1.0] * (PRIOR - len(self._ratios))])
                self.spread = max(1.0, ordered[min(len(ordered) - 1, int(self.quantile * len(ordered)))])
            self.pooled.observe(rows, seconds)
            self._learn(self._by_key, key, rows, seconds)
            if self.group is not None:
                self._learn(self._by_group, self.group(key), rows, seconds)

    def _learn(self, lines: OrderedDict, key: Hashable, rows: int, seconds: float) -> None:
        cost = lines.pop(key, None) or BatchCost()
        cost.observe(rows, seconds)
        lines[key] = cost
        while len(lines) > self.max_keys:  # least recently used first
            lines.popitem(last=False)

    def model(self, key: Hashable) -> BatchCost:
        cost = self._by_key.get(key)
        if cost is not None and cost.observed >= self.min_observed:
            return cost
        if self.group is not None and key is not None:  # None: any key (the task's pooled line)
            line = self._by_group.get(self.group(key))
            if line is not None and line.observed >= self.min_group:
                return line
        return self.pooled

    def profile(self, group: Hashable, sizes: Iterable[int]) -> dict | None:
        """The latency profile of one group (a plan): conservative seconds of a batch of each size
        (its line times the task's spread) and how many batches it learnt from; None before any."""
        with self._lock:
            line = self._by_group.get(group)
            if line is None:
                return None
            return {
                "seconds": {rows: line.seconds(rows) * self.spread for rows in sizes},
                "batches": line.observed,
            }

    def seconds(self, key: Hashable, rows: int) -> float:
        """Conservative seconds of one batch of `rows` rows under `key` (0 before any batch ran)."""
        if rows <= 0:
            return 0.0
        return self.model(key).seconds(rows) * self.spread


class Backlog:
    """Predicted seconds of admitted work not yet done, across every task of the process: queued
    work (each task's batcher keeps its share up to date with `admit` / `withdraw`) and the
    batches handed to the model thread (`reserve` when handed over, counted whole until `start`,
    then counting down, to OVERRUN_LEFT of their prediction at least, until `finish`)."""

    def __init__(self, clock=time.perf_counter):
        self._clock = clock
        self._lock = threading.Lock()
        self._queued = 0.0
        self._running: dict[Hashable, tuple[float, float | None]] = {}  # batch -> (predicted s, started)

    def seconds(self) -> float:
        with self._lock:
            now = self._clock()
            running = sum(
                cost if start is None else max(cost - (now - start), OVERRUN_LEFT * cost)
                for cost, start in self._running.values()
            )
            return max(self._queued, 0.0) + running

    def admit(self, cost: float) -> None:
        with self._lock:
            self._queued += cost

    def withdraw(self, cost: float) -> None:
        with self._lock:
            self._queued -= cost

    def reserve(self, batch: Hashable, cost: float) -> None:
        """The batch left its queue for the model thread, which may still be busy."""
        with self._lock:
            self._running[batch] = (cost, None)

    def start(self, batch: Hashable, cost: float | None = None) -> None:
        """The batch starts running (on the model thread): from now on it counts down."""
        with self._lock:
            if cost is None:
                cost = self._running.get(batch, (0.0, None))[0]
            self._running[batch] = (cost, self._clock())

    def finish(self, batch: Hashable) -> None:
        with self._lock:
            self._running.pop(batch, None)

    def retry_after(self, limit_s: float) -> int:
        """Whole seconds until the backlog is back within `limit_s` (at least 1)."""
        return max(1, math.ceil(self.seconds() - limit_s))
