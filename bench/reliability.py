"""Reliability of `tokenlean serve` (embedded demo models, CPU) under overload, hostile clients and
a long soak, every figure from one run against one server process, and the bars it must meet.

Full measurement (about 13 minutes; run it on an otherwise idle machine, it writes the committed
bench/results/reliability.json and .md):

    python -m bench.reliability

Short run (about 1 minute; writes bench/results/quick/, which git ignores):

    python -m bench.reliability --quick

Every phase's length can be set on its own (e.g. `--soak-seconds 120`). The load comes from
separate load-generator processes (bench/loadgen.py: HTTP/1.1 over raw sockets, open loop at a
fixed arrival rate per task), never from this process's event loop; vqa, retrieval and classify
are loaded alike and reported separately.

1. sustainable rate R: a closed loop at concurrency 16, the tasks in turn, R = answers 2xx per s;
2. overload ladder: open-loop Poisson arrivals at 1x, 3x and 10x R (R/3 per task), per task:
   offered and answered rates, how far the generator fell behind its schedule, status counts,
   p50/p99 of accepted and of refused requests, refusal share, the server's queue and batch time;
3. slow bodies: clients that send their headers and half a body, then stall, watched for longer
   than the server's body timeout (`--body-timeout-s`, default the server's own), while normal
   traffic runs; then clients that send half a body and hang up (aborted uploads);
4. a wave of large images (concurrent 24-megapixel JPEGs): resident memory before, peak, after;
5. soak: an open loop at R/2 for `--soak-seconds` (600 in the full run), RSS sampled throughout.

Bars (printed PASS/FAIL with their figures, and stored in the JSON): at 10x R the generator
offered the rate it aimed at; accepted requests' p99 <= batching.max_queue_wait_ms + one batch
time (p99 of the model-call time those requests report) for every task; refused (503) requests
answered within 50 ms p99; refusal shares of the tasks within 10 points of each other; no 500 in
any phase; every slow body cut (408 and closed) once the body timeout passed; RSS not growing
over the soak.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import math
import signal
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageDraw
from prometheus_client.parser import text_string_to_metric_families

from bench.loadgen import LoadRun, generate, http_request
from bench.server import free_port, rss_bytes, start_server

TASKS = ("vqa", "retrieval", "classify")
HOST = "127.0.0.1"
CAPTION_SETS = (  # two text lengths, so retrieval batches fall in both padded lengths
    ("a red circle", "a blue rectangle", "a green triangle", "a gray circle"),
    (
        "a small red circle drawn on a plain white background",
        "a large blue rectangle drawn on a plain white background",
        "a green triangle pointing up on a white background",
        "a gray circle next to nothing else at all",
    ),
)
REFUSED_P99_MS = 50.0
TASK_SPREAD = 0.10  # largest difference of refusal shares between two tasks
OFFERED_MIN = 0.95  # of the aimed rate
LAG_P99_MS = 50.0  # how far behind schedule the generator may send (p99)
RSS_GROWTH = 0.02  # soak: last quarter's mean RSS over the second quarter's, at most
SLOW_BODY_SLACK_S = 2.0  # a stalled body is cut within the body timeout plus this

FULL = {
    "rate_seconds": 15.0,
    "step_seconds": 20.0,
    "soak_seconds": 600.0,
    "hostile_clients": 50,
    "large_clients": 6,
    "body_timeout_s": None,
    "rss_every_s": 1.0,
}
QUICK = {
    "rate_seconds": 3.0,
    "step_seconds": 4.0,
    "soak_seconds": 20.0,
    "hostile_clients": 4,
    "large_clients": 2,
    "body_timeout_s": 3.0,
    "rss_every_s": 0.5,
}
RESULTS = Path("bench/results")


# ------------------------------------------------------------------ requests


def multipart(files: list[tuple[str, bytes]], fields: dict) -> tuple[bytes, str]:
    request = httpx.Request("POST", "http://x/", files=[(k, ("i.png", v)) for k, v in files], data=fields)
    return request.read(), request.headers["content-type"]


def task_requests(port: int, per_task: int) -> dict[str, list[bytes]]:
    """Per task, complete HTTP requests built from easy-VQA test images and questions: VQA
    questions of every length in the split (both padded text lengths), retrieval with short and long
    caption sets, classification at `medium`."""
    from models.demo import data  # numpy only; the server process loads the models

    split = data.load_split("test")
    order = sorted(range(len(split.questions)), key=lambda i: len(split.questions[i]))
    picks = [order[round(k * (len(order) - 1) / max(per_task - 1, 1))] for k in range(per_task)]
    out: dict[str, list[bytes]] = {t: [] for t in TASKS}
    for k, i in enumerate(picks):
        buf = io.BytesIO()
        Image.fromarray(split.images[split.question_image[i]]).save(buf, "PNG")
        png = buf.getvalue()
        bodies = {
            "vqa": multipart([("image", png)], {"question": split.questions[i]}),
            "retrieval": multipart([("image", png)], {"texts": list(CAPTION_SETS[k % 2])}),
            "classify": multipart([("image", png)], {"compression": "medium"}),
        }
        for task, (body, content_type) in bodies.items():
            out[task].append(http_request(HOST, port, f"/v1/{task}", body, content_type))
    return out


def large_jpeg(width: int = 6000, height: int = 4000) -> bytes:
    """A legal photo-sized JPEG: a gradient with shapes (compresses to a few MB at most)."""
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    draw = ImageDraw.Draw(image)
    for i in range(12):
        x, y = (i * 487) % (width - 800), (i * 331) % (height - 800)
        draw.ellipse((x, y, x + 700, y + 700), fill=(200, 40 * (i % 6), 90))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=85)
    return buf.getvalue()


# ------------------------------------------------------------------ figures


def pct(values, q: float) -> float | None:
    values = [v for v in values if not math.isnan(v)]
    return round(float(np.percentile(values, q)), 1) if values else None


def figures(run: LoadRun, task: str | None = None) -> dict:
    """One task's (or, with None, every task's) requests of a load run."""
    r = {k: np.asarray(v) for k, v in run.records.items()}
    sel = np.ones(len(run), bool) if task is None else r["task"] == task
    if len(run) == 0 or not sel.any():
        return EMPTY_FIGURES
    status, sent, done, due = r["status"][sel], r["sent"][sel], r["done"][sel], r["due"][sel]
    kind = r["kind"][sel]
    ms = (done - sent) * 1e3
    ok, refused = (status >= 200) & (status < 300), status == 503
    span = max(float(done.max() - min(sent.min(), 0.0)), 1e-9)
    counts = Counter(int(s) for s in status)
    lag = (sent - due) * 1e3
    return {
        "sent": int(sel.sum()),
        "offered_rate": round(int(sel.sum()) / run.seconds, 1),
        "answered_rate": round(int((status > 0).sum()) / span, 1),
        "goodput": round(int(ok.sum()) / span, 1),
        "send_lag_ms": {"p50": pct(lag, 50), "p99": pct(lag, 99), "max": round(float(lag.max()), 1)},
        "status": {str(k): v for k, v in sorted(counts.items())},
        "no_response": dict(Counter(str(k) for k in kind[status == 0])),
        "refused_plain_503": int((refused & (kind == "plain")).sum()),
        "refused_by": dict(Counter(str(k) for k in kind[refused])),
        "server_errors_500": counts.get(500, 0),
        "accepted": {
            "count": int(ok.sum()),
            "p50_ms": pct(ms[ok], 50),
            "p99_ms": pct(ms[ok], 99),
            "max_ms": pct(ms[ok], 100),
        },
        "refused": {
            "count": int(refused.sum()),
            "p50_ms": pct(ms[refused], 50),
            "p99_ms": pct(ms[refused], 99),
        },
        "refused_share": round(float(refused.sum()) / int(sel.sum()), 3),
        "server_queue_ms": {"p50": pct(r["queue_ms"][sel][ok], 50), "p99": pct(r["queue_ms"][sel][ok], 99)},
        "batch_ms": {"p50": pct(r["inference_ms"][sel][ok], 50), "p99": pct(r["inference_ms"][sel][ok], 99)},
    }


EMPTY_FIGURES = {
    "sent": 0,
    "offered_rate": 0.0,
    "answered_rate": 0.0,
    "goodput": 0.0,
    "send_lag_ms": {"p50": None, "p99": None, "max": None},
    "status": {},
    "no_response": {},
    "refused_plain_503": 0,
    "refused_by": {},
    "server_errors_500": 0,
    "accepted": {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None},
    "refused": {"count": 0, "p50_ms": None, "p99_ms": None},
    "refused_share": 0.0,
    "server_queue_ms": {"p50": None, "p99": None},
    "batch_ms": {"p50": None, "p99": None},
}


def load_summary(run: LoadRun) -> dict:
    return {
        "mode": run.mode,
        "seconds": run.seconds,
        "processes": run.processes,
        "aimed_rate": None if run.aimed_rate is None else round(run.aimed_rate, 1),
        "concurrency": run.concurrency,
        "connections_opened": run.connections_opened,
        "generator_cpu_s": round(run.generator_cpu_s, 2),
        "all": figures(run),
        "per_task": {t: figures(run, t) for t in TASKS},
    }


# ------------------------------------------------------------------ the server side


def scrape(base: str) -> dict:
    """Requests counted by status, and the queue depth of every task, from /metrics."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    totals: Counter = Counter()
    depth = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "tokenlean_requests_total":
                totals[s.labels.get("status", "?")] += s.value
            elif s.name == "tokenlean_queue_depth":
                depth += s.value
    return {"requests": dict(totals), "queue_depth": depth}


