"""Tasks that answer one image (+ a question) with top-k scored labels: VQA and classification."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel

from app.errors import InvalidInput
from app.tasks.base import (
    BatchModel,
    Task,
    check_top_k,
    softmax,
    token_map_field,
    token_map_layer,
    top_labels,
)


@dataclass(frozen=True)
class LabelItem:
    pixels: np.ndarray  # (3, H, W)
    top_k: int
    question: str | None = None
    text_length: int = 0  # padded token length of the question; part of the batch key
    token_map_layer: int | None = None  # the token map asked for; part of the batch key


class LabelTask(Task):
    """Subclasses name the response's two fields (`keys`: best label, scored list) and say
    whether a question comes with the image (`asks`)."""

    file_fields = ("image",)
    keys: tuple[str, str]
    asks: bool

    async def decode(self, body, images, ctx) -> LabelItem:
        check_top_k(body.top_k, ctx.limits)
        if self.asks and len(body.question) > ctx.limits.max_question_chars:
            raise InvalidInput(f"question: at most {ctx.limits.max_question_chars} characters")
        layer = token_map_layer(body, ctx)
        pixels = (await ctx.pixels(images["image"][:1]))[0]
        if not self.asks:
            return LabelItem(pixels, body.top_k, token_map_layer=layer)
        return LabelItem(pixels, body.top_k, body.question, ctx.text_length([body.question]), layer)

    def scores(self, model: BatchModel, logits: np.ndarray) -> np.ndarray:
        return softmax(logits)

    def run(self, model: BatchModel, items: list[LabelItem]) -> list:
        """(top labels, token map or None) per item."""
        pixels = np.stack([i.pixels for i in items])
        texts = [i.question for i in items] if self.asks else None
        first = items[0]
        logits, maps = model.run(pixels, texts, first.text_length, first.token_map_layer)
        scores = self.scores(model, logits)
        maps = maps or (None,) * len(items)
        return [
            (top_labels(s, model.labels, i.top_k), m) for s, i, m in zip(scores, items, maps, strict=True)
        ]

    def encode(self, body: BaseModel, result) -> dict:
        best, scored = self.keys
        labels, token_map = result
        return {
            best: labels[0].label,
            scored: [{"label": a.label, "score": a.score} for a in labels],
            **token_map_field(token_map),
        }

    def v2_tensors(self, fields: dict) -> dict[str, list]:
        """The best label, the top-k labels and their scores (`v2_outputs`: keys + "scores")."""
        best, scored = self.keys
        rows = fields[scored]
        return {
            best: [fields[best]],
            scored: [r["label"] for r in rows],
            "scores": [r["score"] for r in rows],
        }
