"""The Open Inference Protocol v2 (app/v2/): `tritonclient[http]` as a real client against a real
`tokenlean serve` (health, server and model metadata, every task with binary and with JSON tensor
data, compression, method and top_k in the parameters, answers equal to /v1's for the same inputs),
malformed requests answered 4xx in the protocol's error body, the API key, readiness and the
refusals made before routing (the body limit, the connection cap) in process, and the codec on its
own (against tritonclient's own request and response code).

The server serves the small 64 px demo checkpoints (ViLT VQA and retrieval, the ViT classifier):
they load in seconds and answer in milliseconds."""

from __future__ import annotations

import base64
import json
import re
import struct
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from conftest import png_bytes, wait_ready
from fastapi.testclient import TestClient
from live_server import start
from tritonclient.utils import InferenceServerException

from app import __version__
from app.errors import BadInput, InvalidInput, Overloaded
from app.http_errors import response_for
from app.main import create_app, default_factory
from app.settings import Settings
from app.tasks.base import tasks
from app.v2 import codec
from app.v2.codec import Tensor
from models.demo.paths import CHECKPOINTS, RETRIEVAL, VIT_CLASSIFY, VQA

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "examples"
RED, BLUE, GREEN = (
    (EXAMPLES / f"{name}.png").read_bytes() for name in ("red-circle", "blue-triangle", "green-rectangle")
)
SMALL_MODELS = {
    "TOKENLEAN_MODELS__VQA__CHECKPOINT": str(CHECKPOINTS / VQA),
    "TOKENLEAN_MODELS__RETRIEVAL__CHECKPOINT": str(CHECKPOINTS / RETRIEVAL),
    "TOKENLEAN_MODELS__CLASSIFY__CHECKPOINT": str(CHECKPOINTS / VIT_CLASSIFY),
}
V2_TASKS = [name for name, task in tasks().items() if task.v2_outputs]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # a 1 MiB image limit, so that one test can pass it cheaply; admission limits lifted (a live
    # server does not inherit the test session's TOKENLEAN_* settings): infer requests are admitted
    # early, and a busy machine's event loop runs past the default 30 ms while the models load
    server = start(
        tmp_path_factory.mktemp("oip-v2"),
        TOKENLEAN_LIMITS__MAX_UPLOAD_BYTES="1048576",
        TOKENLEAN_BATCHING__MAX_EVENT_LOOP_LAG_MS="600000",
        TOKENLEAN_BATCHING__MAX_QUEUE_WAIT_MS="600000",
        **SMALL_MODELS,
    )
    try:
        yield server
    finally:
        server.terminate()


@pytest.fixture(scope="module")
def client(server):
    c = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    yield c
    c.close()


@pytest.fixture(scope="module")
def methods(server) -> dict[str, list[str]]:
    """Each task's reduction methods, its default first (from /v1/models)."""
    models = httpx.get(f"{server.base}/v1/models", timeout=10).json()["models"]
    return {
        m["task"]: [m["default_method"]] + [x for x in m["methods"] if x != m["default_method"]]
        for m in models
    }


# ------------------------------------------------------------------ health and metadata


def test_health_and_server_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "tokenlean" and meta["version"] == __version__
    assert "binary_tensor_data" in meta["extensions"]


