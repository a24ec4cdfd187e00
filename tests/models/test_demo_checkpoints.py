"""The shipped demo checkpoints load through the service's loader (load_bundle) and still know
easy-VQA."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from models import NO_REDUCTION, named_plan
from models.bundle import load_bundle
from models.demo import data
from models.demo.evaluate import caption_scores, grid_of, scenes_vqa_accuracy, task_of
from models.demo.paths import CHECKPOINTS, DEMO_CHECKPOINTS
from models.demo.scenes import load_split
from models.demo.scenes.dataset import SAMPLE
from models.plan import LEVELS

SLICE = slice(0, 400)


@pytest.fixture(scope="module")
def test_split():
    return data.load_split("test")


def test_checkpoints_are_small_safetensors_only():
    files = [f for f in CHECKPOINTS.rglob("*") if f.is_file()]
    # Models on the pretrained towers ship only what was trained here: the DINOv2-S classifier its
    # head, the two-stream models their fusion layers and heads, stored in fp16 (about 10 MB each);
    # the towers' weights come from installed packages (models/towers.py), never from the
    # repository. The small 64 px models add 15.5 MB; the scenes VQA model, whose heads see two
    # reads of the image and where they lie, another 16 MB.
    assert sum(f.stat().st_size for f in files) <= 52 * 1024 * 1024
    assert (CHECKPOINTS / "classify" / "model.safetensors").stat().st_size < 1024 * 1024
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    for name in DEMO_CHECKPOINTS:
        assert (CHECKPOINTS / name / "model.safetensors").is_file()
    for config in CHECKPOINTS.rglob("config.json"):  # nothing of the machine that trained them
        assert '"/' not in config.read_text(), config
    for name in ("two-stream-vqa", "two-stream-retrieval", "two-stream-scenes-vqa"):
        with safe_open(CHECKPOINTS / name / "model.safetensors", "pt") as f:
            assert not [k for k in f.keys() if k.startswith(("two_stream.vision.", "two_stream.text."))]
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}


@pytest.mark.parametrize(
    ("name", "task"),
    [
        ("two-stream-vqa", "vqa"),
        ("two-stream-retrieval", "retrieval"),
        ("two-stream-scenes-vqa", "vqa"),
        ("vqa", "vqa"),
        ("retrieval", "retrieval"),
        ("classify", "classify"),
        ("vit-classify", "classify"),
        ("lookupvit-classify", "classify"),
    ],
)
def test_task_of_follows_the_model_capabilities(name, task):
    assert task_of(load_bundle(CHECKPOINTS / name).model) == task


def test_tokenizer_knows_every_word_of_the_data_set(test_split):
    bundle = load_bundle(CHECKPOINTS / "vqa")
    words = {w for q in test_split.questions for w in q.replace("?", " ?").split()}
    ids = bundle.tokenizer(sorted(words), add_special_tokens=False)["input_ids"]
    assert bundle.tokenizer.unk_token_id not in {i for row in ids for i in row}


@torch.inference_mode()
@pytest.mark.parametrize(("name", "floors"), [("vqa", (0.93, 0.92)), ("two-stream-vqa", (0.98, 0.97))])
def test_vqa_checkpoint_answers_a_fixed_slice(test_split, name, floors):
    bundle = load_bundle(CHECKPOINTS / name)
    questions = list(test_split.questions[SLICE])
    pixels = bundle.preprocess.from_uint8(test_split.images[test_split.question_image[SLICE]])
    for level, floor in zip(("none", "medium"), floors, strict=True):
        out = bundle.forward(pixels, questions, named_plan(bundle.model, level))
        predicted = [bundle.labels()[i] for i in out.logits.argmax(-1).tolist()]
        accuracy = np.mean([p == a for p, a in zip(predicted, test_split.answers[SLICE], strict=True)])
        assert accuracy >= floor, (level, accuracy)


@torch.inference_mode()
@pytest.mark.parametrize("name", ["classify", "vit-classify"])
def test_classify_checkpoint_labels_a_fixed_slice(test_split, name):
    bundle = load_bundle(CHECKPOINTS / name)
    ids = test_split.fact_ids()[:200]
    out = bundle.forward(bundle.preprocess.from_uint8(test_split.images[ids]), None, NO_REDUCTION)
    predicted = [bundle.labels()[i] for i in out.logits.argmax(-1).tolist()]
    expected = [data.class_label(*test_split.facts[int(i)]) for i in ids]
    assert np.mean([p == e for p, e in zip(predicted, expected, strict=True)]) >= 0.95
    assert grid_of(bundle.model, NO_REDUCTION) is None  # no compressed grid


@torch.inference_mode()
def test_lookupvit_checkpoint_labels_a_fixed_slice_at_every_level(test_split):
    bundle = load_bundle(CHECKPOINTS / "lookupvit-classify")
    rm = bundle.model
    ids = test_split.fact_ids()[:200]
    pixels = bundle.preprocess.from_uint8(test_split.images[ids])
    expected = [data.class_label(*test_split.facts[int(i)]) for i in ids]
    grids = []
    for level in LEVELS:
        plan = named_plan(rm, level)
        out = rm(pixels, plan=plan)
        predicted = [bundle.labels()[i] for i in out.logits.argmax(-1).tolist()]
        accuracy = np.mean([p == e for p, e in zip(predicted, expected, strict=True)])
        assert accuracy >= 0.95, (level, accuracy)
        assert grid_of(rm, plan) ** 2 == out.trace.compressed_tokens[0]
        grids.append(out.trace.compressed_tokens[0])
    assert grids == sorted(grids, reverse=True) and grids[-1] == 1  # high: one compressed token


@torch.inference_mode()
@pytest.mark.parametrize("name", ["retrieval", "two-stream-retrieval"])
def test_retrieval_checkpoint_matches_captions(test_split, name):
    bundle = load_bundle(CHECKPOINTS / name)
    ids = test_split.fact_ids()[:40]
    scores = caption_scores(bundle, test_split, ids, NO_REDUCTION)
    facts = [(s, c) for s in data.SHAPES for c in data.COLORS]
    best = [facts[i] for i in scores.argmax(1)]
    assert np.mean([b == test_split.facts[int(i)] for b, i in zip(best, ids, strict=True)]) >= 0.9


def test_recipes_train_every_checkpoint_after_what_it_starts_from(tmp_path):
    from models.demo.train import phases

    run, loaded = phases(tmp_path)
    assert loaded == []
    assert [name for p in run for name in p.schedules] == [
        "two-stream-vqa",
        "two-stream-retrieval",
        "dinov2-classify",
        "classify",
        "vqa",
        "retrieval",
        "classify_distill",
        "lookupvit",
    ]
    for i, phase in enumerate(run):
        assert set(phase.requires) <= {name for p in run[:i] for name in p.produces}
    on_scenes, loaded = phases(tmp_path, "two-stream", "scenes")
    assert loaded == []
    assert [name for p in on_scenes for name in p.schedules] == [
        "two-stream-scenes-vqa",
        "two-stream-scenes-placed",
        "two-stream-scenes-relations",
        "two-stream-scenes-count",
        "two-stream-scenes-read",
        "two-stream-scenes-text-query",
    ]
    produced = [name for p in (*run, *on_scenes) for name in p.produces]
    assert set(DEMO_CHECKPOINTS) <= set(produced)
    with pytest.raises(ValueError, match="trains on scenes"):
        phases(tmp_path, "lookupvit", "scenes")


def test_lookupvit_alone_starts_from_the_saved_classifier(tmp_path):
    from models.demo.train import phases

    with pytest.raises(FileNotFoundError, match="vit-classify"):
        phases(tmp_path, only="lookupvit")
    run, loaded = phases(CHECKPOINTS, only="lookupvit")
    assert loaded == ["vit-classify"] and [p.produces for p in run] == [("lookupvit-classify",)]


def test_demo_cli_imports_no_torch():
    code = "import sys, models.demo.cli; assert not {'torch', 'transformers', 'numpy'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_the_scenes_model_offers_text_informed_pruning_in_its_tower():
    rm = load_bundle(CHECKPOINTS / "two-stream-scenes-vqa").model
    assert rm.methods == ("pumer", "tome", "tcvit", "evit", "text-evit")
    assert list(rm.base.config.text_query_layers) == [3, 6, 9]
    assert rm.flops(named_plan(rm, "high", "text-evit")) == rm.flops(named_plan(rm, "high", "evit"))


@torch.inference_mode()
def test_the_scenes_model_reads_single_objects_and_loses_them_under_heavy_compression():
    """On the checked-in sample's 16 training scenes (384 questions): questions about one object
    (exist, colour, shape, size; about 35 % by chance) are answered unreduced, and ToMe at `high`
    (2-5 of 257 image tokens left) loses much of that: the set tells levels apart."""
    bundle = load_bundle(CHECKPOINTS / "two-stream-scenes-vqa")
    split = load_split(SAMPLE, "train")

    def single_object(plan) -> float:
        by_type = scenes_vqa_accuracy(bundle, split, plan, None)["by_type"]
        kinds = [by_type[t] for t in ("exist", "color", "shape", "size")]
        return sum(k["accuracy"] * k["n"] for k in kinds) / sum(k["n"] for k in kinds)

    unreduced = single_object(NO_REDUCTION)
    assert unreduced >= 0.75, unreduced
    assert single_object(named_plan(bundle.model, "high", "tome")) <= unreduced - 0.2


@torch.inference_mode()
def test_the_scenes_model_compares_the_two_objects_a_question_names_in_order():
    """Size comparisons flip their answer when the question swaps its two objects; a read by the
    mean-pooled question cannot tell the two apart. Of the sample's 42 comparison questions
    (training scenes) this checkpoint answers 38, the one before the two reads 18."""
    bundle = load_bundle(CHECKPOINTS / "two-stream-scenes-vqa")
    by_type = scenes_vqa_accuracy(bundle, load_split(SAMPLE, "train"), NO_REDUCTION, None)["by_type"]
    assert by_type["compare"]["n"] == 42 and by_type["compare"]["accuracy"] >= 0.8, by_type["compare"]
