"""What every v1 request and response shares: the compression fields of a request, and the report
of what compression cost and saved. Each task (app/tasks/) adds its own fields."""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

IMAGE_DOC = (
    "base64 image (PNG, JPEG, WebP, BMP, GIF; whitespace and line breaks are ignored), or a "
    "data:image/...;base64, URL"
)
# A 1x1 PNG, the OpenAPI examples' image.
PNG_EXAMPLE = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
COMPRESSION_DOC = (
    "none | low | medium | high, or the fraction of encoder FLOPs to remove in [0, 0.9], or auto: "
    "the least compressed level predicted to answer within the latency budget"
)
DEADLINE_DOC = "server-side deadline: answered 504 if not started by then"
BUDGET_DOC = (
    "latency budget from arrival to answer; with compression auto (or none sent) the server picks "
    "the level from it and its load; with a fixed level it is only reported (met or missed)"
)
TOKEN_MAP_DOC = (
    "return `token_map`: which input patches each token of one layer stands for (off by default; "
    "the torch backend only)"
)
TOKEN_MAP_LAYER_DOC = (
    "with `return_token_map`: the layer whose tokens are mapped, an index into `tokens.per_layer` "
    "(0: the input; default: the last, after the last layer)"
)


def _unicode_text(value: Any) -> Any:
    """Strings a tokenizer can take: JSON's \\ud800 escapes (or a multipart charset such as
    UTF-7) can produce lone surrogates, which are not text and cannot be encoded."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from None
        if not value.strip():
            raise ValueError("must not be empty")
    return value


def _no_bool(value: Any) -> Any:
    # JSON true/false would otherwise pass as the numbers 1 and 0.
    if isinstance(value, bool):
        raise ValueError("must be a number, not true/false")
    return value


def _compression(value: Any) -> Any:
    value = _unicode_text(_no_bool(value))
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


# Every client string a model or a message may see goes through one of these types.
Text = Annotated[str, BeforeValidator(_unicode_text)]
Name = Annotated[str, BeforeValidator(_unicode_text), Field(max_length=64)]
Compression = Annotated[Annotated[str, Field(max_length=32)] | float | None, BeforeValidator(_compression)]
TopK = Annotated[int, BeforeValidator(_no_bool), Field(ge=1)]
DeadlineMs = Annotated[int, BeforeValidator(_no_bool), Field(ge=1, le=600_000)]
BudgetMs = DeadlineMs
Layer = Annotated[int, BeforeValidator(_no_bool), Field(ge=0)]


class TaskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    compression: Compression = Field(default=None, description=COMPRESSION_DOC, examples=["medium", 0.4])
    method: Name | None = Field(
        default=None, description="reduction method; default: the model's", examples=["pumer"]
    )
    deadline_ms: DeadlineMs | None = Field(default=None, description=DEADLINE_DOC)
    latency_budget_ms: BudgetMs | None = Field(default=None, description=BUDGET_DOC, examples=[250])
    return_token_map: bool = Field(default=False, description=TOKEN_MAP_DOC)
    token_map_layer: Layer | None = Field(default=None, description=TOKEN_MAP_LAYER_DOC)

    @model_validator(mode="after")
    def _token_map_layer_needs_map(self) -> TaskRequest:
        if self.token_map_layer is not None and not self.return_token_map:
            raise ValueError("token_map_layer needs return_token_map: true")
        return self


class ScoredLabel(BaseModel):
    label: str
    score: float


class CompressionReport(BaseModel):
    requested: str | float | None
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


class TokenMap(BaseModel):
    """Which input patches each token of one layer stands for. Its size is bounded by the model's
    patch grid (images are resized to the model's input size)."""

    layer: int = Field(description="index into `tokens.per_layer`: the tokens entering that layer")
    grid: list[int] = Field(description="[rows, columns] of the input patch grid")
    tokens: int = Field(description="tokens of that layer that cover image patches")
    token_of_patch: list[int] = Field(
        description="one value per patch, in raster order (rows x columns): the token covering it, "
        "numbered 0 .. tokens - 1 in the layer's token order (merged patches share a number), or -1 "
        "where the patch was pruned. LookupViT: its compressed tokens, each patch under the one whose "
        "cell of the compressed grid holds the patch's centre"
    )


class LatencyReport(BaseModel):
    """A request with a latency budget (app/budget.py): the prediction the plan was chosen by,
    and what it took, both from the request's arrival."""

    auto: bool = Field(description="the level was chosen by the budget")
    budget_ms: float
    predicted_ms: float | None
    measured_ms: float
    met: bool


class Report(BaseModel):
    model: str
    compression: CompressionReport
    tokens: TokensReport
    flops: FlopsReport
    timings: Timings
    batch_size: int = Field(description="rows in the model call this request shared")
    latency: LatencyReport | None = Field(default=None, description="requests with a latency budget")
    token_map: TokenMap | None = Field(
        default=None,
        description="with `return_token_map`: the image's token map (retrieval: of the best-ranked pair)",
    )
