"""The HTTP service through FastAPI's TestClient, on the shipped demo checkpoints."""

from __future__ import annotations

import base64
import io
import threading
import zlib

import numpy as np
import pytest
from conftest import loaded_status, png_bytes, wait_ready
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from app.errors import Overloaded
from app.main import create_app, default_factory
from app.settings import Settings

PNG = png_bytes()
B64 = base64.b64encode(PNG).decode()


def bomb_png(width=30_000, height=30_000) -> bytes:
    """A valid PNG header announcing a huge image; the pixel data is never needed."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([1, 0, 0, 0, 0])
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def make_client(**overrides) -> TestClient:
    settings = Settings(**overrides)
    return TestClient(create_app(settings))


@pytest.fixture(scope="module")
def client():
    with make_client(
        limits={"max_candidates": 8, "max_question_chars": 100, "max_request_bytes": 2_000_000}
    ) as c:
        wait_ready(c)
        yield c


def scrape(client) -> dict:
    text = client.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


# ------------------------------------------------------------------ endpoints and input forms


@pytest.mark.parametrize("form", ["json", "multipart"])
def test_vqa_answers_with_a_full_report(client, form):
    if form == "json":
        r = client.post(
            "/v1/vqa", json={"image": B64, "question": "what color is the shape?", "compression": "medium"}
        )
    else:
        r = client.post(
            "/v1/vqa",
            files={"image": ("s.png", PNG, "image/png")},
            data={"question": "what color is the shape?", "compression": "medium"},
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["answer"] == "red"
    assert body["answers"][0]["label"] == "red" and len(body["answers"]) == 3
    assert body["compression"] == {
        "requested": "medium",
        "level": "medium",
        "method": "evit",  # the two-stream default: EViT in the vision tower, PuMer in the fusion
        "plan": body["compression"]["plan"],
    }
    tokens = body["tokens"]
    assert tokens["per_layer"][0] == tokens["text_per_layer"][0] + tokens["image_per_layer"][0]
    assert tokens["per_layer"][-1] < tokens["per_layer"][0]
    assert 0 < body["flops"]["reduced"] < body["flops"]["full"]
    assert set(body["timings"]) == {"queue_ms", "inference_ms", "total_ms"}
    assert body["timings"]["total_ms"] >= body["timings"]["inference_ms"]


@pytest.mark.parametrize("form", ["json", "multipart"])
def test_classify(client, form):
    if form == "json":
        r = client.post("/v1/classify", json={"image": B64, "compression": 0.3, "top_k": 2})
    else:
        r = client.post(
            "/v1/classify", files={"image": ("s.png", PNG)}, data={"compression": "0.3", "top_k": "2"}
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["label"] == "red rectangle" and len(body["labels"]) == 2
    assert body["compression"]["level"] == "0.3" and body["compression"]["method"] == "tome"
    assert 0.2 < body["flops"]["saved"] < 0.4


@pytest.mark.parametrize("form", ["json", "multipart"])
def test_retrieval_ranks_texts_for_an_image(client, form):
    texts = ["a blue circle", "a red rectangle", "a red triangle"]
    if form == "json":
        r = client.post("/v1/retrieval", json={"image": B64, "texts": texts, "compression": "low"})
    else:
        r = client.post(
            "/v1/retrieval", files={"image": ("s.png", PNG)}, data={"texts": texts, "compression": "low"}
        )
    assert r.status_code == 200, r.text
    ranking = r.json()["ranking"]
    assert ranking[0]["text"] == "a red rectangle" and ranking[0]["index"] == 1
    assert sorted(x["index"] for x in ranking) == [0, 1, 2]
    assert abs(sum(x["probability"] for x in ranking) - 1) < 1e-4


@pytest.mark.parametrize("form", ["json", "multipart"])
def test_retrieval_ranks_images_for_a_text(client, form):
    images = [png_bytes((0, 0, 255)), PNG, png_bytes((0, 128, 0))]
    if form == "json":
        payload = {"text": "a red rectangle", "images": [base64.b64encode(i).decode() for i in images]}
        r = client.post("/v1/retrieval", json=payload)
    else:
        files = [("images", (f"{i}.png", data)) for i, data in enumerate(images)]
        r = client.post("/v1/retrieval", files=files, data={"text": "a red rectangle"})
    assert r.status_code == 200, r.text
    assert r.json()["ranking"][0]["index"] == 1
    assert r.json()["batch_size"] >= 3


def test_models_health_and_openapi(client):
    models = {m["task"]: m for m in client.get("/v1/models").json()["models"]}
    assert set(models) == {"vqa", "retrieval", "classify"}
    vqa = models["vqa"]
    assert vqa["family"] == "two-stream" and vqa["default_method"] == "evit"
    assert vqa["levels"]["none"]["flops_saved"] == 0
    assert vqa["levels"]["high"]["flops"] < vqa["levels"]["medium"]["flops"] < vqa["levels"]["none"]["flops"]
    assert client.get("/healthz").json() == {"status": "ok"}
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/vqa"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(body)
    assert "example" in body["application/json"]


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "kwargs,status,code",
    [
        ({"json": {"image": "@@not base64@@", "question": "q"}}, 400, "bad_request"),
        (
            {"json": {"image": base64.b64encode(b"plain text").decode(), "question": "q"}},
            415,
            "unsupported_media_type",
        ),
        ({"json": {"image": base64.b64encode(PNG[:60]).decode(), "question": "q"}}, 400, "bad_request"),
        (
            {"json": {"image": base64.b64encode(bomb_png()).decode(), "question": "q"}},
            413,
            "payload_too_large",
        ),
        ({"json": {"image": B64, "question": "q" * 101}}, 422, "invalid_request"),
        ({"json": {"image": B64, "question": "q", "compression": "extreme"}}, 422, "invalid_request"),
        ({"json": {"image": B64, "question": "q", "compression": 0.95}}, 422, "invalid_request"),
        ({"json": {"image": B64, "question": "q", "method": "no-such-method"}}, 422, "invalid_request"),
        ({"json": {"image": B64, "question": "q", "top_k": 1000}}, 422, "invalid_request"),
        ({"json": {"image": B64}}, 422, "invalid_request"),
        (
            {"json": {"image": B64, "question": "q", "url": "http://example.com/x.png"}},
            422,
            "invalid_request",
        ),
        ({"json": ["not", "an", "object"]}, 400, "bad_request"),
        ({"content": b"{broken", "headers": {"content-type": "application/json"}}, 400, "bad_request"),
        ({"content": b"x", "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
        (
            {"content": b"[" * 100_000 + b"]" * 100_000, "headers": {"content-type": "application/json"}},
            400,
            "bad_request",
        ),
        (
            {"content": b'{"top_k": ' + b"1" * 5000 + b"}", "headers": {"content-type": "application/json"}},
            400,
            "bad_request",
        ),
        (
            {"content": b"x" * 2_000_001, "headers": {"content-type": "application/json"}},
            413,
            "payload_too_large",
        ),
    ],
)
def test_bad_input_is_a_clear_4xx(client, kwargs, status, code):
    r = client.post("/v1/vqa", **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]


def test_compression_error_lists_what_is_allowed(client):
    message = client.post("/v1/vqa", json={"image": B64, "question": "q", "compression": "max"}).json()[
        "error"
    ]
    assert "none, low, medium, high" in message["message"] and "[0, 0.9]" in message["message"]


def test_retrieval_limits(client):
    too_many = {"image": B64, "texts": [f"t{i}" for i in range(9)]}
    assert client.post("/v1/retrieval", json=too_many).status_code == 422
    both = {"image": B64, "texts": ["a"], "text": "b", "images": [B64]}
    assert client.post("/v1/retrieval", json=both).status_code == 422
    assert client.post("/v1/retrieval", json={"image": B64, "texts": []}).status_code == 422


def test_chunked_upload_over_the_limit_is_refused(client):
    def body():
        for _ in range(30):
            yield b"x" * 100_000

    r = client.post("/v1/vqa", content=body(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_errors_are_counted_and_service_keeps_serving(client):
    key = (
        "tokenlean_requests_total",
        (("level", "invalid"), ("method", "invalid"), ("status", "400"), ("task", "vqa")),
    )
    before = scrape(client).get(key, 0)
    client.post("/v1/vqa", json={"image": "###", "question": "q"})
    assert scrape(client)[key] == before + 1
    assert (
        client.post("/v1/vqa", json={"image": B64, "question": "what shape is in the image?"}).status_code
        == 200
    )


def test_overload_is_503_with_retry_after_and_counted(client, monkeypatch):
    svc = client.app.state.services["classify"]

    async def refuse(*args, **kwargs):
        raise Overloaded("full")

    monkeypatch.setattr(svc.batcher, "submit", refuse)
    r = client.post("/v1/classify", json={"image": B64})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert scrape(client)[("tokenlean_rejected_total", (("task", "classify"),))] >= 1


def test_a_full_backlog_refuses_every_task_before_the_body_is_read(client, monkeypatch):
    backlog = client.app.state.services["vqa"].batcher.backlog  # one backlog: the model thread's
    limit = client.app.state.settings.batching.max_queue_wait_ms / 1000
    decoded = []
    monkeypatch.setattr("app.routes.parse", lambda *a: decoded.append(a))  # must not be reached
    backlog.admit(limit + 3.0)
    try:
        for task, body in (("vqa", {"image": B64, "question": "what?"}), ("classify", {"image": B64})):
            r = client.post(f"/v1/{task}", json=body)
            assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
            assert int(r.headers["retry-after"]) >= 3 and "queued ahead" in r.json()["error"]["message"]
    finally:
        backlog.withdraw(limit + 3.0)
        monkeypatch.undo()
    assert not decoded
    assert client.post("/v1/classify", json={"image": B64}).status_code == 200


# ------------------------------------------------------------------ auth and readiness


def test_bearer_token_protects_v1_but_not_health_or_metrics():
    with make_client(
        api_key="s3cret", models={"vqa": {"enabled": False}, "retrieval": {"enabled": False}}
    ) as c:
        wait_ready(c)
        assert c.post("/v1/classify", json={"image": B64}).status_code == 401
        assert (
            c.post("/v1/classify", json={"image": B64}, headers={"Authorization": "Bearer nope"}).status_code
            == 401
        )
        ok = c.post("/v1/classify", json={"image": B64}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert c.get("/v1/models").status_code == 401
        assert c.get("/healthz").status_code == 200 and c.get("/metrics").status_code == 200
        assert (
            c.post(
                "/v1/vqa", json={"image": B64, "question": "q"}, headers={"Authorization": "Bearer s3cret"}
            ).status_code
            == 404
        )


def test_metrics_can_require_the_token():
    with make_client(
        api_key="k", protect_metrics=True, models={"vqa": {"enabled": False}, "retrieval": {"enabled": False}}
    ) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"Authorization": "Bearer k"}).status_code == 200


def test_not_ready_until_models_are_loaded_and_warmed_up():
    gate = threading.Event()

    def slow_factory(task, settings, metrics):
        gate.wait(10)
        return default_factory(task, settings, metrics)

    settings = Settings(models={"vqa": {"enabled": False}, "retrieval": {"enabled": False}})
    with TestClient(create_app(settings, slow_factory)) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.headers["retry-after"]
        assert c.post("/v1/classify", json={"image": B64}).status_code == 503
        gate.set()
        wait_ready(c)
        assert c.post("/v1/classify", json={"image": B64}).status_code == 200


def test_numpy_random_images_of_any_size_are_accepted(client):
    image = Image.fromarray((np.random.default_rng(0).random((300, 171, 3)) * 255).astype("uint8"))
    buf = io.BytesIO()
    image.save(buf, "JPEG")
    r = client.post("/v1/classify", files={"image": ("x.jpg", buf.getvalue(), "image/jpeg")})
    assert r.status_code == 200


def test_a_failed_load_is_reported_and_requests_get_503():
    def broken(task, settings, metrics):
        raise RuntimeError("no such checkpoint")

    with TestClient(create_app(Settings(), broken)) as c:
        assert loaded_status(c) == "failed"
        assert c.get("/readyz").json() == {"status": "failed"}
        assert c.post("/v1/classify", json={"image": B64}).status_code == 503


def test_many_large_images_in_one_request_are_refused_by_the_pixel_budget():
    big = base64.b64encode(png_bytes(size=(3000, 3000))).decode()
    with make_client(
        limits={"max_request_pixels": 20_000_000},
        models={"vqa": {"enabled": False}, "classify": {"enabled": False}},
    ) as c:
        wait_ready(c)
        r = c.post("/v1/retrieval", json={"text": "a red circle", "images": [big] * 3})
        assert r.status_code == 413
