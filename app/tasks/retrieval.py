"""Image-text retrieval: rank candidate texts for an image, or candidate images for a text, by the
model's image-text matching score."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, Field, model_validator

from app.errors import InvalidInput
from app.schemas import IMAGE_DOC, PNG_EXAMPLE, Report, TaskRequest, Text
from app.tasks.base import (
    BatchModel,
    Task,
    TensorSpec,
    register_task,
    softmax,
    token_map_field,
    token_map_layer,
    warmup_pixels,
)

_FILE = {"type": "string", "format": "binary"}


class RetrievalRequest(TaskRequest):
    """Either `image` + `texts` (rank the texts) or `text` + `images` (rank the images)."""

    image: str | None = Field(
        default=None, description=f"image whose candidate texts are ranked: {IMAGE_DOC}"
    )
    texts: list[Text] | None = Field(
        default=None,
        description="candidate texts: at most `max_candidates`, each at most `max_question_chars` characters",
        examples=[["a red circle", "a blue triangle"]],
    )
    text: Text | None = Field(
        default=None,
        description="the text whose candidate images are ranked, at most `max_question_chars` characters",
    )
    images: list[str] | None = Field(
        default=None,
        description="candidate images, each like `image`; at most `max_candidates`",
    )

    @model_validator(mode="after")
    def _one_direction(self) -> RetrievalRequest:
        texts_mode = self.image is not None and self.texts is not None
        images_mode = self.text is not None and self.images is not None
        if (
            texts_mode == images_mode
            or (texts_mode and (self.text is not None or self.images is not None))
            or (images_mode and (self.image is not None or self.texts is not None))
        ):
            raise ValueError("send either `image` with `texts`, or `text` with `images`")
        if (self.texts is not None and not self.texts) or (self.images is not None and not self.images):
            raise ValueError("candidates must not be empty")
        return self


class RankedItem(BaseModel):
    index: int = Field(description="position in the request's candidate list")
    text: str | None = None
    score: float = Field(description="image-text matching logit")
    probability: float = Field(description="softmax of the scores over the candidates")


class RetrievalResponse(Report):
    ranking: list[RankedItem]


@dataclass(frozen=True)
class RetrievalItem:
    pixels: np.ndarray  # (N, 3, H, W): one image repeated, or N candidate images
    texts: tuple[str, ...]  # N texts: candidates, or one query repeated
    candidates: tuple  # what is ranked (the texts or image indices)
    text_length: int
    token_map_layer: int | None = None  # the token map asked for; part of the batch key


def ranked(logits: np.ndarray, candidates: tuple) -> list[dict]:
    """Candidates by descending matching score; `probability` is the softmax over candidates."""
    probs = softmax(logits, axis=0)
    order = np.argsort(-logits, kind="stable")
    return [
        {"index": int(i), "item": candidates[i], "score": float(logits[i]), "probability": float(probs[i])}
        for i in order
    ]


class Retrieval(Task):
    name = "retrieval"
    summary = "Rank candidate texts for an image, or candidate images for a text."
    request = RetrievalRequest
    response = RetrievalResponse
    file_fields = ("image", "images")
    list_fields = ("texts", "images")
    demo_checkpoint = "two-stream-retrieval"
    json_example = {"image": PNG_EXAMPLE, "texts": ["a red circle", "a blue triangle"], "compression": "low"}
    form_fields = {
        "texts": {"type": "array", "items": {"type": "string"}},
        "text": {"type": "string"},
        "images": {"type": "array", "items": _FILE},
    }
    # either image + texts or text + images, as on /v1; outputs best first: candidate indices,
    # their scores and probabilities, and the texts when texts were ranked
    v2_inputs = (
        TensorSpec("image", "BYTES", (1,), optional=True),
        TensorSpec("texts", "BYTES", (-1,), optional=True),
        TensorSpec("text", "BYTES", (1,), optional=True),
        TensorSpec("images", "BYTES", (-1,), optional=True),
    )
    v2_outputs = (
        TensorSpec("ranking", "INT64", (-1,)),
        TensorSpec("scores", "FP64", (-1,)),
        TensorSpec("probabilities", "FP64", (-1,)),
        TensorSpec("texts", "BYTES", (-1,)),
    )

    def serves(self, model) -> bool:
        return model.takes_text and model.head == "matching"

    async def decode(self, body, images, ctx) -> RetrievalItem:
        limits = ctx.limits
        candidates = body.texts if body.texts is not None else images["images"]
        if len(candidates) > limits.max_candidates:
            raise InvalidInput(f"at most {limits.max_candidates} candidates per request")
        texts = body.texts or [body.text]
        if any(len(t) > limits.max_question_chars for t in texts):
            raise InvalidInput(f"texts: at most {limits.max_question_chars} characters each")
        length = ctx.text_length(texts)
        layer = token_map_layer(body, ctx)
        if body.texts is not None:
            image = await ctx.pixels(images["image"][:1])
            pixels = np.broadcast_to(image, (len(texts), *image.shape[1:]))
            return RetrievalItem(pixels, tuple(texts), tuple(texts), length, layer)
        pixels = await ctx.pixels(images["images"])
        return RetrievalItem(pixels, (body.text,) * len(pixels), tuple(range(len(pixels))), length, layer)

    def weight(self, item: RetrievalItem) -> int:
        return len(item.texts)

    def run(self, model: BatchModel, items: list[RetrievalItem]) -> list:
        """(ranking, token map of the best-ranked pair or None) per item."""
        pixels = np.concatenate([i.pixels for i in items])
        texts = [t for i in items for t in i.texts]
        first = items[0]
        logits, maps = model.run(pixels, texts, first.text_length, first.token_map_layer)
        logits = logits[:, 0]
        results, start = [], 0
        for item in items:
            n = len(item.texts)
            ranking = ranked(logits[start : start + n], item.candidates)
            results.append((ranking, maps[start + ranking[0]["index"]] if maps else None))
            start += n
        return results

    def encode(self, body, result) -> dict:
        ranking, token_map = result
        rows = [
            {
                "index": r["index"],
                "text": r["item"] if body.texts is not None else None,
                "score": r["score"],
                "probability": r["probability"],
            }
            for r in ranking
        ]
        return {"ranking": rows, **token_map_field(token_map)}

    def v2_tensors(self, fields: dict) -> dict[str, list]:
        rows = fields["ranking"]
        tensors = {
            "ranking": [r["index"] for r in rows],
            "scores": [r["score"] for r in rows],
            "probabilities": [r["probability"] for r in rows],
        }
        if rows and rows[0]["text"] is not None:
            tensors["texts"] = [r["text"] for r in rows]
        return tensors

    def warmup_items(self, ctx, count) -> list[RetrievalItem]:
        texts, length = ("a shape",), ctx.text_length(["a shape"])
        return [RetrievalItem(pixels[None], texts, texts, length) for pixels in warmup_pixels(ctx, count)]


register_task(Retrieval())
