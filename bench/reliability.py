"""Reliability of `tokenlean serve` (embedded defaults, CPU) under overload, hostile clients and a
long soak, every figure from one run against one server process:

1. sustainable rate: a closed loop at concurrency 16 over a mix of every task -> R requests/s;
2. overload ladder: open-loop Poisson arrivals at 1x, 3x and 10x R, tasks mixed: status counts,
   p50/p99 latency of the accepted and of the refused requests, refusals per task;
3. slow bodies: clients that send their headers and half their body, then stall, while normal
   traffic runs: what they get and when, and the normal traffic's latency meanwhile;
4. aborted uploads: clients that send half a body and hang up: how the server counts them;
5. a wave of large images (several concurrent 24-megapixel JPEGs): resident memory before, at the
   peak and after;
6. soak: half of R for --soak-seconds, resident memory sampled along the way.

    python -m bench.reliability [--quick] [--soak-seconds 600] [--out bench/results/reliability.json]

The load generator runs in this process, on the same 2 cores as the server: at 10x R it is part
of the load, and the offered rate it reached is reported beside the rate it aimed at.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageDraw
from prometheus_client.parser import text_string_to_metric_families

from bench.measure import environment, module_command
from bench.server import free_port, rss_bytes, start_server
from models.demo import data

TASK_MIX = ("vqa", "classify", "retrieval")
CAPTIONS = ["a red circle", "a blue rectangle", "a green triangle", "a gray circle"]


@dataclass(frozen=True)
class Body:
    task: str
    content: bytes
    content_type: str


@dataclass(frozen=True)
class Outcome:
    task: str
    status: int  # 0: the connection failed or was reset
    seconds: float


def multipart(task: str, files: list[tuple[str, bytes]], fields: dict) -> Body:
    request = httpx.Request("POST", "http://x/", files=[(k, ("i.png", v)) for k, v in files], data=fields)
    return Body(task, request.read(), request.headers["content-type"])


def request_bodies(n: int) -> list[Body]:
    """Easy-VQA test images and questions, as each task's multipart request."""
    split = data.load_split("test")
    bodies = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(split.images[split.question_image[i]]).save(buf, "PNG")
        png = buf.getvalue()
        task = TASK_MIX[i % len(TASK_MIX)]
        if task == "vqa":
            bodies.append(multipart(task, [("image", png)], {"question": split.questions[i]}))
        elif task == "classify":
            bodies.append(multipart(task, [("image", png)], {"compression": "medium"}))
        else:
            bodies.append(multipart(task, [("image", png)], {"texts": CAPTIONS}))
    return bodies


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


async def send(client: httpx.AsyncClient, base: str, body: Body) -> Outcome:
    started = time.perf_counter()
    try:
        r = await client.post(
            f"{base}/v1/{body.task}", content=body.content, headers={"content-type": body.content_type}
        )
        status = r.status_code
    except httpx.HTTPError:
        status = 0
    return Outcome(body.task, status, time.perf_counter() - started)


async def closed_loop(base: str, bodies: list[Body], concurrency: int, seconds: float) -> list[Outcome]:
    outcomes: list[Outcome] = []
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def worker(k: int) -> None:
            i = k
            while time.perf_counter() < stop:
                outcomes.append(await send(client, base, bodies[i % len(bodies)]))
                i += concurrency

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return outcomes


async def open_loop(base: str, bodies: list[Body], rate: float, seconds: float, seed: int) -> dict:
    """Poisson arrivals at `rate` per second for `seconds`, whatever the server answers."""
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=4000, max_keepalive_connections=512)
    async with httpx.AsyncClient(limits=limits, timeout=120) as client:
        loop = asyncio.get_running_loop()
        jobs, start = [], loop.time()
        due = start
        while due - start < seconds:
            await asyncio.sleep(max(0.0, due - loop.time()))
            jobs.append(asyncio.create_task(send(client, base, rng.choice(bodies))))
            due += rng.expovariate(rate)
        sent_for = loop.time() - start
        outcomes = await asyncio.gather(*jobs)
    return {"aimed_rate": rate, "offered_rate": len(jobs) / sent_for, "outcomes": outcomes}


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50_ms": None, "p99_ms": None}
    return {
        "p50_ms": round(float(np.percentile(values, 50)) * 1e3, 1),
        "p99_ms": round(float(np.percentile(values, 99)) * 1e3, 1),
    }


