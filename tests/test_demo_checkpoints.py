"""The shipped demo checkpoints load through the service's loader and still know easy-VQA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from app.settings import CHECKPOINTS
from models import NO_REDUCTION, named_plan
from models.demo import data
from models.demo.evaluate import caption_scores
from models.plan import LEVELS
from models.tasks.pipelines import load_pipeline

SLICE = slice(0, 400)


@pytest.fixture(scope="module")
def test_split():
    return data.load_split("test")


def test_checkpoints_are_small_safetensors_only():
    files = [f for f in CHECKPOINTS.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 25 * 1024 * 1024
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    for task in ("vqa", "retrieval", "classify", "classify-lookupvit"):
        assert (CHECKPOINTS / task / "model.safetensors").is_file()


def test_tokenizer_knows_every_word_of_the_data_set(test_split):
    pipeline = load_pipeline("vqa", CHECKPOINTS / "vqa")
    words = {w for q in test_split.questions for w in q.replace("?", " ?").split()}
    ids = pipeline.tokenizer(sorted(words), add_special_tokens=False)["input_ids"]
    assert pipeline.tokenizer.unk_token_id not in {i for row in ids for i in row}


@torch.inference_mode()
def test_vqa_checkpoint_answers_a_fixed_slice(test_split):
    pipeline = load_pipeline("vqa", CHECKPOINTS / "vqa")
    questions = list(test_split.questions[SLICE])
    pixels = pipeline.preprocess.from_uint8(test_split.images[test_split.question_image[SLICE]])
    for level, floor in (("none", 0.93), ("medium", 0.92)):
        out = pipeline.forward(pixels, questions, named_plan(pipeline.model, level))
        predicted = [pipeline.labels()[i] for i in out.logits.argmax(-1).tolist()]
        accuracy = np.mean([p == a for p, a in zip(predicted, test_split.answers[SLICE], strict=True)])
        assert accuracy >= floor, (level, accuracy)


@torch.inference_mode()
def test_classify_checkpoint_labels_a_fixed_slice(test_split):
    pipeline = load_pipeline("classify", CHECKPOINTS / "classify")
    ids = test_split.fact_ids()[:200]
    out = pipeline.model(pipeline.preprocess.from_uint8(test_split.images[ids]), plan=NO_REDUCTION)
    predicted = [pipeline.labels()[i] for i in out.logits.argmax(-1).tolist()]
    expected = [f"{test_split.facts[int(i)][1]} {test_split.facts[int(i)][0]}" for i in ids]
    assert np.mean([p == e for p, e in zip(predicted, expected, strict=True)]) >= 0.95


@torch.inference_mode()
def test_lookupvit_checkpoint_labels_a_fixed_slice_at_every_level(test_split):
    pipeline = load_pipeline("classify", CHECKPOINTS / "classify-lookupvit")
    rm = pipeline.model
    assert rm.family == "lookupvit"
    ids = test_split.fact_ids()[:200]
    pixels = pipeline.preprocess.from_uint8(test_split.images[ids])
    expected = [f"{test_split.facts[int(i)][1]} {test_split.facts[int(i)][0]}" for i in ids]
    grids = []
    for level in LEVELS:
        out = rm(pixels, plan=named_plan(rm, level))
        predicted = [pipeline.labels()[i] for i in out.logits.argmax(-1).tolist()]
        accuracy = np.mean([p == e for p, e in zip(predicted, expected, strict=True)])
        assert accuracy >= 0.95, (level, accuracy)
        grids.append(out.trace.compressed_tokens[0])
    assert grids == sorted(grids, reverse=True) and grids[-1] == 1  # high: one compressed token


@torch.inference_mode()
def test_retrieval_checkpoint_matches_captions(test_split):
    pipeline = load_pipeline("retrieval", CHECKPOINTS / "retrieval")
    ids = test_split.fact_ids()[:40]
    scores = caption_scores(pipeline, test_split, ids, NO_REDUCTION)
    facts = [(s, c) for s in data.SHAPES for c in data.COLORS]
    best = [facts[i] for i in scores.argmax(1)]
    assert np.mean([b == test_split.facts[int(i)] for b, i in zip(best, ids, strict=True)]) >= 0.9
