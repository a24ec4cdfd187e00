"""`tokenlean bench` and the bench package: the measurements, the variants it compares, the
command, the studies' entry points, and the committed results."""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_vision

from bench import cli, measure, report
from bench.subjects import SUBJECTS
from bench.variants import flops_at, resolution_sizes, variants_of
from models import NO_REDUCTION, named_plan, reducible
from models.loading import load_reducible
from models.plan import LEVELS

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs" / "benchmarks.md"
STUDIES = (
    "bookkeeping",
    "engine_speed",
    "export_speed",
    "fidelity",
    "lookupvit_speed",
    "scenes_readout",
    "serving",
)
MiB = 2**20


def tokenlean(argv: list[str]) -> None:
    """`tokenlean <argv>` with the bench sub-command registered as app/cli.py registers it."""
    parser = argparse.ArgumentParser(prog="tokenlean")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def test_cpu_peak_counts_live_tensors_not_the_sum_of_allocations():
    def two_live():
        a = torch.empty(2 * MiB, dtype=torch.uint8)
        b = torch.empty(1 * MiB, dtype=torch.uint8)
        return a, b

    def one_after_another():
        a = torch.empty(2 * MiB, dtype=torch.uint8)
        del a
        b = torch.empty(1 * MiB, dtype=torch.uint8)
        return b

    assert 3 * MiB <= measure.cpu_peak_bytes(two_live) < 3 * MiB + 64 * 1024
    assert 2 * MiB <= measure.cpu_peak_bytes(one_after_another) < 2 * MiB + 64 * 1024


def test_cuda_peak_is_max_allocated_above_the_start(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append("sync"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1000)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 5096)
    peak = measure.peak_bytes(lambda: calls.append("call"), torch.device("cuda:0"))
    assert peak == 4096
    assert calls.index("reset") < calls.index("call") < len(calls) - 1  # synchronised after the call


def test_rounds_interleave_every_variant_in_alternating_order():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in "abc"}
    times = measure.time_interleaved(calls, rounds=4, warmup=1, device=torch.device("cpu"))
    assert order == list("abc") + list("abc") + list("cba") + list("abc") + list("cba")
    assert {name: len(t) for name, t in times.items()} == {"a": 4, "b": 4, "c": 4}
    stats = measure.speed_stats([0.1, 0.2, 0.3, 0.4], batch=8)
    assert stats["items_per_s"] == pytest.approx(8 / 0.25)
    assert stats["p95_ms"] >= stats["p50_ms"]


@pytest.mark.parametrize("checkpoint", ["vqa", "classify", "retrieval", "vit-classify"])
def test_resolution_baseline_matches_the_default_methods_flops(checkpoint):
    rm = load_reducible(str(ROOT / "models" / "checkpoints" / checkpoint))
    n_text = rm.max_text_tokens
    full, patch = rm.config.image_size, rm.config.patch_size
    unreduced = flops_at(rm, NO_REDUCTION, full, n_text)
    sizes = resolution_sizes(rm, n_text)
    assert set(sizes) == set(LEVELS[1:])
    for level, size in sizes.items():
        assert size % patch == 0 and patch <= size < full
        target = 1 - flops_at(rm, named_plan(rm, level, rm.default_method), full, n_text) / unreduced
        error = abs(1 - flops_at(rm, NO_REDUCTION, size, n_text) / unreduced - target)
        for other in range(patch, full, patch):
            assert error <= abs(1 - flops_at(rm, NO_REDUCTION, other, n_text) / unreduced - target) + 1e-12
    names = [v.name for v in variants_of(rm, n_text=n_text)]
    assert names[0] == "none" and len(names) == len(set(names))
    assert all(f"{m} {lv}" in names for m in rm.methods for lv in LEVELS[1:])


