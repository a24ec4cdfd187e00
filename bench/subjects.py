"""The models a benchmark runs: the demo checkpoints on real easy-VQA inputs (speed and accuracy)
and full-size architectures with random weights on random inputs (speed only)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models import ReducibleModel, named_plan, reducible
from models.benchmark.variants import Variant, input_size, variants_of
from models.demo import data
from models.demo.evaluate import METRICS
from models.loading import load_model
from models.plan import LEVELS
from models.tasks.pipelines import Pipeline, load_pipeline

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
DEMO = ("vqa", "retrieval", "classify")
FULL_SIZE = {
    "vilt-b32": ("vqa", "random:vilt-b32"),
    "vit-s16": ("classify", "random:vit-s16"),
    "vit-b16": ("classify", "random:vit-b16"),
}
SUBJECTS = (*DEMO, *FULL_SIZE)
# The headline quality figure of each task (retrieval: mean recall@1 of both directions).
METRIC = {"vqa": "accuracy", "classify": "accuracy", "retrieval": "recall@1"}
SEED = 0


def text_tokens(rm: ReducibleModel) -> int | None:
    """Question tokens of every timed input: ViLT's limit, the length FLOPs are counted at."""
    return rm.config.max_position_embeddings if rm.family == "vilt" else None


@dataclass
class Subject:
    name: str
    task: str
    source: str
    models: dict[str, ReducibleModel]
    variants: list[Variant]
    pipelines: dict[str, Pipeline] = field(default_factory=dict)  # demo subjects only
    split: data.Split | None = None

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
            return split.images[split.question_image[:batch]], list(split.questions[:batch])
        ids = split.fact_ids()[:batch]
        return split.images[ids], [data.caption(*split.facts[int(i)]) for i in ids]

    def inputs(self, batch: int, size: int) -> dict[str, torch.Tensor]:
        dev, main = self.device, self.main
        if self.pipelines:
            images, texts = self._images(batch)
            pipeline = self.pipelines["main"]
            pixels = dataclasses.replace(pipeline.preprocess, size=size).from_uint8(images).to(dev)
            if main.family != "vilt":
                return {"pixel_values": pixels}
            return {"pixel_values": pixels, **pipeline.encode_texts(texts, self.n_text)}
        g = torch.Generator().manual_seed(SEED)
        pixels = torch.randn(batch, 3, size, size, generator=g).to(dev)
        if main.family != "vilt":
            return {"pixel_values": pixels}
        ids = torch.randint(1, main.config.vocab_size, (batch, self.n_text), generator=g).to(dev)
        return {"pixel_values": pixels, "input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def call(self, variant: Variant, batch: int) -> Callable:
        """A zero-argument reduced forward of `variant` on a fixed batch (inference mode)."""
        rm = self.models[variant.model]
        x = self.inputs(batch, variant.size)

        @torch.inference_mode()
        def run():
            if rm.family == "vilt":
                return rm(
                    x["input_ids"], x["pixel_values"], attention_mask=x["attention_mask"], plan=variant.plan
                )
            return rm(x["pixel_values"], plan=variant.plan)

        return run

    def accuracy(self, variant: Variant, limit: int | None) -> dict | None:
        """The task's metrics on the easy-VQA test split (demo subjects), at the variant's input size."""
        if not self.pipelines:
            return None
        pipeline = copy.copy(self.pipelines[variant.model])
        pipeline.preprocess = dataclasses.replace(pipeline.preprocess, size=variant.size)
        metrics = METRICS[self.task](pipeline, self.split, variant.plan, limit)
        if self.task == "retrieval":
            metrics["recall@1"] = (metrics["image_to_text_r1"] + metrics["text_to_image_r1"]) / 2
        return metrics


def demo_subject(task: str, device: str) -> Subject:
    pipeline = load_pipeline(task, CHECKPOINTS / task, device=device)
    rm = pipeline.model
    subject = Subject(
        name=task,
        task=task,
        source=f"models/checkpoints/{task}",
        models={"main": rm},
        variants=variants_of(rm, n_text=text_tokens(rm)),
        pipelines={"main": pipeline},
        split=data.load_split("test"),
    )
    if task == "classify":  # LookupViT is a classifier of its own, compared with the ViT's `none`
        lookup = load_pipeline(task, CHECKPOINTS / "classify-lookupvit", device=device)
        subject.models["lookupvit"] = lookup.model
        subject.pipelines["lookupvit"] = lookup
        subject.variants += [
            Variant("lookupvit", lv, named_plan(lookup.model, lv), input_size(lookup.model), "lookupvit")
            for lv in LEVELS
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
