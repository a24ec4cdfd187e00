"""Latency budgets through the API (in process, the small 64 px ViLT VQA model): `latency_budget_ms`
in JSON, multipart and /v2 parameters, `compression: auto`, the server's default budget, the
overload policy, the report's `latency` section, the metrics and the profile /v1/models shows.
Where a test needs to know what the server predicts, the prediction is injected (a model of known
latency per plan); nothing asserts on how fast anything runs."""

from __future__ import annotations

import base64

import pytest
from conftest import png_bytes, wait_ready
from fastapi.testclient import TestClient

from app.budget import PROFILE_SIZES, Calibration, state_of
from app.main import create_app
from app.settings import Settings
from models.demo.paths import CHECKPOINTS, VQA

PNG = png_bytes()
B64 = base64.b64encode(PNG).decode()
QUESTION = "what color is the shape?"
# predicted seconds from arrival to answer, per level: the injected model of known latency
KNOWN = {"none": 2.0, "low": 1.5, "medium": 1.0, "high": 0.5}


@pytest.fixture(scope="module")
def client():
    settings = Settings(
        models={
            "vqa": {"checkpoint": str(CHECKPOINTS / VQA)},
            "retrieval": {"enabled": False},
            "classify": {"enabled": False},
        }
    )
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


@pytest.fixture
def known_latency(client, monkeypatch):
    svc = client.app.state.services["vqa"]
    monkeypatch.setattr(svc.batcher, "completion_seconds", lambda key, weight: KNOWN[key[0].level])
    # the answers come far sooner than the injected model says: no calibration against it
    monkeypatch.setattr(state_of(svc), "calibration", Calibration(min_samples=10**9))
    return client.app.state.settings


def vqa(client, **fields):
    return client.post("/v1/vqa", json={"image": B64, "question": QUESTION, **fields})


@pytest.mark.parametrize("value", [0, -5, 600_001, 10**12, 1.5, "soon", "", True, [100]])
def test_bad_budgets_are_422_in_json(client, value):
    r = vqa(client, compression="auto", latency_budget_ms=value)
    assert r.status_code == 422, r.text
    assert "latency_budget_ms" in r.json()["error"]["message"]


@pytest.mark.parametrize("value", ["0", "-1", "600001", "1e400", "soon", "nan"])
def test_bad_budgets_are_422_in_multipart_and_v2(client, value):
    r = client.post(
        "/v1/vqa",
        files={"image": ("a.png", PNG, "image/png")},
        data={"question": QUESTION, "compression": "auto", "latency_budget_ms": value},
    )
    assert r.status_code == 422, r.text
    assert "latency_budget_ms" in r.json()["error"]["message"]
    infer = {
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [1], "data": [B64]},
            {"name": "question", "datatype": "BYTES", "shape": [1], "data": [QUESTION]},
        ],
        "parameters": {"compression": "auto", "latency_budget_ms": value},
    }
    r = client.post("/v2/models/vqa/infer", json=infer)
    assert r.status_code == 422, r.text
    assert "latency_budget_ms" in r.json()["error"]


def test_auto_without_any_budget_is_422(client):
    r = vqa(client, compression="auto")
    assert r.status_code == 422 and "latency_budget_ms" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("budget_ms", "level"), [(3000, "none"), (1800, "low"), (1200, "medium"), (700, "high"), (100, "high")]
)
def test_auto_takes_the_least_compressed_level_predicted_within_the_budget(
    known_latency, client, budget_ms, level
):
    r = vqa(client, compression="auto", latency_budget_ms=budget_ms)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["compression"]["requested"] == "auto" and body["compression"]["level"] == level
    latency = body["latency"]
    assert latency["auto"] is True and latency["budget_ms"] == budget_ms
    assert latency["predicted_ms"] >= KNOWN[level] * 1e3  # plus what it waited before the choice
    assert latency["measured_ms"] > 0 and latency["met"] == (latency["measured_ms"] <= budget_ms)


