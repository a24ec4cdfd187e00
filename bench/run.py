"""Run the benchmark: per subject, accuracy of every variant, then every variant timed side by side
at each batch size, with its peak memory, analytic FLOPs and tokens per layer."""

from __future__ import annotations

import dataclasses
import math
import os
import time

import torch
from tqdm import tqdm

from bench.measure import git_state, machine, peak_bytes, speed_stats, time_interleaved, versions
from bench.subjects import METRIC, SUBJECTS, Subject, load_subject
from bench.token_maps import scene_maps
from bench.variants import Variant, flops_at
from models.plan import NO_REDUCTION


@dataclasses.dataclass(frozen=True)
class Settings:
    batches: tuple[int, ...] = (1, 16)
    seconds_per_case: float = 30.0  # timed rounds of one subject at one batch size, roughly
    min_rounds: int = 7
    max_rounds: int = 200
    warmup: int = 1
    accuracy_limit: int | None = None  # first N test items (None: the whole split)
    accuracy: bool = True  # False: speed, memory and FLOPs only (no accuracy pass, no scene maps)

    @classmethod
    def quick(cls) -> Settings:
        return cls(batches=(1, 4), seconds_per_case=0.0, min_rounds=2, warmup=1, accuracy_limit=64)


def describe(subject: Subject, variant: Variant) -> dict:
    rm = subject.models[variant.model]
    unreduced = flops_at(subject.main, NO_REDUCTION, subject.main.config.image_size, subject.n_text)
    flops = flops_at(rm, variant.plan, variant.size, subject.n_text)
    trace = subject.call(variant, 1)().trace
    row = {
        "method": variant.method,
        "level": variant.level,
        "model": variant.model,
        "input_size": variant.size,
        "plan": variant.plan.to_dict(),
        "flops": flops,
        "flops_ratio": flops / unreduced,
        "tokens_per_layer": list(trace.tokens),
    }
    if trace.compressed_tokens:
        row["compressed_tokens_per_layer"] = list(trace.compressed_tokens)
    return row


def rounds_for(calls: dict, settings: Settings, device: torch.device) -> int:
    """Enough rounds to fill the time budget, from one pilot round."""
    start = time.perf_counter()
    time_interleaved(calls, 1, 0, device)
    per_round = time.perf_counter() - start
    wanted = math.ceil(settings.seconds_per_case / max(per_round, 1e-9))
    return max(settings.min_rounds, min(settings.max_rounds, wanted))


def bench_subject(subject: Subject, settings: Settings) -> dict:
    device = subject.device
    rows = [describe(subject, v) for v in subject.variants]
    scored = bool(subject.bundles) and settings.accuracy
    if scored:
        for v, row in zip(tqdm(subject.variants, desc=f"{subject.name} accuracy"), rows, strict=True):
            row["metrics"] = subject.accuracy(v, settings.accuracy_limit)
    for row in rows:
        row["speed"] = {}
    for batch in settings.batches:
        calls = {v.name: subject.call(v, batch) for v in subject.variants}
        for _ in range(settings.warmup):
            time_interleaved(calls, 1, 0, device)
        rounds = rounds_for(calls, settings, device)
        times = time_interleaved(calls, rounds, 0, device, desc=f"{subject.name} b{batch} ({rounds} rounds)")
        base = speed_stats(times["none"], batch)["items_per_s"]
        for v, row in zip(subject.variants, rows, strict=True):
            stats = speed_stats(times[v.name], batch)
            stats["gain"] = stats["items_per_s"] / base
            stats["peak_memory_bytes"] = peak_bytes(calls[v.name], device)
            row["speed"][str(batch)] = stats
    main = subject.main
    maps = scene_maps(subject) if scored and subject.data == "scenes" else None
    return {
        "name": subject.name,
        "task": subject.task,
        "source": subject.source,
        "weights": "demo checkpoint" if subject.bundles else "random",
        "architecture": main.kind,
        "input_size": main.config.image_size,
        "text_tokens": subject.n_text,
        "metric": METRIC[subject.task] if scored else None,
        "accuracy_items": rows[0]["metrics"]["n"] if scored else None,
        "data": subject.data,
        "variants": rows,
        **({"token_maps": maps} if maps else {}),
    }


def run(subjects: list[str] | None, settings: Settings, device: str, command: str) -> dict:
    dev = torch.device(device)
    report = {
        "command": command,
        "machine": machine(dev),
        "versions": versions(),
        "git": git_state(),
        "settings": dataclasses.asdict(settings) | {"batches": list(settings.batches)},
        "subjects": [],
    }
    started = time.perf_counter()
    for name in tqdm(subjects or SUBJECTS, desc="subjects"):
        report["subjects"].append(bench_subject(load_subject(name, device), settings))
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    return report
