"""What every v1 request and response shares: the compression fields of a request, and the report
of what compression cost and saved. Each task (app/tasks/) adds its own fields."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

Compression = str | float | None
IMAGE_DOC = "base64 image (PNG, JPEG, WebP, BMP, GIF); a data: URL is accepted"
# A 1x1 PNG, the OpenAPI examples' image.
PNG_EXAMPLE = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
COMPRESSION_DOC = "none | low | medium | high, or the fraction of encoder FLOPs to remove in [0, 0.9]"


class TaskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    compression: Compression = Field(default=None, description=COMPRESSION_DOC, examples=["medium", 0.4])
    method: str | None = Field(
        default=None, description="reduction method; default: the model's", examples=["pumer"]
    )


class ScoredLabel(BaseModel):
    label: str
    score: float


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
