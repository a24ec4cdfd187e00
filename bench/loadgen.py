"""HTTP load from processes of its own, so that the load a study offers is not limited by, nor
part of, the event loop of the process that measures the server.

`generate(...)` (async; `generate_sync` blocks) starts `processes` worker processes
(`python -m bench.loadgen SPEC OUT`), waits until every one is ready, gives them one common start
time and collects what each request got. A worker is an asyncio loop (uvloop when installed) that
speaks HTTP/1.1 over raw sockets with requests prepared in advance, so a request costs it tens of
microseconds, not the milliseconds of a full HTTP client. Two modes:

- open loop: every task gets its own arrival process at `rate / len(tasks)` requests/s (Poisson,
  or evenly spaced), split across the workers; a request is sent at its arrival time whatever
  happened to the ones before it (a new connection when no idle one is at hand), so a slow server
  meets the offered rate, not a rate it set itself;
- closed loop: `concurrency` connections in all, each sending its next request when the last one
  is answered, cycling through the tasks (the sustainable rate).

Per request: its task, which of the task's requests it was, when it was due, when it was sent,
when it was answered (seconds from the common start), the status (0: no response: refused, reset
or timed out, with the reason), why a 503 came (the service's admission, its row queue, or the
connection cap's plain text), and for a 2xx the server's own `queue_ms` and `inference_ms` from the
response's `timings`, its `answer` (VQA) and the compression `level` it ran at. How far sends fell
behind their due times tells whether the generator kept up.

Workers import nothing but the standard library (and uvloop): they start in a few tens of ms.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import random
import re
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

IDLE_S = 2.0  # idle connections older than this are closed, not reused (the server's keep-alive is 5 s)
_TIMINGS = re.compile(rb'"queue_ms":\s*([0-9.eE+-]+),\s*"inference_ms":\s*([0-9.eE+-]+)')
_ANSWER = re.compile(rb'"answer":\s*"((?:[^"\\]|\\.)*)"')
_LEVEL = re.compile(rb'"level":\s*"((?:[^"\\]|\\.)*)"')


# ------------------------------------------------------------------ requests and responses


def http_request(host: str, port: int, path: str, body: bytes, content_type: str) -> bytes:
    """A complete HTTP/1.1 POST, ready to be written to a socket as it is."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    )
    return head.encode("latin-1") + body


@dataclass(frozen=True)
class Head:
    status: int
    length: int | None  # Content-Length; None: chunked or until close
    chunked: bool
    close: bool  # the server closes the connection after this response
    json: bool


def parse_head(raw: bytes) -> Head:
    """The status line and the headers that matter for reading the body and the connection."""
    lines = raw.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ValueError(f"not an HTTP/1.x response: {lines[0][:80]!r}")
    status = int(parts[1])
    length, chunked, close, is_json = None, False, parts[0] == b"HTTP/1.0", False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value
        elif name == b"connection":
            close = b"close" in value
        elif name == b"content-type":
            is_json = value.startswith(b"application/json")
    if length is None and not chunked:
        close = True
    return Head(status, length, chunked, close, is_json)


async def read_body(reader: asyncio.StreamReader, head: Head) -> bytes:
    if head.chunked:
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return b"".join(chunks)
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
    if head.length is not None:
        return await reader.readexactly(head.length)
    return await reader.read()


def server_timings(body: bytes) -> tuple[float, float]:
    """queue_ms, inference_ms of a service response (NaN when absent)."""
    m = _TIMINGS.search(body)
    return (float(m.group(1)), float(m.group(2))) if m else (math.nan, math.nan)


def answer_fields(body: bytes) -> tuple[str, str]:
    """The `answer` (VQA) and the compression `level` of a service response ("" when absent)."""
    found = [rx.search(body) for rx in (_ANSWER, _LEVEL)]
    return tuple(json.loads(b'"' + m.group(1) + b'"') if m else "" for m in found)


def refusal_kind(head: Head, body: bytes) -> str:
    """Why a 503 came: the service's admission (`busy`: too much predicted work queued ahead;
    `queue full`: the task's rows), shutting down, or a plain-text 503 (uvicorn's connection cap)."""
    if not head.json:
        return "plain"
    for marker, kind in (
        (b"queue is full", "queue full"),
        (b"is busy", "busy"),
        (b"shutting down", "shutdown"),
    ):
        if marker in body:
            return kind
    return "json"


# ------------------------------------------------------------------ arrivals


