"""The monitoring stack for real, as far as this machine allows (no Docker engine): `tokenlean serve`
runs with the CPU image's environment on a free loopback port; the image's health check script
runs against it; `promtool` checks the shipped Prometheus config and the live /metrics; a real
Prometheus with a config derived from docker/prometheus/prometheus.yml scrapes the service while
it serves traffic, and every query of the Grafana dashboard is evaluated by it.

The Prometheus tests need Debian's `prometheus` package (`prometheus` and `promtool`), which
.ci/run installs; without it they are skipped with that message."""

from __future__ import annotations

import base64
import io
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import yaml
from PIL import Image
from prometheus_client import CollectorRegistry, generate_latest
from test_deploy_files import (
    PROMETHEUS,
    ROOT,
    SERVICE,
    dashboard,
    dashboard_expressions,
    dashboard_metric_names,
    scrape_job,
    service_process_env,
)

from app.metrics import GPUMemoryCollector
from bench.server import free_port

PROMETHEUS_BIN = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
NEEDS_PROMETHEUS = pytest.mark.skipif(
    not (PROMETHEUS_BIN and PROMTOOL),
    reason="prometheus/promtool not found: install Debian's `prometheus` package (.ci/run does)",
)
READY_TIMEOUT_S = 120  # bounds every wait below; nothing asserts on how fast it is reached


def wait_for(check, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Poll `check` until it returns something truthy; fail (with the process log) after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = check()
        except httpx.HTTPError:
            result = None
        if result:
            return result
        if proc is not None and proc.poll() is not None:
            pytest.fail(
                f"{what}: process exited with {proc.returncode}\n{log.read_text()[-4000:] if log else ''}"
            )
        time.sleep(0.25)
    pytest.fail(
        f"timed out after {timeout:.0f} s waiting for {what}\n{log.read_text()[-4000:] if log else ''}"
    )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """`tokenlean serve` configured as the CPU container is (image ENV + compose environment),
    except that it listens on a free loopback port and reads the checkpoints from the repo."""
    port = free_port()
    exe = shutil.which("tokenlean", path=os.path.dirname(sys.executable))
    command = [exe] if exe else [sys.executable, "-m", "app.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENLEAN_")}
    env.update(service_process_env(port))
    work = tmp_path_factory.mktemp("service")  # like the image's WORKDIR: nothing of the repo in it
    log = work / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([*command, "serve"], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=work)
    base = f"http://127.0.0.1:{port}"
    try:
        ready = lambda: httpx.get(f"{base}/readyz", timeout=2).status_code == 200  # noqa: E731
        wait_for(ready, READY_TIMEOUT_S, "the service's /readyz", proc, log)
        yield SimpleNamespace(base=base, port=port, log=log)
    finally:
        stop(proc)


def png_b64(color=(200, 30, 30)) -> str:
    image = Image.new("RGB", (64, 64), (240, 240, 240))
    image.paste(Image.new("RGB", (24, 24), color), (20, 20))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


IMAGE = png_b64()
LEVEL = "medium"  # the level whose latency quantile Prometheus must find


def send_traffic(base: str, vqa: int = 4, classify: int = 2, invalid: int = 1) -> None:
    """A bounded number of requests: VQA at LEVEL, classification at `high`, and invalid ones (4xx)."""
    with httpx.Client(base_url=base, timeout=60) as client:
        for _ in range(vqa):
            body = {"image": IMAGE, "question": "what shape is in the image?", "compression": LEVEL}
            assert client.post("/v1/vqa", json=body).status_code == 200
        for _ in range(classify):
            assert (
                client.post("/v1/classify", json={"image": IMAGE, "compression": "high"}).status_code == 200
            )
        for _ in range(invalid):
            assert (
                client.post("/v1/classify", json={"image": IMAGE, "compression": "bogus"}).status_code == 422
            )


@pytest.fixture(scope="module")
def metrics_text(service) -> str:
    send_traffic(service.base)
    r = httpx.get(f"{service.base}/metrics", timeout=10)
    assert r.status_code == 200
    return r.text


