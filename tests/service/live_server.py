"""`tokenlean serve` as a subprocess for the tests that need a real server (sockets, signals, exit
codes, logs), and raw HTTP/1.1 over sockets for clients that misbehave. Waits are bounded by
generous timeouts; nothing asserts on how fast anything happens."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.server import free_port

READY_TIMEOUT_S = 120


def command() -> list[str]:
    exe = shutil.which("tokenlean", path=os.path.dirname(sys.executable))
    return [exe] if exe else [sys.executable, "-m", "app.cli"]


@dataclass
class LiveServer:
    proc: subprocess.Popen
    port: int
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_lines(self) -> list[dict]:
        """The JSON log lines so far (uvicorn's and ours)."""
        lines = []
        for line in self.log.read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                lines.append({"level": "raw", "message": line})
        return lines

    def metrics(self) -> dict:
        text = httpx.get(f"{self.base}/metrics", timeout=10).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def count(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples whose labels include these."""
        return sum(
            v for (n, ls), v in self.metrics().items() if n == name and labels.items() <= dict(ls).items()
        )

    def terminate(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise


# Settings a live server takes from the test session (tests/conftest.py lifts the admission
# limits); every other TOKENLEAN_* variable of the environment is dropped.
INHERITED = ("TOKENLEAN_BATCHING__MAX_EVENT_LOOP_LAG_MS", "TOKENLEAN_BATCHING__MAX_QUEUE_WAIT_MS")


def start(tmp: Path, **env: str) -> LiveServer:
    """A server on a free port with JSON logs in tmp/serve.log and these TOKENLEAN_* settings (and
    the session's INHERITED ones); returns once /readyz answers 200."""
    port = free_port()
    log = tmp / f"serve-{port}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENLEAN_") or k in INHERITED}
    full_env.update({"TOKENLEAN_PORT": str(port), "TOKENLEAN_LOG_FORMAT": "json", **env})
    with log.open("wb") as out:
        proc = subprocess.Popen([*command(), "serve"], env=full_env, stdout=out, stderr=subprocess.STDOUT)
    server = LiveServer(proc, port, log)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{server.base}/readyz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    server.proc.kill()
    raise AssertionError(f"the server did not become ready:\n{log.read_text()[-4000:]}")


def wait_until(check, timeout: float = 60, what: str = "a condition", then=None):
    """Polls `check` until it is truthy; on timeout fails, showing `then()` if given."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.05)
    seen = f": {then()}" if then else ""
    raise AssertionError(f"timed out waiting for {what}{seen}")


# ------------------------------------------------------------------ raw HTTP


def open_request(port: int, path: str, content_length: int, content_type: str = "application/json"):
    """A socket that has sent a POST's head announcing `content_length` bytes, and no body yet."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {content_length}\r\n\r\n"
    )
    sock.sendall(head.encode())
    return sock


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


def read_response(sock: socket.socket) -> RawResponse:
    """One HTTP/1.1 response (Content-Length framed) from the socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response head: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", 0))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return RawResponse(int(status_line.split()[1]), headers, body)


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the server has closed the connection (EOF or reset)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
