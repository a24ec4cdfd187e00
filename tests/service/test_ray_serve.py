"""The Ray Serve engine (app/engines/): `tokenlean serve --engine ray --replicas 2` for real, in a
local Ray instance it starts, against the single-process server running the same light models
(the 64 px ViLT VQA and retrieval checkpoints and the 64 px ViT classifier): the same answers for
every task and several levels under concurrent load, both replicas serving and naming themselves
in `x-tokenlean-replica`, both replicas' metrics in one scrape of Ray's metrics export port, a
killed replica replaced while requests go on, and a clean stop. Then, without a cluster: the
shipped Serve config, the deployment options, the replica header and the proxy's JSON errors.

Waits are bounded by generous timeouts; nothing asserts on how fast anything happens."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import live_server
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from app.settings import CHECKPOINTS, Settings
from bench.server import free_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "examples"
LIGHT = {
    "TOKENLEAN_MODELS__VQA__CHECKPOINT": str(CHECKPOINTS / "vqa"),
    "TOKENLEAN_MODELS__RETRIEVAL__CHECKPOINT": str(CHECKPOINTS / "retrieval"),
    "TOKENLEAN_MODELS__CLASSIFY__CHECKPOINT": str(CHECKPOINTS / "vit-classify"),
    # answers under concurrency, not admission (tests/service/test_admission.py covers that)
    "TOKENLEAN_BATCHING__MAX_EVENT_LOOP_LAG_MS": "600000",
    "TOKENLEAN_BATCHING__MAX_QUEUE_WAIT_MS": "600000",
    "TOKENLEAN_BATCHING__MAX_WAIT_MS": "2",
}
LEVELS = ["none", "low", "medium", "high", "0.35"]
START_TIMEOUT_S = 300
HEADER = "x-tokenlean-replica"


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def v2(inputs: dict[str, str], level: str) -> dict:
    """An Open Inference Protocol v2 infer body (JSON tensor data) with the level in parameters."""
    tensors = [{"name": k, "datatype": "BYTES", "shape": [1], "data": [v]} for k, v in inputs.items()]
    return {"inputs": tensors, "parameters": {"compression": level}}


def requests_of_every_task() -> list[tuple[str, dict]]:
    """(path, JSON body): VQA and classification on three images, retrieval both ways, each at
    every level; and VQA and classification over /v2."""
    images = [b64(EXAMPLES / f"{name}.png") for name in ("red-circle", "blue-triangle", "green-rectangle")]
    questions = ["what color is the shape?", "what shape is in the image?", "is there a circle?"]
    texts = ["a red circle", "a blue triangle", "a green rectangle"]
    out = []
    for level in LEVELS:
        for i, image in enumerate(images):
            out.append(("/v1/vqa", {"image": image, "question": questions[i], "compression": level}))
            out.append(("/v1/classify", {"image": image, "compression": level, "top_k": 3}))
        out.append(("/v1/retrieval", {"image": images[0], "texts": texts, "compression": level}))
        out.append(("/v1/retrieval", {"text": texts[1], "images": images, "compression": level}))
        out.append(("/v2/models/vqa/infer", v2({"image": images[1], "question": questions[1]}, level)))
        out.append(("/v2/models/classify/infer", v2({"image": images[2]}, level)))
    return out


def comparable(body: dict) -> dict:
    """What must not depend on the server: all but the timings and the batch's size (in /v2's
    response parameters too)."""
    out = {k: v for k, v in body.items() if k not in ("timings", "batch_size")}
    if isinstance(out.get("parameters"), dict):
        kept = {
            k: v for k, v in out["parameters"].items() if not k.startswith("timings_") and k != "batch_size"
        }
        out["parameters"] = kept
    return out


def assert_same(a, b, where: str = "") -> None:
    """Equal, floats within 1e-4 (replicas run torch on one thread, the reference on two)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {a} != {b}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{where}: {a} != {b}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and not isinstance(a, bool):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@dataclass