def summarise(outcomes: list[Outcome]) -> dict:
    statuses = Counter(o.status for o in outcomes)
    accepted = [o.seconds for o in outcomes if 200 <= o.status < 300]
    refused = [o.seconds for o in outcomes if o.status == 503]
    per_task = {}
    for task in TASK_MIX:
        mine = [o for o in outcomes if o.task == task]
        per_task[task] = {
            "sent": len(mine),
            "refused_share": round(sum(o.status == 503 for o in mine) / max(len(mine), 1), 3),
        }
    return {
        "requests": len(outcomes),
        "status": {str(k): v for k, v in sorted(statuses.items())},
        "server_errors_500": statuses.get(500, 0),
        "accepted": {"count": len(accepted), **percentiles(accepted)},
        "refused_503": {"count": len(refused), **percentiles(refused)},
        "per_task": per_task,
    }


async def stalled_bodies(base: str, port: int, clients: int, wait_s: float, abort: bool) -> list[dict]:
    """Clients that send headers and half of a body, then stall (abort=False: read what the server
    does within wait_s) or hang up (abort=True)."""
    body = request_bodies(3)[1]  # a classify request
    head = (
        f"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {body.content_type}\r\n"
        f"Content-Length: {len(body.content)}\r\n\r\n"
    ).encode()

    async def one() -> dict:
        started = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head + body.content[: len(body.content) // 2])
        await writer.drain()
        if abort:
            writer.transport.abort()
            return {"outcome": "aborted"}
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=wait_s)
            outcome = line.decode(errors="replace").strip() or "closed"
        except TimeoutError:
            outcome = "still open"
        except ConnectionError:
            outcome = "reset"
        writer.close()
        return {"outcome": outcome, "seconds": round(time.perf_counter() - started, 2)}

    return await asyncio.gather(*(one() for _ in range(clients)))


def scrape(base: str) -> dict:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    totals: Counter = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "tokenlean_requests_total":
                totals[s.labels.get("status", "?")] += s.value
    return dict(totals)


def sample_rss(pid: int, samples: list[int], stop: asyncio.Event, every: float = 0.05):
    async def run():
        while not stop.is_set():
            samples.append(rss_bytes(pid))
            await asyncio.sleep(every)

    return run()


async def large_image_wave(base: str, pid: int, clients: int) -> dict:
    jpeg = large_jpeg()
    body = multipart("classify", [("image", jpeg)], {})
    before = rss_bytes(pid)
    samples: list[int] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(pid, samples, stop))
    async with httpx.AsyncClient(timeout=120) as client:
        outcomes = await asyncio.gather(*(send(client, base, body) for _ in range(clients)))
    await asyncio.sleep(2.0)
    stop.set()
    await sampler
    return {
        "image": "6000x4000 JPEG",
        "bytes": len(jpeg),
        "clients": clients,
        "status": dict(Counter(str(o.status) for o in outcomes)),
        "rss_before_mb": round(before / 2**20, 1),
        "rss_peak_mb": round(max(samples, default=before) / 2**20, 1),
        "rss_after_mb": round(rss_bytes(pid) / 2**20, 1),
    }


async def soak(base: str, pid: int, bodies: list[Body], rate: float, seconds: float) -> dict:
    samples: list[int] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(pid, samples, stop, every=5.0))
    result = await open_loop(base, bodies, rate, seconds, seed=7)
    stop.set()
    await sampler
    mb = [round(s / 2**20, 1) for s in samples]
    return {
        "seconds": seconds,
        "rate": round(rate, 1),
        **summarise(result["outcomes"]),
        "rss_mb": {"start": mb[0], "max": max(mb), "end": mb[-1], "samples": mb},
    }


async def study(base: str, port: int, pid: int, args) -> dict:
    bodies = request_bodies(96)
    report: dict = {}
    await closed_loop(base, bodies, 4, 2.0)  # warm the server and the client
    baseline = await closed_loop(base, bodies, 16, args.rate_seconds)
    rate = sum(200 <= o.status < 300 for o in baseline) / args.rate_seconds
    report["sustainable"] = {"rate": round(rate, 1), **summarise(baseline)}
    report["ladder"] = []
    for factor in (1, 3, 10):
        run = await open_loop(base, bodies, factor * rate, args.step_seconds, seed=factor)
        report["ladder"].append(
            {
                "factor": factor,
                "aimed_rate": round(run["aimed_rate"], 1),
                "offered_rate": round(run["offered_rate"], 1),
                **summarise(run["outcomes"]),
            }
        )
        await asyncio.sleep(2.0)  # let the queue drain between steps
    before = scrape(base)
    normal = asyncio.create_task(closed_loop(base, bodies, 4, args.hostile_seconds))
    slow = await stalled_bodies(base, port, args.hostile_clients, args.hostile_seconds, abort=False)
    await stalled_bodies(base, port, args.hostile_clients, 0, abort=True)
    normal_outcomes = await normal
    await asyncio.sleep(1.0)
    after = scrape(base)
    report["slow_bodies"] = {
        "clients": args.hostile_clients,
        "waited_s": args.hostile_seconds,
        "outcomes": dict(Counter(s["outcome"] for s in slow)),
        "seconds_to_outcome": percentiles([s["seconds"] for s in slow if "seconds" in s]),
        "normal_traffic_meanwhile": summarise(normal_outcomes),
    }
    report["aborted_uploads"] = {
        "clients": args.hostile_clients,
        "counted_by_status": {
            k: after.get(k, 0) - before.get(k, 0) for k in after if after[k] != before.get(k)
        },
    }
    report["large_images"] = await large_image_wave(base, pid, args.large_clients)
    report["soak"] = await soak(base, pid, bodies, rate / 2, args.soak_seconds)
    return report


