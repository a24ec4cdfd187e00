"""Serving overhead, compression gain and batching gain of `tokenlean serve` on the default VQA
checkpoint (CPU).

1. Overhead at concurrency 1: p50 of an HTTP /v1/vqa request minus the p50 of the direct model
   call (preprocess + reduced forward + postprocess) for the same input, measured in one run.
2. Compression over HTTP: p50 at concurrency 1 at the level over p50 at `none` (runs at `none`
   before and after the level's, pooled).
3. Batching: throughput at concurrency 16 over throughput at concurrency 1, same level.

    python -m bench.serving [--quick] [--level medium] [--out bench/results/serving.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from bench.measure import module_command
from bench.server import free_port, start_server
from models.bundle import ModelBundle, load_bundle
from models.demo import data
from models.demo.paths import CHECKPOINTS, TWO_STREAM_VQA
from models.levels import resolve


def requests_from_test_split(n: int) -> list[tuple[bytes, str]]:
    """One question for each of the first n test images: requests never share an image, which a
    two-stream model would run through its vision tower once for a whole batch."""
    split = data.load_split("test")
    out = []
    for i in np.unique(split.question_image, return_index=True)[1][:n]:
        buf = io.BytesIO()
        Image.fromarray(split.images[split.question_image[i]]).save(buf, "PNG")
        out.append((buf.getvalue(), split.questions[i]))
    return out


def answer(bundle: ModelBundle, image: Image.Image, question: str, plan, top_k: int = 3) -> list[tuple]:
    """What the service computes for one VQA request: preprocess, reduced forward, top-k answers
    (softmax scores for a single-label head, sigmoid for a multi-label one)."""
    logits = bundle.forward(bundle.preprocess([image]), [question], plan).logits.float()
    scores = logits.softmax(dim=-1) if bundle.single_label else logits.sigmoid()
    values, indices = scores[0].topk(min(top_k, scores.shape[-1]))
    labels = bundle.labels()
    return [(labels[i], v) for v, i in zip(values.tolist(), indices.tolist(), strict=True)]


def direct_latencies(bundle: ModelBundle, items, level: str) -> list[float]:
    plan = resolve(bundle.model, level)
    times = []
    with torch.inference_mode():
        for image_bytes, question in items:
            start = time.perf_counter()
            image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
            answer(bundle, image, question, plan)
            times.append(time.perf_counter() - start)
    return times


def http_run(base: str, items, level: str, concurrency: int) -> tuple[list[float], float]:
    client = httpx.Client(timeout=60)

    def one(item):
        image_bytes, question = item
        start = time.perf_counter()
        r = client.post(
            f"{base}/v1/vqa",
            files={"image": ("q.png", image_bytes, "image/png")},
            data={"question": question, "compression": level},
        )
        r.raise_for_status()
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, items))
    return latencies, len(items) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--level", default="medium")
    parser.add_argument("--out", type=Path, default=Path("bench/results/serving.json"))
    args = parser.parse_args(argv)
    n = 40 if args.quick else 200
    items = requests_from_test_split(n)
    port = free_port()
    proc = start_server(port)
    base = f"http://127.0.0.1:{port}"
    try:
        bundle = load_bundle(CHECKPOINTS / TWO_STREAM_VQA)
        http_run(base, items[:20], args.level, 1)  # warm-up, both paths
        direct_latencies(bundle, items[:20], args.level)
        direct = direct_latencies(bundle, items, args.level)
        none_before, _ = http_run(base, items, "none", 1)
        http1, thr1 = http_run(base, items, args.level, 1)
        none_after, _ = http_run(base, items, "none", 1)
        direct_again = direct_latencies(bundle, items, args.level)  # bracket the HTTP run
        _, thr16 = http_run(base, items, args.level, 16)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    direct_p50 = float(np.median(direct + direct_again))
    result = {
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "command": module_command(__spec__.name, argv),
        "level": args.level,
        "requests": n,
        "direct_p50_ms": direct_p50 * 1e3,
        "http_c1_p50_ms": float(np.median(http1)) * 1e3,
        "http_c1_p95_ms": float(np.percentile(http1, 95)) * 1e3,
        "overhead_p50_ms": (float(np.median(http1)) - direct_p50) * 1e3,
        "http_c1_none_p50_ms": float(np.median(none_before + none_after)) * 1e3,
        "http_c1_p50_vs_none": float(np.median(http1) / np.median(none_before + none_after)),
        "throughput_c1": thr1,
        "throughput_c16": thr16,
        "batching_gain": thr16 / thr1,
    }
    result["targets"] = {
        "overhead_p50_ms <= 5": result["overhead_p50_ms"] <= 5,
        "batching_gain >= 1.5": result["batching_gain"] >= 1.5,
        f"http_c1_p50 at {args.level} <= 0.75 x none": result["http_c1_p50_vs_none"] <= 0.75,
    }
    for key, value in result.items():
        if key not in ("machine", "versions"):
            print(f"{key:>18}: {value:.2f}" if isinstance(value, float) else f"{key:>18}: {value}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
