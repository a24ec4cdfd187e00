"""What reduction bookkeeping costs inside a reduced forward at batch 1 (default: the VQA and
classification defaults, each under two methods; any checkpoint and method with --case).

Bookkeeping: everything a reduction step does besides the transformer's own layers: scoring,
sorting, matching, gathering and merging tokens, and carrying their sizes and sources. It is timed
by wrapping every reducer the plan calls (the tower method's `reduce`, the fusion's
`reduce_streams`) with a clock; on the CPU every operation is synchronous, so the clock sees its
whole cost. The share is that time over the whole reduced forward, per level, medians over rounds
(the levels interleaved round by round).

    python -m bench.bookkeeping [--case two-stream-vqa:evit ...] [--rounds 30]
        [--out bench/results/bookkeeping.json]
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

import models.families.two_stream as two_stream_family
from bench.measure import environment, module_command
from models.bundle import load_bundle
from models.demo import data
from models.demo.paths import CHECKPOINTS, CLASSIFY, TWO_STREAM_VQA
from models.levels import named_plan
from models.plan import LEVELS
from models.reduction.registry import IMAGE, get_method


@contextmanager
def clocked(spent: list[float]):
    """Every reducer call adds its seconds to spent[0] while this is open."""
    fusion = two_stream_family.reduce_streams
    patched = {}

    def timed(fn):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start

        return call

    for name in ("tome", "tcvit", "evit"):
        method = get_method(name, IMAGE)
        patched[method] = vars(method).get("reduce")  # normally None: the class's method
        method.reduce = timed(method.reduce)
    two_stream_family.reduce_streams = timed(fusion)
    try:
        yield
    finally:
        two_stream_family.reduce_streams = fusion
        for method, own in patched.items():
            if own is None:
                del method.reduce
            else:
                method.reduce = own


# (checkpoint folder under models/checkpoints, method): the default VQA model under its default
# method and ToMe, and the default classifier under its default method and EViT.
CASES = ((TWO_STREAM_VQA, "evit"), (TWO_STREAM_VQA, "tome"), (CLASSIFY, "tome"), (CLASSIFY, "evit"))


def measure_case(model: str, method: str, rounds: int, split: data.Split) -> dict:
    """Median forward and bookkeeping time per level at batch 1 on the split's first item, levels
    interleaved round by round."""
    bundle = load_bundle(model)
    rm = bundle.model
    pixels = bundle.preprocess.from_uint8(split.images[:1])
    x = bundle.inputs(pixels, [split.questions[0]] if rm.takes_text else None)
    plans = {level: named_plan(rm, level, method) for level in LEVELS}
    totals: dict[str, list[float]] = {level: [] for level in LEVELS}
    spent_in: dict[str, list[float]] = {level: [] for level in LEVELS}
    with torch.inference_mode():
        for plan in plans.values():  # warm-up
            rm(**x, plan=plan)
        for r in range(rounds):
            for level in LEVELS if r % 2 == 0 else LEVELS[::-1]:
                spent = [0.0]
                with clocked(spent):
                    start = time.perf_counter()
                    rm(**x, plan=plans[level])
                    totals[level].append(time.perf_counter() - start)
                spent_in[level].append(spent[0])
    rows = {}
    for level in LEVELS:
        total, spent = float(np.median(totals[level])), float(np.median(spent_in[level]))
        rows[level] = {
            "forward_ms": total * 1e3,
            "bookkeeping_ms": spent * 1e3,
            "share": spent / total,
            "flops_ratio": rm.flops(plans[level]) / rm.flops(plans["none"]),
        }
    return {"architecture": type(rm.model).__name__, "levels": rows}


def case(text: str) -> tuple[str, str]:
    model, sep, method = text.rpartition(":")
    if not sep or not model or not method:
        raise argparse.ArgumentTypeError(f"expected MODEL:METHOD, got {text!r}")
    return model, method


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bookkeeping", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--case",
        type=case,
        action="append",
        metavar="MODEL:METHOD",
        help="a checkpoint (folder under models/checkpoints, a path or a hub id) and a method; repeat "
        f"(default: {', '.join(f'{m}:{k}' for m, k in CASES)})",
    )
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("bench/results/bookkeeping.json"))
    args = parser.parse_args(argv)
    cases, split = [], data.load_split("test")
    for model, method in args.case or CASES:
        folder = CHECKPOINTS / model
        source = f"models/checkpoints/{model}" if folder.is_dir() else model
        result = measure_case(str(folder) if folder.is_dir() else model, method, args.rounds, split)
        cases.append({"model": source, "method": method, **result})
        for level, row in result["levels"].items():
            print(
                f"{source} {method} {level:>7}: forward {row['forward_ms']:.1f} ms, bookkeeping "
                f"{row['bookkeeping_ms']:.2f} ms ({row['share']:.1%}), FLOPs x{row['flops_ratio']:.2f}"
            )
    result = {
        **environment(module_command(__spec__.name, argv)),
        "batch": 1,
        "rounds": args.rounds,
        "cases": cases,
        "targets": {
            f"{c['model']} {c['method']}: bookkeeping share <= 0.10": all(
                r["share"] <= 0.10 for r in c["levels"].values()
            )
            for c in cases
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
