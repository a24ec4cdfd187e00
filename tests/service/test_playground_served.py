"""The playground's files as the service serves them (no browser needed): / leads to the page, the
page and its files need no API key and stay out of the OpenAPI document, and the page fetches
nothing from another host."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.playground import STATIC
from app.settings import Settings


@pytest.fixture(scope="module")
def client():
    off = {"enabled": False}  # no model: the page needs none
    settings = Settings(api_key="secret", models={"vqa": off, "retrieval": off, "classify": off})
    with TestClient(create_app(settings)) as c:
        yield c


def test_the_page_and_its_files_are_served_without_a_key(client):
    r = client.get("/", follow_redirects=False)
    assert r.status_code in (302, 307) and r.headers["location"] == "/playground"
    page = client.get("/playground")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for path in ("/playground/static/playground.js", "/playground/static/playground.css"):
        assert path in page.text
        assert client.get(path).status_code == 200
    assert client.get("/v1/models").status_code == 401  # the API it calls still asks for the key
    assert not [p for p in client.get("/openapi.json").json()["paths"] if "playground" in p]


def test_the_page_loads_nothing_from_elsewhere():
    for path in STATIC.iterdir():
        text = path.read_text()
        assert not re.search(r"""(src|href)\s*=\s*["'](https?:)?//""", text), path.name
        assert not re.search(r"""(fetch|import)\s*\(\s*["'`]https?://""", text), path.name
        assert not re.search(r"@import\s+url\(\s*[\"']?https?://", text), path.name
