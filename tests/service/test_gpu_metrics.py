"""GPU memory gauges are wired to torch's allocator and NVML (CUDA faked: no GPU here)."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from app.metrics import GPUMemoryCollector, Metrics


def fake_torch(available: bool):
    cuda = SimpleNamespace(
        is_available=lambda: available,
        device_count=lambda: 2,
        memory_allocated=lambda i: 1000 + i,
        memory_reserved=lambda i: 2000 + i,
    )
    return SimpleNamespace(cuda=cuda)


def fake_nvml():
    return SimpleNamespace(
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: f"h{i}",
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=12345),
    )


def samples(collector) -> dict[tuple[str, str], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {
        (s.name, s.labels.get("device")): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_gpu_gauges_read_the_allocator_and_nvml():
    got = samples(GPUMemoryCollector(torch_module=fake_torch(True), nvml_module=fake_nvml()))
    assert got[("tokenlean_gpu_memory_allocated_bytes", "cuda:1")] == 1001
    assert got[("tokenlean_gpu_memory_reserved_bytes", "cuda:0")] == 2000
    assert got[("tokenlean_gpu_memory_used_bytes", "cuda:0")] == 12345


def test_gpu_gauges_are_absent_on_a_cpu_host():
    assert samples(GPUMemoryCollector(torch_module=fake_torch(False), nvml_module=False)) == {}


def test_metrics_registry_exposes_the_design_names():
    text = generate_latest(Metrics(gpu=GPUMemoryCollector(fake_torch(True), fake_nvml())).registry).decode()
    for name in (
        "tokenlean_queue_depth",
        "tokenlean_build_info",
        "tokenlean_gpu_memory_allocated_bytes",
        "tokenlean_gpu_memory_used_bytes",
        "process_cpu_seconds_total",
    ):
        assert name in text
