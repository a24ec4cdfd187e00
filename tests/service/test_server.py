"""`tokenlean serve` for real: a subprocess on a free port, concurrent HTTP requests at different
compression levels, answers checked against direct model calls, then /metrics scraped."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from app.settings import Settings
from bench.server import free_port
from models.bundle import load_bundle
from models.demo import data

LEVELS = ["none", "low", "medium", "high", "0.35"]


def png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server():
    port = free_port()
    exe = shutil.which("tokenlean", path=os.path.dirname(sys.executable))
    command = [exe] if exe else [sys.executable, "-m", "app.cli"]
    # Answers and metrics under concurrency, not admission: a burst of 30 must never be refused,
    # even on a machine slowed by other work (tests/service/test_admission.py covers refusals).
    env = {
        **os.environ,
        "TOKENLEAN_LOG_FORMAT": "json",
        "TOKENLEAN_BATCHING__MAX_WAIT_MS": "2",
        "TOKENLEAN_BATCHING__MAX_QUEUE_WAIT_MS": "60000",
        "TOKENLEAN_BATCHING__MAX_EVENT_LOOP_LAG_MS": "10000",
    }
    proc = subprocess.Popen(
        [*command, "serve", "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.2)
        else:
            raise AssertionError("server did not become ready")
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_concurrent_requests_match_direct_calls_and_metrics_add_up(server):
    split = data.load_split("test")
    cases = [(i, LEVELS[i % len(LEVELS)]) for i in range(30)]
    images = {i: png(split.images[split.question_image[i]]) for i, _ in cases}

    def ask(case):
        i, level = case
        r = httpx.post(
            f"{server}/v1/vqa",
            files={"image": ("q.png", images[i], "image/png")},
            data={"question": split.questions[i], "compression": level},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        return case, r.json()

    before = scrape(server)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, cases))

    direct = load_bundle(Settings().models["vqa"].checkpoint)  # what the server loaded
    from models import resolve

    with torch.inference_mode():
        for (i, level), body in answers:
            plan = resolve(direct.model, level)
            assert body["compression"]["plan"] == plan.to_dict()
            image = Image.open(io.BytesIO(images[i]))
            out = direct.forward(direct.preprocess([image]), [split.questions[i]], plan)
            score, label = out.logits.float().softmax(-1)[0].max(-1)
            trace = out.trace
            assert body["answer"] == direct.labels()[int(label)]
            assert abs(body["answers"][0]["score"] - float(score)) < 1e-4
            assert body["tokens"]["per_layer"] == list(trace.tokens)

    after = scrape(server)
    for level in LEVELS:
        label = level if level in ("none", "low", "medium", "high") else None
        sent = sum(1 for _, lv in cases if lv == level)
        if label is None:
            continue
        method = "none" if level == "none" else direct.model.default_method
        key = (
            "tokenlean_requests_total",
            (("level", label), ("method", method), ("status", "200"), ("task", "vqa")),
        )
        assert after.get(key, 0) - before.get(key, 0) == sent
        hist = (
            "tokenlean_request_duration_seconds_count",
            (("level", label), ("method", method), ("task", "vqa")),
        )
        assert after.get(hist, 0) - before.get(hist, 0) == sent
    numeric = [k for k in after if k[0] == "tokenlean_requests_total" and dict(k[1])["level"].startswith("~")]
    assert numeric, "a numeric compression is counted under its FLOPs bucket"
    rows = sum(
        v for k, v in after.items() if k[0] == "tokenlean_batch_size_sum" and dict(k[1])["task"] == "vqa"
    )
    rows_before = sum(
        v for k, v in before.items() if k[0] == "tokenlean_batch_size_sum" and dict(k[1])["task"] == "vqa"
    )
    assert rows - rows_before == len(cases)


def scrape(base: str) -> dict:
    text = httpx.get(f"{base}/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_inference_duration_has_the_method_label(server):
    samples = [k for k in scrape(server) if k[0] == "tokenlean_inference_duration_seconds_count"]
    assert samples and all("method" in dict(k[1]) for k in samples)
    default = load_bundle(Settings().models["vqa"].checkpoint).model.default_method
    assert {dict(k[1])["method"] for k in samples} >= {"none", default}
