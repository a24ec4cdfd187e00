"""LookupViT throughput per level beside the same-size ViT with ToMe and TC-ViT at matched FLOPs.

The demo checkpoints (64 px, 8 x 8 patches, hidden 128, 4 layers): the LookupViT classifier at
each of its levels, and the ViT demo classifier unreduced and under the ToMe and TC-ViT plans
whose analytic FLOPs are closest to that level's (a LookupViT level costing more than the
unreduced ViT is matched by the unreduced ViT). Every call of a round runs one batch of
easy-VQA test images; the variants are interleaved round by round (order reversed every other
round) after warm-up, and the median per-call time gives items/s. Each variant's accuracy on the
888 unambiguous easy-VQA test images is measured too.

    python -m bench.lookupvit_speed [--quick] [--out bench/results/lookupvit_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np
import torch
import transformers

from bench.measure import module_command, time_interleaved
from models.bundle import ModelBundle, load_bundle
from models.demo import data
from models.demo.evaluate import METRICS
from models.demo.paths import CHECKPOINTS, LOOKUPVIT_CLASSIFY, VIT_CLASSIFY
from models.levels import named_plan, plan_for_target
from models.plan import LEVELS, NO_REDUCTION


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.lookupvit_speed", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: small batch, few rounds")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench/results/lookupvit_speed.json"))
    args = parser.parse_args(argv)
    batch = 4 if args.quick else args.batch
    rounds = args.rounds or (2 if args.quick else 30)
    warmup = 1 if args.quick else 3

    lookup = load_bundle(CHECKPOINTS / LOOKUPVIT_CLASSIFY)
    vit = load_bundle(CHECKPOINTS / VIT_CLASSIFY)
    split = data.load_split("test")
    images = split.images[split.fact_ids()[:batch]]
    vit_full = vit.model.flops(NO_REDUCTION)

    variants: dict[str, dict] = {}  # name -> {"call", "flops", "plan", ...}

    def add(name: str, bundle: ModelBundle, plan, **extra) -> None:
        x = bundle.inputs(bundle.preprocess.from_uint8(images))

        def call(rm=bundle.model, plan=plan):
            return rm(**x, plan=plan)

        flops = bundle.model.flops(plan)
        limit = 64 if args.quick else None
        accuracy = METRICS["classify"](bundle, split, plan, limit)["accuracy"]
        variants[name] = {"call": call, "flops": flops, "plan": plan.to_dict(), "accuracy": accuracy, **extra}

    add("vit none", vit, NO_REDUCTION, model="vit", level="none")
    for level in LEVELS:
        plan = named_plan(lookup.model, level)
        add(f"lookupvit {level}", lookup, plan, model="lookupvit", level=level, grid=lookup.model.grid(plan))
        target = min(max(1 - lookup.model.flops(plan) / vit_full, 0.0), 0.9)
        for method in ("tome", "tcvit"):
            matched = plan_for_target(vit.model, round(target, 3), method)
            if not matched.removes_nothing:
                add(f"vit {method} @ {level}", vit, matched, model="vit", level=level, method=method)

    with torch.inference_mode():
        times = time_interleaved(
            {k: v["call"] for k, v in variants.items()}, rounds, warmup, torch.device("cpu")
        )
    rows = []
    for name, v in variants.items():
        median = float(np.median(times[name]))
        rows.append(
            {
                "variant": name,
                **{k: v[k] for k in v if k not in ("call",)},
                "flops_vs_vit": v["flops"] / vit_full,
                "median_s": median,
                "items_per_s": batch / median,
                "rounds_s": times[name],
            }
        )
    base = next(r for r in rows if r["variant"] == "vit none")["items_per_s"]
    print(f"\nbatch {batch}, {rounds} rounds; items/s relative to the unreduced ViT ({base:.0f} items/s)")
    print(f"{'variant':<22}{'MFLOPs':>8}{'vs ViT':>8}{'items/s':>9}{'speed':>7}{'accuracy':>10}")
    for r in rows:
        r["speed_vs_vit"] = r["items_per_s"] / base
        print(
            f"{r['variant']:<22}{r['flops'] / 1e6:>8.1f}{r['flops_vs_vit']:>8.2f}"
            f"{r['items_per_s']:>9.0f}{r['speed_vs_vit']:>6.2f}x{r['accuracy'] * 100:>9.2f}%"
        )
    env = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "loadavg": os.getloadavg(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": module_command(__spec__.name, argv),
    }
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = {"batch": batch, "rounds": rounds, "env": env, "rows": rows}
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
