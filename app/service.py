"""The data plane: one loaded pipeline per task, compression requests resolved to plans, batched
model calls, and the per-request result with what compression cost and saved. No HTTP here."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from app.batching import BatchInfo, MicroBatcher
from app.errors import invalid
from app.metrics import Metrics
from app.settings import ModelSettings, Settings
from models import NO_REDUCTION, ReductionPlan, named_plan, resolve
from models.plan import LEVELS
from models.tasks.pipelines import Pipeline, load_pipeline, ranked, top_labels

log = logging.getLogger("tokenlean")
ALLOWED = "a level name (none, low, medium, high) or a number in [0, 0.9]"


@dataclass(frozen=True)
class VQAItem:
    pixels: torch.Tensor  # (3, H, W)
    question: str
    top_k: int
    text_length: int  # padded token length; part of the batch key


@dataclass(frozen=True)
class ClassifyItem:
    pixels: torch.Tensor
    top_k: int
    text_length: int = 0


@dataclass(frozen=True)
class RetrievalItem:
    pixels: torch.Tensor  # (N, 3, H, W): one image repeated, or N candidate images
    texts: tuple[str, ...]  # N texts: candidates, or one query repeated
    candidates: tuple  # what is ranked (the texts or image indices)
    text_length: int


@lru_cache(maxsize=1)
def inference_thread() -> ThreadPoolExecutor:
    """The one thread that runs every model call of this process (loading and warm-up included).
    On a CPU host, torch's OpenMP pool is per calling thread: several threads calling torch keep
    several pools spinning on the same cores, which doubled the forward time in the server."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")


def metric_level(plan: ReductionPlan, saved: float) -> str:
    """Bounded label: the named level, or the resolved plan's FLOPs saving in tenths."""
    return plan.level if plan.level in LEVELS else f"~{round(saved, 1):.1f}"


