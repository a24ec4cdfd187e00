"""bench.reliability and its load generator (bench/loadgen.py): open and closed loops from worker
processes against a stub server, the figures and bars computed from what they record, and a
seconds-long smoke of the whole benchmark against a real `tokenlean serve`. Nothing here asserts
on how fast anything ran."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from bench import loadgen, reliability
from bench.loadgen import Head, LoadRun, arrivals, generate, http_request, parse_head, refusal_kind
from models.demo.paths import CHECKPOINTS, VIT_CLASSIFY

ROOT = Path(__file__).resolve().parents[2]
TASKS = reliability.TASKS


# ------------------------------------------------------------------ the command


def test_help_says_how_to_run_the_full_and_the_short_measurement_without_loading_torch():
    code = (
        "import contextlib, io, sys\n"
        "from bench import reliability\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    reliability.main(['--help'])\n"
        "print(out.getvalue())\n"
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    text, loaded = done.stdout.rsplit("\n", 2)[0], done.stdout.strip().splitlines()[-1]
    assert loaded == "[]"
    assert "python -m bench.reliability\n" in text  # the full measurement
    assert "python -m bench.reliability --quick" in text
    for option in ("--soak-seconds", "--body-timeout-s", "--step-seconds", "--factors", "--processes"):
        assert option in text


@pytest.mark.parametrize("argv", [["--factors", "1,x"], ["--factors", "0,3"]])
def test_bad_factors_are_refused_before_anything_runs(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        reliability.parse_args(argv)
    assert exited.value.code == 2 and "--factors" in capsys.readouterr().err


def test_quick_and_full_presets_and_the_quick_output_folder():
    full, quick = reliability.parse_args([]), reliability.parse_args(["--quick", "--soak-seconds", "5"])
    assert full.soak_seconds == 600 and full.body_timeout_s is None  # the server's own body timeout
    assert full.out == Path("bench/results/reliability.json")
    assert quick.soak_seconds == 5 and quick.body_timeout_s == 3
    assert quick.out == Path("bench/results/quick/reliability.json")


def test_the_bars_are_measured_against_the_limits_the_server_will_read(monkeypatch):
    monkeypatch.setenv("TOKENLEAN_BATCHING__MAX_QUEUE_WAIT_MS", "1500")
    env, limits = reliability.server_env(reliability.parse_args(["--body-timeout-s", "7"]))
    assert limits["max_queue_wait_ms"] == 1500 and limits["body_timeout_s"] == 7
    assert env["TOKENLEAN_LIMITS__BODY_TIMEOUT_S"] == "7"
    env, limits = reliability.server_env(reliability.parse_args(["--max-queue-wait-ms", "900"]))
    assert limits["max_queue_wait_ms"] == 900 and env["TOKENLEAN_BATCHING__MAX_QUEUE_WAIT_MS"] == "900"


# ------------------------------------------------------------------ load generator: pieces


def test_arrivals_poisson_and_uniform():
    times = arrivals(1000, 10, random.Random(1))
    assert times == sorted(times) and 0 <= times[0] and times[-1] < 10
    assert abs(len(times) - 10_000) < 500  # seeded: the same list every time
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert abs(sum(gaps) / len(gaps) - 1e-3) < 1e-4
    even = arrivals(50, 2, random.Random(2), "uniform")
    assert len(even) == 100 and all(abs(b - a - 0.02) < 1e-9 for a, b in zip(even, even[1:], strict=False))
    assert arrivals(0, 5, random.Random(0)) == []
    with pytest.raises(ValueError):
        arrivals(1, 1, random.Random(0), "bursty")


def test_response_heads():
    head = parse_head(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 12\r\n\r\n")
    assert head == Head(200, 12, False, False, True)
    head = parse_head(
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Connection: close\r\nContent-Length: 19\r\n\r\n"
    )
    assert head.status == 503 and head.close and not head.json
    head = parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert head.chunked and head.length is None and not head.close
    assert parse_head(b"HTTP/1.1 204 No Content\r\n\r\n").close  # no length: read until close
    with pytest.raises(ValueError):
        parse_head(b"SSH-2.0-OpenSSH\r\n\r\n")


def test_refusals_are_told_apart():
    json_head, plain = Head(503, 10, False, False, True), Head(503, 10, False, True, False)
    assert refusal_kind(json_head, b'{"error": {"message": "the server is busy: 2.1 s of work"}}') == "busy"
    assert (
        refusal_kind(json_head, b'{"error": {"message": "the request queue is full; retry"}}') == "queue full"
    )
    assert refusal_kind(json_head, b'{"error": {"message": "the server is shutting down"}}') == "shutdown"
    assert refusal_kind(plain, b"Service Unavailable") == "plain"
    assert loadgen.server_timings(b'"timings": {"queue_ms": 1.5, "inference_ms": 20.25, "total_ms": 30}') == (
        1.5,
        20.25,
    )
    assert all(math.isnan(v) for v in loadgen.server_timings(b"{}"))


def test_worker_help_and_bad_arguments():
    with pytest.raises(SystemExit) as exited:
        loadgen.main(["--help"])
    assert exited.value.code == 0
    with pytest.raises(SystemExit) as exited:
        loadgen.main(["only-one"])
    assert exited.value.code == 2


# ------------------------------------------------------------------ load generator: against a stub server


async def stub_server(counts: Counter):
    """vqa: 200 with timings (keep-alive); retrieval: the service's JSON 503 (keep-alive);
    classify: a plain-text 503 that closes the connection, as uvicorn's connection cap does."""

    async def handle(reader, writer):
        counts["connections"] += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                path = lines[0].split()[1].decode()
                length = next(int(x.split(b":")[1]) for x in lines if x.lower().startswith(b"content-length"))
                await reader.readexactly(length)
                counts[path] += 1
                if path == "/v1/vqa":
                    body = (
                        b'{"answer": "x", "timings": {"queue_ms": 1.5, "inference_ms": 2.5, "total_ms": 5}}'
                    )
                    status, ctype, close = "200 OK", "application/json", False
                elif path == "/v1/retrieval":
                    body = b'{"error": {"code": "overloaded", "message": "the server is busy: 3 s"}}'
                    status, ctype, close = "503 Service Unavailable", "application/json", False
                else:
                    body, status, ctype, close = (
                        b"Service Unavailable",
                        "503 Service Unavailable",
                        "text/plain",
                        True,
                    )
                writer.write(
                    f"HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
                    f"{'connection: close' + chr(13) + chr(10) if close else ''}\r\n".encode()
                    + body
                )
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def stub_requests(port: int) -> dict[str, list[bytes]]:
    return {
        t: [
            http_request("127.0.0.1", port, f"/v1/{t}", f"body {t} {i}".encode(), "text/plain")
            for i in range(3)
        ]
        for t in TASKS
    }


