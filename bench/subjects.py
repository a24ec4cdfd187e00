"""The models a benchmark runs: the demo checkpoints on real easy-VQA inputs (speed and accuracy)
and full-size architectures with random weights on random inputs (speed only)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from bench.variants import Variant, input_size, variants_of
from models.bundle import ModelBundle, load_bundle
from models.demo import data
from models.demo.evaluate import METRICS, scenes_vqa_accuracy
from models.demo.paths import (
    CHECKPOINTS,
    CLASSIFY,
    LOOKUPVIT_CLASSIFY,
    RETRIEVAL,
    TWO_STREAM_RETRIEVAL,
    TWO_STREAM_SCENES_VQA,
    TWO_STREAM_VQA,
    VIT_CLASSIFY,
    VQA,
)
from models.demo.scenes import SceneSplit, load_split
from models.demo.scenes.dataset import cached_test_split
from models.families.base import ReducibleModel
from models.families.registry import reducible
from models.levels import named_plan
from models.loading import load_model
from models.plan import LEVELS

# Demo subject -> (its task, its checkpoint folder, further models it holds: slot -> folder). The
# defaults (two-stream VQA and retrieval on DINOv2-S + MiniLM-L6, the DINOv2-S classifier, all at
# 224 px) first; then the two-stream VQA model of the scenes set; then the small ViLT models
# (64 px) and the small ViT classifier, whose subject also holds the LookupViT classifier.
DEMO = {
    "two-stream-vqa": ("vqa", TWO_STREAM_VQA, {}),
    "two-stream-retrieval": ("retrieval", TWO_STREAM_RETRIEVAL, {}),
    "classify": ("classify", CLASSIFY, {}),
    "scenes": ("vqa", TWO_STREAM_SCENES_VQA, {}),
    "vqa": ("vqa", VQA, {}),
    "retrieval": ("retrieval", RETRIEVAL, {}),
    "vit-classify": ("classify", VIT_CLASSIFY, {"lookupvit": LOOKUPVIT_CLASSIFY}),
}
# Full-size subject -> (the task its architecture serves, the random-weight config).
FULL_SIZE = {
    "vilt-b32": ("vqa", "random:vilt-b32"),
    "vit-s16": ("classify", "random:vit-s16"),
    "vit-b16": ("classify", "random:vit-b16"),
}
SUBJECTS = (*DEMO, *FULL_SIZE)
# Subjects evaluated on the scenes set's test split (generated on first use) instead of easy-VQA's:
# accuracy also by question type and by target-object size, and token maps of a few test scenes.
SCENES = ("scenes",)
# The headline quality figure of each task (retrieval: mean recall@1 of both directions).
METRIC = {"vqa": "accuracy", "classify": "accuracy", "retrieval": "recall@1"}
SEED = 0


def text_tokens(rm: ReducibleModel) -> int | None:
    """Text tokens of every timed input: the model's limit, the length FLOPs are counted at (None
    for a model that takes no text)."""
    return rm.max_text_tokens


@dataclass
class Subject:
    name: str
    task: str
    source: str
    models: dict[str, ReducibleModel]
    variants: list[Variant]
    bundles: dict[str, ModelBundle] = field(default_factory=dict)  # demo subjects only
    split: data.Split | SceneSplit | None = None
    data: str | None = None  # the test set of the accuracy columns: "easy-VQA" or "scenes"

    @property
    def main(self) -> ReducibleModel:
        return self.models["main"]

    @property
    def n_text(self) -> int | None:
        return text_tokens(self.main)

    @property
    def device(self) -> torch.device:
        return next(self.main.model.parameters()).device

    def _images(self, batch: int) -> tuple:
        """(images as uint8 arrays, their texts): real test items for the demo subjects."""
        split = self.split
        if self.task == "vqa":
            # One question per image: rows of a timed batch never share an image (a two-stream model
            # would run its vision tower once for rows that do).
            first = np.unique(split.question_image, return_index=True)[1][:batch]
            return split.images[split.question_image[first]], [split.questions[i] for i in first]
        ids = split.fact_ids()[:batch]
        return split.images[ids], [data.caption(*split.facts[int(i)]) for i in ids]

    def inputs(self, batch: int, size: int, model: str = "main") -> dict[str, torch.Tensor]:
        """The inputs of `model` for a batch at `size` px: the first test items (demo subjects, texts
        padded to the model's limit), else random inputs of the right shapes."""
        if self.bundles:
            images, texts = self._images(batch)
            bundle = self.bundles[model]
            pixels = dataclasses.replace(bundle.preprocess, size=size).from_uint8(images)
            return bundle.inputs(pixels, texts, text_tokens(bundle.model))
        rm = self.models[model]
        # Unpadded texts at the model's limit: the length FLOPs are counted at.
        x = rm.family.example_inputs(rm, batch, text_tokens(rm) or 0, size, SEED, padded=False)
        return {name: x[name].to(self.device) for name in rm.input_names}

    def call(self, variant: Variant, batch: int) -> Callable:
        """A zero-argument reduced forward of `variant` on a fixed batch (inference mode)."""
        rm = self.models[variant.model]
        x = self.inputs(batch, variant.size, variant.model)

        @torch.inference_mode()
        def run():
            return rm(**x, plan=variant.plan)

        return run

    def accuracy(self, variant: Variant, limit: int | None) -> dict | None:
        """The task's metrics on the test split (demo subjects), at the variant's input size."""
        if not self.bundles:
            return None
        bundle = self.bundles[variant.model]
        bundle = dataclasses.replace(
            bundle, preprocess=dataclasses.replace(bundle.preprocess, size=variant.size)
        )
        evaluate = scenes_vqa_accuracy if self.data == "scenes" else METRICS[self.task]
        metrics = evaluate(bundle, self.split, variant.plan, limit)
        if self.task == "retrieval":
            metrics["recall@1"] = (metrics["image_to_text_r1"] + metrics["text_to_image_r1"]) / 2
        return metrics


def demo_subject(name: str, device: str) -> Subject:
    task, folder, others = DEMO[name]
    bundle = load_bundle(CHECKPOINTS / folder, device=device)
    rm = bundle.model
    subject = Subject(
        name=name,
        task=task,
        source=f"models/checkpoints/{folder}",
        models={"main": rm},
        variants=variants_of(rm, n_text=text_tokens(rm)),
        bundles={"main": bundle},
        split=load_split(cached_test_split(), "test") if name in SCENES else data.load_split("test"),
        data="scenes" if name in SCENES else "easy-VQA",
    )
    for slot, other_folder in others.items():  # a model of its own: its levels, no resolution baseline
        other = load_bundle(CHECKPOINTS / other_folder, device=device)
        om = other.model
        subject.models[slot] = om
        subject.bundles[slot] = other
        method = om.default_method
        subject.variants += [
            Variant(method, lv, named_plan(om, lv, method), input_size(om), slot) for lv in LEVELS
        ]
    return subject


def full_size_subject(name: str, device: str) -> Subject:
    task, model_id = FULL_SIZE[name]
    rm = reducible(load_model(model_id, seed=SEED).to(device))
    return Subject(name, task, model_id, {"main": rm}, variants_of(rm, n_text=text_tokens(rm)))


def load_subject(name: str, device: str = "cpu") -> Subject:
    if name in DEMO:
        return demo_subject(name, device)
    if name in FULL_SIZE:
        return full_size_subject(name, device)
    raise ValueError(f"unknown subject {name!r}; expected one of {SUBJECTS}")
