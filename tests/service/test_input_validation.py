"""Hostile and odd input is a 4xx, never a 500: lone surrogates and other odd Unicode in every text
field (JSON, and multipart in a charset that can encode surrogates), booleans where numbers go,
data URLs that are not images, empty texts; and base64 wrapped by the `base64` command is taken."""

from __future__ import annotations

import base64
import json
import random

import pytest
from conftest import png_bytes, wait_ready
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings

PNG = png_bytes()
B64 = base64.b64encode(PNG).decode()
LONE_SURROGATES = ["\ud800", "a \udfff circle", "\udbff\u0041", "ok" + "\ud83d"]  # high, low, half a pair
ODD = [
    "what shape\x00 is it?",  # NUL
    "e\u0301\u0301\u0301\u0301 what shape",  # stacked combining marks
    "\u202ewhat shape is it?\u202c",  # right-to-left override
    "\u05de\u05d4 \u05d4\u05e6\u05d5\u05e8\u05d4?",  # Hebrew
    "\ufeff\u200b\u200d\u2060what",  # BOM, zero-width characters
    "\U0001f534 circle \U0001f7e6",  # emoji (surrogate pairs in JSON escapes)
    "\uffff\ufffe",  # noncharacters
    "\t\n what shape? \r\n",
    "x" * 100_000,  # over the question limit
]


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(Settings(limits={"max_candidates": 8}))) as c:
        wait_ready(c)
        yield c


def post_json(client, path: str, payload: dict):
    """json.dumps escapes lone surrogates as \\udxxx, as a hostile client's JSON would hold them."""
    content = json.dumps(payload).encode()
    return client.post(path, content=content, headers={"content-type": "application/json"})


def post_multipart(client, path: str, fields: list[tuple[str, str]], charset: str = "utf-8"):
    """A multipart body whose text fields are encoded in `charset` (declared on the body, which
    Starlette honours): UTF-7 can carry lone surrogates, UTF-8 cannot."""
    boundary = "tokenlean-boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        + value.encode(charset, "surrogatepass" if charset.startswith("utf-8") else "strict")
        + b"\r\n"
        for name, value in fields
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'.encode()
        + b"Content-Type: image/png\r\n\r\n"
        + PNG
        + b"\r\n"
    )
    content = b"".join(parts) + f"--{boundary}--\r\n".encode()
    content_type = f"multipart/form-data; boundary={boundary}; charset={charset}"
    return client.post(path, content=content, headers={"content-type": content_type})


def json_cases(text: str) -> list[tuple[str, dict]]:
    """Every text field of every task, holding `text`."""
    return [
        ("/v1/vqa", {"image": B64, "question": text}),
        ("/v1/retrieval", {"image": B64, "texts": ["a red rectangle", text]}),
        ("/v1/retrieval", {"images": [B64, B64], "text": text}),
        ("/v1/vqa", {"image": B64, "question": "what shape?", "compression": text}),
        ("/v1/classify", {"image": B64, "method": text}),
    ]


def multipart_cases(text: str) -> list[tuple[str, list[tuple[str, str]]]]:
    return [
        ("/v1/vqa", [("question", text)]),
        ("/v1/retrieval", [("texts", "a red rectangle"), ("texts", text)]),
        ("/v1/vqa", [("question", "what shape?"), ("compression", text)]),
    ]


def assert_client_error(r, status: int | None = None) -> None:
    assert r.status_code < 500, r.text
    if status is not None:
        assert r.status_code == status, r.text
    if r.status_code >= 400:
        assert r.headers["content-type"] == "application/json"
        assert r.json()["error"]["code"] and r.json()["error"]["message"]


@pytest.mark.parametrize("text", LONE_SURROGATES)
def test_lone_surrogates_in_any_json_text_field_are_422(client, text):
    for path, payload in json_cases(text):
        r = post_json(client, path, payload)
        assert_client_error(r, 422)
        assert r.json()["error"]["code"] == "invalid_request"


@pytest.mark.parametrize("text", LONE_SURROGATES)
def test_lone_surrogates_in_multipart_text_fields_are_422(client, text):
    for path, fields in multipart_cases(text):
        assert_client_error(post_multipart(client, path, fields, charset="utf-7"), 422)