def against_stub(counts: Counter, **load) -> LoadRun:
    """`generate(**load)` against a stub server that counts what it answers into `counts`."""

    async def main() -> LoadRun:
        server = await stub_server(counts)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await generate("127.0.0.1", port, stub_requests(port), **load)

    return asyncio.run(main())


def test_open_loop_from_worker_processes_sends_every_scheduled_request_and_records_each_answer():
    counts: Counter = Counter()
    run = against_stub(counts, mode="open", rate=240, seconds=1.0, processes=2, seed=3)
    # every task alike: each worker's share of each task's arrivals, as the workers scheduled them
    expected: Counter = Counter()
    for k in range(2):
        spec = {
            "requests": dict.fromkeys(TASKS, []),
            "rate_per_task": 240 / 3 / 2,
            "seconds": 1.0,
            "arrivals": "poisson",
            "seed": 3 * 1000 + k,
        }
        expected.update(task for _, task, _ in loadgen.schedule_for(spec))
    assert Counter(run.records["task"]) == expected
    assert {len(v) for v in run.records.values()} == {len(run)}
    assert counts["/v1/vqa"] == expected["vqa"] and counts["/v1/classify"] == expected["classify"]
    rows = list(
        zip(*(run.records[k] for k in ("task", "status", "kind", "queue_ms", "inference_ms")), strict=True)
    )
    assert {(t, s, k) for t, s, k, _, _ in rows} == {
        ("vqa", 200, ""),
        ("retrieval", 503, "busy"),
        ("classify", 503, "plain"),
    }
    assert all((q, i) == (1.5, 2.5) for t, _, _, q, i in rows if t == "vqa")
    assert run.connections_opened == counts["connections"] >= expected["classify"]
    assert all(
        0 <= due < 1.0 and done >= sent
        for due, sent, done in zip(run.records["due"], run.records["sent"], run.records["done"], strict=True)
    )

    summary = reliability.load_summary(run)
    assert summary["aimed_rate"] == 240 and summary["all"]["sent"] == len(run)
    assert summary["per_task"]["vqa"]["refused_share"] == 0
    assert summary["per_task"]["retrieval"]["refused_by"] == {"busy": expected["retrieval"]}
    assert summary["per_task"]["classify"]["refused_plain_503"] == expected["classify"]
    assert summary["per_task"]["vqa"]["server_queue_ms"]["p99"] == 1.5