def arrivals(rate: float, seconds: float, rng: random.Random, kind: str = "poisson") -> list[float]:
    """Arrival times in [0, seconds) of one open-loop stream at `rate` per second: Poisson
    (exponential gaps), or evenly spaced from a random phase."""
    if rate <= 0 or seconds <= 0:
        return []
    if kind == "uniform":
        gap = 1.0 / rate
        t, out = rng.random() * gap, []
        while t < seconds:
            out.append(t)
            t += gap
        return out
    if kind != "poisson":
        raise ValueError(f"arrivals: poisson or uniform, not {kind!r}")
    t, out = rng.expovariate(rate), []
    while t < seconds:
        out.append(t)
        t += rng.expovariate(rate)
    return out


# ------------------------------------------------------------------ the worker process


class Recorder:
    def __init__(self):
        self.columns: dict[str, list] = {
            k: []
            for k in (
                "task",
                "request",
                "due",
                "sent",
                "done",
                "status",
                "kind",
                "queue_ms",
                "inference_ms",
                "answer",
                "level",
            )
        }

    def add(
        self,
        task,
        request,
        due,
        sent,
        done,
        status,
        kind="",
        queue_ms=math.nan,
        inference_ms=math.nan,
        answer="",
        level="",
    ):
        values = (task, request, due, sent, done, status, kind, queue_ms, inference_ms, answer, level)
        for k, v in zip(self.columns, values, strict=True):
            self.columns[k].append(v)


