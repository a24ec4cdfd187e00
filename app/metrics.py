"""Prometheus metrics, all in one registry. Labels are bounded: task, level (a named level or the
FLOPs bucket a numeric request resolved to), method (a reduction method, `none`, or `invalid`
before a plan), status (the HTTP status code: the few app/http_errors.py knows, 200, 499 for a
client that went away), backend, device. A request to /v1/<task> and one to /v2/models/<task>/infer
count in the same series: no label tells the protocols apart."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from app import __version__


def geometric(top: float, bottom: float, factor: float) -> list[float]:
    """Buckets from `top` (the last finite one) down by `factor` while above `bottom`, ascending."""
    buckets, value = [], top
    while value >= bottom:
        buckets.append(round(value, 6))
        value /= factor
    return buckets[::-1]


# *_created samples double the exposition for no use here.
disable_created_metrics()

LATENCY_BUCKETS = geometric(30.0, 0.0004, 2**0.5)  # 0.46 ms .. 30 s
# measured / predicted latency, 1/16 .. 16 (positive: Ray's histograms take no bound <= 0)
RATIO_ERROR_BUCKETS = geometric(16.0, 1 / 16, 2**0.25)
BATCH_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128]
RATIO_BUCKETS = [i / 20 for i in range(1, 21)]


class GPUMemoryCollector(Collector):
    """Reads torch's CUDA allocator (and NVML, device-wide, where nvidia-ml-py finds a GPU) at
    scrape time. On a host without CUDA it yields nothing."""

    def __init__(self, torch_module=None, nvml_module=None):
        self._torch = torch_module
        self._nvml = nvml_module

    def _torch_cuda(self):
        if self._torch is None:
            import torch

            self._torch = torch
        return self._torch.cuda

    def _nvml_handles(self) -> list:
        if self._nvml is False:
            return []
        try:
            if self._nvml is None:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
            return [self._nvml.nvmlDeviceGetHandleByIndex(i) for i in range(self._nvml.nvmlDeviceGetCount())]
        except Exception:  # no driver, no library, no device: NVML metrics are simply absent
            self._nvml = False
            return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        cuda = self._torch_cuda()
        if cuda.is_available():
            allocated = GaugeMetricFamily(
                "tokenlean_gpu_memory_allocated_bytes",
                "bytes held by tensors (torch allocator)",
                labels=["device"],
            )
            reserved = GaugeMetricFamily(
                "tokenlean_gpu_memory_reserved_bytes",
                "bytes reserved by torch's allocator",
                labels=["device"],
            )
            for i in range(cuda.device_count()):
                allocated.add_metric([f"cuda:{i}"], float(cuda.memory_allocated(i)))
                reserved.add_metric([f"cuda:{i}"], float(cuda.memory_reserved(i)))
            yield allocated
            yield reserved
        handles = self._nvml_handles()
        if handles:
            used = GaugeMetricFamily(
                "tokenlean_gpu_memory_used_bytes",
                "device memory in use, all processes (NVML)",
                labels=["device"],
            )
            for i, handle in enumerate(handles):
                used.add_metric([f"cuda:{i}"], float(self._nvml.nvmlDeviceGetMemoryInfo(handle).used))
            yield used


class QueuedSecondsCollector(Collector):
    """Predicted seconds of queued work per task and level, read from each task's queues at
    scrape time: which levels fill the queue that `auto` requests see ahead of them."""

    def __init__(self):
        self.sources: dict[str, Callable[[], dict[str, float]]] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "tokenlean_queued_seconds",
            "predicted seconds of queued work, by the level it is queued at",
            labels=["task", "level"],
        )
        for task, source in list(self.sources.items()):
            for level, seconds in sorted(source().items()):
                family.add_metric([task, level], seconds)
        yield family


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, gpu: Collector | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tokenlean_requests",
            "requests by task, level, method and status code",
            ["task", "level", "method", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "tokenlean_request_duration_seconds",
            "request latency, receipt to response",
            ["task", "level", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_duration = Histogram(
            "tokenlean_inference_duration_seconds",
            "one batched model call",
            ["task", "level", "method", "backend"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "tokenlean_queue_wait_seconds",
            "time from enqueue to batch start",
            ["task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("tokenlean_queue_depth", "items waiting for a batch", ["task"], registry=r)
        self.batch_size = Histogram(
            "tokenlean_batch_size", "items per model call", ["task"], buckets=BATCH_BUCKETS, registry=r
        )
        self.tokens_kept = Histogram(
            "tokenlean_tokens_kept_ratio",
            "tokens after the last layer / tokens in",
            ["task", "level", "method"],
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "tokenlean_rejected", "requests refused because the queue was full", ["task"], registry=r
        )
        self.gpu_peak = Gauge(
            "tokenlean_gpu_memory_peak_bytes",
            "peak CUDA memory of the last batch",
            ["task", "level"],
            registry=r,
        )
        self.model_load = Gauge(
            "tokenlean_model_load_seconds", "time to load and warm up", ["task"], registry=r
        )
        # latency budgets (app/budget.py)
        self.auto_level = Counter(
            "tokenlean_auto_level", "levels `auto` requests were given", ["task", "level"], registry=r
        )
        self.latency_budget = Counter(
            "tokenlean_latency_budget",
            "requests with a latency budget: met, missed (answered later), rejected (no plan fits, "
            "overload policy reject)",
            ["task", "outcome"],
            registry=r,
        )
        self.prediction_error = Histogram(
            "tokenlean_latency_prediction_error_ratio",
            "measured / predicted latency of requests with a budget (1: exact, above: later)",
            ["task"],
            buckets=RATIO_ERROR_BUCKETS,
            registry=r,
        )
        self.queued = QueuedSecondsCollector()
        r.register(self.queued)
        Info("tokenlean_build", "tokenlean version", registry=r).info({"version": __version__})
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        r.register(gpu or GPUMemoryCollector())