class TaskService:
    def __init__(self, task: str, cfg: ModelSettings, settings: Settings, metrics: Metrics, device: str):
        self.task, self.cfg, self.settings, self.metrics = task, cfg, settings, metrics
        started = time.perf_counter()
        self.pipeline: Pipeline = load_pipeline(
            task, cfg.checkpoint, device, settings.backend, cfg.export_dir or None
        )
        self.method = cfg.method or None
        self.graphs = self.pipeline.graphs
        if self.graphs is not None:
            exported = self.graphs.manifest.method
            if self.method not in (None, exported):
                raise ValueError(f"{task}: method {self.method} configured, but the graphs use {exported}")
            self.method = exported
        self.plan_for(cfg.default_compression, None)  # a bad default fails at start-up, not per request
        b = settings.batching
        self.batcher = MicroBatcher(
            self._run_batch,
            inference_thread(),
            b.max_batch_size,
            b.max_wait_ms / 1000,
            b.max_queue,
            on_batch=self._observe_batch,
            on_depth=lambda d: metrics.queue_depth.labels(task).set(d),
        )
        self.load_seconds = time.perf_counter() - started

    # ------------------------------------------------------------------ plans

    @property
    def model(self):
        return self.pipeline.model

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
            plan = resolve(self.model, compression, method)
            return plan if self.graphs is None else self._snap(plan)
        except ValueError as exc:
            methods = ", ".join(self.model.methods)
            raise invalid(
                f"compression/method: {exc}. Allowed compression: {ALLOWED}; methods: {methods}"
            ) from exc

    def levels(self) -> list[str]:
        """Levels this service can run: all of them eagerly, the exported ones on a graph backend."""
        return list(LEVELS) if self.graphs is None else self.graphs.levels()

    def _snap(self, plan: ReductionPlan) -> ReductionPlan:
        """A graph backend runs exported levels only: a named level must be one of them, and a
        numeric target runs at the exported level whose FLOPs saving is closest."""
        exported, method = self.graphs.levels(), self.graphs.manifest.method
        if plan.method not in ("none", method):
            raise ValueError(f"the {self.settings.backend} graphs were exported with {method} only")
        if plan.level in LEVELS:
            if plan.level not in exported:
                raise ValueError(
                    f"level {plan.level!r} was not exported; exported levels: {', '.join(exported)}"
                )
            return plan
        full = self.model.flops(NO_REDUCTION)
        saved = 1 - self.model.flops(plan) / full
        candidates = [named_plan(self.model, level, method) for level in exported]
        return min(candidates, key=lambda p: abs(1 - self.model.flops(p) / full - saved))

    @lru_cache(maxsize=512)  # noqa: B019 - per request on the hot path; plans are few and hashable
    def level_label(self, plan: ReductionPlan) -> str:
        return metric_level(plan, 1 - self.model.flops(plan) / self.model.flops(NO_REDUCTION))

    # ------------------------------------------------------------------ batches

    def _run_batch(self, key: tuple[ReductionPlan, int], items: list[Any]) -> list[Any]:
        plan, text_length = key
        device = self.pipeline.device
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode():
            results = getattr(self, f"_run_{self.task}")(plan, items, text_length)
        if cuda:
            peak = torch.cuda.max_memory_allocated(device)
            self.metrics.gpu_peak.labels(self.task, self.level_label(plan)).set(peak)
        return results

    def _run_vqa(self, plan: ReductionPlan, items: list[VQAItem], text_length: int):
        p = self.pipeline
        logits, trace = p.run(
            torch.stack([i.pixels for i in items]), [i.question for i in items], plan, text_length
        )
        scores = p.scores(logits.float())
        labels = p.labels()
        answers = [top_labels(s[None], labels, i.top_k)[0] for s, i in zip(scores, items, strict=True)]
        return [(a, trace) for a in answers]

    def _run_classify(self, plan: ReductionPlan, items: list[ClassifyItem], text_length: int = 0):
        p = self.pipeline
        logits, trace = p.run(torch.stack([i.pixels for i in items]), plan)
        scores = logits.float().softmax(-1)
        labels = p.labels()
        return [(top_labels(s[None], labels, i.top_k)[0], trace) for s, i in zip(scores, items, strict=True)]

    def _run_retrieval(self, plan: ReductionPlan, items: list[RetrievalItem], text_length: int):
        pixels = torch.cat([i.pixels for i in items])
        texts = [t for i in items for t in i.texts]
        logits, trace = self.pipeline.run(pixels, texts, plan, text_length)
        logits = logits[:, 0].float()
        results, start = [], 0
        for item in items:
            n = len(item.texts)
            results.append((ranked(logits[start : start + n], list(item.candidates)), trace))
            start += n
        return results

    def _observe_batch(self, key: tuple[ReductionPlan, int], info: BatchInfo, waits: list[float]) -> None:
        m, level = self.metrics, self.level_label(key[0])
        m.batch_size.labels(self.task).observe(info.size)
        m.inference_duration.labels(self.task, level, self.settings.backend).observe(info.inference_s)
        for w in waits:
            m.queue_wait.labels(self.task).observe(w)

    async def submit(self, plan: ReductionPlan, item: Any, weight: int = 1):
        """Requests share a batch only with the same plan and the same padded text length, so a
        result never depends on which other requests were batched with it."""
        return await self.batcher.submit((plan, item.text_length), item, weight)

    def text_length(self, texts: list[str]) -> int:
        return self.pipeline.padded_length(texts)

    # ------------------------------------------------------------------ lifecycle

    def warm_up(self) -> None:
        """One call per named level, so the first real request does not pay for lazy init."""
        size = self.pipeline.preprocess.size
        pixels = torch.zeros(1, 3, size, size)
        with torch.inference_mode():
            for level in self.levels():
                plan = self.plan_for(level, None)
                if self.task == "classify":
                    self._run_classify(plan, [ClassifyItem(pixels[0], 1)])
                elif self.task == "vqa":
                    question = "what shape is in the image?"
                    self._run_vqa(plan, [VQAItem(pixels[0], question, 1, 0)], self.text_length([question]))
                else:
                    item = RetrievalItem(pixels, ("a shape",), ("a shape",), 0)
                    self._run_retrieval(plan, [item], self.text_length(["a shape"]))

    def describe(self) -> dict:
        full = self.model.flops(NO_REDUCTION)
        levels = {}
        for level in self.levels():
            plan = self.plan_for(level, None)
            levels[level] = {
                "flops": self.model.flops(plan),
                "flops_saved": round(1 - self.model.flops(plan) / full, 4),
            }
        n_text, n_image = self.model.nominal_tokens()
        return {
            "task": self.task,
            "model": self.cfg.checkpoint,
            "architecture": type(self.model.model).__name__,
            "family": self.model.family,
            "methods": list(self.model.methods),
            "default_method": self.method or self.default_method(),
            "default_compression": self.cfg.default_compression,
            "nominal_tokens": {"text": n_text, "image": n_image},
            "levels": levels,
            "backend": self.settings.backend,
            "device": str(self.pipeline.device),
            "image_size": self.pipeline.preprocess.size,
            "max_text_tokens": getattr(self.model.config, "max_position_embeddings", None)
            if self.model.family == "vilt"
            else None,
        }

    def default_method(self) -> str:
        from models.levels import DEFAULT_METHOD

        return DEFAULT_METHOD[self.model.family]