class RayServer:
    proc: subprocess.Popen
    port: int
    metrics_port: int
    address: str
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metrics(self) -> list[tuple[str, dict, float]]:
        """One scrape of Ray's metrics export port: every replica's tokenlean samples."""
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30).text
        return [
            (s.name, s.labels, s.value)
            for family in text_string_to_metric_families(text)
            if family.name.startswith("ray_tokenlean_")
            for s in family.samples
        ]


def log_entries(log: Path) -> list[dict]:
    entries = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def start_ray_server(tmp: Path) -> RayServer:
    port, metrics_port = free_port(), free_port()
    log = tmp / "ray-serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # a new local instance
    env.update(LIGHT, TOKENLEAN_LOG_FORMAT="json", RAY_metrics_report_interval_ms="1000")
    command = [*live_server.command(), "serve", "--engine", "ray", "--replicas", "2"]
    command += ["--port", str(port), "--ray.metrics-export-port", str(metrics_port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline, address = time.monotonic() + START_TIMEOUT_S, None
    while time.monotonic() < deadline:
        for entry in log_entries(log):
            address = entry.get("ray_address", address)
            if entry.get("message", "").startswith("serving on") and address:
                return RayServer(proc, port, metrics_port, address, log)
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode}:\n{log.read_text()[-6000:]}")
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    proc.wait(120)
    raise AssertionError(f"not serving after {START_TIMEOUT_S} s:\n{log.read_text()[-6000:]}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    server = live_server.start(tmp_path_factory.mktemp("reference"), **LIGHT)
    yield server
    server.terminate()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    server = start_ray_server(tmp_path_factory.mktemp("ray"))
    yield server
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(120)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(30)


def post_all(base: str, cases: list[tuple[str, dict]], threads: int = 8) -> list[httpx.Response]:
    with httpx.Client(timeout=120) as client, ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda case: client.post(f"{base}{case[0]}", json=case[1]), cases))


@pytest.fixture(scope="module")
def served(reference, cluster):
    """Every request of every task, concurrently, through Ray's proxy and to the reference."""
    cases = requests_of_every_task()
    expected = post_all(reference.base, cases)
    got = post_all(cluster.base, cases)
    return cases, expected, got


# ------------------------------------------------------------------ through Ray's proxy


def test_answers_through_the_proxy_equal_the_single_process_servers(served):
    cases, expected, got = served
    for (path, body), ref, r in zip(cases, expected, got, strict=True):
        assert ref.status_code == 200, ref.text
        assert r.status_code == 200, r.text
        level = body.get("compression") or body["parameters"]["compression"]
        assert_same(comparable(r.json()), comparable(ref.json()), f"{path} at {level}")
        assert HEADER not in ref.headers  # the single-process server is unchanged
    paths = {path for path, _ in cases}
    assert paths == {
        "/v1/vqa",
        "/v1/retrieval",
        "/v1/classify",
        "/v2/models/vqa/infer",
        "/v2/models/classify/infer",
    }


def test_both_replicas_served_and_every_response_names_its_replica(served, cluster):
    _, _, got = served
    replicas = Counter(r.headers.get(HEADER) for r in got)
    assert None not in replicas, "a response without the replica header"
    assert len(replicas) == 2, f"requests per replica: {dict(replicas)}"
    # errors and operational routes too: the header is the replica's outermost layer
    for response in (
        httpx.get(f"{cluster.base}/readyz", timeout=30),
        httpx.get(f"{cluster.base}/v2/health/ready", timeout=30),
        httpx.get(f"{cluster.base}/v2/models/nothing", timeout=30),
        httpx.get(f"{cluster.base}/v1/nothing", timeout=30),
        httpx.post(
            f"{cluster.base}/v1/vqa", json={"image": "x", "question": "q", "compression": "2"}, timeout=30
        ),
    ):
        assert response.headers.get(HEADER), response
        if response.status_code >= 400:
            assert "error" in response.json(), response.text


