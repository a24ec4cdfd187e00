"""Visual question answering: an image and a question -> scored answers."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from app.schemas import IMAGE_DOC, PNG_EXAMPLE, Report, ScoredLabel, TaskRequest, Text, TopK
from app.tasks.base import BatchModel, TensorSpec, register_task, sigmoid, softmax, warmup_pixels
from app.tasks.labels import LabelItem, LabelTask


class VQARequest(TaskRequest):
    image: str = Field(description=IMAGE_DOC)
    question: Text = Field(
        description="at most `max_question_chars` characters (see the limits above)",
        examples=["what shape is in the image?"],
    )
    top_k: TopK = Field(default=3, description="answers returned, at most `max_top_k`")


class VQAResponse(Report):
    answer: str
    answers: list[ScoredLabel]


class VQA(LabelTask):
    name = "vqa"
    summary = "Answer a question about an image."
    request = VQARequest
    response = VQAResponse
    keys = ("answer", "answers")
    asks = True
    demo_checkpoint = "two-stream-vqa"
    json_example = {"image": PNG_EXAMPLE, "question": "what color is the shape?", "compression": "medium"}
    form_fields = {"question": {"type": "string"}, "top_k": {"type": "integer"}}
    v2_inputs = (TensorSpec("image", "BYTES", (1,)), TensorSpec("question", "BYTES", (1,)))
    v2_outputs = (
        TensorSpec("answer", "BYTES", (1,)),
        TensorSpec("answers", "BYTES", (-1,)),
        TensorSpec("scores", "FP64", (-1,)),
    )

    def serves(self, model) -> bool:
        return model.takes_text and model.head == "classifier"

    def scores(self, model: BatchModel, logits: np.ndarray) -> np.ndarray:
        """Softmax for single-label answer heads (the demo models); sigmoid for VQAv2-style
        multi-label ones."""
        return softmax(logits) if model.single_label else sigmoid(logits)

    def warmup_items(self, ctx, count) -> list[LabelItem]:
        question = "what shape is in the image?"
        length = ctx.text_length([question])
        return [LabelItem(pixels, 1, question, length) for pixels in warmup_pixels(ctx, count)]


register_task(VQA())