def test_vit_at_a_smaller_input_equals_transformers_with_interpolated_positions():
    model = build_vision("vit-cls").eval()
    rm = reducible(model)
    px = torch.randn(2, 3, 24, 24)
    with torch.inference_mode():
        ours = rm(px, plan=NO_REDUCTION)
        ref = model(pixel_values=px, interpolate_pos_encoding=True).logits
    assert ours.trace.tokens[0] == rm.image_tokens_at(24) == (24 // 4) ** 2 + 1
    assert (ours.logits - ref).abs().max().item() <= 1e-5


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    docs = out / "benchmarks.md"
    docs.write_text(f"intro\n{report.DOCS_BEGIN}\nold\n{report.DOCS_END}\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "DOCS", docs)  # the default page: a quick run must leave it alone
        tokenlean(["bench", "--quick", "--only", "vit-classify", "--only", "vqa", "--out", str(out)])
    assert docs.read_text() == f"intro\n{report.DOCS_BEGIN}\nold\n{report.DOCS_END}\n"
    return out, json.loads((out / "bench.json").read_text())


def test_quick_run_covers_every_method_level_and_baseline(quick_run):
    out, results = quick_run
    assert results["quick"]
    assert results["command"] == f"tokenlean bench --quick --only vit-classify --only vqa --out {out}"
    assert {"platform", "cpu_count", "torch_num_threads", "device"} <= set(results["machine"])
    expected = {
        "vit-classify": {"tome", "tcvit", "evit", "lookupvit", "resolution"},
        "vqa": {"pumer", "tome", "prune", "resolution"},
    }
    assert [s["name"] for s in results["subjects"]] == ["vit-classify", "vqa"]
    for subject in results["subjects"]:
        rows = subject["variants"]
        assert rows[0]["method"] == "none" and rows[0]["flops_ratio"] == 1.0
        assert {r["method"] for r in rows[1:]} == expected[subject["name"]]
        for method in expected[subject["name"]] - {"resolution"}:
            levels = [r["level"] for r in rows if r["method"] == method]
            assert levels[-3:] == ["low", "medium", "high"], method
            flops = [r["flops"] for r in rows if r["method"] == method]
            assert flops == sorted(flops, reverse=True) and flops[-1] < rows[0]["flops"], method
        for row in rows:
            assert 0.0 <= row["metrics"][subject["metric"]] <= 1.0
            assert row["metrics"]["n"] == 64
            for batch in ("1", "4"):
                speed = row["speed"][batch]
                assert speed["items_per_s"] > 0 and speed["p95_ms"] >= speed["p50_ms"] > 0
                assert speed["calls"] >= 2 and speed["peak_memory_bytes"] > 0
            if row["method"] == "resolution":
                assert row["input_size"] < subject["input_size"] and row["flops_ratio"] < 1
                assert row["tokens_per_layer"][0] < rows[0]["tokens_per_layer"][0]
        assert rows[0]["speed"]["4"]["gain"] == 1.0
        high = [r for r in rows if r["level"] == "high" and r["method"] not in ("resolution", "lookupvit")]
        assert all(r["tokens_per_layer"][-1] < rows[0]["tokens_per_layer"][-1] for r in high)
    lookup = [r for r in results["subjects"][0]["variants"] if r["method"] == "lookupvit"]
    assert [r["compressed_tokens_per_layer"][0] for r in lookup] == [36, 25, 9, 1]


def test_quick_run_writes_tables_and_plots_from_its_json(quick_run):
    out, results = quick_run
    assert (out / "bench.md").read_text() == report.markdown(results)
    for key, name in report.PLOTS.items():
        if key == "scene_maps":  # drawn for a scenes subject only
            assert not (out / name).exists()
            continue
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    table = report.markdown(results)
    first = results["subjects"][0]["variants"][1]
    assert f"{report.num(first['speed']['1']['items_per_s'])} ({first['speed']['1']['gain']:.2f}x)" in table


def test_docs_block_is_replaced_and_a_page_without_one_is_refused(quick_run, tmp_path):
    _, results = quick_run
    page = tmp_path / "benchmarks.md"
    page.write_text(f"intro\n{report.DOCS_BEGIN}\nold\n{report.DOCS_END}\noutro\n")
    report.update_docs(page, results)
    assert report.docs_block(page) == report.markdown(results)
    assert page.read_text().startswith(f"intro\n{report.DOCS_BEGIN}\n")
    assert page.read_text().endswith(f"{report.DOCS_END}\noutro\n")
    page.write_text("no block\n")
    with pytest.raises(ValueError, match="no benchmark block"):
        report.update_docs(page, results)


def test_committed_results_are_a_full_run_and_match_the_docs():
    results = json.loads((RESULTS / "bench.json").read_text())
    assert not results["quick"] and results["settings"]["batches"] == [1, 16]
    assert [s["name"] for s in results["subjects"]] == list(SUBJECTS)
    assert report.docs_block(DOCS) == report.markdown(results)
    assert (RESULTS / "bench.md").read_text() == report.markdown(results)
    for name in report.PLOTS.values():
        assert (RESULTS / name).is_file(), name


def test_a_merged_run_replaces_its_subjects_and_names_every_run():
    committed = json.loads((RESULTS / "bench.json").read_text())
    first, second = committed["subjects"][0]["name"], committed["subjects"][1]["name"]
    earlier = {**committed, "command": "tokenlean bench", "git": {"commit": "a" * 40}, "seconds": 100.0}
    for s in earlier["subjects"]:
        s.pop("run", None)
    replaced = {**earlier["subjects"][1], "accuracy_items": 7}
    latest = {
        **earlier,
        "subjects": [replaced],
        "command": f"tokenlean bench --only {second} --merge",
        "git": {"commit": "b" * 40},
        "seconds": 5.0,
    }
    result = report.merged(earlier, latest, [s["name"] for s in earlier["subjects"]])
    assert [s["name"] for s in result["subjects"]] == [s["name"] for s in earlier["subjects"]]
    assert result["subjects"][1]["accuracy_items"] == 7
    assert result["subjects"][0]["run"]["git"]["commit"] == "a" * 40
    assert result["subjects"][1]["run"]["command"] == latest["command"]
    head = report.header(result)
    assert "Subjects from 2 runs" in head and f"{second}: `{latest['command']}` at commit bbbbbbbbbb" in head
    assert f"{first}, " in head and "100 s, on " in head
    # merging again keeps each subject's own run
    again = report.merged(result, {**latest, "subjects": [], "seconds": 1.0}, [first, second])
    assert [s["run"]["seconds"] for s in again["subjects"]] == [100.0, 5.0]


def test_redrawing_the_committed_json_rewrites_tables_plots_and_the_docs_block(tmp_path, monkeypatch):
    page = tmp_path / "benchmarks.md"
    text = DOCS.read_text()
    begin, end = text.index(report.DOCS_BEGIN), text.index(report.DOCS_END)
    page.write_text(text[:begin] + f"{report.DOCS_BEGIN}\nstale\n" + text[end:])
    monkeypatch.setattr(cli, "DOCS", page)  # a redraw of a full run rewrites the default page
    out = tmp_path / "out"
    tokenlean(["bench", "--from-json", str(RESULTS / "bench.json"), "--out", str(out)])
    assert page.read_text() == text
    assert (out / "bench.md").read_text() == (RESULTS / "bench.md").read_text()
    assert not (out / "bench.json").exists()
    for name in report.PLOTS.values():
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_a_speed_only_run_times_every_variant_without_accuracy_or_docs(tmp_path, monkeypatch):
    docs = tmp_path / "benchmarks.md"
    docs.write_text(f"intro\n{report.DOCS_BEGIN}\nold\n{report.DOCS_END}\n")
    monkeypatch.setattr(cli, "DOCS", docs)
    monkeypatch.setattr(cli, "SPEED_RESULTS", tmp_path / "speed")
    monkeypatch.setattr("bench.subjects.Subject.accuracy", lambda *a: pytest.fail("accuracy"))
    tokenlean(["bench", "--quick", "--speed-only", "--only", "vit-classify"])
    results = json.loads((tmp_path / "speed" / "bench.json").read_text())
    assert results["command"] == "tokenlean bench --quick --only vit-classify --speed-only"
    assert not results["settings"]["accuracy"]
    [subject] = results["subjects"]
    assert subject["metric"] is None and subject["weights"] == "demo checkpoint"
    assert all("metrics" not in row and set(row["speed"]) == {"1", "4"} for row in subject["variants"])
    assert "accuracy" not in (tmp_path / "speed" / "bench.md").read_text()
    assert docs.read_text() == f"intro\n{report.DOCS_BEGIN}\nold\n{report.DOCS_END}\n"


def test_a_speed_only_run_does_not_merge(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("bench.run.run", lambda *a, **k: pytest.fail("ran"))
    with pytest.raises(SystemExit) as exited:
        tokenlean(["bench", "--speed-only", "--merge", "--only", "vqa", "--out", str(tmp_path)])
    assert exited.value.code == 2 and "--speed-only" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["0,16", "a", ""])
def test_bad_batch_sizes_are_refused_before_anything_runs(bad, capsys):
    with pytest.raises(SystemExit) as exited:
        tokenlean(["bench", "--quick", "--batches", bad])
    assert exited.value.code == 2 and "positive integers" in capsys.readouterr().err


def test_unknown_subjects_are_refused_with_the_list_before_anything_runs(capsys, monkeypatch):
    monkeypatch.setattr("bench.run.run", lambda *a, **k: pytest.fail("ran"))
    with pytest.raises(SystemExit) as exited:
        tokenlean(["bench", "--quick", "--only", "vqa,vit-b17"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "unknown subject vit-b17" in err
    assert all(name in err for name in SUBJECTS)


def test_a_missing_docs_page_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("bench.run.run", lambda *a, **k: pytest.fail("ran"))
    with pytest.raises(SystemExit) as exited:
        tokenlean(["bench", "--only", "vqa", "--docs", str(tmp_path / "missing.md")])
    assert exited.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_the_command_and_its_help_load_neither_torch_nor_transformers():
    code = (
        "import contextlib, io, sys; from bench.cli import register; import argparse\n"
        "p = argparse.ArgumentParser(prog='tokenlean'); register(p.add_subparsers())\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()) as help:\n"
        "    p.parse_args(['bench', '--help'])\n"
        "assert '--from-json' in help.getvalue() and '--docs' in help.getvalue()\n"
        "print(sorted({'torch', 'transformers', 'numpy'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("study", STUDIES)
def test_every_study_is_a_module_with_a_main(study, capsys):
    module = importlib.import_module(f"bench.{study}")
    with pytest.raises(SystemExit) as exited:
        module.main(["--help"])
    assert exited.value.code == 0
    assert f"python -m bench.{study}" in capsys.readouterr().out


def test_scenes_readout_trains_on_the_sample_with_each_question_count(tmp_path):
    from bench import scenes_readout
    from models.demo.scenes import QUESTION_TYPES, SAMPLE

    out = tmp_path / "readout.json"
    argv = ["--scenes", str(SAMPLE), "--images", "16", "--held-out", "4", "--steps", "6", "--every", "3"]
    scenes_readout.main([*argv, "--questions-per-scene", "2", "6", "--out", str(out)])
    record = json.loads(out.read_text())
    assert record["command"].startswith("python -m bench.scenes_readout --scenes")
    few, many = record["results"]["2"], record["results"]["6"]
    assert few["questions"] == 32 and few["held_out_questions"] == 8
    assert (
        many["questions"] > few["questions"]
        and many["train_questions"] + many["held_out_questions"] == many["questions"]
    )
    for result in (few, many):
        assert [point["step"] for point in result["curve"]] == [3, 6]
        for point in result["curve"]:
            assert 0 <= point["held_out"] <= 100 and point["train_loss"] > 0
            assert set(point["by_type"]) <= set(QUESTION_TYPES)


def test_bookkeeping_clock_sees_both_stages_and_leaves_the_methods_as_they_were():
    from conftest import build_two_stream, vilt_inputs

    from bench.bookkeeping import clocked
    from models.reduction.registry import IMAGE, get_method

    rm = reducible(build_two_stream())
    x = vilt_inputs(batch=2, text_len=12)
    for plan, reduces in ((NO_REDUCTION, False), (named_plan(rm, "high", "tome"), True)):
        spent = [0.0]
        with clocked(spent), torch.inference_mode():
            rm(x["input_ids"], x["pixel_values"], x["attention_mask"], plan=plan)
        assert (spent[0] > 0) == reduces
    assert "reduce" not in vars(get_method("tome", IMAGE))
    spent = [0.0]
    with clocked(spent), torch.inference_mode():  # PuMer alone: the fusion's reducer is clocked too
        rm(x["input_ids"], x["pixel_values"], x["attention_mask"], plan=named_plan(rm, "high", "pumer"))
    assert spent[0] > 0


def test_no_module_of_the_package_edits_sys_path():
    for path in (ROOT / "bench").glob("*.py"):
        assert "sys.path" not in path.read_text(), path


def test_token_maps_grey_what_was_pruned_and_refuse_a_patch_covered_twice():
    from bench.token_maps import PRUNED, merge_picture, token_of_patch

    # [CLS] + 4 patches (2 x 2): token 1 covers patches 0 and 1, token 2 patch 3, patch 2 is pruned
    sources = torch.tensor([[1, 0, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.float32)
    tokens = token_of_patch(sources, protected=1, grid=2, complete=False)
    assert tokens.tolist() == [[1, 1], [PRUNED, 2]]  # token 0 is [CLS]
    with pytest.raises(AssertionError, match="exactly one"):
        token_of_patch(sources, protected=1, grid=2)
    with pytest.raises(AssertionError, match="two tokens"):
        token_of_patch(torch.tensor([[0, 1, 1, 1, 1], [0, 1, 0, 0, 0]]), protected=1, grid=2, complete=False)
    image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    picture = merge_picture(image, tokens)
    assert (picture[2:, :2] == 70).all()  # the pruned patch, dark grey
    assert (picture[2:, 2:] == image[2:, 2:].reshape(-1, 3).mean(0).astype(np.uint8)).all()  # token 2
    assert (picture[1, :] == 255).all()  # token 1's lower edge, white


def test_breakdown_tables_list_every_variant_by_tag():
    metrics = {
        "accuracy": 0.5,
        "n": 4,
        "by_type": {"count": {"accuracy": 0.25, "n": 2}, "exist": {"accuracy": 0.75, "n": 2}},
    }
    subject = {
        "variants": [
            {"method": "none", "level": "none", "flops_ratio": 1.0, "metrics": metrics},
            {"method": "tome", "level": "high", "flops_ratio": 0.35, "metrics": metrics},
        ]
    }
    table = report.breakdown_table(subject, "by_type", "question type")
    assert "| method | level | FLOPs | count (2) | exist (2) |" in table
    assert "| tome | high | 0.35 | 25.0 | 75.0 |" in table
    assert report.breakdown_table(subject, "by_size", "size") is None


def test_scenes_accuracy_breaks_down_by_question_type_and_target_size():
    from models.demo.evaluate import breakdown

    correct = np.array([True, False, True, True])
    assert breakdown(correct, ("count", "count", "exist", "exist", "ignored")) == {
        "count": {"accuracy": 0.5, "n": 2},
        "exist": {"accuracy": 1.0, "n": 2},
    }