def test_every_replicas_metrics_reach_one_scrape_with_a_replica_label(served, cluster, reference):
    _, _, got = served
    answered = Counter(r.headers[HEADER] for r in got if r.status_code == 200)
    counted: dict[str, float] = {}
    loaded: set[tuple[str, str]] = set()

    def scraped() -> bool:
        nonlocal counted, loaded
        counted, loaded = {}, set()
        for name, labels, value in cluster.metrics():
            if name == "ray_tokenlean_requests_total" and labels.get("status") == "200":
                counted[labels["replica"]] = counted.get(labels["replica"], 0) + value
            if name == "ray_tokenlean_model_load_seconds" and value > 0:
                loaded.add((labels["replica"], labels["task"]))
        # the load gauge was set once, seconds ago: it stays exported while the replica lives
        return counted == answered and loaded == {
            (r, t) for r in answered for t in ("vqa", "retrieval", "classify")
        }

    live_server.wait_until(scraped, 120, "both replicas' metrics in one scrape", lambda: (counted, loaded))
    assert set(counted) == set(answered) and len(counted) == 2
    # each replica's own /metrics (what the proxy forwards /metrics to) and the single-process
    # server's keep their names and labels
    for base in (cluster.base, reference.base):
        text = httpx.get(f"{base}/metrics", timeout=30).text
        samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
        assert any(s.name == "tokenlean_requests_total" for s in samples)
        assert not any("replica" in s.labels for s in samples)


def kill_replica(cluster: RayServer, replica: str) -> None:
    """ray.kill of the replica's actor, from a driver joining the local instance (as any Ray
    client would: the instance's token is in ~/.ray)."""
    code = (
        "import ray\n"
        f"ray.init(address={cluster.address!r}, namespace='serve', log_to_driver=False)\n"
        f"ray.kill(ray.get_actor('SERVE_REPLICA::tokenlean#TokenLean#{replica}'), no_restart=True)\n"
    )
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-4000:]


def test_a_killed_replica_is_replaced_while_requests_keep_succeeding(served, cluster):
    cases, expected, got = served
    reference_answers = [comparable(r.json()) for r in expected]
    before = {r.headers[HEADER] for r in got}
    records: list[tuple[float, int, str | None, int]] = []  # (time, status, replica, case index)
    errors: list[str] = []  # what each failure said
    lock, stop = threading.Lock(), threading.Event()

    def client(k: int) -> None:
        i = k
        with httpx.Client(timeout=120) as http:
            while not stop.is_set() and len(records) < 20_000:
                path, body = cases[i % len(cases)]
                try:
                    r = http.post(f"{cluster.base}{path}", json=body)
                    status, replica = r.status_code, r.headers.get(HEADER)
                    if status == 200:
                        assert_same(comparable(r.json()), reference_answers[i % len(cases)], path)
                    else:  # JSON, from the app or from the proxy (app/engines/ray_proxy.py)
                        try:  # /v1's {"error": {"code": ...}} or /v2's {"error": "..."}
                            error = r.json()["error"]
                            v2 = path.startswith("/v2/")
                            assert isinstance(error, str if v2 else dict), error
                            errors.append(f"{status} {'v2' if v2 else error['code']}")
                        except (ValueError, KeyError, TypeError, AssertionError):
                            errors.append(f"{status} not JSON: {r.text[:200]!r}")
                except httpx.HTTPError as exc:
                    status, replica = 0, None
                    errors.append(repr(exc))
                with lock:
                    records.append((time.monotonic(), status, replica, i % len(cases)))
                i += 4

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(4)]
    for t in threads:
        t.start()
    try:
        live_server.wait_until(lambda: len(records) >= 20, 120, "requests flowing")
        victim = sorted(before)[0]
        killed_at = time.monotonic()
        kill_replica(cluster, victim)

        def replacement() -> str | None:
            with lock:
                new = {rep for _, status, rep, _ in records if status == 200 and rep and rep not in before}
            return next(iter(new), None)

        new = live_server.wait_until(replacement, 180, "a replacement replica serving")
        replaced_at = min(t for t, status, rep, _ in records if rep == new)
        live_server.wait_until(
            lambda: sum(1 for t, *_ in records if t > replaced_at) >= 40,
            120,
            "requests after the replacement",
        )
    finally:
        stop.set()
        for t in threads:
            t.join(180)
    failures = [t - killed_at for t, status, _, _ in records if status != 200]
    served_by = Counter(rep for _, status, rep, _ in records if status == 200)
    print(
        f"\nreplica kill: {len(records)} requests, {len(failures)} failed ({errors}, "
        f"{[round(t, 1) for t in failures]} s after the kill began); "
        f"served by {dict(served_by)}; killed {victim}, replaced by {new} "
        f"{replaced_at - killed_at:.1f} s later"
    )
    assert served_by[new] > 0 and len(served_by) == 3
    # At most the requests in flight on the killed replica when it died (one per client) fail;
    # none after its replacement served its first.
    assert len(failures) <= len(threads), errors
    assert all(e.startswith("503 ") and "not JSON" not in e for e in errors), errors
    assert not [t for t, status, _, _ in records if status != 200 and t > replaced_at]


