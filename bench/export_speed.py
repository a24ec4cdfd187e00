"""ONNX Runtime (CPU) against torch eager, per compression level, on the same plans.

For each model: one ONNX graph per level (exported as `tokenlean export` does), then every level
timed on both backends at batch 1 and batch 16, interleaved round by round. The figure that
matters is whether reduction survives export: the speedup of `medium` over `none` on ONNX
Runtime divided by the same speedup in eager mode (bar: >= 0.9). Models: the three demo
checkpoints (one per task) and full-size configs with random weights (ViT-S/16, ViLT-B/32).

    python -m bench.export_speed [--quick] [--out bench/results/export_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from tqdm import tqdm

from bench.measure import environment, module_command, time_interleaved
from exporters.export import export_onnx
from exporters.formats import DEFAULT_OPSET
from exporters.runtime import OnnxGraph
from models.demo.paths import CHECKPOINTS, RETRIEVAL, VIT_CLASSIFY, VQA
from models.levels import named_plan
from models.loading import load_reducible
from models.plan import LEVELS

CPU = torch.device("cpu")
MODELS = {
    "demo classify (ViT, tome)": str(CHECKPOINTS / VIT_CLASSIFY),
    "demo vqa (ViLT, pumer)": str(CHECKPOINTS / VQA),
    "demo retrieval (ViLT, pumer)": str(CHECKPOINTS / RETRIEVAL),
    "ViT-S/16 224px (random, tome)": "random:vit-s16",
    "ViLT-B/32 384px VQA (random, pumer)": "random:vilt-b32",
}
BAR = 0.9


def bench_model(name: str, source: str, batches: dict[int, int], warmup: int, workdir: Path):
    """batches: batch size -> timing rounds."""
    rm = load_reducible(source)
    text = rm.max_text_tokens or 0
    method = rm.default_method

    def example(batch: int) -> tuple[torch.Tensor, ...]:
        x = rm.family.example_inputs(rm, batch, text)
        return tuple(x[name] for name in rm.input_names)

    graphs, sessions, plans = {}, {}, {}
    for level in tqdm(LEVELS, desc=f"export {name}", leave=False):
        plans[level] = named_plan(rm, level, method)
        graphs[level] = rm.family.graph(rm, plans[level])
        path = workdir / f"{abs(hash(source))}-{level}.onnx"
        with torch.inference_mode(False), torch.no_grad():
            export_onnx(graphs[level], example(2), path, DEFAULT_OPSET)
        sessions[level] = OnnxGraph(path, "cpu")

    rows = []
    for batch, rounds in batches.items():
        inputs = example(batch)
        calls = {}
        for level in LEVELS:
            calls[f"eager/{level}"] = lambda g=graphs[level], x=inputs: g(*x)
            calls[f"onnx/{level}"] = lambda s=sessions[level], x=inputs: s(*x)
        with torch.inference_mode():
            times = time_interleaved(calls, rounds, warmup, CPU, f"{name} b{batch}")
            worst = max((calls[f"onnx/{lv}"]() - calls[f"eager/{lv}"]()).abs().max().item() for lv in LEVELS)
        median = {k: float(np.median(v)) for k, v in times.items()}
        levels = {}
        for level in LEVELS:
            flops = rm.flops(plans[level], text, rm.nominal_tokens()[1])
            levels[level] = {
                "flops": flops,
                "eager_ms": median[f"eager/{level}"] * 1e3,
                "onnx_ms": median[f"onnx/{level}"] * 1e3,
                "onnx_p95_ms": float(np.percentile(times[f"onnx/{level}"], 95)) * 1e3,
                "eager_p95_ms": float(np.percentile(times[f"eager/{level}"], 95)) * 1e3,
                "eager_speedup": median["eager/none"] / median[f"eager/{level}"],
                "onnx_speedup": median["onnx/none"] / median[f"onnx/{level}"],
                "onnx_over_eager_time": median[f"onnx/{level}"] / median[f"eager/{level}"],
            }
        medium = levels["medium"]
        retained = medium["onnx_speedup"] / medium["eager_speedup"]
        rows.append(
            {
                "model": name,
                "source": source,
                "method": method,
                "batch": batch,
                "text_length": text,
                "max_abs_diff_onnx_vs_eager": worst,
                "levels": levels,
                "medium_speedup_retained": retained,
                "pass": bool(retained >= BAR),
                "rounds_s": times,
            }
        )
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'model':<38}{'b':>3} {'level':<7}{'eager ms':>9}{'onnx ms':>9}{'eager x':>8}{'onnx x':>8}")
    for row in rows:
        for level, st in row["levels"].items():
            print(
                f"{row['model']:<38}{row['batch']:>3} {level:<7}{st['eager_ms']:>9.2f}{st['onnx_ms']:>9.2f}"
                f"{st['eager_speedup']:>7.2f}x{st['onnx_speedup']:>7.2f}x"
            )
        verdict = "PASS" if row["pass"] else "FAIL"
        print(
            f"{'':<41} medium speedup kept on ONNX Runtime: {row['medium_speedup_retained']:.2f} "
            f"(bar {BAR}) {verdict}; max |onnx - eager| {row['max_abs_diff_onnx_vs_eager']:.1e}\n"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.export_speed", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: demo classify only, few rounds")
    parser.add_argument("--out", type=Path, default=Path("bench/results/export_speed.json"))
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch and ONNX Runtime threads (default: torch's)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # ONNX Runtime sessions take the same count
    rounds = args.rounds or (3 if args.quick else 20)
    models = dict(list(MODELS.items())[:1]) if args.quick else MODELS
    env = environment(module_command(__spec__.name, argv), CPU)
    env["versions"]["onnxruntime"] = onnxruntime.__version__
    env["machine"]["threads"] = torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, source in models.items():
            # Batch-1 calls are short: more of them for a stable median; full-size batches are slow.
            per_batch = {1: rounds * 3, 16: rounds // 2 if source.startswith("random:") else rounds}
            rows += bench_model(name, source, per_batch, 1 if args.quick else 3, Path(tmp))
    env["machine"]["loadavg_at_end"] = os.getloadavg()
    print_table(rows)
    report = {**env, "quick": args.quick, "rounds": rounds, "bar": BAR, "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