def test_model_metadata_describes_every_task(client):
    assert set(V2_TASKS) == {"vqa", "retrieval", "classify"}
    for name in V2_TASKS:
        assert client.is_model_ready(name)
        meta = client.get_model_metadata(name)
        task = tasks()[name]
        assert meta["name"] == name
        assert meta["inputs"] == [
            {"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in task.v2_inputs
        ]
        assert meta["outputs"] == [
            {"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in task.v2_outputs
        ]
        assert all(s["datatype"] == "BYTES" for s in meta["inputs"])
    assert not client.is_model_ready("nope")
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("nope")
    assert err.value.status() == "404" and "no model 'nope'" in err.value.message()


# ------------------------------------------------------------------ inference, against /v1


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def v1(server, task: str, body: dict) -> dict:
    r = httpx.post(f"{server.base}/v1/{task}", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def v2(client, task: str, tensors: dict[str, list], parameters: dict, binary: bool):
    """tritonclient's infer: inputs as binary tensor data (images as their files) or in JSON
    (images in base64), and every output back as binary data or in JSON."""
    inputs = []
    for name, values in tensors.items():
        values = [v if binary or isinstance(v, str) else b64(v) for v in values]
        tensor = triton.InferInput(name, [len(values)], "BYTES")
        tensor.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=binary)
        inputs.append(tensor)
    outputs = None  # tritonclient then asks for every output as binary data
    if not binary:
        names = [o["name"] for o in client.get_model_metadata(task)["outputs"]]
        outputs = [triton.InferRequestedOutput(name, binary_data=False) for name in names]
    result = client.infer(task, inputs, outputs=outputs, parameters=parameters)
    response = result.get_response()
    assert [
        bool(o.get("parameters", {}).get("binary_data_size") is not None) for o in response["outputs"]
    ] == [binary] * len(response["outputs"])
    return result, response["parameters"]


def strings(array) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else v for v in array.tolist()]


def same_report(parameters: dict, body: dict) -> None:
    """The response parameters carry /v1's report: plan, tokens, FLOPs."""
    assert json.loads(parameters["compression_plan"]) == body["compression"]["plan"]
    assert parameters["compression_level"] == body["compression"]["level"]
    assert parameters["compression_method"] == body["compression"]["method"]
    assert json.loads(parameters["tokens_per_layer"]) == body["tokens"]["per_layer"]
    assert parameters["tokens_kept_ratio"] == body["tokens"]["kept_ratio"]
    for key in ("reduced", "full", "saved"):
        assert parameters[f"flops_{key}"] == body["flops"][key]
    assert parameters["model"] == body["model"]


LABEL_CASES = [
    # task, inputs, parameters (method: index into the task's methods, the default first)
    ("vqa", {"image": [RED], "question": ["what color is the shape?"]}, {"compression": "medium"}),
    (
        "vqa",
        {"image": [BLUE], "question": ["what shape is in the image?"]},
        {"compression": "high", "method": 1, "top_k": 2},
    ),
    ("classify", {"image": [GREEN]}, {"compression": 0.4, "method": 2, "deadline_ms": 60000}),
    ("classify", {"image": [RED]}, {}),
]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("case", range(len(LABEL_CASES)))
def test_vqa_and_classify_answer_as_v1_does(server, client, methods, case, binary):
    task, tensors, parameters = LABEL_CASES[case]
    if "method" in parameters:
        parameters = {**parameters, "method": methods[task][parameters["method"]]}
    body = v1(
        server, task, {**{k: b64(v[0]) if k == "image" else v[0] for k, v in tensors.items()}, **parameters}
    )
    result, report = v2(client, task, tensors, parameters, binary)
    best, scored = tasks()[task].keys
    assert strings(result.as_numpy(best)) == [body[best]]
    assert strings(result.as_numpy(scored)) == [a["label"] for a in body[scored]]
    assert result.as_numpy("scores").dtype == np.float64
    assert result.as_numpy("scores").tolist() == [a["score"] for a in body[scored]]
    assert len(body[scored]) == parameters.get("top_k", 3 if task == "vqa" else 5)
    same_report(report, body)
    if "method" in parameters:
        assert report["compression_method"] == parameters["method"] != methods[task][0]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("direction", ["texts", "images"])
def test_retrieval_ranks_as_v1_does(server, client, methods, direction, binary):
    if direction == "texts":
        tensors = {"image": [RED], "texts": ["a blue triangle", "a red circle", "a green rectangle"]}
        parameters = {"compression": "low"}
        v1_body = {"image": b64(RED), "texts": tensors["texts"]}
    else:
        tensors = {"text": ["a red circle"], "images": [BLUE, RED, GREEN]}
        parameters = {"compression": "high", "method": methods["retrieval"][-1]}
        v1_body = {"text": "a red circle", "images": [b64(i) for i in tensors["images"]]}
    body = v1(server, "retrieval", {**v1_body, **parameters})
    result, report = v2(client, "retrieval", tensors, parameters, binary)
    ranking = body["ranking"]
    assert result.as_numpy("ranking").tolist() == [r["index"] for r in ranking]
    assert result.as_numpy("scores").tolist() == [r["score"] for r in ranking]
    assert result.as_numpy("probabilities").tolist() == [r["probability"] for r in ranking]
    texts = result.as_numpy("texts")
    if direction == "texts":
        assert strings(texts) == [r["text"] for r in ranking]
        assert ranking[0]["text"] == "a red circle"  # the 64 px model gets this one right
    else:
        assert texts is None
        assert ranking[0]["index"] == 1
    same_report(report, body)


def test_outputs_can_be_chosen_and_mixed(client):
    image = triton.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([RED], dtype=np.object_))
    outputs = [
        triton.InferRequestedOutput("scores", binary_data=True),
        triton.InferRequestedOutput("label", binary_data=False),
    ]
    result = client.infer("classify", [image], outputs=outputs, parameters={"top_k": 3}, request_id="req-7")
    response = result.get_response()
    assert response["id"] == "req-7" and response["model_name"] == "classify"
    assert [o["name"] for o in response["outputs"]] == ["scores", "label"]
    assert result.as_numpy("scores").shape == (3,) and strings(result.as_numpy("label")) == ["red circle"]
    assert result.as_numpy("labels") is None