def test_under_reject_a_budget_no_level_fits_is_503_and_fixed_levels_still_run(
    known_latency, client, monkeypatch
):
    monkeypatch.setattr(known_latency, "overload_policy", "reject")
    r = vqa(client, compression="auto", latency_budget_ms=100)
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    assert "latency budget" in r.json()["error"]["message"]
    assert vqa(client, compression="auto", latency_budget_ms=700).json()["compression"]["level"] == "high"
    fixed = vqa(client, compression="none", latency_budget_ms=100)
    assert fixed.status_code == 200 and fixed.json()["compression"]["level"] == "none"
    assert fixed.json()["latency"]["auto"] is False and fixed.json()["latency"]["predicted_ms"] >= 2000
    metrics = client.get("/metrics").text
    assert 'tokenlean_latency_budget_total{outcome="rejected",task="vqa"}' in metrics


def test_the_servers_default_budget_makes_auto_the_default(known_latency, client, monkeypatch):
    assert vqa(client).json()["latency"] is None  # no budget anywhere: the task's default level
    monkeypatch.setattr(known_latency, "latency_budget_ms", 1200)
    body = vqa(client).json()
    assert body["compression"]["requested"] is None and body["compression"]["level"] == "medium"
    assert body["latency"]["auto"] is True and body["latency"]["budget_ms"] == 1200
    own = vqa(client, latency_budget_ms=3000).json()  # a budget of its own wins
    assert own["compression"]["level"] == "none" and own["latency"]["budget_ms"] == 3000
    fixed = vqa(client, compression="low").json()  # a level keeps it, the budget is reported
    assert fixed["compression"]["level"] == "low" and fixed["latency"]["auto"] is False


def test_multipart_and_v2_take_a_budget(known_latency, client):
    r = client.post(
        "/v1/vqa",
        files={"image": ("a.png", PNG, "image/png")},
        data={"question": QUESTION, "compression": "auto", "latency_budget_ms": "1800"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["compression"]["level"] == "low" and r.json()["latency"]["budget_ms"] == 1800
    infer = {
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [1], "data": [B64]},
            {"name": "question", "datatype": "BYTES", "shape": [1], "data": [QUESTION]},
        ],
        "parameters": {"compression": "auto", "latency_budget_ms": 700},
    }
    r = client.post("/v2/models/vqa/infer", json=infer)
    assert r.status_code == 200, r.text
    parameters = r.json()["parameters"]
    assert parameters["compression_level"] == "high" and parameters["latency_budget_ms"] == 700
    assert parameters["latency_auto"] is True and parameters["latency_predicted_ms"] >= 500


def test_auto_on_the_real_prediction_answers_and_is_counted(client):
    """No injection: an idle server and a budget of ten minutes: the least compressed level."""
    r = vqa(client, compression="auto", latency_budget_ms=600_000)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["compression"]["level"] == "none" and body["latency"]["met"] is True
    assert 0 < body["latency"]["predicted_ms"] < 600_000
    metrics = client.get("/metrics").text
    assert 'tokenlean_auto_level_total{level="none",task="vqa"}' in metrics
    assert 'tokenlean_latency_budget_total{outcome="met",task="vqa"}' in metrics
    assert 'tokenlean_latency_prediction_error_ratio_count{task="vqa"}' in metrics


def test_models_shows_the_latency_profile_calibrated_at_warm_up(client):
    [model] = client.get("/v1/models").json()["models"]
    profile = model["latency_profile"]
    assert set(profile["levels"]) == {"none", "low", "medium", "high"}
    for level, entry in profile["levels"].items():
        assert list(entry["batch_ms"]) == [str(n) for n in PROFILE_SIZES], level
        assert all(ms > 0 for ms in entry["batch_ms"].values()) and entry["batches"] >= 2, level
    assert profile["spread"] >= 1 and profile["calibration"] > 0
