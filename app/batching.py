"""Micro-batching per (task, plan): requests with the same plan share a model call, requests with
different plans never do. One batch per task runs at a time, in a worker thread, so the event
loop never blocks on inference; while it runs, the next batch fills up.

Admission is bounded by time, not only by rows: a request is refused at once when the work
admitted ahead of it (the process-wide Backlog, in predicted seconds) exceeds the maximum wait,
and a request whose deadline passes before its batch starts is answered 504 instead of run."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from app.backlog import Backlog
from app.errors import DeadlineExceeded, Overloaded, Unavailable


@dataclass
class Pending:
    item: Any
    weight: int  # rows of the model batch this item needs (retrieval: one per candidate)
    future: asyncio.Future
    cost: float = 0.0  # predicted seconds of model time, counted in the backlog
    deadline: float = float("inf")  # perf_counter time after which it is not started
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class BatchInfo:
    """What a request learns about the model call it ran in."""

    size: int  # rows in the model call
    queue_s: float
    inference_s: float


RunBatch = Callable[[Hashable, list[Any]], list[Any]]


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
        cost: Callable[[int], float] = lambda rows: 0.0,
        max_queue_wait_s: float = float("inf"),
        deadline_s: float = float("inf"),
    ):
        """cost(rows): predicted seconds of model time a request of that many rows adds to a busy
        queue; max_queue_wait_s: the most predicted backlog a request is admitted behind;
        deadline_s: the default time from arrival after which a request is not started."""
        self._run, self._executor = run, executor
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self._on_batch, self._on_depth = on_batch, on_depth
        self.backlog = backlog or Backlog()
        self._cost, self.max_queue_wait_s, self.deadline_s = cost, max_queue_wait_s, deadline_s
        self._batches = 0
        self._queues: OrderedDict[Hashable, deque[Pending]] = OrderedDict()
        self._depth = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False
        self._inflight: list[Pending] = []  # the batch in the model

    @property
    def depth(self) -> int:
        return self._depth

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def submit(
        self, key: Hashable, item: Any, weight: int = 1, deadline_s: float | None = None
    ) -> tuple[Any, BatchInfo]:
        """Queue `item` under `key`; its result once its batch ran. Refused at once (Overloaded)
        when the queue is full or the predicted wait ahead of it is too long; answered
        DeadlineExceeded when not started within deadline_s (default: the batcher's)."""
        if self._closing:
            raise Unavailable("the server is shutting down")
        if self._depth + weight > self.max_queue and self._depth > 0:
            raise Overloaded("the request queue is full; retry later", self.backlog.retry_after(0.0))
        self.check_admission()
        now = time.perf_counter()
        deadline = now + min(deadline_s or self.deadline_s, self.deadline_s)
        cost = self._cost(weight)
        pending = Pending(item, weight, asyncio.get_running_loop().create_future(), cost, deadline, now)
        self.backlog.admit(cost)
        self._queues.setdefault(key, deque()).append(pending)
        self._set_depth(self._depth + weight)
        self._wakeup.set()
        try:
            return await pending.future
        except asyncio.CancelledError:  # the client went away: free its place in the queue now
            self._withdraw(key, pending)
            raise

    def check_admission(self) -> None:
        """Overloaded when more predicted work is queued ahead than a request may wait behind.
        Cheap: the HTTP layer calls it before reading a body, so refusals cost milliseconds."""
        if self._closing:
            raise Unavailable("the server is shutting down")
        ahead = self.backlog.seconds()
        if ahead > self.max_queue_wait_s:
            raise Overloaded(
                f"the server is busy: {ahead:.1f} s of work is queued ahead (at most "
                f"{self.max_queue_wait_s:g} s); retry later",
                self.backlog.retry_after(self.max_queue_wait_s),
            )

    def _withdraw(self, key: Hashable, pending: Pending) -> None:
        queue = self._queues.get(key)
        if queue is None or not any(p is pending for p in queue):
            return  # already taken into a batch
        remaining = deque(p for p in queue if p is not pending)
        if remaining:
            self._queues[key] = remaining
        else:
            del self._queues[key]
        self._set_depth(self._depth - pending.weight)
        self.backlog.withdraw(pending.cost)

    async def close(self, timeout_s: float) -> None:
        """Finish what is queued (up to timeout_s), then stop."""
        self._closing = True
        deadline = time.perf_counter() + timeout_s
        while (self._depth or self._inflight) and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for queue in self._queues.values():
            for pending in queue:
                self.backlog.withdraw(pending.cost)
        for pending in [*self._inflight, *(p for q in self._queues.values() for p in q)]:
            if not pending.future.done():
                pending.future.set_exception(Unavailable("the server is shutting down"))

    def _set_depth(self, depth: int) -> None:
        self._depth = depth
        if self._on_depth:
            self._on_depth(depth)

    def _oldest_key(self) -> Hashable | None:
        heads = [(q[0].enqueued, k) for k, q in self._queues.items() if q]
        return min(heads, key=lambda h: h[0])[1] if heads else None

    def _take(self, key: Hashable) -> list[Pending]:
        queue, taken, rows = self._queues[key], [], 0
        now = time.perf_counter()
        while queue and (not taken or rows + queue[0].weight <= self.max_batch):
            pending = queue.popleft()
            if pending.future.cancelled() or now > pending.deadline:
                self._set_depth(self._depth - pending.weight)
                self.backlog.withdraw(pending.cost)
                if not pending.future.done():  # not the client that went away: its deadline passed
                    waited = now - pending.enqueued
                    pending.future.set_exception(
                        DeadlineExceeded(f"not started within its deadline ({waited:.1f} s in the queue)")
                    )
                continue
            taken.append(pending)
            rows += pending.weight
        if not queue:
            del self._queues[key]
        self._set_depth(self._depth - rows)
        return taken

    def _run_counted(self, number: int, key: Hashable, batch: list[Pending]) -> list[Any]:
        """On the model thread: the batch's predicted cost counts as running from here, not while
        it waits behind another task's batch for the thread."""
        batch_id = (id(self), number)
        self.backlog.start(batch_id, sum(p.cost for p in batch))
        try:
            return self._run(key, [p.item for p in batch])
        finally:
            self.backlog.finish(batch_id)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            key = self._oldest_key()
            if key is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            queue = self._queues[key]
            deadline = queue[0].enqueued + self.max_wait_s
            while sum(p.weight for p in queue) < self.max_batch and time.perf_counter() < deadline:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(
                        self._wakeup.wait(), timeout=max(0.0, deadline - time.perf_counter())
                    )
                except TimeoutError:
                    break
            batch = self._take(key)
            if not batch:
                continue
            started = time.perf_counter()
            self._inflight = batch
            self._batches += 1
            try:
                results = await loop.run_in_executor(
                    self._executor, self._run_counted, self._batches, key, batch
                )
            except Exception as exc:  # noqa: BLE001 - a failed batch fails its requests, not the loop
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                self._inflight = []
                continue
            # (cancelled at shutdown: _inflight stays set, so close() fails these requests)
            self._inflight = []
            inference_s = time.perf_counter() - started
            waits = [started - p.enqueued for p in batch]
            rows = sum(p.weight for p in batch)
            if self._on_batch:
                self._on_batch(key, BatchInfo(rows, 0.0, inference_s), waits)
            for p, result, wait in zip(batch, results, waits, strict=True):
                if not p.future.done():
                    p.future.set_result((result, BatchInfo(rows, wait, inference_s)))