def counted_between(before: dict, after: dict) -> dict:
    b, a = before["requests"], after["requests"]
    return {k: int(a[k] - b.get(k, 0)) for k in sorted(a) if a[k] != b.get(k, 0)}


async def drained(base: str, timeout_s: float = 60.0) -> None:
    """Until no task has anything queued (then a second more)."""
    stop = time.monotonic() + timeout_s
    while time.monotonic() < stop:
        if (await asyncio.to_thread(scrape, base))["queue_depth"] == 0:
            break
        await asyncio.sleep(0.5)
    await asyncio.sleep(1.0)


class RSS:
    """Resident memory of the server, sampled every `every` s in the background."""

    def __init__(self, pid: int, every: float):
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, float]] = []  # (monotonic time, MB)
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            self.samples.append((time.monotonic(), rss_bytes(self.pid) / 2**20))
            await asyncio.sleep(self.every)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def between(self, t0: float, t1: float) -> list[float]:
        return [mb for t, mb in self.samples if t0 <= t <= t1]

    def phase(self, t0: float, t1: float) -> dict:
        mb = self.between(t0, t1) or [rss_bytes(self.pid) / 2**20]
        return {"before_mb": round(mb[0], 1), "peak_mb": round(max(mb), 1), "after_mb": round(mb[-1], 1)}


