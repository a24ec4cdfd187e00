"""`tokenlean eval`: accuracy of a checkpoint on the easy-VQA test split at every compression level
of every method that applies, with the analytic FLOPs of each level.

Retrieval: each query (an image, or the caption of an image) is ranked against a fixed, seeded
pool of 100 test candidates that contains its own match; a candidate whose facts (shape, colour)
equal the query's counts as correct. Captions take only 24 distinct values, so every
(image, caption) score is computed once and the pools are ranked from that table.
"""

from __future__ import annotations

from math import isqrt
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.bundle import ModelBundle, load_bundle
from models.demo import data
from models.families.base import ReducibleModel
from models.levels import named_plan
from models.plan import LEVELS, NO_REDUCTION, ReductionPlan

POOL = 100
# (takes text, head) -> the easy-VQA task such a model is evaluated on.
TASK_OF_CAPABILITIES = {
    (True, "classifier"): "vqa",
    (True, "matching"): "retrieval",
    (False, "classifier"): "classify",
}


def task_of(model: ReducibleModel) -> str:
    """The task of a model, from what it takes (text or not) and what its head gives."""
    task = TASK_OF_CAPABILITIES.get((model.takes_text, model.head))
    if task is None:
        text = "image-text" if model.takes_text else "image-only"
        raise ValueError(f"{model.kind}: no easy-VQA task for an {text} model with head {model.head!r}")
    return task


def grid_of(model: ReducibleModel, plan: ReductionPlan) -> int | None:
    """The side of the compressed token grid `plan` runs at (LookupViT); None for a model without one."""
    compressed = model.static_trace(plan, model.nominal_tokens()[0]).compressed_tokens
    return isqrt(compressed[0]) if compressed else None


def plans(bundle: ModelBundle, methods: list[str] | None) -> list[ReductionPlan]:
    rm = bundle.model
    chosen = [NO_REDUCTION]
    for method in methods or rm.methods:
        chosen += [named_plan(rm, level, method) for level in LEVELS if level != "none"]
    return chosen


@torch.inference_mode()
def vqa_predictions(
    p: ModelBundle, split, plan: ReductionPlan, limit: int | None, batch: int = 256
) -> tuple[np.ndarray, float]:
    """(whether each of the first `limit` questions is answered right, measured FLOPs saved). A
    split's questions of one image are consecutive, so a batch runs each image's tower once
    (unless the plan's tower reads the question)."""
    n = len(split.questions) if limit is None else min(limit, len(split.questions))
    labels = p.labels()
    correct, flops, full = [], 0, 0
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        pixels = p.preprocess.from_uint8(split.images[split.question_image[start:stop]])
        out = p.forward(pixels, list(split.questions[start:stop]), plan)
        predicted = out.logits.argmax(-1).tolist()
        correct += [labels[i] == a for i, a in zip(predicted, split.answers[start:stop], strict=True)]
        flops += out.trace.flops * (stop - start)
        full += out.trace.full_flops * (stop - start)
    return np.array(correct, dtype=bool), 1 - flops / full


def vqa_accuracy(p: ModelBundle, split, plan: ReductionPlan, limit: int | None) -> dict:
    correct, saved = vqa_predictions(p, split, plan, limit)
    return {"accuracy": float(correct.mean()), "n": len(correct), "measured_flops_saved": saved}


def breakdown(correct: np.ndarray, tags: tuple[str, ...]) -> dict[str, dict]:
    """Accuracy and count per tag value, over the questions in `correct`."""
    tags = np.asarray(tags[: len(correct)])
    return {
        tag: {"accuracy": float(correct[tags == tag].mean()), "n": int((tags == tag).sum())}
        for tag in dict.fromkeys(tags.tolist())
    }


def scenes_vqa_accuracy(p: ModelBundle, split, plan: ReductionPlan, limit: int | None) -> dict:
    """vqa_accuracy on a scenes split, also by question type and by the size of the objects the
    question is about (models.demo.scenes.questions)."""
    correct, saved = vqa_predictions(p, split, plan, limit)
    return {
        "accuracy": float(correct.mean()),
        "n": len(correct),
        "measured_flops_saved": saved,
        "by_type": breakdown(correct, split.types),
        "by_size": breakdown(correct, split.target_sizes),
    }


