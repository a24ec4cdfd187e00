"""Wall-clock speed of the reduction engine next to its analytic FLOPs savings (random weights, CPU).

Cases: ViLT-B/32 VQA with PuMer "medium" (throughput), ViT-S/16 with ToMe r=13 in every layer
(throughput and batch-1 latency). Each case also times the unmodified Hugging Face forward, so
`none` can be compared with transformers. The variants of a case are interleaved round by round
(order reversed every other round) after warm-up calls, so machine noise hits them alike; the
median per-call time over rounds gives throughput, p50/p95 give latency.

    python -m bench.engine_speed [--quick] [--out bench/results/engine_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.measure import environment, module_command, time_interleaved
from models.families.registry import reducible
from models.levels import named_plan
from models.loading import load_model
from models.plan import NO_REDUCTION, LayerSpec, ReductionPlan

SEED = 0
CPU = torch.device("cpu")


@dataclass
class Case:
    name: str
    mode: str  # "throughput" (median per call -> items/s) or "latency" (p50/p95 per call)
    batch: int
    plan: ReductionPlan
    calls: dict  # variant -> zero-argument callable: "hf", "none", "reduced"
    targets: dict = field(default_factory=dict)  # "speedup" / "efficiency" -> minimum


def vilt_case(batch: int) -> Case:
    hf = load_model("random:vilt-b32", seed=SEED)
    cfg = hf.config
    rm = reducible(hf)
    ids = torch.randint(1, cfg.vocab_size, (batch, rm.max_text_tokens))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    x["pixel_values"] = torch.randn(batch, 3, cfg.image_size, cfg.image_size)
    plan = named_plan(rm, "medium", "pumer")
    calls = {
        "hf": lambda: hf(**x),
        "none": lambda: rm(**x, plan=NO_REDUCTION),
        "reduced": lambda: rm(**x, plan=plan),
    }
    return Case(
        f"ViLT-B/32 VQA, pumer medium, b{batch}",
        "throughput",
        batch,
        plan,
        calls,
        {"speedup": 1.6, "efficiency": 0.85},
    )


def vit_case(batch: int, mode: str, target: float) -> Case:
    hf = load_model("random:vit-s16", seed=SEED)
    cfg = hf.config
    rm = reducible(hf)
    x = {"pixel_values": torch.randn(batch, 3, cfg.image_size, cfg.image_size)}
    plan = ReductionPlan("tome", (LayerSpec(r=13),) * cfg.num_hidden_layers, level="r13")
    calls = {
        "hf": lambda: hf(**x),
        "none": lambda: rm(**x, plan=NO_REDUCTION),
        "reduced": lambda: rm(**x, plan=plan),
    }
    return Case(f"ViT-S/16, tome r13, b{batch} {mode}", mode, batch, plan, calls, {"speedup": target})


def summarize(case: Case, times: dict[str, list[float]]) -> dict:
    trace = case.calls["reduced"]().trace
    stats = {
        name: {
            "median_s": float(np.median(t)),
            "p50_s": float(np.percentile(t, 50)),
            "p95_s": float(np.percentile(t, 95)),
            "items_per_s": case.batch / float(np.median(t)),
            "rounds_s": t,
        }
        for name, t in times.items()
    }
    speedup = stats["none"]["median_s"] / stats["reduced"]["median_s"]  # = thr_reduced / thr_none
    analytic = trace.full_flops / trace.flops
    figures = {"speedup": speedup, "efficiency": speedup / analytic}
    checks = {
        k: {"target": v, "value": figures[k], "pass": bool(figures[k] >= v)} for k, v in case.targets.items()
    }
    return {
        "case": case.name,
        "mode": case.mode,
        "batch": case.batch,
        "plan": case.plan.to_dict(),
        "tokens_per_layer": list(trace.tokens),
        "flops": trace.flops,
        "full_flops": trace.full_flops,
        "variants": stats,
        "speedup": speedup,
        "analytic_ratio": analytic,
        "efficiency": speedup / analytic,
        "none_over_hf_time": stats["none"]["median_s"] / stats["hf"]["median_s"],
        "targets": checks,
    }


def print_table(results: list[dict]) -> None:
    head = f"{'case':<38}{'variant':<9}{'median ms':>10}{'p95 ms':>9}{'items/s':>9}"
    print("\n" + head + f"{'speedup':>9}{'analytic':>10}{'effic.':>8}  targets")
    print("-" * (len(head) + 40))
    for res in results:
        for name, st in res["variants"].items():
            row = f"{res['case']:<38}{name:<9}{st['median_s'] * 1e3:>10.1f}{st['p95_s'] * 1e3:>9.1f}"
            row += f"{st['items_per_s']:>9.1f}"
            if name == "reduced":
                row += f"{res['speedup']:>8.2f}x{res['analytic_ratio']:>9.2f}x{res['efficiency']:>8.2f}  "
                row += ", ".join(
                    f"{k} >= {c['target']:g}: {'PASS' if c['pass'] else 'FAIL'}"
                    for k, c in res["targets"].items()
                )
            elif name == "none":
                row += f"   (none/hf time {res['none_over_hf_time']:.3f})"
            print(row)
        print()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_speed", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny batches, few rounds")
    parser.add_argument("--out", type=Path, default=Path("bench/results/engine_speed.json"))
    parser.add_argument("--rounds", type=int, default=None, help="rounds for throughput cases")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 15)
    warmup = 1 if args.quick else 3
    vilt_b, vit_b = (2, 2) if args.quick else (16, 32)
    env = environment(module_command(__spec__.name, argv), CPU)
    builders = [
        lambda: vilt_case(vilt_b),
        lambda: vit_case(vit_b, "throughput", 1.5),
        lambda: vit_case(1, "latency", 1.2),
    ]
    results = []
    with torch.inference_mode():
        for build in builders:
            case = build()
            scale = 10 if case.mode == "latency" else 1  # batch-1 calls are cheap: take more samples
            results.append(
                summarize(case, time_interleaved(case.calls, rounds * scale, warmup * scale, CPU, case.name))
            )
    env["machine"]["loadavg_at_end"] = os.getloadavg()
    print_table(results)
    report = {
        **env,
        "quick": args.quick,
        "rounds": rounds,
        "warmup": warmup,
        "seed": SEED,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
