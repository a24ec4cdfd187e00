"""A loaded checkpoint with what it needs around it: the reducible model, its image preprocessing
and tokenizer, its labels. The service's backends, the evaluation, the exporter and the
benchmarks all load checkpoints here."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.families.base import ReducedOutput, ReducibleModel
from models.families.registry import reducible
from models.loading import load_model
from models.plan import ReductionPlan
from models.preprocess import ImagePreprocessor

TEXT_BUCKET = 8  # texts are padded to a multiple of this many tokens


@dataclass
class ModelBundle:
    model: ReducibleModel
    preprocess: ImagePreprocessor
    tokenizer: Any = None
    name: str = ""
    # A fast tokenizer sets its padding/truncation on the shared Rust object for each call, and the
    # service measures texts on the event loop while it encodes batches on the model thread: calls
    # are serialised so one call's settings cannot apply to the other's.
    _tokenizer_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.model.parameters()).device

    def labels(self) -> list[str]:
        id2label = self.model.config.id2label
        return [id2label[i] for i in range(len(id2label))]

    @property
    def single_label(self) -> bool:
        """Trained with one right label per input (softmax scores); VQAv2-style answer heads are
        multi-label (sigmoid scores)."""
        return getattr(self.model.config, "problem_type", None) == "single_label_classification"

    def padded_length(self, texts: list[str]) -> int:
        """Tokens the texts are padded to: the longest, rounded up to a multiple of 8 (capped at the
        model's limit). A text's result then depends on its own length bucket only, never on which
        other texts share its batch (PuMer's text merge count follows the padded length)."""
        limit = self.model.max_text_tokens
        with self._tokenizer_lock:
            ids = self.tokenizer(texts, truncation=True, max_length=limit)["input_ids"]
        longest = max(len(i) for i in ids)
        return min(-(-longest // TEXT_BUCKET) * TEXT_BUCKET, limit)

    def encode_texts(self, texts: list[str], length: int | None = None) -> dict[str, torch.Tensor]:
        length = length or self.padded_length(texts)
        with self._tokenizer_lock:
            enc = self.tokenizer(
                texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt"
            )
        return {k: enc[k].to(self.device) for k in ("input_ids", "attention_mask")}

    def inputs(
        self, pixels: torch.Tensor, texts: list[str] | None = None, length: int | None = None
    ) -> dict[str, torch.Tensor]:
        """The model's inputs, in model.input_names order: pixels[i] pairs with texts[i]."""
        named = {"pixel_values": pixels.to(self.device)}
        if self.model.takes_text:
            named |= self.encode_texts(texts, length)
        return {name: named[name] for name in self.model.input_names}

    def forward(
        self,
        pixels: torch.Tensor,
        texts: list[str] | None,
        plan: ReductionPlan,
        length: int | None = None,
        track_source: bool = False,
    ) -> ReducedOutput:
        """track_source: also which input patches each token covers (token maps)."""
        inputs = self.inputs(pixels, texts, length)
        if track_source:
            return self.model(**inputs, plan=plan, track_source=True)
        return self.model(**inputs, plan=plan)


def load_bundle(name_or_path: str | Path, device: str = "cpu") -> ModelBundle:
    """A checkpoint folder, hub id or `random:*` config. Weights load from safetensors only."""
    name = str(name_or_path)
    model = reducible(load_model(name).to(device))
    tokenizer = None
    if model.takes_text:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name)
    return ModelBundle(model, ImagePreprocessor.for_model(model.config, name), tokenizer, name)
