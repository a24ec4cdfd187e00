"""Task pipelines: preprocess -> reduced forward -> postprocess, for VQA, image-text retrieval and
image classification. The service, the evaluation and the benchmarks all load models here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from models.families import ReducedOutput, ReducibleModel
from models.loading import load_model
from models.plan import ReductionPlan
from models.tasks.preprocess import ImagePreprocessor
from models.trace import Trace

TASKS = ("vqa", "retrieval", "classify")
EXPECTED_FAMILY = {"vqa": ("vilt",), "retrieval": ("vilt",), "classify": ("vit", "lookupvit")}
TEXT_BUCKET = 8


@dataclass(frozen=True)
class Scored:
    label: str
    score: float


class Pipeline:
    task: str

    def __init__(
        self,
        model: ReducibleModel,
        preprocess: ImagePreprocessor,
        tokenizer=None,
        name: str = "",
        graphs=None,
    ):
        if model.family not in EXPECTED_FAMILY[self.task]:
            expected = " or ".join(EXPECTED_FAMILY[self.task])
            raise ValueError(f"{self.task} needs a {expected} model, got {model.kind}")
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.name = name
        self.graphs = graphs  # exporters.runtime.GraphSet: run exported graphs instead of eager torch

    @property
    def device(self) -> torch.device:
        return next(self.model.model.parameters()).device

    def labels(self) -> list[str]:
        id2label = self.model.model.config.id2label
        return [id2label[i] for i in range(len(id2label))]

    def padded_length(self, texts: list[str]) -> int:
        """Tokens the texts are padded to: the longest, rounded up to a multiple of 8 (capped at the
        model's limit). A text's result then depends on its own length bucket only, never on which
        other texts share its batch (PuMer's text merge count follows the padded length)."""
        limit = self.model.config.max_position_embeddings
        longest = max(
            len(ids) for ids in self.tokenizer(texts, truncation=True, max_length=limit)["input_ids"]
        )
        length = min(-(-longest // TEXT_BUCKET) * TEXT_BUCKET, limit)
        return self.graphs.text_length_for(length) if self.graphs is not None else length

    def encode_texts(self, texts: list[str], length: int | None = None) -> dict[str, torch.Tensor]:
        length = length or self.padded_length(texts)
        enc = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt"
        )
        return {k: enc[k].to(self.device) for k in ("input_ids", "attention_mask")}

    def static_trace(self, plan: ReductionPlan, n_text: int = 0) -> Trace:
        """The trace of a forward whose token counts the plan fixes (exported graphs)."""
        n_image = self.model.nominal_tokens()[1]
        return self.model.make_trace(plan, self.model.schedule(plan, n_text, n_image))


class TextImagePipeline(Pipeline):
    def forward(
        self, pixels: torch.Tensor, texts: list[str], plan: ReductionPlan, length: int | None = None
    ) -> ReducedOutput:
        """ViLT on aligned pairs (pixels[i], texts[i]), texts padded to `length` tokens."""
        text = self.encode_texts(texts, length)
        return self.model(
            text["input_ids"], pixels.to(self.device), attention_mask=text["attention_mask"], plan=plan
        )

    def run(
        self, pixels: torch.Tensor, texts: list[str], plan: ReductionPlan, length: int | None = None
    ) -> tuple[torch.Tensor, Trace]:
        """(logits, trace) from eager torch or, when loaded, the exported graph of this plan's level."""
        if self.graphs is None:
            out = self.forward(pixels, texts, plan, length)
            return out.logits, out.trace
        text = self.encode_texts(texts, length)
        n_text = text["input_ids"].shape[1]
        logits = self.graphs.run(plan.level, n_text, text["input_ids"], text["attention_mask"], pixels)
        return logits, self.static_trace(plan, n_text)


class VQAPipeline(TextImagePipeline):
    task = "vqa"

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax for single-label heads (the demo models); sigmoid for VQAv2-style multi-label ones."""
        if self.model.model.config.problem_type == "single_label_classification":
            return logits.softmax(dim=-1)
        return logits.sigmoid()

    def answer(self, images: list, questions: list[str], plan: ReductionPlan, top_k: int = 3):
        logits, trace = self.run(self.preprocess(images), questions, plan)
        return top_labels(self.scores(logits.float()), self.labels(), top_k), trace


class RetrievalPipeline(TextImagePipeline):
    """forward() gives image-text matching logits (B, 1) of aligned pairs."""

    task = "retrieval"

    def rank_texts(self, image, texts: list[str], plan: ReductionPlan):
        pixels = self.preprocess([image]).expand(len(texts), -1, -1, -1)
        logits, trace = self.run(pixels, texts, plan)
        return ranked(logits[:, 0].float(), texts), trace

    def rank_images(self, text: str, images: list, plan: ReductionPlan):
        logits, trace = self.run(self.preprocess(images), [text] * len(images), plan)
        return ranked(logits[:, 0].float(), list(range(len(images)))), trace


class ClassifyPipeline(Pipeline):
    task = "classify"

    def run(self, pixels: torch.Tensor, plan: ReductionPlan) -> tuple[torch.Tensor, Trace]:
        """(logits, trace) from eager torch or, when loaded, the exported graph of this plan's level."""
        if self.graphs is None:
            out = self.model(pixels.to(self.device), plan=plan)
            return out.logits, out.trace
        return self.graphs.run(plan.level, 0, pixels), self.static_trace(plan)

    def classify(self, images: list, plan: ReductionPlan, top_k: int = 5):
        logits, trace = self.run(self.preprocess(images), plan)
        return top_labels(logits.float().softmax(dim=-1), self.labels(), top_k), trace


PIPELINES = {"vqa": VQAPipeline, "retrieval": RetrievalPipeline, "classify": ClassifyPipeline}


def top_labels(scores: torch.Tensor, labels: list[str], k: int) -> list[list[Scored]]:
    values, indices = scores.topk(min(k, scores.shape[-1]), dim=-1)
    return [
        [Scored(labels[i], float(v)) for v, i in zip(vs, ix, strict=True)]
        for vs, ix in zip(values.tolist(), indices.tolist(), strict=True)
    ]


def ranked(logits: torch.Tensor, items: list) -> list[dict]:
    """Candidates by descending matching score; `probability` is the softmax over candidates."""
    probs = logits.softmax(dim=0)
    order = torch.argsort(logits, descending=True, stable=True).tolist()
    return [
        {"index": i, "item": items[i], "score": float(logits[i]), "probability": float(probs[i])}
        for i in order
    ]


def load_pipeline(
    task: str,
    name_or_path: str | Path,
    device: str = "cpu",
    backend: str = "torch",
    export_dir: str | Path | None = None,
) -> Pipeline:
    """Load a checkpoint folder or hub id for `task`. Weights load from safetensors only.

    backend "onnx" / "torchscript": run the graphs in `export_dir` (written by `tokenlean export`
    from this checkpoint); the eager model still provides plans, labels and token accounting.
    """
    from transformers import AutoTokenizer

    from models import reducible

    if task not in PIPELINES:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    name = str(name_or_path)
    model = reducible(load_model(name).to(device))
    tokenizer = AutoTokenizer.from_pretrained(name) if task in ("vqa", "retrieval") else None
    graphs = None
    if backend != "torch":
        from exporters.runtime import GraphSet, check_compatible

        if not export_dir:
            raise ValueError(f"backend {backend} needs an export folder for {task} (`tokenlean export`)")
        graphs = GraphSet(export_dir, backend, device)
        check_compatible(graphs.manifest, task, model)
    preprocess = ImagePreprocessor.for_model(model.config, name)
    return PIPELINES[task](model, preprocess, tokenizer, name=name, graphs=graphs)