@pytest.mark.parametrize("text", ODD)
def test_odd_unicode_in_text_fields_never_gives_a_5xx(client, text):
    for path, payload in json_cases(text):
        assert_client_error(post_json(client, path, payload))
    for path, fields in multipart_cases(text):
        assert_client_error(post_multipart(client, path, fields))
    r = post_json(client, "/v1/vqa", {"image": B64, "question": text})
    assert r.status_code == (422 if len(text) > 512 or not text.strip() else 200), r.text


def test_random_unicode_fuzz_of_text_fields(client):
    """Random strings over every plane, surrogates and controls included: each is a 200 or a 4xx,
    and a 422 whenever it holds a lone surrogate."""
    rng = random.Random(15)
    pools = [(0, 0x20), (0x20, 0x7F), (0x300, 0x370), (0x590, 0x700), (0xD800, 0xE000), (0xE000, 0x110000)]
    for _ in range(40):
        text = "".join(chr(rng.randrange(*rng.choice(pools))) for _ in range(rng.randrange(1, 40)))
        surrogate = any(0xD800 <= ord(c) < 0xE000 for c in text)
        for path, payload in json_cases(text)[:3]:
            r = post_json(client, path, payload)
            assert_client_error(r, 422 if surrogate else None)


def test_lone_surrogate_in_a_field_name_is_a_clean_422(client):
    r = post_json(client, "/v1/vqa", {"image": B64, "question": "q", "\ud800": 1})
    assert_client_error(r, 422)


# ------------------------------------------------------------------ strict, consistent validation


@pytest.mark.parametrize(
    "field,value",
    [("compression", False), ("compression", True), ("top_k", True), ("deadline_ms", True)],
)
def test_booleans_are_not_numbers(client, field, value):
    r = client.post("/v1/classify", json={"image": B64, field: value})
    assert_client_error(r, 422)
    assert field in r.json()["error"]["message"] and "true/false" in r.json()["error"]["message"]


def test_non_finite_compression_is_422(client):
    r = client.post(
        "/v1/classify",
        content=b'{"image": "%s", "compression": NaN}' % B64.encode(),
        headers={"content-type": "application/json"},
    )
    assert_client_error(r, 422)


@pytest.mark.parametrize("media", ["text/plain", "application/octet-stream", ""])
def test_data_url_that_is_not_an_image_is_415(client, media):
    r = client.post("/v1/classify", json={"image": f"data:{media};base64,{B64}"})
    assert_client_error(r, 415)


def test_data_urls_must_be_base64_and_image_ones_work(client):
    assert client.post("/v1/classify", json={"image": f"data:image/png;base64,{B64}"}).status_code == 200
    assert_client_error(client.post("/v1/classify", json={"image": f"data:image/png,{B64}"}), 400)


@pytest.mark.parametrize(
    "path,payload",
    [
        ("/v1/vqa", {"image": B64, "question": ""}),
        ("/v1/vqa", {"image": B64, "question": "   "}),
        ("/v1/retrieval", {"images": [B64], "text": ""}),
        ("/v1/retrieval", {"images": [B64], "text": " \n"}),
        ("/v1/retrieval", {"image": B64, "texts": ["a red circle", ""]}),
        ("/v1/retrieval", {"image": B64, "texts": []}),
    ],
)
def test_empty_texts_are_422_in_every_task(client, path, payload):
    r = client.post(path, json=payload)
    assert_client_error(r, 422)


def test_empty_multipart_text_is_422(client):
    r = client.post("/v1/retrieval", files=[("images", ("a.png", PNG))], data={"text": ""})
    assert_client_error(r, 422)


def test_line_wrapped_base64_is_accepted(client):
    wrapped = base64.encodebytes(png_bytes(size=(96, 96))).decode()  # what `base64 file` prints
    assert "\n" in wrapped
    assert client.post("/v1/classify", json={"image": wrapped}).status_code == 200
    r = client.post("/v1/retrieval", json={"text": "a red rectangle", "images": [wrapped, B64]})
    assert r.status_code == 200, r.text
    assert (
        client.post("/v1/classify", json={"image": f"data:image/png;base64,\n{wrapped}"}).status_code == 200
    )
    assert_client_error(client.post("/v1/classify", json={"image": wrapped.replace("\n", "\n!")}), 400)
