"""The data plane of one task: a loaded checkpoint behind a backend, compression requests resolved
to plans, batched model calls and what each request learns about its call. Generic over tasks
(app/tasks/) and backends (models/backends/): nothing here names one. No HTTP here."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Any

from app.backlog import Backlog, CostTable
from app.batching import BatchInfo, MicroBatcher
from app.budget import latency_profile
from app.errors import InvalidInput
from app.metrics import Metrics
from app.settings import ModelSettings, Settings
from app.tasks.base import BatchModel, DecodeContext, Task
from models.backends.base import get_backend
from models.bundle import load_bundle
from models.levels import resolve
from models.plan import LEVELS, NO_REDUCTION, ReductionPlan
from models.trace import Trace

log = logging.getLogger("tokenlean")
ALLOWED = "a level name (none, low, medium, high) or a number in [0, 0.9]"


@lru_cache(maxsize=1)
def inference_thread() -> ThreadPoolExecutor:
    """The one thread that runs every model call of this process (loading and warm-up included).
    On a CPU host, torch's OpenMP pool is per calling thread: several threads calling torch keep
    several pools spinning on the same cores, which doubled the forward time in the server."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")


@lru_cache(maxsize=1)
def shared_backlog() -> Backlog:
    """The predicted work of the inference thread, every task's: what admission reads."""
    return Backlog()


def metric_level(plan: ReductionPlan, saved: float) -> str:
    """Bounded label: the named level, or the resolved plan's FLOPs saving in tenths."""
    return plan.level if plan.level in LEVELS else f"~{round(saved, 1):.1f}"