def test_sigterm_deletes_the_application_and_stops_the_local_instance(cluster):
    cluster.proc.send_signal(signal.SIGTERM)
    assert cluster.proc.wait(120) == 0, cluster.log.read_text()[-4000:]
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{cluster.base}/readyz", timeout=5)
    messages = [e.get("message", "") for e in log_entries(cluster.log)]
    assert any(m.startswith("stopping: deleting the application") for m in messages)


# ------------------------------------------------------------------ without a cluster


@pytest.fixture
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("TOKENLEAN_"):
            monkeypatch.delenv(name)


def test_the_shipped_serve_config_is_what_ray_config_writes_and_ray_accepts(clean_env, capsys):
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    from app.cli import main
    from app.engines.ray_serve import build_app

    shipped = (ROOT / "deploy" / "ray" / "serve.yaml").read_text()
    flags = shipped.splitlines()[0].split("`tokenlean ray-config")[1].split("`")[0].split()
    main(["ray-config", *flags])
    assert capsys.readouterr().out == shipped, (
        "regenerate deploy/ray/serve.yaml with the command in its header"
    )

    config = ServeDeploySchema.model_validate(yaml.safe_load(shipped))
    (application,) = config.applications
    assert application.import_path == "app.engines.ray_serve:build_app"
    assert config.http_options.host == "0.0.0.0" and config.http_options.port == 8000
    (deployment,) = application.deployments
    assert deployment.num_replicas == 2
    assert deployment.backpressure_config.status_code == 503
    assert deployment.backpressure_config.retry_after_s >= 1

    built = call_user_app_builder_with_args_if_necessary(build_app, application.args)
    bound = built._bound_deployment  # what Ray deploys before the file's overrides
    assert bound.name == deployment.name
    assert bound.max_ongoing_requests == deployment.max_ongoing_requests
    assert bound.max_queued_requests == deployment.max_queued_requests
    assert bound.ray_actor_options["num_cpus"] == deployment.ray_actor_options.num_cpus
    settings = Settings(**bound.init_args[0])
    assert settings.models["vqa"].checkpoint == str(CHECKPOINTS / "two-stream-vqa")


def test_settings_flags_and_variables_shape_the_deployment(clean_env, monkeypatch):
    from ray.serve.schema import DeploymentSchema

    from app.cli import fold_model_flags, fold_shortcuts
    from app.engines.ray_config import DEPLOYMENT, deployment_options, serve_config
    from app.engines.ray_serve import TokenLean

    argv = fold_model_flags(fold_shortcuts(["--engine", "ray", "--replicas", "3", "--ray.num-gpus", "0.25"]))
    fixed = Settings(_cli_parse_args=argv)
    assert fixed.engine == "ray" and fixed.ray.replicas == 3
    options = deployment_options(fixed)
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.25}

    monkeypatch.setenv("TOKENLEAN_RAY__AUTOSCALING", "true")
    monkeypatch.setenv("TOKENLEAN_RAY__MAX_REPLICAS", "8")
    monkeypatch.setenv("TOKENLEAN_RAY__MAX_QUEUED_REQUESTS", "10")
    monkeypatch.setenv("TOKENLEAN_API_KEY", "secret")
    scaled = Settings()
    options = deployment_options(scaled)
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 8,
        "target_ongoing_requests": 16.0,
    }
    assert options["max_queued_requests"] == 10
    for opts in (deployment_options(fixed), options):  # Ray takes both
        DeploymentSchema.model_validate({"name": DEPLOYMENT, **opts})
        TokenLean.options(**opts)
    assert "secret" not in json.dumps(serve_config(scaled))  # the key goes to the replicas' environment

    with pytest.raises(ValueError, match="min_replicas"):
        Settings(ray={"autoscaling": True, "min_replicas": 5, "max_replicas": 2})
    with pytest.raises(ValueError):
        Settings(ray={"num_gpus": -1})
    with pytest.raises(ValueError):
        Settings(engine="kubernetes")


