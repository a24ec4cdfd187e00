"""A `tokenlean serve` process for the serving studies: started on a free port, ready when its
/readyz says so."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen:
    """The service with its defaults (plus `env`), logging to `log` (discarded when None)."""
    exe = Path(sys.executable).with_name("tokenlean")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "app.cli"]
    env = {**os.environ, "TOKENLEAN_LOG_LEVEL": "warning", **(env or {})}
    out = open(log, "w") if log else subprocess.DEVNULL  # the child keeps it open
    proc = subprocess.Popen(
        [*cmd, "serve", "--port", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT
    )
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