def test_the_deploying_guide_example_runs(server):
    """docs/deploying.md's tritonclient example, verbatim but for the server's port."""
    text = (ROOT / "docs" / "deploying.md").read_text()
    section = text.split("## Open Inference Protocol v2", 1)[1].split("\n## ", 1)[0]
    [example] = re.findall(r"^```python\n(.*?)^```", section, re.S | re.M)
    code = example.replace("localhost:8000", f"127.0.0.1:{server.port}")
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------ bad input, over HTTP


def header_body(header: dict, *blobs: bytes) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), {codec.HEADER_LENGTH: str(len(head))}


def packed(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


IMAGE = {"name": "image", "datatype": "BYTES", "shape": [1]}
IMAGE_JSON = {**IMAGE, "data": [b64(RED)]}


def binary_image(blob: bytes, size: int | None = None) -> tuple[bytes, dict]:
    """A binary image input of `size` bytes (default: the blob's) followed by `blob`."""
    size = len(blob) if size is None else size
    return header_body({"inputs": [{**IMAGE, "parameters": {"binary_data_size": size}}]}, blob)


BINARY_IMAGE = binary_image(packed(RED))


def request(*inputs: dict, **extra) -> tuple[bytes, dict]:
    return json.dumps({"inputs": list(inputs), **extra}).encode(), {}


BAD = {
    # name: (model, (body, headers), status, words in the message)
    "malformed json": ("classify", (b'{"inputs": [', {}), 400, "not valid JSON"),
    "json array": ("classify", (b"[]", {}), 400, "JSON object"),
    "no inputs": ("classify", request(), 400, "inputs must be"),
    "header length not a number": (
        "classify",
        (BINARY_IMAGE[0], {codec.HEADER_LENGTH: "12abc"}),
        400,
        "Inference-Header-Content-Length",
    ),
    "header length past the body": (
        "classify",
        (BINARY_IMAGE[0], {codec.HEADER_LENGTH: "99999999"}),
        400,
        "body has",
    ),
    "header length cuts the json": (
        "classify",
        (BINARY_IMAGE[0], {codec.HEADER_LENGTH: "10"}),
        400,
        "not valid JSON",
    ),
    "binary size past the end": ("classify", binary_image(packed(RED), 10**6), 400, "runs past the end"),
    "bytes after the last input": (
        "classify",
        (BINARY_IMAGE[0] + b"xx", BINARY_IMAGE[1]),
        400,
        "follow the last",
    ),
    "truncated element": ("classify", binary_image(packed(RED)[:6]), 400, "announces"),
    "wrong datatype": (
        "classify",
        request({**IMAGE_JSON, "datatype": "FP32", "data": [1.0]}),
        400,
        "datatype FP32, expected BYTES",
    ),
    "unknown datatype": ("classify", request({**IMAGE_JSON, "datatype": "STRING"}), 400, "is not one of"),
    "shape and data disagree": ("classify", request({**IMAGE_JSON, "shape": [2]}), 400, "holds 2 elements"),
    "shape not the model's": ("classify", request({**IMAGE_JSON, "shape": [1, 1]}), 400, "expected [1]"),
    "negative shape": ("classify", request({**IMAGE_JSON, "shape": [-1]}), 400, "non-negative"),
    "data and binary size": (
        "classify",
        request({**IMAGE_JSON, "parameters": {"binary_data_size": 3}}),
        400,
        "both data",
    ),
    "shared memory": (
        "classify",
        request({**IMAGE_JSON, "parameters": {"shared_memory_region": "r"}}),
        400,
        "shared memory",
    ),
    "number as text": (
        "vqa",
        request(IMAGE_JSON, {"name": "question", "datatype": "BYTES", "shape": [1], "data": [5]}),
        400,
        "must be strings",
    ),
    "text not utf-8": (
        "vqa",
        header_body(
            {
                "inputs": [
                    IMAGE_JSON,
                    {
                        "name": "question",
                        "datatype": "BYTES",
                        "shape": [1],
                        "parameters": {"binary_data_size": 6},
                    },
                ]
            },
            packed(b"\xff\xfe"),
        ),
        400,
        "not UTF-8",
    ),
    "image not base64": ("classify", request({**IMAGE_JSON, "data": ["not an image!"]}), 400, "base64"),
    "a path is not read": ("classify", request({**IMAGE_JSON, "data": ["/etc/passwd"]}), 400, "base64"),
    "a url is not fetched": (
        "classify",
        request({**IMAGE_JSON, "data": ["http://127.0.0.1:9/x.png"]}),
        400,
        "base64",
    ),
    "binary path is not an image": (
        "classify",
        binary_image(packed(b"/etc/passwd")),
        415,
        "not a supported image",
    ),
    "image over the limit": (
        "classify",
        binary_image(packed(RED + bytes(1_100_000))),
        413,
        "exceeds 1048576 bytes",
    ),
    "compressed body": (
        "classify",
        (request(IMAGE_JSON)[0], {"content-encoding": "gzip"}),
        415,
        "uncompressed",
    ),
    "unknown model": ("nope", request(IMAGE_JSON), 404, "no model 'nope'"),
    "missing input": ("vqa", request(IMAGE_JSON), 422, "'question' is required"),
    "unknown input": (
        "classify",
        request(IMAGE_JSON, {**IMAGE_JSON, "name": "picture"}),
        422,
        "unknown input(s) ['picture']",
    ),
    "unknown output": (
        "classify",
        request(IMAGE_JSON, outputs=[{"name": "answer"}]),
        422,
        "unknown output(s) ['answer']",
    ),
    "unknown parameter": (
        "classify",
        request(IMAGE_JSON, parameters={"compresion": "high"}),
        422,
        "unknown parameter 'compresion'",
    ),
    "bad compression": (
        "classify",
        request(IMAGE_JSON, parameters={"compression": "extreme"}),
        422,
        "Allowed compression",
    ),
    "bad method": ("classify", request(IMAGE_JSON, parameters={"method": "pumer"}), 422, "methods:"),
    "top_k over the limit": ("classify", request(IMAGE_JSON, parameters={"top_k": 999}), 422, "top_k"),
    "deadline out of range": (
        "classify",
        request(IMAGE_JSON, parameters={"deadline_ms": 0}),
        422,
        "deadline_ms",
    ),
    "retrieval both directions": (
        "retrieval",
        request(
            IMAGE_JSON,
            {"name": "texts", "datatype": "BYTES", "shape": [1], "data": ["a"]},
            {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["b"]},
        ),
        422,
        "either `image` with `texts`",
    ),
    "too many candidates": (
        "retrieval",
        request(IMAGE_JSON, {"name": "texts", "datatype": "BYTES", "shape": [65], "data": ["a"] * 65}),
        422,
        "65 elements; at most 64 per tensor",
    ),
    "a huge shape is refused before its data is read": (
        "retrieval",
        header_body(
            {
                "inputs": [
                    IMAGE_JSON,
                    {
                        "name": "texts",
                        "datatype": "BYTES",
                        "shape": [10**9],
                        "parameters": {"binary_data_size": 5},
                    },
                ]
            },
            packed(b"a"),
        ),
        422,
        "at most 64 per tensor",
    ),
    "no candidates": (
        "retrieval",
        request(IMAGE_JSON, {"name": "texts", "datatype": "BYTES", "shape": [0], "data": []}),
        422,
        "must not be empty",
    ),
    "lone surrogate": (
        "vqa",
        (
            b'{"inputs": ['
            + json.dumps(IMAGE_JSON).encode()
            + b', {"name": "question", "datatype": "BYTES", "shape": [1], "data": ["\\ud800"]}]}',
            {},
        ),
        422,
        "lone surrogate",
    ),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_a_clear_4xx_in_the_protocols_error_body(server, name):
    model, (body, headers), status, words = BAD[name]
    r = httpx.post(f"{server.base}/v2/models/{model}/infer", content=body, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    payload = r.json()
    assert list(payload) == ["error"] and isinstance(payload["error"], str), payload
    assert words in payload["error"], payload["error"]
    assert server.count("tokenlean_requests_total", status="500") == 0


def test_tritonclient_reports_a_refusal_with_its_status_and_message(client):
    image = triton.InferInput("image", [1], "INT64")
    image.set_data_from_numpy(np.array([7], dtype=np.int64))
    with pytest.raises(InferenceServerException) as err:
        client.infer("classify", [image])
    assert err.value.status() == "400" and "datatype INT64, expected BYTES" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.infer("classify", [image_input(RED)], parameters={"compression": 2})
    assert err.value.status() == "422" and "compression" in err.value.message()


def image_input(data: bytes) -> triton.InferInput:
    tensor = triton.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([data], dtype=np.object_))
    return tensor


def test_unknown_routes_and_methods_answer_in_the_protocols_body(server):
    for method, path, status in [("GET", "/v2/nothing", 404), ("GET", "/v2/models/classify/infer", 405)]:
        r = httpx.request(method, f"{server.base}{path}", timeout=10)
        assert r.status_code == status and isinstance(r.json()["error"], str), r.text
    assert server.count("tokenlean_requests_total", status="500") == 0


# ------------------------------------------------------------------ key, readiness, refusals: in process

ONLY_CLASSIFY = {
    "vqa": {"enabled": False},
    "retrieval": {"enabled": False},
    "classify": {"checkpoint": str(CHECKPOINTS / VIT_CLASSIFY)},
}
INFER_BODY = json.dumps(
    {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(png_bytes())]}]}
)