def test_the_replica_header_names_every_response_errors_included():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from app.engines.replica import install

    app = FastAPI()

    @app.get("/ok")
    async def ok():
        return {"ok": True}

    @app.get("/bug")
    async def bug():
        raise RuntimeError("a bug")

    install(app, "r1")
    client = TestClient(app, raise_server_exceptions=False)
    for path, status in (("/ok", 200), ("/missing", 404), ("/bug", 500)):
        r = client.get(path)
        assert (r.status_code, r.headers.get(HEADER)) == (status, "r1")


def run_asgi(app, messages: list[dict], path: str = "/v1/vqa") -> list[dict]:
    """Messages an ASGI app sends for one GET of `path`, the inner app sending `messages`."""
    sent = []

    async def inner(scope, receive, send):
        for message in messages:
            await send(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "headers": []}
    asyncio.run(app(inner)(scope, receive, send))
    return sent


def test_the_proxys_own_errors_become_the_apps_json_errors():
    from ray.serve._private.http_util import convert_object_to_asgi_messages

    from app.engines.ray_proxy import LOST, JSONErrors, middlewares

    assert [m.cls for m in middlewares()] == [JSONErrors]
    cases = [
        # what Ray's proxy sends for a full queue (max_queued_requests, backpressure_config) ...
        (
            convert_object_to_asgi_messages(
                "Request dropped due to backpressure", 503, [(b"retry-after", b"2")]
            ),
            503,
            "overloaded",
            "2",
        ),
        # ... when no replica can take a request, and for a replica that died with it
        (convert_object_to_asgi_messages("no replicas", 503), 503, "unavailable", "1"),
        (convert_object_to_asgi_messages("Internal Server Error", 500), 500, "internal_error", None),
        # a replica that died with the request: the proxy sends nothing at all ...
        ([], 503, "unavailable", "1"),
        # ... or only the start of its answer, or part of its body
        (convert_object_to_asgi_messages({"answer": "2"}, 200)[:1], 503, "unavailable", "1"),
        (
            [
                {"type": "http.response.start", "status": 200, "headers": []},
                {"type": "http.response.body", "body": b'{"ans', "more_body": True},
            ],
            503,
            "unavailable",
            "1",
        ),
    ]
    for messages, status, code, retry_after in cases:
        start, body = run_asgi(JSONErrors, messages)
        headers = {bytes(k).decode(): bytes(v).decode() for k, v in start["headers"]}
        assert start["status"] == status and headers["content-type"] == "application/json"
        assert headers.get("retry-after") == retry_after
        error = json.loads(body["body"])["error"]
        assert error["code"] == code and error["message"]
        assert int(headers["content-length"]) == len(body["body"])
    # under /v2, the Open Inference Protocol's error body
    start, body = run_asgi(JSONErrors, [], path="/v2/models/vqa/infer")
    assert start["status"] == 503 and json.loads(body["body"]) == {"error": LOST}
    # the app's own answers pass untouched, errors included
    own = convert_object_to_asgi_messages({"error": {"code": "invalid_request", "message": "x"}}, 422)
    assert run_asgi(JSONErrors, own) == own
    ok = convert_object_to_asgi_messages("fine", 200)
    assert run_asgi(JSONErrors, ok) == ok
    chunked = [
        {"type": "http.response.start", "status": 200, "headers": []},
        {"type": "http.response.body", "body": b"a", "more_body": True},
        {"type": "http.response.body", "body": b"b", "more_body": False},
    ]
    assert run_asgi(JSONErrors, chunked) == chunked