class Worker:
    def __init__(self, spec: dict):
        self.host, self.port = spec["host"], spec["port"]
        self.timeout_s = spec["timeout_s"]
        self.requests = {t: [base64.b64decode(r) for r in rs] for t, rs in spec["requests"].items()}
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self.recorder = Recorder()
        self.opened = 0
        self.start = 0.0

    async def _connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        now = time.monotonic()
        while self.idle:
            reader, writer, since = self.idle.pop()
            if now - since < IDLE_S and not writer.is_closing() and not reader.at_eof():
                return reader, writer, True
            writer.close()
        reader, writer = await asyncio.open_connection(self.host, self.port, limit=2**22)
        self.opened += 1
        return reader, writer, False

    async def _exchange(self, raw: bytes) -> tuple[Head, bytes]:
        for attempt in (0, 1):
            reader, writer, reused = await self._connection()
            try:
                writer.write(raw)
                head = parse_head(await reader.readuntil(b"\r\n\r\n"))
                body = await read_body(reader, head)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                writer.close()
                # a kept-alive connection the server closed meanwhile: once more on a new one
                if reused and attempt == 0 and not getattr(exc, "partial", b""):
                    continue
                raise
            except BaseException:
                writer.close()
                raise
            if head.close:
                writer.close()
            else:
                self.idle.append((reader, writer, time.monotonic()))
            return head, body
        raise AssertionError("unreachable")

    async def one(self, task: str, index: int, due: float) -> None:
        reqs = self.requests[task]
        index %= len(reqs)
        sent = time.monotonic() - self.start
        try:
            async with asyncio.timeout(self.timeout_s):
                head, body = await self._exchange(reqs[index])
        except TimeoutError:
            self.recorder.add(task, index, due, sent, time.monotonic() - self.start, 0, "timeout")
            return
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            self.recorder.add(task, index, due, sent, time.monotonic() - self.start, 0, type(exc).__name__)
            return
        done = time.monotonic() - self.start
        kind = refusal_kind(head, body) if head.status == 503 else ""
        ok = 200 <= head.status < 300
        q, inf = server_timings(body) if ok else (math.nan, math.nan)
        answer, level = answer_fields(body) if ok else ("", "")
        self.recorder.add(task, index, due, sent, done, head.status, kind, q, inf, answer, level)

    async def open_loop(self, schedule: list[tuple[float, str, int]]) -> None:
        jobs = []
        for due, task, index in schedule:
            delay = self.start + due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            jobs.append(asyncio.create_task(self.one(task, index, due)))
        await asyncio.gather(*jobs)

    async def closed_loop(self, concurrency: int, seconds: float, offset: int) -> None:
        tasks = sorted(self.requests)

        async def client(k: int) -> None:
            i = k + offset
            while time.monotonic() - self.start < seconds:
                task = tasks[i % len(tasks)]
                await self.one(task, i // len(tasks), time.monotonic() - self.start)
                i += 1

        await asyncio.gather(*(client(k) for k in range(concurrency)))


def schedule_for(spec: dict) -> list[tuple[float, str, int]]:
    """(due, task, request index) of every arrival of this worker, in time order."""
    rng = random.Random(spec["seed"])
    out = []
    for task in sorted(spec["requests"]):
        times = arrivals(spec["rate_per_task"], spec["seconds"], rng, spec["arrivals"])
        out += [(t, task, rng.randrange(1 << 30)) for t in times]
    return sorted(out)


def worker_main(spec_path: str, out_path: str) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    spec = json.loads(Path(spec_path).read_text())
    worker = Worker(spec)
    schedule = schedule_for(spec) if spec["mode"] == "open" else []
    try:
        import uvloop

        new_loop = uvloop.new_event_loop
    except ImportError:
        new_loop = asyncio.new_event_loop
    print("ready", flush=True)
    start_at = float(sys.stdin.readline())  # a time.monotonic() value, the same clock in every process

    async def run() -> None:
        worker.start = start_at
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        if spec["mode"] == "open":
            await worker.open_loop(schedule)
        else:
            await worker.closed_loop(spec["concurrency"], spec["seconds"], spec["seed"])

    loop = new_loop()
    try:
        loop.run_until_complete(run())
    finally:
        loop.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    Path(out_path).write_text(
        json.dumps(
            {
                "records": worker.recorder.columns,
                "connections_opened": worker.opened,
                "cpu_s": usage.ru_utime + usage.ru_stime,
            }
        )
    )


# ------------------------------------------------------------------ the parent side


@dataclass
class LoadRun:
    mode: str
    seconds: float
    processes: int
    aimed_rate: float | None  # open loop: requests/s over every task
    concurrency: int | None
    records: dict[str, list] = field(default_factory=dict)
    connections_opened: int = 0
    generator_cpu_s: float = 0.0

    def __len__(self) -> int:
        return len(self.records.get("task", []))


async def generate(
    host: str,
    port: int,
    requests: dict[str, list[bytes]],
    *,
    mode: str,
    seconds: float,
    rate: float | None = None,
    concurrency: int | None = None,
    processes: int = 2,
    seed: int = 0,
    timeout_s: float = 60.0,
    arrivals_kind: str = "poisson",
) -> LoadRun:
    """Load the server from `processes` worker processes. `requests`: per task, complete HTTP
    requests (see `http_request`); open loop: `rate` requests/s over all tasks, each task alike;
    closed loop: `concurrency` connections in all."""
    if mode not in ("open", "closed"):
        raise ValueError(f"mode: open or closed, not {mode!r}")
    if mode == "open" and not (rate and rate > 0):
        raise ValueError("an open loop needs a positive rate")
    if mode == "closed" and not (concurrency and concurrency > 0):
        raise ValueError("a closed loop needs a positive concurrency")
    processes = max(1, min(processes, concurrency or processes))
    encoded = {t: [base64.b64encode(r).decode() for r in rs] for t, rs in requests.items()}
    with tempfile.TemporaryDirectory(prefix="loadgen-") as tmp:
        procs, outs = [], []
        for k in range(processes):
            if mode == "closed":
                share = concurrency // processes + (k < concurrency % processes)
            spec = {
                "host": host,
                "port": port,
                "mode": mode,
                "seconds": seconds,
                "rate_per_task": (rate or 0.0) / len(requests) / processes,
                "concurrency": share if mode == "closed" else 0,
                "arrivals": arrivals_kind,
                "seed": seed * 1000 + k,
                "timeout_s": timeout_s,
                "requests": encoded,
            }
            spec_path, out = Path(tmp) / f"spec{k}.json", Path(tmp) / f"out{k}.json"
            spec_path.write_text(json.dumps(spec))
            outs.append(out)
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "bench.loadgen",
                    str(spec_path),
                    str(out),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    cwd=Path(__file__).resolve().parents[1],
                    env={**os.environ, "PYTHONHASHSEED": "0"},
                )
            )
        try:
            for proc in procs:
                line = await asyncio.wait_for(proc.stdout.readline(), timeout=60)
                if line.strip() != b"ready":
                    raise RuntimeError(f"load generator did not start: {line!r}")
            start_at = time.monotonic() + 0.25
            for proc in procs:
                proc.stdin.write(f"{start_at!r}\n".encode())
                await proc.stdin.drain()
            codes = [await proc.wait() for proc in procs]
        except BaseException:
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            raise
        if any(codes):
            raise RuntimeError(f"load generator processes exited with {codes}")
        run = LoadRun(mode, seconds, processes, rate if mode == "open" else None, concurrency)
        for out in outs:
            part = json.loads(out.read_text())
            for k, values in part["records"].items():
                run.records.setdefault(k, []).extend(values)
            run.connections_opened += part["connections_opened"]
            run.generator_cpu_s += part["cpu_s"]
    return run


def generate_sync(*args, **kwargs) -> LoadRun:
    return asyncio.run(generate(*args, **kwargs))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0].startswith("-"):
        print(
            "usage: python -m bench.loadgen SPEC OUT\n\n"
            "A load generator worker process, started by bench.loadgen.generate() (see "
            "python -m bench.reliability); not meant to be run by hand.",
            file=sys.stderr if argv[:1] not in (["-h"], ["--help"]) else sys.stdout,
        )
        raise SystemExit(0 if argv[:1] in (["-h"], ["--help"]) else 2)
    worker_main(*argv)


if __name__ == "__main__":
    main()