def test_ready_exactly_when_readyz_is_and_the_api_key_guards_all_but_health():
    gate = threading.Event()

    def slow_factory(task, settings, metrics):
        gate.wait(30)
        return default_factory(task, settings, metrics)

    key = {"Authorization": "Bearer s3cret"}
    with TestClient(create_app(Settings(api_key="s3cret", models=ONLY_CLASSIFY), slow_factory)) as c:
        assert c.get("/v2/health/live").status_code == 200
        assert c.get("/readyz").status_code == 503
        r = c.get("/v2/health/ready")
        assert r.status_code == 503 and r.headers["retry-after"] and "loading" in r.json()["error"]
        assert c.get("/v2/models/classify/ready", headers=key).status_code == 503
        assert c.post("/v2/models/classify/infer", content=INFER_BODY, headers=key).status_code == 503
        gate.set()
        wait_ready(c)
        assert c.get("/v2/health/ready").status_code == 200 and c.get("/readyz").status_code == 200
        # the health routes answer without the key; every other route needs it
        assert c.get("/v2/health/live").status_code == 200
        for path in ("/v2", "/v2/models/classify", "/v2/models/classify/ready"):
            r = c.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
            assert isinstance(r.json()["error"], str)
            r = c.get(path, headers={"Authorization": "Bearer nope"})
            assert r.status_code == 401, path
            assert c.get(path, headers=key).status_code == 200, path
        assert c.post("/v2/models/classify/infer", content=INFER_BODY).status_code == 401
        ok = c.post("/v2/models/classify/infer", content=INFER_BODY, headers=key)
        assert ok.status_code == 200, ok.text
        # a task this server does not serve: 404, like /v1
        r = c.get("/v2/models/vqa/ready", headers=key)
        assert r.status_code == 404 and "vqa" in r.json()["error"]


