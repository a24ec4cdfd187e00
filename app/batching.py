"""Micro-batching per (task, plan): requests with the same plan share a model call, requests with
different plans never do. Every task's batcher hands its batches to one Dispatcher per model
thread, which runs them one at a time, the batch holding the oldest request first, whatever its
task: a request waits for the work admitted before it, not for a turn among the tasks, and a
batch is formed when the thread is free, from everything queued by then.

Admission is bounded by time: a request is refused at once when the predicted work ahead of it
(the process-wide Backlog: the running batch and every batch the queues will form, in seconds
measured per task, batch key and batch size) would make it wait longer than the maximum queue
wait from its arrival. An admitted request is run even when the prediction was short and it
waits longer (a refusal after seconds of waiting is worse for a client than a late answer, and
the prediction's spread keeps such overruns few); only its deadline, checked when it reaches the
head of its queue, stops it: answered 504, not run."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from app.backlog import Backlog
from app.errors import DeadlineExceeded, Overloaded, Unavailable

# When the request reached the server (time.perf_counter), set by the HTTP layer before the body
# is read: waits and deadlines count from there. Unset: from the call to submit.
arrival: ContextVar[float | None] = ContextVar("tokenlean_arrival", default=None)


def arrived_at() -> float:
    t = arrival.get()
    return time.perf_counter() if t is None else t


@dataclass
class Reservation:
    """The work of a request admitted before its body was read, counted in the backlog until the
    request is queued (then its queue counts it) or ends: requests still being read and decoded
    are ahead of a later arrival too, and without them a burst would pass the early check all at
    once and be refused only after its bodies were read and decoded."""

    backlog: Backlog
    seconds: float
    held: bool = True
    at: float = field(default_factory=time.perf_counter)
    cpu_at: float = field(default_factory=time.thread_time)  # the event loop's thread

    def release(self) -> None:
        if self.held:
            self.held = False
            self.backlog.withdraw(self.seconds)

    def retake(self) -> None:
        """Counted again (after `release` while the request waited for its body)."""
        if not self.held:
            self.held = True
            self.backlog.admit(self.seconds)


reservation: ContextVar[Reservation | None] = ContextVar("tokenlean_reservation", default=None)


@dataclass
class Pending:
    item: Any
    weight: int  # rows of the model batch this item needs (retrieval: one per candidate)
    future: asyncio.Future
    deadline: float = float("inf")  # perf_counter time after which it is not started
    enqueued: float = field(default_factory=time.perf_counter)
    arrived: float = 0.0  # when the request reached the server


@dataclass(frozen=True)
class BatchInfo:
    """What a request learns about the model call it ran in."""

    size: int  # rows in the model call
    queue_s: float
    inference_s: float


LAG_PERIOD_S = 0.005
LAG_WEIGHT = 0.1  # an average over ~10 ticks: one stall (a big decode, a collection) is no congestion
LOOP_COST_S = 0.003  # first guess of the event loop's work per admitted request, then measured
# Of the event loop's time, the share the HTTP work of admitted requests (reading, validating,
# decoding) may take; the rest stays for refusals, new connections and answers, so that those
# stay fast however many requests come. Bursts up to max_loop_lag_s of such work are allowed.
LOOP_SHARE = 0.5

RunBatch = Callable[[Hashable, list[Any]], list[Any]]
BatchSeconds = Callable[[Hashable, int], float]  # (batch key, rows) -> predicted seconds of that batch


class Dispatcher:
    """Runs the batches of every MicroBatcher on one executor (the model thread) within one event
    loop, one batch at a time: of the queues ready to run (full, or their head waited max_wait),
    the one whose head arrived first."""

    def __init__(self, executor: Executor):
        self.executor = executor
        self.lanes: list[MicroBatcher] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._watch: asyncio.Task | None = None
        self.lag = 0.0  # seconds the event loop runs behind (see _watch_lag)
        # The event loop's work per admitted request (reading, validating, decoding): LOOP_COST_S
        # until measured.
        self.loop_cost = LOOP_COST_S
        self._loop_costs: deque[float] = deque(maxlen=64)
        self._budget, self._budget_at = 0.0, time.perf_counter()

    def loop_budget(self, now: float, capacity: float) -> bool:
        """Whether the loop's budget for admitted requests' HTTP work (LOOP_SHARE of its time,
        at most `capacity` seconds saved up) is not spent. A request is charged when it reaches
        its queue, not when admitted: a client slow to send its body costs the loop nothing."""
        self._budget = min(capacity, self._budget + (now - self._budget_at) * LOOP_SHARE)
        self._budget_at = now
        return self._budget > 0

    def queued(self, held: Reservation) -> None:
        """An early-admitted request reached its queue: learn what its HTTP work cost the loop.
        The loop's CPU time from admission to queueing also holds whatever other requests ran
        in between (refusals, answers), so the estimate is a low quantile of recent samples: the
        ones with little in between."""
        self._loop_costs.append(time.thread_time() - held.cpu_at)
        if len(self._loop_costs) >= 8:
            ordered = sorted(self._loop_costs)
            self.loop_cost = ordered[len(ordered) // 4]
        self._budget -= self.loop_cost

    def register(self, lane: MicroBatcher) -> None:
        if lane not in self.lanes:
            self.lanes.append(lane)
        if self._task is None:
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self._loop())
            self._watch = loop.create_task(self._watch_lag())

    async def unregister(self, lane: MicroBatcher) -> None:
        """The lane is closed; the last one out stops the loop (and a batch still in the model)."""
        if lane in self.lanes:
            self.lanes.remove(lane)
        if not self.lanes and self._task is not None:
            tasks, self._task = (self._task, self._watch), None
            for task in tasks:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass

    async def _watch_lag(self) -> None:
        """How far behind the event loop runs: how late a timer of LAG_PERIOD_S fires, averaged
        exponentially (LAG_WEIGHT per tick)."""
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(LAG_PERIOD_S)
            late = loop.time() - start - LAG_PERIOD_S
            self.lag += LAG_WEIGHT * (late - self.lag)

    def wake(self) -> None:
        self._wakeup.set()

    def _pick(self, now: float) -> tuple[MicroBatcher, Hashable] | float:
        """The ready queue with the oldest head, or when the next one gets ready (inf: none)."""
        best, best_arrived, wake_at = None, float("inf"), float("inf")
        for lane in self.lanes:
            for key, queue in lane._queues.items():
                head = queue[0]
                fill_by = head.enqueued + lane.max_wait_s
                if lane._rows[key] >= lane.max_batch or now >= fill_by:
                    if head.arrived < best_arrived:
                        best, best_arrived = (lane, key), head.arrived
                else:
                    wake_at = min(wake_at, fill_by)
        return best if best is not None else wake_at

    async def _loop(self) -> None:
        while True:
            now = time.perf_counter()
            pick = self._pick(now)
            if isinstance(pick, tuple):
                lane, key = pick
                batch = lane._take(key, now)
                if batch:
                    await lane._execute(key, batch)
                    for other in self.lanes:  # the batch's time was learnt: queued work re-priced
                        other.reprice()
                continue
            self._wakeup.clear()
            timeout = None if pick == float("inf") else max(0.0, pick - now)
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except TimeoutError:
                pass


# One dispatcher per (event loop, executor): the tasks of an app share the model thread's.
_DISPATCHERS: dict[tuple[int, int], tuple[asyncio.AbstractEventLoop, Dispatcher]] = {}


def dispatcher_for(executor: Executor) -> Dispatcher:
    loop = asyncio.get_running_loop()
    for k, (other, _) in list(_DISPATCHERS.items()):
        if other.is_closed():
            del _DISPATCHERS[k]
    key = (id(loop), id(executor))
    if key not in _DISPATCHERS:
        _DISPATCHERS[key] = (loop, Dispatcher(executor))
    return _DISPATCHERS[key][1]


class MicroBatcher:
    def __init__(
        self,
        run: RunBatch,
        executor: Executor,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        on_batch: Callable[[Hashable, BatchInfo, list[float]], None] | None = None,
        on_depth: Callable[[int], None] | None = None,
        backlog: Backlog | None = None,
        cost: BatchSeconds = lambda key, rows: 0.0,
        max_queue_wait_s: float = float("inf"),
        deadline_s: float = float("inf"),
        max_loop_lag_s: float = float("inf"),
    ):
        """cost(key, rows): predicted seconds of one batch of that many rows under that key;
        max_queue_wait_s: the longest a request may wait for its batch to start, from its
        arrival, as predicted at admission (an admitted request is run even if it waits longer);
        deadline_s: the default time from arrival after which a request is not started (504);
        max_loop_lag_s: while the event loop runs further behind than this, admit_early refuses
        (it is the HTTP work of admitted requests that delays every answer, refusals included)."""
        self._run, self._executor = run, executor
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self._on_batch, self._on_depth = on_batch, on_depth
        self.backlog = backlog or Backlog()
        self._cost, self.max_queue_wait_s, self.deadline_s = cost, max_queue_wait_s, deadline_s
        self.max_loop_lag_s = max_loop_lag_s
        self._batches = 0
        self._queues: dict[Hashable, deque[Pending]] = {}
        self._rows: dict[Hashable, int] = {}  # rows queued per key
        self._queued_s: dict[Hashable, float] = {}  # per key: predicted seconds, as counted in the backlog
        self._depth = 0
        self._closing = False
        self._inflight: list[Pending] = []  # the batch in the model
        self.dispatcher: Dispatcher | None = None
        self._mean_weight = 1.0  # rows of a request, recent average: what an early admission reserves
        self._batch_rows = 1.0  # rows of a batch, recent average: what a batch grows to while it waits

    @property
    def depth(self) -> int:
        return self._depth

    def start(self) -> None:
        self.dispatcher = dispatcher_for(self._executor)
        self.dispatcher.register(self)

    # ------------------------------------------------------------------ admission

    def queue_seconds(self, key: Hashable, rows: int) -> float:
        """Predicted seconds of the batches `rows` queued rows of `key` make."""
        full, rest = divmod(rows, self.max_batch)
        return full * self._cost(key, self.max_batch) + (self._cost(key, rest) if rest else 0.0)

    def _reprice(self, key: Hashable) -> None:
        """Bring this key's share of the backlog in line with its queue."""
        rows = self._rows.get(key, 0)
        new = self.queue_seconds(key, rows) if rows else 0.0
        old = self._queued_s.pop(key, 0.0)
        if rows:
            self._queued_s[key] = new
        if new != old:
            self.backlog.admit(new - old)

    def queued_seconds(self) -> dict[Hashable, float]:
        """Predicted seconds of the queued work, per batch key."""
        return dict(self._queued_s)

    def reprice(self) -> None:
        for key in list(self._queued_s):
            self._reprice(key)

    def _busy(self, ahead: float, waited: float) -> Overloaded:
        return Overloaded(
            f"the server is busy: {ahead:.1f} s of work is queued ahead (at most "
            f"{self.max_queue_wait_s:g} s of waiting); retry later",
            self.backlog.retry_after(max(self.max_queue_wait_s - waited, 0.0)),
        )

    def _own_reservation(self) -> float:
        held = reservation.get()
        return held.seconds if held is not None and held.held and held.backlog is self.backlog else 0.0

    def check_admission(self) -> None:
        """Overloaded when the predicted work ahead would make the request wait past the maximum
        queue wait, counted from its arrival. Cheap: the HTTP layer calls it before reading a
        body, so refusals cost microseconds."""
        if self._closing:
            raise Unavailable("the server is shutting down")
        waited = time.perf_counter() - arrived_at()
        ahead = self.backlog.seconds() - self._own_reservation()
        if ahead > self.max_queue_wait_s - waited:
            raise self._busy(ahead, waited)

    def completion_seconds(self, key: Hashable, weight: int) -> float:
        """Predicted seconds from now until a request of `weight` rows queued now under `key`
        has run: the work ahead of it as admission counts it (every task's, the running batch's
        rest included; the request's own reservation excluded), less the partial batch of `key`
        it would join, plus that batch with it at the size it will run at: when there is work
        ahead, requests arriving meanwhile join it too, as they joined recent batches (the
        recent average batch size, up to max_batch), plus the wait for it to fill."""
        rows = self._rows.get(key, 0)
        partial = rows % self.max_batch
        if partial + weight > self.max_batch:  # it starts a batch of its own
            partial = 0
        joined = partial + weight
        ahead = self.backlog.seconds() - self._own_reservation()
        if partial:
            ahead -= self._cost(key, partial)
        if ahead > 0:
            joined = max(joined, min(self.max_batch, round(self._batch_rows)))
        fill = self.max_wait_s if joined < self.max_batch else 0.0
        return max(ahead, 0.0) + fill + self._cost(key, joined)

    def follower_seconds(self, key: Hashable) -> float:
        """Predicted seconds of the batch a request arriving next would run in under `key`,
        behind what is queued now: 0 while the model thread is idle (nobody is expected to
        wait), else a batch of the recent average size."""
        if self.backlog.seconds() - self._own_reservation() <= 0:
            return 0.0
        return self._cost(key, min(self.max_batch, max(1, round(self._batch_rows))))

    def admit_early(self) -> Reservation:
        """check_admission, then reserve what a request of this task typically costs a busy
        queue until the request is queued; the caller releases it if the request ends first."""
        self.check_admission()
        d = self.dispatcher
        if d is not None:
            behind = d.lag
            if behind > self.max_loop_lag_s or not d.loop_budget(time.perf_counter(), self.max_loop_lag_s):
                raise Overloaded(
                    f"the server is busy reading and answering requests ({behind * 1e3:.0f} ms "
                    f"behind, at most {self.max_loop_lag_s * 1e3:g} ms); retry later",
                    1,
                )
        per_row = self._cost(None, self.max_batch) / self.max_batch
        held = Reservation(self.backlog, per_row * self._mean_weight)
        self.backlog.admit(held.seconds)
        reservation.set(held)
        return held

    async def submit(
        self, key: Hashable, item: Any, weight: int = 1, deadline_s: float | None = None
    ) -> tuple[Any, BatchInfo]:
        """Queue `item` under `key`; its result once its batch ran. Refused at once (Overloaded)
        when the task's queue is full or the predicted wait is too long; answered
        DeadlineExceeded when not started within deadline_s (default: the batcher's) of its
        arrival."""
        if self._closing:
            raise Unavailable("the server is shutting down")
        if self._depth + weight > self.max_queue and self._depth > 0:
            raise Overloaded("the request queue is full; retry later", self.backlog.retry_after(0.0))
        self._mean_weight += 0.1 * (weight - self._mean_weight)
        held = reservation.get()
        if held is not None and held.held:  # from here its queue counts it
            held.release()
            if self.dispatcher is not None:
                self.dispatcher.queued(held)
        self.check_admission()
        now, arrived = time.perf_counter(), arrived_at()
        deadline = arrived + min(deadline_s or self.deadline_s, self.deadline_s)
        future = asyncio.get_running_loop().create_future()
        pending = Pending(item, weight, future, deadline, now, arrived)
        self._queues.setdefault(key, deque()).append(pending)
        self._rows[key] = self._rows.get(key, 0) + weight
        self._reprice(key)
        self._set_depth(self._depth + weight)
        if self.dispatcher is not None:
            self.dispatcher.wake()
        try:
            return await future
        except asyncio.CancelledError:  # the client went away: free its place in the queue now
            self._withdraw(key, pending)
            raise

    def _withdraw(self, key: Hashable, pending: Pending) -> None:
        queue = self._queues.get(key)
        if queue is None or not any(p is pending for p in queue):
            return  # already taken into a batch
        remaining = deque(p for p in queue if p is not pending)
        if remaining:
            self._queues[key] = remaining
        else:
            del self._queues[key]
        self._rows[key] -= pending.weight
        if not remaining:
            del self._rows[key]
        self._reprice(key)
        self._set_depth(self._depth - pending.weight)

    # ------------------------------------------------------------------ running

    def _set_depth(self, depth: int) -> None:
        self._depth = depth
        if self._on_depth:
            self._on_depth(depth)

    def _take(self, key: Hashable, now: float) -> list[Pending]:
        """The next batch of `key`, up to max_batch rows. A request at the head whose deadline
        passed is answered 504 and not run."""
        queue, taken, rows, dropped = self._queues[key], [], 0, 0
        while queue and (not taken or rows + queue[0].weight <= self.max_batch):
            pending = queue.popleft()
            if pending.future.cancelled() or now > pending.deadline:
                dropped += pending.weight
                if pending.future.done():  # the client went away
                    continue
                pending.future.set_exception(
                    DeadlineExceeded(
                        f"not started within its deadline ({now - pending.arrived:.1f} s since it arrived)"
                    )
                )
                continue
            taken.append(pending)
            rows += pending.weight
        if queue:
            self._rows[key] -= rows + dropped
        else:
            del self._queues[key], self._rows[key]
        self._reprice(key)
        self._set_depth(self._depth - rows - dropped)
        return taken

    def _run_counted(self, batch_id: Hashable, key: Hashable, batch: list[Pending]) -> list[Any]:
        """On the model thread: the batch counts down from here, not while it waits for the
        thread."""
        self.backlog.start(batch_id)
        try:
            return self._run(key, [p.item for p in batch])
        finally:
            self.backlog.finish(batch_id)

    async def _execute(self, key: Hashable, batch: list[Pending]) -> None:
        """Run one batch on the model thread and answer its requests."""
        loop = asyncio.get_running_loop()
        rows = sum(p.weight for p in batch)
        self._batches += 1
        batch_id = (id(self), self._batches)
        self.backlog.reserve(batch_id, self._cost(key, rows))
        started = time.perf_counter()
        self._inflight = batch
        try:
            results = await loop.run_in_executor(self._executor, self._run_counted, batch_id, key, batch)
        except asyncio.CancelledError:
            self.backlog.finish(batch_id)  # (in case the thread never picked it up)
            raise
        except Exception as exc:  # noqa: BLE001 - a failed batch fails its requests, not the loop
            self.backlog.finish(batch_id)
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            self._inflight = []
            return
        # (cancelled at shutdown: _inflight stays set, so close() fails these requests)
        self._inflight = []
        inference_s = time.perf_counter() - started
        self._batch_rows += 0.1 * (rows - self._batch_rows)
        waits = [started - p.enqueued for p in batch]
        if self._on_batch:
            self._on_batch(key, BatchInfo(rows, 0.0, inference_s), waits)
        for p, result, wait in zip(batch, results, waits, strict=True):
            if not p.future.done():
                p.future.set_result((result, BatchInfo(rows, wait, inference_s)))

    # ------------------------------------------------------------------ shutdown

    async def close(self, timeout_s: float) -> None:
        """Finish what is queued (up to timeout_s), then stop: what is left is answered 503."""
        self._closing = True
        deadline = time.perf_counter() + timeout_s
        while (self._depth or self._inflight) and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        if self.dispatcher is not None:
            await self.dispatcher.unregister(self)
        left = [*self._inflight, *(p for q in self._queues.values() for p in q)]
        self._queues.clear()
        self._rows.clear()
        self.reprice()  # nothing queued: this batcher's share of the backlog goes
        if self._depth:
            self._set_depth(0)
        for pending in left:
            if not pending.future.done():
                pending.future.set_exception(Unavailable("the server is shutting down"))