def markdown(report: dict) -> str:
    lines = [
        "Sustainable rate (closed loop, concurrency 16, tasks mixed): "
        f"**{report['sustainable']['rate']} req/s**.",
        "",
        "| load | offered req/s | 2xx | 503 | 504 | 500 | other | accepted p50 / p99 | refused p50 / p99 "
        "| refused share vqa / classify / retrieval |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for step in report["ladder"]:
        st = step["status"]
        ok = sum(v for k, v in st.items() if k.startswith("2"))
        other = step["requests"] - ok - st.get("503", 0) - st.get("504", 0) - st.get("500", 0)
        acc, ref, pt = step["accepted"], step["refused_503"], step["per_task"]
        lines.append(
            f"| {step['factor']}x | {step['offered_rate']} | {ok} | {st.get('503', 0)} | "
            f"{st.get('504', 0)} | {st.get('500', 0)} | {other} | {acc['p50_ms']} / {acc['p99_ms']} ms | "
            f"{ref['p50_ms']} / {ref['p99_ms']} ms | "
            f"{pt['vqa']['refused_share']:.0%} / {pt['classify']['refused_share']:.0%} / "
            f"{pt['retrieval']['refused_share']:.0%} |"
        )
    slow, ab = report["slow_bodies"], report["aborted_uploads"]
    big, soak_ = report["large_images"], report["soak"]
    meanwhile, rss = slow["normal_traffic_meanwhile"], soak_["rss_mb"]
    lines += [
        "",
        f"- Slow bodies ({slow['clients']} clients, half a body then silence): {slow['outcomes']}, after "
        f"{slow['seconds_to_outcome']['p50_ms']} ms (p50); normal traffic meanwhile: "
        f"{meanwhile['status']}, p50 {meanwhile['accepted']['p50_ms']} ms.",
        f"- Aborted uploads ({ab['clients']}): counted by status {ab['counted_by_status']}.",
        f"- Large images ({big['clients']} concurrent {big['image']}, {big['bytes'] / 2**20:.1f} MB each): "
        f"{big['status']}; RSS {big['rss_before_mb']} MB before, {big['rss_peak_mb']} MB peak, "
        f"{big['rss_after_mb']} MB after.",
        f"- Soak ({soak_['seconds']:.0f} s at {soak_['rate']} req/s): {soak_['status']}, accepted p50 / p99 "
        f"{soak_['accepted']['p50_ms']} / {soak_['accepted']['p99_ms']} ms; "
        f"RSS {rss['start']} MB at the start, {rss['max']} MB at most, {rss['end']} MB at the end.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.reliability", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: seconds instead of minutes")
    parser.add_argument("--soak-seconds", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/reliability.json"))
    args = parser.parse_args(argv)
    args.rate_seconds, args.step_seconds, args.hostile_seconds = (3, 4, 5) if args.quick else (15, 20, 20)
    args.hostile_clients, args.large_clients = (4, 2) if args.quick else (50, 6)
    if args.quick:
        args.soak_seconds = min(args.soak_seconds, 10.0)
    port = free_port()
    log = args.out.with_suffix(".server.log")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    proc = start_server(port, env={"TOKENLEAN_LOG_FORMAT": "json", "TOKENLEAN_LOG_LEVEL": "info"}, log=log)
    base = f"http://127.0.0.1:{port}"
    try:
        started = time.perf_counter()
        report = asyncio.run(study(base, port, proc.pid, args))
        report["seconds"] = round(time.perf_counter() - started, 1)
    finally:
        proc.send_signal(signal.SIGTERM)
        report_exit = proc.wait(60)
    server_log = log.read_text().splitlines()
    report["server"] = {
        "exit_code": report_exit,
        "log_lines": len(server_log),
        "error_lines": sum('"level": "error"' in line.lower() for line in server_log),
    }
    result = {**environment(module_command("bench.reliability", argv)), "quick": args.quick, **report}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(
        f"server exit code {report_exit}; {report['server']['error_lines']} ERROR log lines; wrote {args.out}"
    )


if __name__ == "__main__":
    main()