def test_refusals_before_routing_answer_in_the_body_of_the_requests_api():
    """The Content-Length 413 and the connection cap's 503 come from the middleware (app/limits.py),
    before any route: under /v2 in the protocol's body, elsewhere in /v1's; status and headers the
    same on both."""
    settings = Settings(models=ONLY_CLASSIFY, limits={"max_request_bytes": 4096})
    too_large = b"{" + b" " * 5000 + b"}"
    with TestClient(create_app(settings)) as c:
        v2 = c.post("/v2/models/classify/infer", content=too_large)
        v1 = c.post("/v1/classify", content=too_large, headers={"content-type": "application/json"})
        c.app.state.connections = set(range(settings.max_connections))  # every connection taken
        try:
            capped = {
                path: c.post(path, content=INFER_BODY)
                for path in ("/v2/models/classify/infer", "/v1/classify")
            }
            capped_health = c.get("/v2/health/live")
        finally:
            del c.app.state.connections
    assert v2.status_code == v1.status_code == 413
    assert v2.json() == {"error": "request body exceeds 4096 bytes"}
    assert v1.json() == {"error": {"code": "payload_too_large", "message": "request body exceeds 4096 bytes"}}
    v2, v1 = capped["/v2/models/classify/infer"], capped["/v1/classify"]
    for r in (v2, v1, capped_health):
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and r.headers["connection"] == "close"
    assert isinstance(v2.json()["error"], str) and "too many open connections" in v2.json()["error"]
    assert v2.json() == capped_health.json()
    assert v1.json()["error"] == {"code": "overloaded", "message": v2.json()["error"]}


