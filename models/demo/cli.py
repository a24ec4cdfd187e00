"""The demo models' sub-commands of `tokenlean`: `train-demo` and `eval`. Importing this module
loads neither torch nor transformers; each handler imports what it runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from models.demo.paths import CHECKPOINTS, EASY_VQA_CHECKPOINTS


def train_demo_command(args: argparse.Namespace) -> None:
    """Train the three demo checkpoints from scratch on easy-VQA."""
    from models.demo.train import recipes, train_demo

    known = recipes()
    if args.only is not None and args.only not in known:
        raise SystemExit(f"tokenlean train-demo: --only takes one of {sorted(known)}, got {args.only!r}")
    scenes = Path(args.scenes) if args.scenes else None
    report = train_demo(
        Path(args.out), seed=args.seed, scale=args.scale, only=args.only, scenes=scenes, distill=args.distill
    )
    print(json.dumps(report["seconds"], indent=2))


def eval_command(args: argparse.Namespace) -> None:
    """Evaluate checkpoints on the easy-VQA test split at every level of every method."""
    from models.demo.evaluate import evaluate, format_table

    reports = []
    for checkpoint in args.checkpoint:
        report = evaluate(checkpoint, methods=args.method or None, limit=args.limit)
        print(format_table(report) + "\n")
        reports.append(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(reports, indent=2) + "\n")


def register(subparsers) -> None:
    """Add `train-demo` and `eval` to the `tokenlean` parser's sub-commands."""
    train = subparsers.add_parser(
        "train-demo", help="train the demo checkpoints on easy-VQA (about 40 min on 2 CPU cores)"
    )
    train.add_argument("--out", default=str(CHECKPOINTS))
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--scale", type=float, default=1.0, help="fraction of the training steps (smoke runs)")
    train.add_argument(
        "--only",
        default=None,
        help="run one model family's recipe alone, e.g. two-stream, or lookupvit (starts from out/classify)",
    )
    train.add_argument(
        "--scenes",
        default=None,
        metavar="DIR",
        help="train on the scenes set `tokenlean data scenes --out DIR` wrote instead of easy-VQA "
        "(the two-stream VQA model: two-stream-scenes-vqa)",
    )
    train.add_argument(
        "--distill",
        action="store_true",
        help="the two-stream VQA model adds PuMer's distillation: a KL term pulls each reduced "
        "step's answers towards the unreduced model's on the same batch (docs/demo-models.md)",
    )
    train.set_defaults(func=train_demo_command)

    ev = subparsers.add_parser("eval", help="accuracy on the easy-VQA test split at every compression level")
    ev.add_argument(
        "checkpoint", nargs="*", default=[str(CHECKPOINTS / name) for name in EASY_VQA_CHECKPOINTS]
    )
    ev.add_argument("--method", action="append", help="only these methods (default: all that apply)")
    ev.add_argument("--limit", type=int, default=None, help="first N test items only")
    ev.add_argument("--json", default=None, help="also write the results here")
    ev.set_defaults(func=eval_command)