class TaskService:
    def __init__(self, task: Task, cfg: ModelSettings, settings: Settings, metrics: Metrics, device: str):
        self.task, self.cfg, self.settings, self.metrics = task, cfg, settings, metrics
        started = time.perf_counter()
        self.bundle = load_bundle(cfg.checkpoint, device)
        self.model = self.bundle.model
        self.labels = self.bundle.labels()  # read once: every batch's results name them
        if not task.serves(self.model):
            raise ValueError(f"{task.name}: {cfg.checkpoint} ({self.model.kind}) cannot serve this task")
        self.backend = get_backend(settings.backend)(self.bundle, task.name, cfg.export_dir or None)
        self.method = cfg.method or None
        fixed = self.backend.method
        if fixed is not None:
            if self.method not in (None, fixed):
                raise ValueError(f"{task.name}: method {self.method} configured, but the graphs use {fixed}")
            self.method = fixed
        self.plan_for(cfg.default_compression, None)  # a bad default fails at start-up, not per request
        b = settings.batching
        # seconds per batch by batch key and rows, learnt from every batch this task runs; per
        # plan, the latency profile that `auto` chooses by (app/budget.py)
        self.costs = CostTable(group=lambda key: key[0])
        self.batcher = MicroBatcher(
            self._run_batch,
            inference_thread(),
            b.max_batch_size,
            b.max_wait_ms / 1000,
            b.max_queue,
            on_batch=self._observe_batch,
            on_depth=lambda d: metrics.queue_depth.labels(task.name).set(d),
            backlog=shared_backlog(),
            cost=self.costs.seconds,
            max_queue_wait_s=b.max_queue_wait_ms / 1000,
            deadline_s=b.deadline_ms / 1000,
            max_loop_lag_s=b.max_event_loop_lag_ms / 1000,
        )
        metrics.queued.sources[task.name] = self._queued_by_level
        self.load_seconds = time.perf_counter() - started

    # ------------------------------------------------------------------ plans

    def plan_for(self, compression: str | float | None, method: str | None) -> ReductionPlan:
        if compression is None:
            compression = self.cfg.default_compression
        compression = str(compression).strip().lower()
        try:  # numeric targets: 3 decimals are plenty, and keep the plan cache bounded
            compression = f"{round(float(compression), 3):g}"
        except (ValueError, OverflowError):
            pass
        return self._resolve(compression, method or self.method)

    @lru_cache(maxsize=512)  # noqa: B019 - one service per task, lives as long as the app
    def _resolve(self, compression: str, method: str | None) -> ReductionPlan:
        try:
            return self.backend.runnable(resolve(self.model, compression, method))
        except ValueError as exc:
            methods = ", ".join(self.model.methods)
            raise InvalidInput(
                f"compression/method: {exc}. Allowed compression: {ALLOWED}; methods: {methods}"
            ) from exc

    @lru_cache(maxsize=512)  # noqa: B019 - per request on the hot path; plans are few and hashable
    def level_label(self, plan: ReductionPlan) -> str:
        return metric_level(plan, 1 - self.model.flops(plan) / self.model.flops(NO_REDUCTION))

    # ------------------------------------------------------------------ batches

    def decode_context(self, pixels) -> DecodeContext:
        return DecodeContext(
            limits=self.settings.limits,
            pixels=pixels,
            text_length=self.backend.text_length,
            image_size=self.bundle.preprocess.size,
            token_map_layers=self.model.num_layers if self.backend.token_maps else None,
        )

    def _batch_model(self, plan: ReductionPlan, traces: list) -> BatchModel:
        def forward(pixels, texts, text_length):
            out = self.backend.run(plan, pixels, texts, text_length)
            traces.append(out)
            return out.logits

        def mapped(pixels, texts, text_length, layer):
            out = self.backend.run(plan, pixels, texts, text_length, token_map_layer=layer)
            traces.append(out)
            return out.logits, out.token_maps

        return BatchModel(forward, self.labels, self.bundle.single_label, mapped)

    def _run_batch(
        self, key: tuple[ReductionPlan, Any], items: list[Any], observe: bool = True
    ) -> list[tuple[Any, Trace]]:
        plan = key[0]
        outputs: list = []
        started = time.perf_counter()
        results = self.task.run(self._batch_model(plan, outputs), items)
        if observe:  # the batch's time, for admission (app/backlog.py)
            self.costs.observe(key, sum(self.task.weight(i) for i in items), time.perf_counter() - started)
        out = outputs[-1]
        if out.peak_memory_bytes is not None:
            self.metrics.gpu_peak.labels(self.task.name, self.level_label(plan)).set(out.peak_memory_bytes)
        return [(result, out.trace) for result in results]

    def _observe_batch(self, key: tuple[ReductionPlan, Any], info: BatchInfo, waits: list[float]) -> None:
        m, level, name = self.metrics, self.level_label(key[0]), self.task.name
        m.batch_size.labels(name).observe(info.size)
        method = key[0].method
        m.inference_duration.labels(name, level, method, self.settings.backend).observe(info.inference_s)
        for w in waits:
            m.queue_wait.labels(name).observe(w)

    async def submit(
        self, plan: ReductionPlan, item: Any, deadline_s: float | None = None
    ) -> tuple[Any, Trace, BatchInfo]:
        """Requests share a batch only with the same plan and the same task key (the padded text
        length), so a result never depends on which other requests were batched with it."""
        key = (plan, self.task.batch_key(item))
        (result, trace), info = await self.batcher.submit(key, item, self.task.weight(item), deadline_s)
        return result, trace, info

    # ------------------------------------------------------------------ lifecycle

    def warm_up(self) -> None:
        """One call per named level, so the first real request does not pay for lazy init; then
        full and one-item batches at the default level, so admission control starts from
        measured costs (the first calls, which pay for lazy init, are not counted), and at every
        other level, the latency profile `auto` starts from."""
        ctx = self.decode_context(None)
        one = self.task.warmup_items(ctx, 1)
        key = self.task.batch_key(one[0])
        for level in self.backend.levels():
            self._run_batch((self.plan_for(level, None), key), one, observe=False)
        per_batch = max(1, self.settings.batching.max_batch_size // self.task.weight(one[0]))
        full = self.task.warmup_items(ctx, per_batch)
        default = (self.plan_for(None, None), key)
        self._run_batch(default, full, observe=False)
        for batch in (full, one, one):
            self._run_batch(default, batch)
        # every other level's latency profile: a quarter batch and one item fix its line (full
        # batches of every level would lengthen the start-up; serving refines the line)
        few = full[: max(2, len(full) // 4)]
        for level in self.backend.levels():
            plan = (self.plan_for(level, None), key)
            if plan != default:
                for batch in (few, one):
                    self._run_batch(plan, batch)

    def _queued_by_level(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, seconds in self.batcher.queued_seconds().items():
            level = self.level_label(key[0])
            out[level] = out.get(level, 0.0) + seconds
        return out

    def describe(self) -> dict:
        full = self.model.flops(NO_REDUCTION)
        levels = {}
        for level in self.backend.levels():
            flops = self.model.flops(self.plan_for(level, None))
            levels[level] = {"flops": flops, "flops_saved": round(1 - flops / full, 4)}
        n_text, n_image = self.model.nominal_tokens()
        return {
            "task": self.task.name,
            "model": self.cfg.checkpoint,
            "architecture": self.model.kind,
            "family": str(self.model.family),
            "methods": list(self.model.methods),
            "default_method": self.method or self.model.default_method,
            "default_compression": self.cfg.default_compression,
            "nominal_tokens": {"text": n_text, "image": n_image},
            "levels": levels,
            **self.backend.describe(),
            "image_size": self.bundle.preprocess.size,
            "max_text_tokens": self.model.max_text_tokens,
            "latency_profile": latency_profile(self),
        }