def test_one_rule_picks_the_error_body_by_path():
    error = Overloaded("full", 7)
    v1_body = {"error": {"code": "overloaded", "message": "full"}}
    for path in ("/v2", "/v2/", "/v2/models/vqa/infer", "/v2x", "/v1/vqa", "/metrics", ""):
        r = response_for(error, path)
        assert (r.status_code, r.headers["retry-after"]) == (503, "7"), path
        v2 = path == "/v2" or path.startswith("/v2/")
        assert json.loads(r.body) == ({"error": "full"} if v2 else v1_body), path


# ------------------------------------------------------------------ the codec on its own


def test_tritonclients_request_bodies_decode_to_their_tensors():
    question = triton.InferInput("question", [1], "BYTES")
    question.set_data_from_numpy(np.array(["what colour?"], dtype=np.object_), binary_data=False)
    images = triton.InferInput("images", [2], "BYTES")
    images.set_data_from_numpy(np.array([RED, b""], dtype=np.object_), binary_data=True)
    scale = triton.InferInput("scale", [2, 2], "FP32")
    scale.set_data_from_numpy(np.array([[1.5, -2], [0, 3]], dtype=np.float32), binary_data=True)
    ids = triton.InferInput("ids", [3], "INT64")
    ids.set_data_from_numpy(np.array([1, -2, 2**40], dtype=np.int64), binary_data=False)
    outputs = [
        triton.InferRequestedOutput("answer", binary_data=False),
        triton.InferRequestedOutput("scores"),
    ]
    body, size = triton.InferenceServerClient.generate_request_body(
        [question, images, scale, ids], outputs=outputs, request_id="r1", parameters={"compression": "high"}
    )
    request = codec.decode_request(body, str(size))
    assert request.id == "r1" and request.parameters == {"compression": "high"}
    assert request.inputs["question"] == Tensor("question", "BYTES", (1,), ["what colour?"])
    assert request.inputs["images"] == Tensor("images", "BYTES", (2,), [RED, b""])
    assert request.inputs["scale"].data == [1.5, -2.0, 0.0, 3.0] and request.inputs["scale"].shape == (2, 2)
    assert request.inputs["ids"].data == [1, -2, 2**40]
    assert request.outputs == {"answer": False, "scores": True}
    assert not request.binary("answer") and request.binary("scores")
    # no outputs named: tritonclient asks for every output as binary data
    body, size = triton.InferenceServerClient.generate_request_body([question])
    assert size is None and codec.decode_request(body).binary("anything")


