"""How long the model thread is busy: a cost model of each task's batches, learnt from the batches
it runs, and the process-wide backlog of admitted work that admission control reads.

Every model call of a process runs on one thread (app/service.py), so a request's wait is the work
of every task admitted before it, not only its own task's queue. The backlog counts that work in
predicted seconds; a request is admitted when the backlog ahead of it is within the configured
maximum wait, whatever its own size, so a retrieval request with many candidates is treated like a
one-row question.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Hashable


class BatchCost:
    """seconds(rows) ~ overhead + per_row * rows, fitted by exponentially weighted least squares
    over the batches seen (older batches decay, so a change of load or machine shows). Each
    observation is clipped to 3x the current prediction first, so one stall does not move it much."""

    def __init__(self, decay: float = 0.95, clip: float = 3.0):
        self.decay, self.clip = decay, clip
        self._w = self._x = self._y = self._xx = self._xy = 0.0
        self.overhead, self.per_row = 0.0, 0.0
        self.observed = 0

    def seconds(self, rows: int) -> float:
        return self.overhead + self.per_row * rows

    def observe(self, rows: int, seconds: float) -> None:
        if self.observed >= 3:
            seconds = min(seconds, self.clip * max(self.seconds(rows), 1e-6))
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

    def amortised(self, rows: int, max_batch: int) -> float:
        """Predicted seconds `rows` add to a busy queue, where batches run full."""
        return rows * (self.overhead / max_batch + self.per_row)


class Backlog:
    """Predicted seconds of admitted work not yet done, across every task of the process. Work
    enters when a request is admitted, becomes running when its batch starts on the model thread
    (running work counts down as it runs) and leaves when the batch ends or the request is
    withdrawn."""

    def __init__(self, clock=time.perf_counter):
        self._clock = clock
        self._lock = threading.Lock()
        self._queued = 0.0
        self._running: dict[Hashable, tuple[float, float]] = {}  # batch -> (predicted s, started at)

    def seconds(self) -> float:
        with self._lock:
            now = self._clock()
            running = sum(max(cost - (now - start), 0.0) for cost, start in self._running.values())
            return max(self._queued, 0.0) + running

    def admit(self, cost: float) -> None:
        with self._lock:
            self._queued += cost

    def withdraw(self, cost: float) -> None:
        with self._lock:
            self._queued -= cost

    def start(self, batch: Hashable, cost: float) -> None:
        """The batch's requests leave the queue and start running (on the model thread)."""
        with self._lock:
            self._queued -= cost
            self._running[batch] = (cost, self._clock())

    def finish(self, batch: Hashable) -> None:
        with self._lock:
            self._running.pop(batch, None)

    def retry_after(self, limit_s: float) -> int:
        """Whole seconds until the backlog is back within `limit_s` (at least 1)."""
        return max(1, math.ceil(self.seconds() - limit_s))