def test_closed_loop_keeps_its_connections_busy_with_the_tasks_in_turn():
    counts: Counter = Counter()
    run = against_stub(counts, mode="closed", concurrency=3, seconds=0.3, processes=2)
    per_task = Counter(run.records["task"])
    assert set(per_task) == set(TASKS)
    assert max(per_task.values()) - min(per_task.values()) <= 3  # each connection cycles the tasks
    assert set(run.records["status"]) == {200, 503}
    assert run.processes == 2 and run.concurrency == 3


def test_a_load_needs_its_rate_or_concurrency():
    with pytest.raises(ValueError):
        asyncio.run(generate("127.0.0.1", 1, {}, mode="open", seconds=1))
    with pytest.raises(ValueError):
        asyncio.run(generate("127.0.0.1", 1, {}, mode="closed", seconds=1))
    with pytest.raises(ValueError):
        asyncio.run(generate("127.0.0.1", 1, {}, mode="sideways", seconds=1, rate=1))


def test_a_server_that_is_not_there_is_recorded_as_no_response():
    from bench.server import free_port

    port = free_port()
    run = asyncio.run(
        generate("127.0.0.1", port, stub_requests(port), mode="open", rate=30, seconds=0.3, processes=1)
    )
    assert len(run) and set(run.records["status"]) == {0}
    assert set(run.records["kind"]) == {"ConnectionRefusedError"}


# ------------------------------------------------------------------ figures and bars


def synthetic_run(seconds: float, rows: list[tuple], aimed: float | None = None) -> LoadRun:
    """rows: (task, status, latency s, kind, queue_ms, inference_ms)."""
    run = LoadRun("open", seconds, 2, aimed, None)
    cols = {k: [] for k in ("task", "due", "sent", "done", "status", "kind", "queue_ms", "inference_ms")}
    for i, (task, status, latency, kind, q, inf) in enumerate(rows):
        due = i * seconds / len(rows)
        for k, v in zip(cols, (task, due, due, due + latency, status, kind, q, inf), strict=True):
            cols[k].append(v)
    run.records = cols
    return run


def rows_for(accepted_s: dict[str, float], refused: dict[str, int], n: int = 100, status_500: int = 0):
    rows = []
    for task in TASKS:
        for i in range(n):
            if i < refused[task]:
                rows.append((task, 503, 0.01, "busy", math.nan, math.nan))
            elif i < refused[task] + (status_500 if task == "vqa" else 0):
                rows.append((task, 500, 0.02, "", math.nan, math.nan))
            else:
                rows.append((task, 200, accepted_s[task], "", accepted_s[task] * 800, 100.0))
    return rows