def test_json_data_may_be_nested_and_bf16_is_read():
    body, headers = header_body(
        {
            "inputs": [
                {"name": "m", "datatype": "INT32", "shape": [2, 2], "data": [[1, 2], [3, 4]]},
                {"name": "b", "datatype": "BF16", "shape": [2], "parameters": {"binary_data_size": 4}},
            ]
        },
        struct.pack("<2H", 0x3FC0, 0xC000),  # 1.5, -2.0
    )
    request = codec.decode_request(body, headers[codec.HEADER_LENGTH])
    assert request.inputs["m"].data == [1, 2, 3, 4] and request.inputs["b"].data == [1.5, -2.0]
    assert request.outputs is None and not request.binary("x")


@pytest.mark.parametrize(
    "header, blob, words",
    [
        (
            {
                "inputs": [
                    {"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 4}}
                ]
            },
            b"\0" * 4,
            "take 8 bytes",
        ),
        (
            {
                "inputs": [
                    {"name": "x", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 5}}
                ]
            },
            packed(b"a"),
            "holds 2 elements, the data 1",
        ),
        (
            {
                "inputs": [
                    {"name": "x", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 3}}
                ]
            },
            b"\1\0\0",
            "truncated length prefix",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [True], "data": ["a"]}]},
            b"",
            "non-negative integers",
        ),
        ({"inputs": [{"name": "x", "datatype": "BOOL", "shape": [1], "data": [1]}]}, b"", "true or false"),
        ({"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [1.5]}]}, b"", "integers"),
        ({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1]}]}, b"", "neither data nor"),
        ({"inputs": [{"datatype": "BYTES", "shape": [1], "data": ["a"]}]}, b"", "needs a name"),
        (
            {"inputs": [{"name": "x" * 65, "datatype": "BYTES", "shape": [1], "data": ["a"]}]},
            b"",
            "1 to 64 characters",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["a"]}] * 2},
            b"",
            "given twice",
        ),
        ({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": "a"}]}, b"", "must be a list"),
        (
            {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["a"]}], "id": 3},
            b"",
            "id must be",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["a"]}], "parameters": []},
            b"",
            "JSON object",
        ),
        (
            {
                "inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["a"]}],
                "parameters": {"binary_data_output": "yes"},
            },
            b"",
            "true or false",
        ),
        (
            {
                "inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["a"]}],
                "outputs": [{"name": "y", "parameters": {"classification": 2}}],
            },
            b"",
            "classification",
        ),
        (
            {
                "inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["a"]}],
                "outputs": [{"name": "y"}, {"name": "y"}],
            },
            b"",
            "requested twice",
        ),
        (
            {
                "inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["a"]}],
                "outputs": [{"name": "y", "parameters": {"binary_data": 1}}],
            },
            b"",
            "true or false",
        ),
    ],
)
def test_unreadable_requests_are_bad_input(header, blob, words):
    body, headers = header_body(header, blob)
    with pytest.raises(BadInput, match=re.escape(words)):
        codec.decode_request(body, headers[codec.HEADER_LENGTH])