def exported_names(text: str) -> set[str]:
    """Every sample name an exposition can hold: the samples present, and for families declared
    without a sample yet (labelled metrics nobody has used) the names their type produces."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            suffixes = {"histogram": ["_bucket", "_count", "_sum"], "summary": ["", "_count", "_sum"]}
            names.update(name + s for s in suffixes.get(kind, [""]))
        elif line and not line.startswith("#"):
            names.add(re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line)[0])
    return names


def gpu_host_names() -> set[str]:
    """What GPUMemoryCollector adds on a CUDA host with NVML, faked here (no GPU on this machine)."""
    cuda = SimpleNamespace(
        is_available=lambda: True,
        device_count=lambda: 1,
        memory_allocated=lambda i: 1,
        memory_reserved=lambda i: 2,
    )
    nvml = SimpleNamespace(
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=3),
    )
    registry = CollectorRegistry()
    registry.register(GPUMemoryCollector(torch_module=SimpleNamespace(cuda=cuda), nvml_module=nvml))
    return exported_names(generate_latest(registry).decode())


# ---------------------------------------------------------------- health check script


class _Readyz503(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(503)
        self.end_headers()

    def log_message(self, *args):
        pass


def run_healthcheck(port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENLEAN_PORT": str(port)}
    script = ROOT / "docker" / "healthcheck.py"
    return subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=30)


def test_image_healthcheck_script_follows_readyz(service):
    assert run_healthcheck(service.port).returncode == 0
    assert run_healthcheck(free_port()).returncode == 1  # nothing listening
    loading = ThreadingHTTPServer(("127.0.0.1", 0), _Readyz503)  # a service still loading
    thread = threading.Thread(target=loading.serve_forever, daemon=True)
    thread.start()
    try:
        result = run_healthcheck(loading.server_address[1])
        assert result.returncode == 1 and "503" in result.stderr
    finally:
        loading.shutdown()
        loading.server_close()


# ---------------------------------------------------------------- metric names


def test_dashboard_uses_only_metric_names_the_service_exports(metrics_text):
    exported = exported_names(metrics_text) | gpu_host_names()
    used = dashboard_metric_names()
    assert len(used) >= 10
    assert not used - exported, f"dashboard metrics the service does not export: {sorted(used - exported)}"
    # And the names this CPU host exports without any fake include all non-GPU ones.
    assert not {n for n in used - exported_names(metrics_text) if not n.startswith("tokenlean_gpu_")}


# ---------------------------------------------------------------- promtool


@NEEDS_PROMETHEUS
def test_promtool_accepts_the_shipped_config():
    result = subprocess.run([PROMTOOL, "check", "config", str(PROMETHEUS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@NEEDS_PROMETHEUS
def test_promtool_accepts_the_services_metrics(metrics_text):
    assert "tokenlean_requests_total{" in metrics_text
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=metrics_text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not result.stdout.strip() and not result.stderr.strip(), result.stdout + result.stderr


# ---------------------------------------------------------------- a real Prometheus


def derived_config(service_port: int) -> dict:
    """The shipped config, scraping every second, with the compose target `tokenlean:8000` replaced
    by the service on loopback. Everything else (job name, metrics path, scheme) is kept."""
    config = yaml.safe_load(PROMETHEUS.read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["scrape_timeout"] = "1s"
    job = scrape_job(config)
    job.pop("scrape_interval", None)
    job.pop("scrape_timeout", None)
    [static] = job["static_configs"]
    [target] = static["targets"]
    assert target.split(":")[0] == SERVICE
    static["targets"] = [f"127.0.0.1:{service_port}"]
    return config


@pytest.fixture(scope="module")
def prometheus(service, tmp_path_factory):
    if not (PROMETHEUS_BIN and PROMTOOL):
        pytest.skip("prometheus/promtool not found: install Debian's `prometheus` package (.ci/run does)")
    work = tmp_path_factory.mktemp("prometheus")
    config = work / "prometheus.yml"
    config.write_text(yaml.safe_dump(derived_config(service.port)))
    checked = subprocess.run([PROMTOOL, "check", "config", str(config)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    port = free_port()
    log = work / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                PROMETHEUS_BIN,
                f"--config.file={config}",
                f"--storage.tsdb.path={work / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=work,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: httpx.get(f"{base}/-/ready", timeout=2).status_code == 200, 60, "Prometheus", proc, log
        )
        yield SimpleNamespace(base=base, proc=proc, log=log)
    finally:
        stop(proc)


def query(prom, expr: str) -> list[dict]:
    r = httpx.get(f"{prom.base}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    return body["data"]["result"]


def value(prom, expr: str) -> float | None:
    result = query(prom, expr)
    return float(result[0]["value"][1]) if result else None


def test_prometheus_scrapes_the_service_and_evaluates_the_dashboard(service, prometheus):
    def scraped(selector: str, at_least: float):
        v = value(prometheus, f"sum({selector})")
        return v is not None and v >= at_least

    # The target is up under the shipped job name.
    def target_up():
        targets = httpx.get(f"{prometheus.base}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        return any(t["labels"]["job"] == SERVICE and t["health"] == "up" for t in targets)

    wait_for(target_up, 60, "the service's target to be up", prometheus.proc, prometheus.log)

    # Two waves: a series' first scrape only creates it; rates need a later, larger sample.
    vqa = f'tokenlean_requests_total{{task="vqa",level="{LEVEL}",method="evit",status="200"}}'
    before = value(prometheus, f"sum({vqa})") or 0.0
    send_traffic(service.base)
    wait_for(
        lambda: scraped(vqa, before + 4), 60, "the first wave in Prometheus", prometheus.proc, prometheus.log
    )
    send_traffic(service.base)
    wait_for(
        lambda: scraped(vqa, before + 8), 60, "the second wave in Prometheus", prometheus.proc, prometheus.log
    )

    # The request counter, with the labels the dashboard filters on.
    result = query(prometheus, vqa)
    assert result and result[0]["metric"]["job"] == SERVICE
    assert float(result[0]["value"][1]) >= before + 8
    assert value(prometheus, 'sum(tokenlean_requests_total{task="classify",status="422"})') >= 2

    # A latency quantile for the level used, the way the dashboard computes it.
    p95 = (
        "histogram_quantile(0.95, sum by (le, task, level) "
        f'(rate(tokenlean_request_duration_seconds_bucket{{task="vqa",level="{LEVEL}"}}[1m])))'
    )

    def finite_p95():
        v = value(prometheus, p95)
        return v is not None and math.isfinite(v) and v

    latency = wait_for(finite_p95, 30, "a finite p95 latency", prometheus.proc, prometheus.log)
    assert 0 < latency <= 30  # within the histogram's buckets

    # Every dashboard query is valid PromQL here; all but the GPU and queue-full ones have data.
    optional = ("tokenlean_gpu_", "tokenlean_rejected_total")
    for expr in dashboard_expressions():
        concrete = expr.replace("$__rate_interval", "1m")
        for var in ("$task", "$level", "$method"):
            concrete = concrete.replace(var, ".*")
        assert "$" not in concrete, expr
        result = query(prometheus, concrete)
        if not any(name in expr for name in optional):
            assert result, f"no data for a dashboard query: {concrete}"
    for var in dashboard()["templating"]["list"]:
        metric = re.fullmatch(r"label_values\((\w+).*,\s*(\w+)\)", var["definition"])
        r = httpx.get(f"{prometheus.base}/api/v1/label/{metric[2]}/values", params={"match[]": metric[1]})
        assert r.json()["data"], var["definition"]
    assert (
        LEVEL
        in httpx.get(
            f"{prometheus.base}/api/v1/label/level/values", params={"match[]": "tokenlean_requests_total"}
        ).json()["data"]
    )
