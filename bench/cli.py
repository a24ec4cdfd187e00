"""`tokenlean bench`: speed, memory, FLOPs and accuracy of every method and level, side by side.

Writes bench.json (every figure, the machine and the command), bench.md (the tables) and three
plots; a full run, and a redraw of a full run's JSON, also rewrites the generated block of
docs/benchmarks.md. Importing this module loads neither torch nor transformers (`tokenlean
--help` stays fast): the handler imports the benchmark when it runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
from functools import partial
from pathlib import Path

from bench.report import DOCS

RESULTS = Path("bench/results")
QUICK_RESULTS = RESULTS / "quick"
SPEED_RESULTS = RESULTS / "speed-only"
# Options recorded in a run's command line besides --quick and --only: (flag, attribute).
RECORDED = (
    ("--out", "out"),
    ("--device", "device"),
    ("--batches", "batches"),
    ("--seconds-per-case", "seconds_per_case"),
    ("--accuracy-limit", "accuracy_limit"),
    ("--docs", "docs"),
    ("--merge", "merge"),
    ("--speed-only", "speed_only"),
)


def batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(sorted({int(b) for b in text.split(",")}))
    except ValueError:
        sizes = ()
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,16, got {text!r}")
    return sizes


def register(subparsers) -> None:
    """Add the `bench` sub-command to `tokenlean`'s sub-parsers."""
    bench = subparsers.add_parser(
        "bench",
        help="speed, memory, FLOPs and accuracy of every method and level (JSON, tables, plots)",
        description=__doc__.split("\n\n")[0],
    )
    bench.add_argument("--quick", action="store_true", help="smoke run: batches 1 and 4, 2 rounds, 64 items")
    bench.add_argument(
        "--only",
        action="append",
        metavar="SUBJECT",
        help="only this subject (repeat, or comma-separate; default: all of them); an unknown name is "
        "refused with the list of subjects",
    )
    bench.add_argument(
        "--out", default=None, help=f"results folder (default {RESULTS}, quick: {QUICK_RESULTS})"
    )
    bench.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    bench.add_argument(
        "--batches", type=batch_sizes, default=None, help="comma-separated batch sizes (default 1,16)"
    )
    bench.add_argument("--seconds-per-case", type=float, default=None, help="timing budget per batch size")
    bench.add_argument("--accuracy-limit", type=int, default=None, help="first N test items only")
    bench.add_argument(
        "--speed-only",
        action="store_true",
        help="time every variant (speed, memory, FLOPs) without the accuracy pass, which is most of a "
        f"full run on CPU: to re-time on other hardware (default --out {SPEED_RESULTS}; leaves the "
        "docs alone unless --docs is given; does not --merge)",
    )
    bench.add_argument(
        "--docs",
        default=None,
        metavar="PATH",
        help=f"rewrite this page's generated block (default: {DOCS} after a full run or a redraw of "
        "one; quick runs leave the docs alone unless this is given)",
    )
    bench.add_argument("--from-json", default=None, help="only redraw tables, plots and docs from this JSON")
    bench.add_argument(
        "--merge",
        action="store_true",
        help="with --only: replace these subjects in the results folder's bench.json and keep the "
        "others (each subject records the run it comes from)",
    )
    bench.set_defaults(func=partial(bench_command, parser=bench))


def subject_names(only: list[str] | None) -> list[str] | None:
    """--only values, each possibly comma-separated, in order and without repeats."""
    if not only:
        return None
    names = [n.strip() for value in only for n in value.split(",") if n.strip()]
    return list(dict.fromkeys(names))


def command_line(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """The command as recorded in bench.json: the options that differ from their defaults."""
    parts = ["tokenlean", "bench"] + (["--quick"] if args.quick else [])
    for name in subject_names(args.only) or []:
        parts += ["--only", name]
    for flag, attr in RECORDED:
        value = getattr(args, attr)
        if value != parser.get_default(attr):
            if value is True:
                parts.append(flag)
            else:
                parts += [flag, ",".join(map(str, value)) if isinstance(value, tuple) else str(value)]
    return shlex.join(parts)


def bench_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Run (or, with --from-json, redraw) the benchmark; write JSON, Markdown, plots and docs."""
    from bench import report

    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        quick = bool(results.get("quick"))
    else:
        from bench.subjects import SUBJECTS

        only = subject_names(args.only)
        unknown = [name for name in only or [] if name not in SUBJECTS]
        if unknown:
            parser.error(
                f"--only: unknown subject {', '.join(unknown)}; expected one of {', '.join(SUBJECTS)}"
            )
        quick = args.quick
        if args.merge and not only:
            parser.error("--merge: name the subjects to replace with --only")
        if args.merge and args.speed_only:
            parser.error("--merge: a --speed-only run has no accuracy to replace the results' with")
    speed_only = args.speed_only and not args.from_json
    docs = Path(args.docs) if args.docs else (None if quick or speed_only else DOCS)
    if docs is not None:
        try:
            report.check_docs(docs)  # before a run that can take half an hour
        except ValueError as exc:
            parser.error(str(exc))
    default_out = SPEED_RESULTS if speed_only else QUICK_RESULTS if quick else RESULTS
    out = Path(args.out) if args.out else default_out

    if not args.from_json:
        from bench.run import Settings, run

        settings = Settings.quick() if args.quick else Settings()
        overrides = {
            "batches": args.batches,
            "seconds_per_case": args.seconds_per_case,
            "accuracy_limit": args.accuracy_limit,
            "accuracy": False if args.speed_only else None,
        }
        settings = dataclasses.replace(settings, **{k: v for k, v in overrides.items() if v is not None})
        if args.merge:
            previous = out / "bench.json"
            if not previous.is_file():
                parser.error(f"--merge: {previous} does not exist")
            earlier = json.loads(previous.read_text())
            if bool(earlier.get("quick")) != quick:
                parser.error("--merge: a quick run and a full run do not merge")
            if earlier["settings"]["batches"] != list(settings.batches):
                parser.error(f"--merge: {previous} was measured at batches {earlier['settings']['batches']}")
        results = run(only, settings, args.device, command_line(args, parser)) | {"quick": args.quick}
        if args.merge:
            results = report.merged(earlier, results, list(SUBJECTS))

    out.mkdir(parents=True, exist_ok=True)
    written = []
    if not args.from_json:
        (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
        written.append(out / "bench.json")
    (out / "bench.md").write_text(report.markdown(results))
    written += [out / "bench.md", *report.plot(results, out).values()]
    if docs is not None:
        report.update_docs(docs, results)
        written.append(docs)
    print(report.markdown(results))
    print("wrote", ", ".join(str(p) for p in written))