def report_with(
    top: LoadRun, soak_rss: list[float] | None = None, slow_outcome="HTTP/1.1 408 Request Timeout"
):
    quiet = reliability.load_summary(
        synthetic_run(1.0, rows_for(dict.fromkeys(TASKS, 0.05), dict.fromkeys(TASKS, 0)))
    )
    rss = reliability.soak_growth(soak_rss or [500.0] * 40)
    return {
        "limits": {"max_queue_wait_ms": 2000.0, "body_timeout_s": 3.0},
        "sustainable": {"rate": 300.0, **quiet},
        "ladder": [{"factor": 1.0, **quiet}, {"factor": 10.0, **reliability.load_summary(top)}],
        "slow_bodies": {
            "clients": 4,
            "body_timeout_s": 3.0,
            "watched_s": 5.0,
            "outcomes": {slow_outcome: 4},
            "closed_by_server": 4,
            "answered_after_s": {"min": 3.0, "p50": 3.0, "max": 3.01},
            "normal_traffic_meanwhile": quiet,
        },
        "aborted_uploads": {"clients": 4, "server_counted_during_hostile_phase": {"408": 4, "499": 4}},
        "large_images": {
            "image": "6000x4000 JPEG",
            "bytes": 1,
            "clients": 2,
            "status": {"200": 2},
            "rss_before_mb": 1,
            "rss_peak_mb": 1,
            "rss_after_mb": 1,
        },
        "soak": {**quiet, "aimed_rate": 150.0, "seconds": 20.0, "rss": rss},
        "rss": {},
        "server": {"exit_code": 0, "error_lines": 0, "errors": {}},
    }


def verdicts(report: dict) -> dict[str, bool | None]:
    return {
        b["bar"].split(" ", 1)[1] if b["bar"].startswith("10x") else b["bar"]: b["passed"]
        for b in reliability.evaluate(report)
    }


def test_bars_pass_on_a_server_that_meets_them():
    top = synthetic_run(1.0, rows_for(dict.fromkeys(TASKS, 0.5), dict.fromkeys(TASKS, 90)), aimed=300)
    report = report_with(top)
    assert set(verdicts(report).values()) == {True}, reliability.evaluate(report)
    text = reliability.markdown({**report, "bars": reliability.evaluate(report)})
    assert text.count("**pass**") == 7 and "| 10x (300 aimed) | all | 300.0 /" in text


def test_each_bar_fails_on_its_own_figure():
    slow_classify = {"vqa": 0.5, "retrieval": 0.5, "classify": 2.3}  # > 2000 ms + batch p99 100 ms
    v = verdicts(
        report_with(synthetic_run(1.0, rows_for(slow_classify, dict.fromkeys(TASKS, 90)), aimed=300))
    )
    assert v["R accepted p99 <= max queue wait + one batch"] is False
    assert v["R refused answered < 50 ms p99"] is True

    unfair = {"vqa": 80, "retrieval": 95, "classify": 80}
    v = verdicts(report_with(synthetic_run(1.0, rows_for(dict.fromkeys(TASKS, 0.5), unfair), aimed=300)))
    assert v["R tasks treated alike"] is False

    v = verdicts(
        report_with(
            synthetic_run(
                1.0, rows_for(dict.fromkeys(TASKS, 0.5), dict.fromkeys(TASKS, 90), status_500=1), aimed=300
            )
        )
    )
    assert v["no 500"] is False

    under_offered = synthetic_run(
        1.0, rows_for(dict.fromkeys(TASKS, 0.5), dict.fromkeys(TASKS, 90)), aimed=400
    )
    assert verdicts(report_with(under_offered))["R offered as aimed"] is False

    refused_late = rows_for(dict.fromkeys(TASKS, 0.5), dict.fromkeys(TASKS, 90))
    refused_late = [(t, s, 0.2 if s == 503 else lat, k, q, i) for t, s, lat, k, q, i in refused_late]
    assert (
        verdicts(report_with(synthetic_run(1.0, refused_late, aimed=300)))["R refused answered < 50 ms p99"]
        is False
    )

    ok = synthetic_run(1.0, rows_for(dict.fromkeys(TASKS, 0.5), dict.fromkeys(TASKS, 90)), aimed=300)
    growing = [500.0 + i for i in range(40)]
    assert verdicts(report_with(ok, soak_rss=growing))["soak RSS not growing"] is False
    assert verdicts(report_with(ok, slow_outcome="still open"))["slow bodies never held"] is False
    # refused on arrival (before its body) is as good as cut: it holds nothing
    refused = report_with(ok, slow_outcome="HTTP/1.1 503 Service Unavailable")
    assert verdicts(refused)["slow bodies never held"] is True