@pytest.mark.parametrize("header_length", ["-1", "1e3", " ", "١٢", "9" * 16])
def test_a_header_length_must_be_a_plain_byte_count(header_length):
    with pytest.raises(BadInput, match="Inference-Header-Content-Length"):
        codec.decode_request(b'{"inputs": []}', header_length)


@pytest.mark.parametrize("binary", [True, False])
def test_responses_decode_with_tritonclient(binary):
    outputs = [
        Tensor("answer", "BYTES", (1,), ["ünïcode"]),
        Tensor("labels", "BYTES", (3,), ["a", "", "c"]),
        Tensor("scores", "FP64", (3,), [0.1, 2.5e-310, -3.0]),
        Tensor("ranking", "INT64", (3,), [2, 0, 2**40]),
        Tensor("empty", "FP64", (0,), []),
    ]
    content, headers = codec.encode_response(
        "vqa", "id-1", [(t, binary) for t in outputs], {"flops_saved": 0.5}
    )
    assert (codec.HEADER_LENGTH in headers) == binary
    assert headers["content-type"] == ("application/octet-stream" if binary else "application/json")
    length = int(headers[codec.HEADER_LENGTH]) if binary else None
    result = triton.InferenceServerClient.parse_response_body(content, header_length=length)
    response = result.get_response()
    assert (
        response["model_name"] == "vqa"
        and response["id"] == "id-1"
        and response["parameters"] == {"flops_saved": 0.5}
    )
    assert strings(result.as_numpy("answer")) == ["ünïcode"]
    assert strings(result.as_numpy("labels")) == ["a", "", "c"]
    assert result.as_numpy("scores").tolist() == [0.1, 2.5e-310, -3.0]
    assert result.as_numpy("ranking").dtype == np.int64 and result.as_numpy("ranking").tolist() == [
        2,
        0,
        2**40,
    ]
    assert result.as_numpy("empty").shape == (0,)


def test_reading_stops_one_element_past_the_shape():
    many = packed(b"a") * 100_000
    assert len(codec.unpack_bytes(many, "x", 2)) == 3
    body, headers = header_body(
        {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [2], "data": [["a"] * 50_000] * 2}]}
    )
    with pytest.raises(BadInput, match=r"holds 2 elements, the data more than 2"):
        codec.decode_request(body, headers[codec.HEADER_LENGTH])
    body, headers = header_body({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [3, 1000]}]})
    with pytest.raises(InvalidInput, match="3000 elements; at most 64 per tensor"):
        codec.decode_request(body, headers[codec.HEADER_LENGTH], max_elements=64)


def test_bytes_elements_pack_with_little_endian_lengths():
    packed_bytes = codec.pack(Tensor("t", "BYTES", (2,), ["ab", b"\x00\xff"]))
    assert packed_bytes == b"\x02\x00\x00\x00ab\x02\x00\x00\x00\x00\xff"
    assert codec.unpack_bytes(packed_bytes) == [b"ab", b"\x00\xff"]