@torch.inference_mode()
def classify_accuracy(p: ModelBundle, split: data.Split, plan: ReductionPlan, limit: int | None) -> dict:
    ids = split.fact_ids()[:limit]
    labels = p.labels()
    correct = 0
    for start in range(0, len(ids), 256):
        chunk = ids[start : start + 256]
        out = p.forward(p.preprocess.from_uint8(split.images[chunk]), None, plan)
        predicted = out.logits.argmax(-1).tolist()
        expected = [data.class_label(*split.facts[int(i)]) for i in chunk]
        correct += sum(labels[a] == b for a, b in zip(predicted, expected, strict=True))
    return {"accuracy": correct / len(ids), "n": len(ids)}


@torch.inference_mode()
def caption_scores(p: ModelBundle, split: data.Split, ids: np.ndarray, plan: ReductionPlan) -> np.ndarray:
    """Matching logit of every (image, caption) pair: (len(ids), 24)."""
    facts = [(s, c) for s in data.SHAPES for c in data.COLORS]
    captions = [data.caption(*f) for f in facts]
    scores = np.zeros((len(ids), len(captions)), dtype=np.float32)
    per_batch = 10  # images per forward: 10 x 24 pairs
    for start in range(0, len(ids), per_batch):
        chunk = ids[start : start + per_batch]
        pixels = p.preprocess.from_uint8(split.images[chunk]).repeat_interleave(len(captions), dim=0)
        out = p.forward(pixels, captions * len(chunk), plan)
        scores[start : start + len(chunk)] = out.logits[:, 0].view(len(chunk), len(captions)).float().numpy()
    return scores


def recall_at(ranked_correct: np.ndarray, k: int) -> float:
    return float(ranked_correct[:, :k].any(axis=1).mean())


def retrieval_recall(
    p: ModelBundle, split: data.Split, plan: ReductionPlan, limit: int | None, seed: int = 0
) -> dict:
    ids = split.fact_ids()[:limit]
    fact_list = [(s, c) for s in data.SHAPES for c in data.COLORS]
    fact_index = np.array([fact_list.index(split.facts[int(i)]) for i in ids])
    scores = caption_scores(p, split, ids, plan)
    rng = np.random.default_rng(seed)
    pool = min(POOL, len(ids))
    i2t, t2i = [], []
    for q in range(len(ids)):
        others = rng.choice(np.delete(np.arange(len(ids)), q), size=pool - 1, replace=False)
        members = np.concatenate([[q], others])  # pool of test items; the query's own match is in it
        # image -> text: the captions of the pool's images, scored against the query image
        cand = fact_index[members]
        order = np.argsort(-scores[q, cand], kind="stable")
        i2t.append(cand[order] == fact_index[q])
        # text -> image: the pool's images, scored against the query image's caption
        order = np.argsort(-scores[members, fact_index[q]], kind="stable")
        t2i.append(fact_index[members[order]] == fact_index[q])
    i2t, t2i = np.array(i2t), np.array(t2i)
    return {
        "image_to_text_r1": recall_at(i2t, 1),
        "image_to_text_r5": recall_at(i2t, 5),
        "text_to_image_r1": recall_at(t2i, 1),
        "text_to_image_r5": recall_at(t2i, 5),
        "n": len(ids),
        "pool": pool,
    }


METRICS = {"vqa": vqa_accuracy, "classify": classify_accuracy, "retrieval": retrieval_recall}


def evaluate(checkpoint: str | Path, methods: list[str] | None = None, limit: int | None = None) -> dict:
    bundle = load_bundle(checkpoint)
    rm = bundle.model
    task = task_of(rm)
    split = data.load_split("test")
    full = rm.flops(NO_REDUCTION)
    rows = []
    for plan in tqdm(plans(bundle, methods), desc=f"eval {task}"):
        result = METRICS[task](bundle, split, plan, limit)
        flops = rm.flops(plan)
        grid = grid_of(rm, plan)
        rows.append(
            {
                "method": plan.method,
                "level": plan.level,
                "flops": flops,
                "flops_saved": 1 - flops / full,
                **({"grid": grid} if grid is not None else {}),
                **result,
            }
        )
    return {"checkpoint": str(checkpoint), "task": task, "limit": limit, "rows": rows}


def format_table(report: dict) -> str:
    keys = [k for k in report["rows"][0] if k not in ("method", "level", "flops", "n", "pool", "grid")]
    lines = [f"{report['task']} — {report['checkpoint']}", "method  level   MFLOPs  " + "  ".join(keys)]
    for row in report["rows"]:
        values = "  ".join(f"{row[k] * 100:>{len(k)}.2f}" for k in keys)
        grid = f"  (grid {row['grid']}x{row['grid']})" if "grid" in row else ""
        lines.append(f"{row['method']:<7} {row['level']:<7} {row['flops'] / 1e6:>6.1f}  {values}{grid}")
    return "\n".join(lines)