def soak_growth(mb: list[float]) -> dict:
    """Mean RSS of the soak's last quarter against its second quarter (the first is warm-up), and
    the least-squares slope over the last three quarters."""
    if len(mb) < 8:
        return {"samples": len(mb), "second_quarter_mb": None, "last_quarter_mb": None, "growth": None}
    q = len(mb) // 4
    second, last = float(np.mean(mb[q : 2 * q])), float(np.mean(mb[-q:]))
    tail = np.asarray(mb[q:])
    slope = float(np.polyfit(np.arange(len(tail)), tail, 1)[0]) * len(tail)
    return {
        "samples": len(mb),
        "start_mb": round(mb[0], 1),
        "max_mb": round(max(mb), 1),
        "end_mb": round(mb[-1], 1),
        "second_quarter_mb": round(second, 1),
        "last_quarter_mb": round(last, 1),
        "growth": round((last - second) / second, 4),
        "fitted_change_mb": round(slope, 1),
    }


# ------------------------------------------------------------------ hostile clients


async def stalled_bodies(
    port: int, body: bytes, content_type: str, clients: int, wait_s: float, abort: bool
) -> list[dict]:
    """Clients that send headers and half of a body, then stall (abort=False: what the server
    does within wait_s, and whether it then closes the connection) or hang up (abort=True)."""
    head = (
        f"POST /v1/classify HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()

    async def one() -> dict:
        started = time.monotonic()
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(head + body[: len(body) // 2])
        await writer.drain()
        if abort:
            writer.transport.abort()
            return {"outcome": "aborted"}
        stop = started + wait_s
        outcome, answered_s, closed = "still open", None, False
        try:
            async with asyncio.timeout_at(asyncio.get_running_loop().time() + wait_s):
                line = await reader.readline()
                answered_s = time.monotonic() - started
                outcome = line.decode(errors="replace").strip() or "closed without an answer"
                await reader.read()  # the rest of the answer, until the server closes
                closed = True
        except TimeoutError:
            pass
        except ConnectionError:
            outcome, closed = "reset", True
        writer.close()
        return {
            "outcome": outcome,
            "answered_s": None if answered_s is None else round(answered_s, 2),
            "closed_by_server": closed,
            "watched_s": round(min(time.monotonic(), stop) - started, 2),
        }

    return await asyncio.gather(*(one() for _ in range(clients)))


async def large_image_wave(base: str, pid: int, clients: int) -> dict:
    jpeg = large_jpeg()
    body, content_type = multipart([("image", jpeg)], {})
    before = rss_bytes(pid)
    samples = [before]
    done = asyncio.Event()

    async def sample():
        while not done.is_set():
            samples.append(rss_bytes(pid))
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())

    async def one(client: httpx.AsyncClient) -> int:
        try:
            r = await client.post(f"{base}/v1/classify", content=body, headers={"content-type": content_type})
            return r.status_code
        except httpx.HTTPError:
            return 0

    async with httpx.AsyncClient(timeout=120) as client:
        statuses = await asyncio.gather(*(one(client) for _ in range(clients)))
    await asyncio.sleep(2.0)
    done.set()
    await sampler
    return {
        "image": "6000x4000 JPEG",
        "bytes": len(jpeg),
        "clients": clients,
        "status": dict(Counter(str(s) for s in statuses)),
        "rss_before_mb": round(before / 2**20, 1),
        "rss_peak_mb": round(max(samples) / 2**20, 1),
        "rss_after_mb": round(rss_bytes(pid) / 2**20, 1),
    }


# ------------------------------------------------------------------ the study


async def study(port: int, pid: int, args, limits: dict) -> dict:
    base = f"http://{HOST}:{port}"
    requests = task_requests(port, 48)
    load = dict(processes=args.processes)
    report: dict = {"limits": limits, "rss": {}}
    rss = RSS(pid, args.rss_every_s)
    rss.start()
    t_start = time.monotonic()
    try:
        await generate(HOST, port, requests, mode="closed", concurrency=4, seconds=2.0, **load)  # warm-up
        t0 = time.monotonic()
        before = await asyncio.to_thread(scrape, base)
        baseline = await generate(
            HOST, port, requests, mode="closed", concurrency=16, seconds=args.rate_seconds, **load
        )
        summary = load_summary(baseline)
        rate = summary["all"]["goodput"]
        if rate <= 0:
            raise RuntimeError(f"the server answered no request with 2xx: {summary['all']['status']}")
        report["sustainable"] = {
            "rate": rate,
            **summary,
            "server_counted": counted_between(before, await asyncio.to_thread(scrape, base)),
        }
        report["rss"]["sustainable"] = rss.phase(t0, time.monotonic())
        report["ladder"] = []
        for factor in args.factors:
            await drained(base)
            t0 = time.monotonic()
            before = await asyncio.to_thread(scrape, base)
            run = await generate(
                HOST,
                port,
                requests,
                mode="open",
                rate=factor * rate,
                seconds=args.step_seconds,
                seed=int(factor * 10),
                **load,
            )
            after = await asyncio.to_thread(scrape, base)
            report["ladder"].append(
                {"factor": factor, **load_summary(run), "server_counted": counted_between(before, after)}
            )
            report["rss"][f"ladder {factor:g}x"] = rss.phase(t0, time.monotonic())
        await drained(base)

        # hostile clients: stalled bodies watched past the body timeout, normal traffic meanwhile
        classify = requests["classify"][0]
        head_end = classify.index(b"\r\n\r\n") + 4
        content_type = next(
            line.split(b":", 1)[1].strip().decode()
            for line in classify[:head_end].split(b"\r\n")
            if line.lower().startswith(b"content-type:")
        )
        watch_s = limits["body_timeout_s"] + max(2.0, 0.25 * limits["body_timeout_s"])
        before = await asyncio.to_thread(scrape, base)
        t0 = time.monotonic()
        normal = asyncio.create_task(
            generate(HOST, port, requests, mode="closed", concurrency=4, seconds=watch_s, processes=1)
        )
        slow = await stalled_bodies(
            port, classify[head_end:], content_type, args.hostile_clients, watch_s, abort=False
        )
        await stalled_bodies(port, classify[head_end:], content_type, args.hostile_clients, 0, abort=True)
        normal_run = await normal
        await asyncio.sleep(1.0)
        after = await asyncio.to_thread(scrape, base)
        answered = [s["answered_s"] for s in slow if s["answered_s"] is not None]
        report["slow_bodies"] = {
            "clients": args.hostile_clients,
            "body_timeout_s": limits["body_timeout_s"],
            "watched_s": watch_s,
            "outcomes": dict(Counter(s["outcome"] for s in slow)),
            "closed_by_server": sum(s["closed_by_server"] for s in slow),
            "answered_after_s": {
                "min": min(answered, default=None),
                "p50": pct(answered, 50),
                "max": max(answered, default=None),
            },
            "normal_traffic_meanwhile": load_summary(normal_run),
        }
        report["aborted_uploads"] = {
            "clients": args.hostile_clients,
            "server_counted_during_hostile_phase": counted_between(before, after),
        }
        report["rss"]["hostile clients"] = rss.phase(t0, time.monotonic())

        t0 = time.monotonic()
        report["large_images"] = await large_image_wave(base, pid, args.large_clients)
        report["rss"]["large images"] = rss.phase(t0, time.monotonic())
        await drained(base)

        t0 = time.monotonic()
        before = await asyncio.to_thread(scrape, base)
        soak = await generate(
            HOST, port, requests, mode="open", rate=rate / 2, seconds=args.soak_seconds, seed=7, **load
        )
        t1 = time.monotonic()
        after = await asyncio.to_thread(scrape, base)
        report["soak"] = {
            **load_summary(soak),
            "server_counted": counted_between(before, after),
            "rss": soak_growth(rss.between(t0, t1)),
        }
        report["rss"]["soak"] = rss.phase(t0, t1)
        report["rss"]["whole run"] = rss.phase(t_start, time.monotonic())
    finally:
        await rss.stop()
    return report


# ------------------------------------------------------------------ bars


def bar(name: str, passed: bool | None, figures: str) -> dict:
    return {"bar": name, "passed": passed, "figures": figures}


def evaluate(report: dict) -> list[dict]:
    """The issue's bars, each with the figures it was decided on (passed None: not measured)."""
    limits = report["limits"]
    wait_ms = limits["max_queue_wait_ms"]
    bars = []
    top = max(report["ladder"], key=lambda s: s["factor"]) if report["ladder"] else None
    if top is None:
        bars.append(bar("overload ladder", None, "no ladder step ran"))
    else:
        f, per_task = top["factor"], top["per_task"]
        aimed = top["aimed_rate"]
        offered = top["all"]["offered_rate"]
        lag = top["all"]["send_lag_ms"]["p99"]
        tasks_offered = ", ".join(f"{t} {per_task[t]['offered_rate']}" for t in TASKS)
        bars.append(
            bar(
                f"{f:g}x R offered as aimed",
                offered >= OFFERED_MIN * aimed and lag is not None and lag <= LAG_P99_MS,
                f"aimed {aimed} req/s, offered {offered} req/s ({tasks_offered}), answered "
                f"{top['all']['answered_rate']} req/s; sends behind schedule p99 {lag} ms "
                f"(at least {OFFERED_MIN:.0%} of the aim, lag p99 <= {LAG_P99_MS:g} ms)",
            )
        )
        batch = top["all"]["batch_ms"]["p99"]
        if batch is None:
            bars.append(bar(f"{f:g}x R accepted p99", None, "no request was accepted"))
        else:
            limit = wait_ms + batch
            p99 = {t: per_task[t]["accepted"]["p99_ms"] for t in TASKS}
            ok = all(v is not None and v <= limit for v in p99.values())
            listed = ", ".join(f"{t} {v}" for t, v in p99.items())
            bars.append(
                bar(
                    f"{f:g}x R accepted p99 <= max queue wait + one batch",
                    ok,
                    f"accepted p99 ms: {listed} (all {top['all']['accepted']['p99_ms']}); "
                    f"limit {limit:.1f} ms = {wait_ms:g} + batch p99 {batch}; "
                    f"server queue p99 {top['all']['server_queue_ms']['p99']} ms",
                )
            )
        refused = top["all"]["refused"]
        bars.append(
            bar(
                f"{f:g}x R refused answered < {REFUSED_P99_MS:g} ms p99",
                None if refused["count"] == 0 else refused["p99_ms"] < REFUSED_P99_MS,
                f"{refused['count']} refused "
                f"(of them {top['all']['refused_plain_503']} by the connection cap), "
                f"p50 / p99 {refused['p50_ms']} / {refused['p99_ms']} ms",
            )
        )
        shares = {t: per_task[t]["refused_share"] for t in TASKS}
        spread = max(shares.values()) - min(shares.values())
        bars.append(
            bar(
                f"{f:g}x R tasks treated alike",
                spread <= TASK_SPREAD,
                "refused share "
                + ", ".join(f"{t} {v:.1%}" for t, v in shares.items())
                + f"; spread {spread:.1%} (at most {TASK_SPREAD:.0%})",
            )
        )
    phases = {
        "sustainable": report["sustainable"]["all"],
        **{f"ladder {s['factor']:g}x": s["all"] for s in report["ladder"]},
        "hostile-phase traffic": report["slow_bodies"]["normal_traffic_meanwhile"]["all"],
        "soak": report["soak"]["all"],
    }
    errors = {name: p.get("server_errors_500", 0) for name, p in phases.items()}
    errors["large images"] = report["large_images"]["status"].get("500", 0)
    log_500 = report.get("server", {}).get("error_lines")
    bars.append(
        bar(
            "no 500",
            sum(errors.values()) == 0 and not log_500,
            "500s: "
            + ", ".join(f"{k} {v}" for k, v in errors.items())
            + (f"; server ERROR log lines {log_500}" if log_500 is not None else ""),
        )
    )
    slow = report["slow_bodies"]
    # A stalled client is either cut when its body times out (408) or refused on arrival, before
    # its body, when the burst of them finds the server busy (503): neither holds the server.
    cut = sum(
        n for outcome, n in slow["outcomes"].items() if outcome.startswith(("HTTP/1.1 408", "HTTP/1.1 503"))
    )
    last = slow["answered_after_s"]["max"]
    bars.append(
        bar(
            "slow bodies never held",
            cut == slow["clients"]
            and slow["closed_by_server"] == slow["clients"]
            and last is not None
            and last <= slow["body_timeout_s"] + SLOW_BODY_SLACK_S,
            f"{slow['clients']} clients watched {slow['watched_s']:g} s "
            f"(body timeout {slow['body_timeout_s']:g} s): "
            f"{slow['outcomes']}, {slow['closed_by_server']} closed by the server, answered after "
            f"{slow['answered_after_s']['min']}-{last} s",
        )
    )
    growth = report["soak"]["rss"]
    bars.append(
        bar(
            "soak RSS not growing",
            None if growth["growth"] is None else growth["growth"] <= RSS_GROWTH,
            "too few samples"
            if growth["growth"] is None
            else f"{report['soak']['seconds']:g} s at {report['soak']['aimed_rate']} req/s: "
            f"RSS {growth['start_mb']} MB "
            f"at the start, {growth['max_mb']} MB max, {growth['end_mb']} MB at the end; last quarter "
            f"{growth['last_quarter_mb']} MB against second quarter {growth['second_quarter_mb']} MB "
            f"({growth['growth']:+.1%}, at most +{RSS_GROWTH:.0%})",
        )
    )
    return bars


# ------------------------------------------------------------------ report


def _row(label: str, task: str, s: dict) -> str:
    st = s["status"]
    ok = sum(v for k, v in st.items() if k.startswith("2"))
    known = ok + st.get("503", 0) + st.get("504", 0) + st.get("500", 0)
    acc, ref, by = s["accepted"], s["refused"], s["refused_by"]
    return (
        f"| {label} | {task} | {s['offered_rate']} / {s['answered_rate']} | "
        f"{s['send_lag_ms']['p99']} | {ok} | "
        f"{st.get('503', 0)} ({by.get('busy', 0)} / {by.get('queue full', 0)} / {by.get('plain', 0)}) | "
        f"{st.get('504', 0)} | {st.get('500', 0)} | {s['sent'] - known} | "
        f"{acc['p50_ms']} / {acc['p99_ms']} | {ref['p50_ms']} / {ref['p99_ms']} | {s['refused_share']:.1%} | "
        f"{s['server_queue_ms']['p99']} / {s['batch_ms']['p99']} |"
    )


def markdown(report: dict) -> str:
    sus = report["sustainable"]
    lim = report["limits"]
    lines = [
        f"Server limits: batching.max_queue_wait_ms {lim['max_queue_wait_ms']:g}, "
        f"limits.body_timeout_s {lim['body_timeout_s']:g}. Load from {sus['processes']} load-generator "
        "process(es), open loop with Poisson arrivals, every task at the same rate.",
        "",
        f"Sustainable rate R (closed loop, concurrency {sus['concurrency']}, tasks in turn): "
        f"**{sus['rate']} req/s** ("
        + ", ".join(f"{t} {sus['per_task'][t]['goodput']}" for t in TASKS)
        + ").",
        "",
        "| load | task | offered / answered req/s | send lag p99 ms | 2xx | 503 (busy / queue full / cap) "
        "| 504 | 500 | other "
        "| accepted p50 / p99 ms | refused p50 / p99 ms | refused share | server queue / batch p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    steps = [(f"{s['factor']:g}x ({s['aimed_rate']} aimed)", s) for s in report["ladder"]]
    steps.append((f"soak ({report['soak']['aimed_rate']} aimed)", report["soak"]))
    for label, step in steps:
        lines.append(_row(label, "all", step["all"]))
        for task in TASKS:
            lines.append(_row("", task, step["per_task"][task]))
    runs = [(f"{s['factor']:g}x", s) for s in report["ladder"]] + [("soak", report["soak"])]
    lines += [
        "",
        "Load generator: "
        + ", ".join(
            f"{name} {r['generator_cpu_s']} CPU s, {r['connections_opened']} connections" for name, r in runs
        )
        + " (its CPU is taken from the same cores as the server's).",
    ]
    slow, ab, big = report["slow_bodies"], report["aborted_uploads"], report["large_images"]
    meanwhile = slow["normal_traffic_meanwhile"]["all"]
    soak_rss = report["soak"]["rss"]
    lines += [
        "",
        f"- Slow bodies ({slow['clients']} clients, half a body then silence, "
        f"watched {slow['watched_s']:g} s "
        f"with a body timeout of {slow['body_timeout_s']:g} s): {slow['outcomes']}, "
        f"{slow['closed_by_server']} closed by the server, answered after "
        f"{slow['answered_after_s']['min']}-{slow['answered_after_s']['max']} s; normal traffic meanwhile: "
        f"{meanwhile['status']}, accepted p50 / p99 {meanwhile['accepted']['p50_ms']} / "
        f"{meanwhile['accepted']['p99_ms']} ms.",
        f"- Aborted uploads ({ab['clients']}) and the slow bodies, as the server counted the hostile phase: "
        f"{ab['server_counted_during_hostile_phase']}.",
        f"- Large images ({big['clients']} concurrent {big['image']}, {big['bytes'] / 2**20:.1f} MB each): "
        f"{big['status']}; RSS {big['rss_before_mb']} MB before, {big['rss_peak_mb']} MB peak, "
        f"{big['rss_after_mb']} MB after.",
    ]
    if soak_rss.get("start_mb") is not None:
        lines.append(
            f"- Soak RSS: {soak_rss['start_mb']} MB at the start, {soak_rss['max_mb']} MB max, "
            f"{soak_rss['end_mb']} MB at the end ({soak_rss['samples']} samples)."
        )
    whole = report["rss"].get("whole run")
    if whole:
        lines.append(
            f"- RSS over the whole run: {whole['before_mb']} MB before, {whole['peak_mb']} MB peak, "
            f"{whole['after_mb']} MB after."
        )
    if "server" in report:
        srv = report["server"]
        lines.append(
            f"- Server: exit code {srv['exit_code']} on SIGTERM, {srv['error_lines']} ERROR log lines "
            f"{srv['errors'] or ''}".rstrip()
            + "."
        )
    lines += ["", "| bar | verdict | figures |", "|---|---|---|"]
    for b in report["bars"]:
        verdict = {True: "**pass**", False: "**FAIL**", None: "not measured"}[b["passed"]]
        lines.append(f"| {b['bar']} | {verdict} | {b['figures']} |")
    return "\n".join(lines) + "\n"


def server_errors(log_lines: list[str]) -> tuple[int, dict[str, int]]:
    """ERROR lines of the server's JSON log, counted by message and the exception's last line."""
    counts: Counter = Counter()
    for line in log_lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("level") not in ("error", "critical"):
            continue
        last = (entry.get("exception") or "").strip().splitlines()[-1:] or [""]
        counts[f"{entry.get('message', '')}: {last[0][:160]}".rstrip(": ")] += 1
    return sum(counts.values()), dict(counts)


# ------------------------------------------------------------------ command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.reliability",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short run (about 1 minute): seconds per phase, a 20 s soak, a 3 s body timeout",
    )
    parser.add_argument("--rate-seconds", type=float, help="closed loop measuring R (full 15, quick 3)")
    parser.add_argument("--step-seconds", type=float, help="each overload step (full 20, quick 4)")
    parser.add_argument("--factors", default="1,3,10", help="overload steps, multiples of R (default 1,3,10)")
    parser.add_argument("--soak-seconds", type=float, help="soak at R/2 (full 600, quick 20)")
    parser.add_argument(
        "--body-timeout-s",
        type=float,
        help="the server's limits.body_timeout_s (full: the server's setting, 30 by default; quick 3)",
    )
    parser.add_argument(
        "--max-queue-wait-ms",
        type=float,
        help="the server's batching.max_queue_wait_ms (default: the server's setting, 2000)",
    )
    parser.add_argument(
        "--hostile-clients", type=int, help="slow-body and aborting clients each (full 50, quick 4)"
    )
    parser.add_argument("--large-clients", type=int, help="concurrent 24-megapixel images (full 6, quick 2)")
    parser.add_argument("--processes", type=int, default=2, help="load-generator processes (default 2)")
    parser.add_argument(
        "--out",
        type=Path,
        help=f"results JSON (full {RESULTS}/reliability.json, "
        f"quick {RESULTS}/quick/reliability.json); the .md goes beside it",
    )
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    try:
        args.factors = [float(f) for f in args.factors.split(",")]
    except ValueError:
        parser.error("--factors: comma-separated numbers, e.g. 1,3,10")
    if not args.factors or min(args.factors) <= 0:
        parser.error("--factors: positive numbers")
    if args.out is None:
        args.out = RESULTS / ("quick" if args.quick else "") / "reliability.json"
    return args


def server_env(args) -> tuple[dict[str, str], dict]:
    """The server's environment, and the limits the bars are measured against (what the server
    will read, defaults included)."""
    from app.settings import Settings  # torch-free

    env = {"TOKENLEAN_LOG_FORMAT": "json", "TOKENLEAN_LOG_LEVEL": "info"}
    if args.body_timeout_s is not None:
        env["TOKENLEAN_LIMITS__BODY_TIMEOUT_S"] = f"{args.body_timeout_s:g}"
    if args.max_queue_wait_ms is not None:
        env["TOKENLEAN_BATCHING__MAX_QUEUE_WAIT_MS"] = f"{args.max_queue_wait_ms:g}"
    import os

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        settings = Settings()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    limits = {
        "max_queue_wait_ms": settings.batching.max_queue_wait_ms,
        "max_batch_size": settings.batching.max_batch_size,
        "deadline_ms": settings.batching.deadline_ms,
        "body_timeout_s": settings.limits.body_timeout_s,
        "max_connections": settings.max_connections,
    }
    return env, limits


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from bench.measure import environment, git_state, module_command  # loads torch: after --help

    env, limits = server_env(args)
    port = free_port()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log = args.out.with_suffix(".server.log")
    proc = start_server(port, env=env, log=log)
    started = time.perf_counter()
    try:
        report = asyncio.run(study(port, proc.pid, args, limits))
        report["seconds"] = round(time.perf_counter() - started, 1)
    finally:
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(90)
    count, errors = server_errors(log.read_text().splitlines())
    report["server"] = {"exit_code": exit_code, "error_lines": count, "errors": errors}
    report["bars"] = evaluate(report)
    result = {
        **environment(module_command("bench.reliability", argv)),
        "git": git_state(),
        "quick": args.quick,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        **report,
    }
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    text = markdown(report)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    for b in report["bars"]:
        verdict = {True: "PASS", False: "FAIL", None: "----"}[b["passed"]]
        print(f"{verdict}  {b['bar']}: {b['figures']}")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')} ({report['seconds']} s)")


if __name__ == "__main__":
    main()
