"""Throughput of `tokenlean serve --engine ray` with 1 and with 2 replicas at equal total threads,
and of the single-process server beside them, on this machine.

Every configuration gets the same torch threads in all (`--threads`, default: the machine's
cores): the single process uses them all, one Ray replica reserves them all (`--ray.num-cpus`,
from which Ray sets its OMP_NUM_THREADS), two replicas half each. Each configuration is started
on its own, warmed up, loaded by a closed loop at `--concurrency` connections from separate
load-generator processes (bench/loadgen.py), the tasks in turn (easy-VQA test images and
questions, as `python -m bench.reliability` sends them), and stopped; admission limits are lifted
(the closed loop bounds the queue). `--rounds` rounds, each in the order the previous one ran
backwards. Reported per configuration: answers 2xx per second, p50 / p99 latency and failures
(medians over the rounds), and each Ray configuration over 1 replica, 1 replica over the single
process.

On one 2-core host, replicas share the cores the single process already used: this measures
what replication costs or gains there (one model thread per process, the batching split in two,
Ray's proxy hop), not the scaling of a cluster; docs/deploying.md has the arithmetic for N nodes.
The load generators run on the same cores, alike for every configuration.

Full run (on a quiet machine; writes bench/results/ray_serving.json), and a smoke run:

    python -m bench.ray_serving
    python -m bench.ray_serving --quick --light --out /tmp/ray_serving.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.server import free_port

RESULTS = Path("bench/results")
LIGHT = {  # the 64 px ViLT and ViT demo checkpoints: a smoke run, not the defaults' figures
    "TOKENLEAN_MODELS__VQA__CHECKPOINT": "models/checkpoints/vqa",
    "TOKENLEAN_MODELS__RETRIEVAL__CHECKPOINT": "models/checkpoints/retrieval",
    "TOKENLEAN_MODELS__CLASSIFY__CHECKPOINT": "models/checkpoints/vit-classify",
}
ADMISSION_LIFTED = {
    "TOKENLEAN_BATCHING__MAX_EVENT_LOOP_LAG_MS": "600000",
    "TOKENLEAN_BATCHING__MAX_QUEUE_WAIT_MS": "600000",
}
START_TIMEOUT_S = 600


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ray_serving",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 s warm-up, 6 s measured")
    parser.add_argument("--light", action="store_true", help="the 64 px demo checkpoints, not the defaults")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch threads in all (default: cores)"
    )
    parser.add_argument("--replicas", default="1,2", help="Ray replica counts to measure (default 1,2)")
    parser.add_argument("--no-process", action="store_true", help="skip the single-process server")
    parser.add_argument("--concurrency", type=int, default=16, help="closed-loop connections (default 16)")
    parser.add_argument("--seconds", type=float, help="measured seconds per configuration (full 30, quick 6)")
    parser.add_argument("--warmup-seconds", type=float, help="warm-up per configuration (full 10, quick 3)")
    parser.add_argument("--processes", type=int, default=2, help="load-generator processes (default 2)")
    parser.add_argument("--rounds", type=int, help="rounds, in alternating order (full 3, quick 1)")
    parser.add_argument("--out", type=Path, default=RESULTS / "ray_serving.json", help="results JSON")
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (6.0 if args.quick else 30.0)
    args.warmup_seconds = args.warmup_seconds or (3.0 if args.quick else 10.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    try:
        args.replicas = [int(n) for n in args.replicas.split(",") if n.strip()]
    except ValueError:
        parser.error("--replicas: comma-separated counts, e.g. 1,2")
    if not args.replicas or min(args.replicas) < 1 or args.threads < 1:
        parser.error("--replicas and --threads: positive")
    return args


def server_env(args) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENLEAN_", "RAY_ADDRESS"))}
    # info: `serving on` is the line that says every Ray replica is ready
    env.update({"TOKENLEAN_LOG_FORMAT": "json", "TOKENLEAN_LOG_LEVEL": "info"})
    # Throughput, not admission: the closed loop bounds the queue itself (`--concurrency`), and a
    # refusal, answered in microseconds, would only send the loop round faster.
    env.update(ADMISSION_LIFTED)
    if args.light:
        env.update(LIGHT)
    return env


def wait_ready(port: int, proc: subprocess.Popen, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)
    raise RuntimeError(f"the server was not ready within {START_TIMEOUT_S} s")


def serve_command() -> list[str]:
    exe = Path(sys.executable).with_name("tokenlean")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "app.cli"]


def launch(config: dict, args, log: Path) -> tuple[subprocess.Popen, int]:
    """Start a configuration: the single process with `threads` torch threads, or Ray with
    `replicas` replicas of threads/replicas CPUs each; returns once all of it serves."""
    port = free_port()
    env = server_env(args)
    command = [*serve_command(), "serve", "--port", str(port)]
    if config["engine"] == "ray":
        command += ["--engine", "ray", "--replicas", str(config["replicas"])]
        command += ["--ray.num-cpus", f"{config['cpus_per_replica']:g}", "--ray.metrics-export-port", "0"]
    else:
        env["OMP_NUM_THREADS"] = str(args.threads)
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        if config["engine"] == "ray":  # serving once `serve.run` saw every replica ready
            deadline = time.monotonic() + START_TIMEOUT_S
            while b"serving on" not in log.read_bytes():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Ray Serve did not start:\n{log.read_text()[-4000:]}")
                time.sleep(0.5)
        wait_ready(port, proc, log)
    except BaseException:
        stop(proc)
        raise
    return proc, port


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(180)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(30)


def measure(config: dict, args, requests_for) -> dict:
    from bench.loadgen import generate_sync
    from bench.reliability import figures

    log = args.out.with_name(f"{args.out.stem}.{config['name']}.server.log")
    started = time.perf_counter()
    proc, port = launch(config, args, log)
    start_s = time.perf_counter() - started
    try:
        requests = requests_for(port)
        load = dict(mode="closed", concurrency=args.concurrency, processes=args.processes)
        generate_sync("127.0.0.1", port, requests, seconds=args.warmup_seconds, **load)
        run = generate_sync("127.0.0.1", port, requests, seconds=args.seconds, **load)
    finally:
        exit_code = stop(proc)
    f = figures(run)
    return {
        **config,
        "start_s": round(start_s, 1),
        "requests": len(run),
        "throughput": f["goodput"],
        "p50_ms": f["accepted"]["p50_ms"],
        "p99_ms": f["accepted"]["p99_ms"],
        "status": f["status"],
        "no_response": f["no_response"],
        "server_batch_ms_p50": f["batch_ms"]["p50"],
        "generator_cpu_s": round(run.generator_cpu_s, 2),
        "exit_code": exit_code,
    }


def summary(rows: list[dict]) -> dict:
    """Per configuration, the median over rounds of throughput and latency."""
    out = {}
    for name in dict.fromkeys(r["name"] for r in rows):
        mine = [r for r in rows if r["name"] == name]
        out[name] = {
            "throughput": round(statistics.median(r["throughput"] for r in mine), 1),
            "p50_ms": statistics.median(r["p50_ms"] for r in mine if r["p50_ms"] is not None),
            "p99_ms": statistics.median(r["p99_ms"] for r in mine if r["p99_ms"] is not None),
            "failed": sum(n for r in mine for code, n in r["status"].items() if not code.startswith("2"))
            + sum(sum(r["no_response"].values()) for r in mine),
            "rounds": [r["throughput"] for r in mine],
        }
    return out


def ratio(table: dict, a: str, b: str) -> float | None:
    if a in table and b in table and table[b]["throughput"]:
        return round(table[a]["throughput"] / table[b]["throughput"], 3)
    return None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from bench.measure import environment, git_state, module_command  # loads torch: after --help
    from bench.reliability import task_requests

    configs = [] if args.no_process else [{"name": "process", "engine": "uvicorn", "threads": args.threads}]
    for n in args.replicas:
        configs.append(
            {
                "name": f"ray-{n}",
                "engine": "ray",
                "replicas": n,
                "cpus_per_replica": args.threads / n,
                "threads": args.threads,
            }
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(args.rounds):  # alternating order: a drift of the machine favours no one
        for config in configs if k % 2 == 0 else configs[::-1]:
            rows.append({"round": k, **measure(config, args, lambda port: task_requests(port, 24))})
            r = rows[-1]
            print(
                f"round {k} {r['name']:>8}: {r['throughput']:7.1f} answers/s  p50 {r['p50_ms']} ms"
                f"  p99 {r['p99_ms']} ms  status {r['status']}  (started in {r['start_s']} s)",
                flush=True,
            )
    table = summary(rows)
    ratios = {
        f"{a} / {b}": value
        for a, b in [(f"ray-{n}", "ray-1") for n in args.replicas if n != 1] + [("ray-1", "process")]
        if (value := ratio(table, a, b)) is not None
    }
    for name, t in table.items():
        print(f"{name:>8}: {t['throughput']:7.1f} answers/s (median of {t['rounds']}), {t['failed']} failed")
    for name, value in ratios.items():
        print(f"{name}: {value}")
    result = {
        **environment(module_command("bench.ray_serving", argv)),
        "git": git_state(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "summary": table,
        "ratios": ratios,
        "runs": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