def test_server_errors_are_counted_by_message_and_exception():
    lines = [
        json.dumps({"level": "info", "message": "GET /metrics"}),
        json.dumps(
            {
                "level": "error",
                "message": "unhandled error on POST /v1/vqa",
                "exception": "Traceback ...\nValueError: Unable to create tensor",
            }
        ),
        json.dumps(
            {
                "level": "error",
                "message": "unhandled error on POST /v1/vqa",
                "exception": "Traceback ...\nValueError: Unable to create tensor",
            }
        ),
        "not json",
    ]
    assert reliability.server_errors(lines) == (
        2,
        {"unhandled error on POST /v1/vqa: ValueError: Unable to create tensor": 2},
    )


# ------------------------------------------------------------------ the whole benchmark, for seconds


def test_a_seconds_long_run_against_a_real_server(tmp_path, monkeypatch):
    # The harness, not the defaults' speed: the small classifier keeps every task busy in 1 s steps.
    monkeypatch.setenv("TOKENLEAN_MODELS__CLASSIFY__CHECKPOINT", str(CHECKPOINTS / VIT_CLASSIFY))
    out = tmp_path / "reliability.json"
    argv = [
        "--quick",
        "--rate-seconds",
        "1",
        "--step-seconds",
        "1",
        "--factors",
        "1,3",
        "--soak-seconds",
        "2",
        "--body-timeout-s",
        "1",
        "--hostile-clients",
        "2",
        "--large-clients",
        "1",
        "--out",
        str(out),
    ]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        reliability.main(argv)
    result = json.loads(out.read_text())
    assert result["quick"] and result["limits"]["body_timeout_s"] == 1
    assert [s["factor"] for s in result["ladder"]] == [1, 3]
    for step in result["ladder"]:
        assert set(step["per_task"]) == set(TASKS) and step["mode"] == "open" and step["processes"] == 2
        assert all(step["per_task"][t]["sent"] > 0 for t in TASKS)
    slow = result["slow_bodies"]
    assert slow["watched_s"] > slow["body_timeout_s"]
    assert slow["outcomes"] == {"HTTP/1.1 408 Request Timeout": 2} and slow["closed_by_server"] == 2
    assert result["aborted_uploads"]["server_counted_during_hostile_phase"]["499"] == 2
    bars = {b["bar"]: b["passed"] for b in result["bars"]}
    assert len(bars) == 7 and bars["no 500"] is True and bars["slow bodies never held"] is True
    assert result["server"]["exit_code"] == 0
    assert out.with_suffix(".md").read_text() in printed.getvalue()
    assert "PASS  no 500" in printed.getvalue()


def test_a_task_without_requests_still_has_every_figure():
    run = synthetic_run(1.0, [("vqa", 200, 0.1, "", 1.0, 2.0)], aimed=3)
    summary = reliability.load_summary(run)
    assert summary["per_task"]["classify"].keys() == summary["per_task"]["vqa"].keys()
    assert summary["per_task"]["classify"]["sent"] == 0
    reliability._row("", "classify", summary["per_task"]["classify"])  # renders
