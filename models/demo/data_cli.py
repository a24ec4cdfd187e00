"""`tokenlean data`: data sets generated in code. Importing this module loads neither torch nor
transformers (nor the generator itself: the handler imports it when it runs)."""

from __future__ import annotations

import argparse
import time


def scenes_command(args: argparse.Namespace) -> None:
    """Write the scenes set's splits, then print the counts and answers per question type."""
    from models.demo.scenes.dataset import DEFAULT_SCENES, SAMPLE_SCENES, format_distribution, generate

    defaults = SAMPLE_SCENES if args.sample else DEFAULT_SCENES
    scenes = {
        "train": defaults["train"] if args.train_scenes is None else args.train_scenes,
        "val": defaults["val"] if args.val_scenes is None else args.val_scenes,
        "test": defaults["test"] if args.test_scenes is None else args.test_scenes,
    }
    start = time.perf_counter()
    manifest = generate(
        args.out,
        seed=args.seed,
        size=args.size,
        scenes=scenes,
        questions_per_scene=args.questions_per_scene,
        progress=not args.quiet,
    )
    seconds = time.perf_counter() - start
    for name, split in manifest["splits"].items():
        counts = f"{split['scenes']} scenes, {split['questions']} questions, {split['captions']} captions"
        print(f"{name:>5}: {counts}")
    print("answers per question type (all splits):")
    print(format_distribution(manifest))
    print(f"wrote {args.out}/manifest.json in {seconds:.1f} s")


def register(subparsers) -> None:
    """Add `data` (with its sub-command `scenes`) to the `tokenlean` parser's sub-commands."""
    data = subparsers.add_parser(
        "data", help="generate data sets in code (see `tokenlean data scenes --help`)"
    )
    kinds = data.add_subparsers(dest="data_set", required=True)
    sc = kinds.add_parser(
        "scenes",
        help="multi-object scenes with VQA questions and retrieval captions",
        description="Multi-object scenes (numpy + PIL) with questions answered from each scene graph "
        "and retrieval captions: train / val / test splits, the same files for the same seed.",
    )
    sc.add_argument("--out", required=True, help="output folder (manifest.json and one folder per split)")
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument("--size", type=int, default=224, help="image side in pixels (objects scale with it)")
    sc.add_argument("--train-scenes", type=int, default=None, help="default 5000 (16 with --sample)")
    sc.add_argument("--val-scenes", type=int, default=None, help="default 500 (4 with --sample)")
    sc.add_argument("--test-scenes", type=int, default=None, help="default 1000 (4 with --sample)")
    sc.add_argument(
        "--questions-per-scene",
        type=int,
        default=None,
        help="default 24 for train, 4 for val, 5 for test (120k / 2k / 5k questions)",
    )
    sc.add_argument(
        "--sample",
        action="store_true",
        help="the small sample's scene counts (16 / 4 / 4), as checked in under models/demo/scenes_sample",
    )
    sc.add_argument("--quiet", action="store_true", help="no progress bar")
    sc.set_defaults(func=scenes_command)
