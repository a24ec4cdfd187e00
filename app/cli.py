"""The `tokenlean` command."""

from __future__ import annotations

import argparse
import json

from models.levels import DEFAULT_METHOD


def plans_command(args: argparse.Namespace) -> None:
    """Print every level of every method: tokens per layer and analytic FLOPs."""
    from models import NO_REDUCTION, named_plan, plan_for_target
    from models.loading import load_reducible

    rm = load_reducible(args.model)
    n_text, n_image = rm.nominal_tokens()
    full = rm.flops(NO_REDUCTION)
    methods = [args.method] if args.method else list(rm.methods)
    rows = []
    for method in methods:
        plans = [named_plan(rm, level, method) for level in ("none", "low", "medium", "high")]
        plans += [plan_for_target(rm, t, method) for t in args.target]
        for plan in plans:
            counts = rm.schedule(plan, n_text, n_image)
            rows.append(
                {
                    "method": method if plan.method != "none" else "none",
                    "level": plan.level,
                    "tokens_per_layer": [t + i for t, i in counts],
                    "gflops": round(rm.flops(plan) / 1e9, 3),
                    "flops_saved": round(1 - rm.flops(plan) / full, 3),
                    "plan": plan.to_dict()["layers"],
                }
            )
    if args.json:
        print(json.dumps({"model": args.model, "family": rm.family, "rows": rows}, indent=2))
        return
    print(
        f"{args.model}: {rm.family}, {rm.num_layers} layers, {n_text} text + {n_image} image tokens, "
        f"{full / 1e9:.3f} GFLOPs unreduced; default method {DEFAULT_METHOD[rm.family]}"
    )
    for row in rows:
        tokens = " ".join(str(t) for t in row["tokens_per_layer"])
        print(
            f"{row['method']:>6} {row['level']:>6}  saved {row['flops_saved']:>5.1%}"
            f"  {row['gflops']:>8.3f} GF  [{tokens}]"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tokenlean", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    plans = sub.add_parser("plans", help="show compression levels, tokens per layer and FLOPs for a model")
    plans.add_argument(
        "--model",
        default="random:vilt-b32",
        help="hub id, local folder, or one of the random:* full-size configs",
    )
    plans.add_argument("--method", default=None, help="only this method")
    plans.add_argument(
        "--target", type=float, action="append", default=[], help="also resolve this FLOPs fraction"
    )
    plans.add_argument("--json", action="store_true")
    plans.set_defaults(func=plans_command)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
