"""A request's own deadline (`deadline_ms`, JSON or multipart) reaches the batcher: a request not
started by then is answered 504, and out-of-range deadlines are refused."""

from __future__ import annotations

import base64

import pytest
from conftest import png_bytes, wait_ready
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings

B64 = base64.b64encode(png_bytes()).decode()


@pytest.fixture(scope="module")
def client():
    # A lone request waits for its batch to fill for a second: far past a 1 ms deadline.
    settings = Settings(
        batching={"max_wait_ms": 1000},
        models={"vqa": {"enabled": False}, "retrieval": {"enabled": False}},
    )
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


def test_a_request_not_started_by_its_deadline_is_504(client):
    r = client.post("/v1/classify", json={"image": B64, "deadline_ms": 1})
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "deadline_exceeded"
    r = client.post("/v1/classify", files={"image": ("a.png", png_bytes())}, data={"deadline_ms": "1"})
    assert r.status_code == 504, r.text
    assert client.post("/v1/classify", json={"image": B64, "deadline_ms": 60_000}).status_code == 200


@pytest.mark.parametrize("value", [0, -5, 600_001, 1.5, "soon"])
def test_out_of_range_deadlines_are_422(client, value):
    r = client.post("/v1/classify", json={"image": B64, "deadline_ms": value})
    assert r.status_code == 422 and "deadline_ms" in r.json()["error"]["message"]
