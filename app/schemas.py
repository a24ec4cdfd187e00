"""Request and response bodies of the v1 API."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

Compression = str | float | None
COMPRESSION_DOC = "none | low | medium | high, or the fraction of encoder FLOPs to remove in [0, 0.9]"


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    compression: Compression = Field(default=None, description=COMPRESSION_DOC, examples=["medium", 0.4])
    method: str | None = Field(
        default=None, description="reduction method; default: the model's", examples=["pumer"]
    )


class VQARequest(_Request):
    image: str = Field(description="base64 image (PNG, JPEG, WebP, BMP, GIF); a data: URL is accepted")
    question: str = Field(min_length=1, examples=["what shape is in the image?"])
    top_k: int = Field(default=3, ge=1)


class ClassifyRequest(_Request):
    image: str = Field(description="base64 image")
    top_k: int = Field(default=5, ge=1)


class RetrievalRequest(_Request):
    """Either `image` + `texts` (rank the texts) or `text` + `images` (rank the images)."""

    image: str | None = Field(default=None, description="base64 image whose candidate texts are ranked")
    texts: list[str] | None = Field(default=None, examples=[["a red circle", "a blue triangle"]])
    text: str | None = Field(default=None, description="text whose candidate images are ranked")
    images: list[str] | None = Field(default=None, description="base64 candidate images")

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


class ScoredLabel(BaseModel):
    label: str
    score: float


class RankedItem(BaseModel):
    index: int = Field(description="position in the request's candidate list")
    text: str | None = None
    score: float = Field(description="image-text matching logit")
    probability: float = Field(description="softmax of the scores over the candidates")


class CompressionReport(BaseModel):
    requested: Compression
    level: str = Field(description="the named level, or the numeric target")
    method: str
    plan: dict[str, Any]


class TokensReport(BaseModel):
    per_layer: list[int] = Field(description="tokens entering each layer, then after the last")
    text_per_layer: list[int] | None = None
    image_per_layer: list[int] | None = None
    lookup_per_layer: list[int] | None = Field(default=None, description="LookupViT: lookup tokens (N)")
    compressed_per_layer: list[int] | None = Field(
        default=None, description="LookupViT: compressed tokens (M); kept_ratio is M / N"
    )
    kept_ratio: float


class FlopsReport(BaseModel):
    reduced: int
    full: int
    saved: float


class Timings(BaseModel):
    queue_ms: float
    inference_ms: float
    total_ms: float


class Report(BaseModel):
    model: str
    compression: CompressionReport
    tokens: TokensReport
    flops: FlopsReport
    timings: Timings
    batch_size: int = Field(description="rows in the model call this request shared")


class VQAResponse(Report):
    answer: str
    answers: list[ScoredLabel]


class ClassifyResponse(Report):
    label: str
    labels: list[ScoredLabel]


class RetrievalResponse(Report):
    ranking: list[RankedItem]
