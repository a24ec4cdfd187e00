"""Latency budgets under open-loop load: `compression: auto` with a budget against fixed levels, on
`tokenlean serve` with its default VQA model (two-stream, 224 px; only VQA loaded), easy-VQA test
questions.

For each offered rate (Poisson arrivals, fixed seed, from bench/loadgen.py's worker processes)
and each arm (fixed `none`, `medium`, `high`, and `auto` within the budget), one run of
`--seconds`; the arms of a rate run one after the other, the server drained in between. Per arm
and rate: goodput (answers within the budget, measured by the client from sending to the last
byte, per second of offered load), the share of requests sent that were answered within it,
p50/p99 latency of the answers, 503s, requests without an answer, accuracy of the answers on
easy-VQA and, for `auto`, the levels it chose. Every arm sends the budget (a fixed level keeps its
level; the server only reports it).

    python -m bench.open_loop --budget-ms 1000 --rates 4,8,16,32 --seconds 25

writes bench/results/latency_budgets.json, the plot docs/latency-budgets.png and prints the table
(`--out`, `--plot` to change where)."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import signal
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from bench.loadgen import LoadRun, generate, http_request
from bench.reliability import HOST, drained, multipart, pct
from bench.server import free_port, start_server

ARMS = ("none", "medium", "high", "auto")
RESULTS = Path("bench/results/latency_budgets.json")
PLOT = Path("docs/latency-budgets.png")
SERVER_ENV = {  # only the VQA model: the others would only take memory and start-up time
    "TOKENLEAN_MODELS__RETRIEVAL__ENABLED": "false",
    "TOKENLEAN_MODELS__CLASSIFY__ENABLED": "false",
}


def questions(n: int) -> tuple[list[tuple[bytes, str]], list[str]]:
    """(PNG, question) of n easy-VQA test questions on distinct images (a two-stream model runs
    its vision tower once per distinct image of a batch: repeated images would be cheaper), and
    their answers."""
    from models.demo import data  # numpy only

    split = data.load_split("test")
    firsts = np.unique(split.question_image, return_index=True)[1]
    picks = [int(i) for i in np.random.default_rng(0).permutation(firsts)[:n]]
    items, truth = [], []
    for i in picks:
        buf = io.BytesIO()
        Image.fromarray(split.images[split.question_image[i]]).save(buf, "PNG")
        items.append((buf.getvalue(), split.questions[i]))
        truth.append(split.answers[i])
    return items, truth


def arm_requests(port: int, items, arm: str, budget_ms: int) -> list[bytes]:
    compression = "auto" if arm == "auto" else arm
    out = []
    for png, question in items:
        fields = {"question": question, "compression": compression, "latency_budget_ms": str(budget_ms)}
        body, content_type = multipart([("image", png)], fields)
        out.append(http_request(HOST, port, "/v1/vqa", body, content_type))
    return out


def arm_figures(run: LoadRun, truth: list[str], budget_ms: int) -> dict:
    r = {k: np.asarray(v) for k, v in run.records.items()}
    sent = len(run)
    if not sent:
        return {"sent": 0}
    status = r["status"]
    ms = (r["done"] - r["sent"]) * 1e3
    ok = (status >= 200) & (status < 300)
    within = ok & (ms <= budget_ms)
    correct = [a == truth[i] for a, i, o in zip(r["answer"], r["request"], ok, strict=True) if o]
    lag = (r["sent"] - r["due"]) * 1e3
    return {
        "sent": sent,
        "offered_rate": round(sent / run.seconds, 2),
        "answered": int(ok.sum()),
        "within_budget": int(within.sum()),
        "goodput": round(int(within.sum()) / run.seconds, 2),
        "within_share": round(int(within.sum()) / sent, 3),
        "p50_ms": pct(ms[ok], 50),
        "p99_ms": pct(ms[ok], 99),
        "status_503": int((status == 503).sum()),
        "status_504": int((status == 504).sum()),
        "no_response": int((status == 0).sum()),
        "accuracy": round(float(np.mean(correct)), 4) if correct else None,
        "levels": dict(Counter(str(level) for level in r["level"][ok])),
        "send_lag_p99_ms": pct(lag, 99),
    }


async def study(port: int, args) -> dict:
    base = f"http://{HOST}:{port}"
    items, truth = questions(args.questions)
    requests = {arm: arm_requests(port, items, arm, args.budget_ms) for arm in args.arms}
    points = []
    for rate in args.rates:
        for arm in args.arms:
            run = await generate(
                HOST,
                port,
                {"vqa": requests[arm]},
                mode="open",
                seconds=args.seconds,
                rate=rate,
                processes=1,
                seed=args.seed,
                timeout_s=args.timeout_s,
            )
            figures = arm_figures(run, truth, args.budget_ms)
            points.append({"arm": arm, "rate": rate, **figures})
            print(row(points[-1]), flush=True)
            await drained(base)
    profile = httpx.get(f"{base}/v1/models", timeout=10).json()["models"][0]["latency_profile"]
    return {"points": points, "profile_after": profile}


def row(p: dict) -> str:
    levels = " ".join(f"{k}:{v}" for k, v in sorted(p.get("levels", {}).items()))
    acc = "-" if p.get("accuracy") is None else f"{100 * p['accuracy']:.2f} %"
    return (
        f"| {p['rate']:g} | {p['arm']} | {p['sent']} | {p['goodput']:.2f} | {100 * p['within_share']:.1f} % "
        f"| {p['p50_ms']} | {p['p99_ms']} | {p['status_503']} | {p['no_response']} | {acc} | {levels} |"
    )


HEADER = (
    "| rate /s | arm | sent | goodput /s | within budget | p50 ms | p99 ms | 503 | no answer | accuracy "
    "| levels |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, budget = report["points"], report["settings"]["budget_ms"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (
        ("goodput", "answers within budget / s"),
        ("within_share", "share of requests within budget"),
        ("p99_ms", "p99 latency of answers (ms)"),
    )
    for ax, (key, label) in zip(axes, panels, strict=True):
        for arm in report["settings"]["arms"]:
            mine = [p for p in points if p["arm"] == arm and p.get(key) is not None]
            name = f"auto ({budget} ms)" if arm == "auto" else arm
            ax.plot([p["rate"] for p in mine], [p[key] for p in mine], marker="o", label=name)
        ax.set_xlabel("offered rate (requests / s)")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        rates = sorted({p["rate"] for p in points})
        ax.set_xticks(rates, [f"{r:g}" for r in rates])
        ax.grid(alpha=0.3)
    axes[2].axhline(budget, color="gray", linestyle="--", linewidth=1)
    axes[2].set_yscale("log")
    axes[1].axhline(0.95, color="gray", linestyle="--", linewidth=1)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"Open-loop Poisson load on the two-stream VQA model, budget {budget} ms (2-core CPU, contended)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.open_loop",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--budget-ms", type=int, default=1000, help="the latency budget (default 1000)")
    parser.add_argument("--rates", default="4,8,16,32", help="offered rates, requests/s (default 4,8,16,32)")
    parser.add_argument("--seconds", type=float, default=25.0, help="each arm at each rate (default 25)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"default {','.join(ARMS)}")
    parser.add_argument(
        "--questions", type=int, default=400, help="distinct test questions sent (default 400)"
    )
    parser.add_argument("--seed", type=int, default=0, help="arrivals and question order (default 0)")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="a request without answer by then")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plot", type=Path, default=PLOT)
    args = parser.parse_args(argv)
    try:
        args.rates = [float(r) for r in args.rates.split(",")]
    except ValueError:
        parser.error("--rates: comma-separated numbers, e.g. 4,8,16")
    args.arms = [a for a in args.arms.split(",") if a]
    if not args.rates or min(args.rates) <= 0 or set(args.arms) - set(ARMS) or not args.arms:
        parser.error(f"--rates: positive numbers; --arms: some of {','.join(ARMS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from bench.measure import environment, git_state, module_command  # loads torch: after --help

    port = free_port()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    proc = start_server(port, env=SERVER_ENV, log=args.out.with_suffix(".server.log"))
    started = time.perf_counter()
    try:
        report = asyncio.run(study(port, args))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(90)
    report = {
        **environment(module_command("bench.open_loop", argv)),
        "git": git_state(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "seconds": round(time.perf_counter() - started, 1),
        **report,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.plot)
    print(HEADER)
    for p in report["points"]:
        print(row(p))
    print(f"wrote {args.out} and {args.plot} ({report['seconds']} s)")


if __name__ == "__main__":
    main()
