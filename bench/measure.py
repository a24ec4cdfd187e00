"""Timing and peak memory of zero-argument model calls, and the machine and versions they ran on."""

from __future__ import annotations

import contextlib
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import transformers
from tqdm import tqdm


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    calls: dict[str, Callable],
    rounds: int,
    warmup: int,
    device: torch.device,
    desc: str = "",
) -> dict[str, list[float]]:
    """Seconds per call of each variant, one call of every variant per round, in an order reversed
    every other round (ABC, CBA, ...): machine noise then hits every variant alike."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    synchronize(device)
    names, times = list(calls), {name: [] for name in calls}
    for r in tqdm(range(rounds), desc=desc, leave=False):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            calls[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def speed_stats(seconds: list[float], batch: int) -> dict:
    """Throughput from the median call; p50 / p95 latency of one call of `batch` items."""
    median = float(np.median(seconds))
    return {
        "items_per_s": batch / median,
        "p50_ms": median * 1e3,
        "p95_ms": float(np.percentile(seconds, 95)) * 1e3,
        "calls": len(seconds),
    }


@contextlib.contextmanager
def native_stderr_silenced():
    """The profiler's C++ side logs two lines to stderr per session, at any log level; over hundreds
    of sessions they drown the progress bars. Python exceptions still propagate."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_peak_bytes(call: Callable) -> int:
    """Peak bytes allocated by `call` above what was allocated before it, from the allocation and
    free events torch's profiler records for every CPU tensor, summed in time order."""
    from torch.profiler import ProfilerActivity, profile

    with native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call()
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type().name == "CPU"
    ]
    live = peak = 0
    for _, nbytes in sorted(events):
        live += nbytes
        peak = max(peak, live)
    return peak


def cuda_peak_bytes(call: Callable, device: torch.device) -> int:
    """Peak bytes allocated on the device by `call` above what was allocated before it."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    call()
    synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - before)


def peak_bytes(call: Callable, device: torch.device) -> int:
    return cuda_peak_bytes(call, device) if device.type == "cuda" else cpu_peak_bytes(call)


def cpu_model() -> str:
    """The CPU's marketing name where the OS tells it (Linux), else the architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_state() -> dict | None:
    """The commit, and the model files changed since (figures depend on the working tree); None
    outside a git checkout."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout

    try:
        changed = git("status", "--porcelain", "models").splitlines()
        return {"commit": git("rev-parse", "HEAD").strip(), "changed_under_models": [c[3:] for c in changed]}
    except (OSError, subprocess.CalledProcessError):
        return None


def machine(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "device": str(device),
        "loadavg_at_start": os.getloadavg(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def environment(command: str, device: torch.device | None = None) -> dict:
    """What a study's JSON starts with: the machine (CPU unless told), the versions and the command."""
    return {"machine": machine(device or torch.device("cpu")), "versions": versions(), "command": command}


def module_command(module: str, argv: list[str] | None = None) -> str:
    """The command line `python -m <module> <argv>` (default: this process's arguments), as a
    result file records it."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])
