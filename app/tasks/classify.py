"""Image classification: an image -> scored labels."""

from __future__ import annotations

from pydantic import Field

from app.schemas import IMAGE_DOC, PNG_EXAMPLE, Report, ScoredLabel, TaskRequest, TopK
from app.tasks.base import TensorSpec, register_task, warmup_pixels
from app.tasks.labels import LabelItem, LabelTask


class ClassifyRequest(TaskRequest):
    image: str = Field(description=IMAGE_DOC)
    top_k: TopK = Field(default=5, description="labels returned, at most `max_top_k`")


class ClassifyResponse(Report):
    label: str
    labels: list[ScoredLabel]


class Classify(LabelTask):
    name = "classify"
    summary = "Classify an image."
    request = ClassifyRequest
    response = ClassifyResponse
    keys = ("label", "labels")
    asks = False
    demo_checkpoint = "classify"
    json_example = {"image": PNG_EXAMPLE, "compression": 0.3}
    form_fields = {"top_k": {"type": "integer"}}
    v2_inputs = (TensorSpec("image", "BYTES", (1,)),)
    v2_outputs = (
        TensorSpec("label", "BYTES", (1,)),
        TensorSpec("labels", "BYTES", (-1,)),
        TensorSpec("scores", "FP64", (-1,)),
    )

    def serves(self, model) -> bool:
        return not model.takes_text and model.head == "classifier"

    def warmup_items(self, ctx, count) -> list[LabelItem]:
        return [LabelItem(pixels, 1) for pixels in warmup_pixels(ctx, count)]


register_task(Classify())
