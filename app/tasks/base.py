"""The task contract: what a task (vqa, retrieval, classify) owns, from a validated request body
to the response fields. A task sees images as bytes and then as numpy arrays, and the model as a
function from a batch to logits: it never touches tensors, HTTP or a particular backend.

Adding a task: one module under app/tasks/ that subclasses Task and calls `register_task(...)`,
imported by app/tasks/__init__.py; the route, its OpenAPI entry, its settings and its metrics
follow from the registry. Its Open Inference Protocol v2 model (app/v2/) follows from
`v2_inputs`, `v2_outputs` and `v2_tensors`: a task without them is served on /v1 only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
from pydantic import BaseModel

from app.errors import InvalidInput


class ModelTraits(Protocol):
    """What a task may know of a loaded model to decide whether it can serve it."""

    takes_text: bool
    head: str | None  # "classifier", "matching" or None


@dataclass(frozen=True)
class DecodeContext:
    """What decoding a request may use: the limits, the images' decoder and the text padding."""

    limits: Any  # app.settings.LimitSettings
    pixels: Callable[[list[bytes]], Awaitable[np.ndarray]]  # bytes -> (N, 3, H, W) float32
    text_length: Callable[[list[str]], int]  # tokens a batch holding these texts is padded to
    image_size: int
    # Token maps may be asked for at layers 0 .. token_map_layers (the model's layers); None: this
    # backend cannot return them.
    token_map_layers: int | None = None


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a task's Open Inference Protocol v2 model (app/v2/). An input is the request
    field of the same name: an image field (`Task.file_fields`) holds encoded image files, any other
    BYTES input UTF-8 text; shape (1,) is a single value, (-1,) a list (`Task.list_fields`). The
    request's other fields (compression, method, top_k ...) come in the request's parameters."""

    name: str
    datatype: str  # "BYTES", "INT64", "FP64" ...
    shape: tuple[int, ...]  # -1: any length
    optional: bool = False  # inputs: may be left out (the request model says which combinations hold)


@dataclass(frozen=True)
class BatchModel:
    """The model as a task runs it: one plan, fixed for the batch."""

    forward: Callable[
        [np.ndarray, list[str] | None, int], np.ndarray
    ]  # (pixels, texts, text length) -> logits
    labels: list[str]
    single_label: bool
    # (pixels, texts, text length, layer) -> (logits, one token map per row, each with to_dict())
    mapped: Callable[[np.ndarray, list[str] | None, int, int], tuple[np.ndarray, tuple]] | None = None

    def run(
        self, pixels: np.ndarray, texts: list[str] | None, text_length: int, token_map_layer: int | None
    ) -> tuple[np.ndarray, tuple | None]:
        """Logits, and the rows' token maps at `token_map_layer` when it is not None."""
        if token_map_layer is None:
            return self.forward(pixels, texts, text_length), None
        return self.mapped(pixels, texts, text_length, token_map_layer)


class Task(ABC):
    name: ClassVar[str]
    summary: ClassVar[str]
    request: ClassVar[type[BaseModel]]
    response: ClassVar[type[BaseModel]]
    file_fields: ClassVar[tuple[str, ...]]  # multipart fields that carry image files
    list_fields: ClassVar[tuple[str, ...]] = ()  # multipart fields that repeat
    json_example: ClassVar[dict]
    form_fields: ClassVar[dict[str, dict]]  # multipart fields besides the compression ones (OpenAPI)
    demo_checkpoint: ClassVar[str]  # folder under models/checkpoints/ served by default
    # The Open Inference Protocol v2 model of this task (app/v2/); empty: not served on /v2.
    v2_inputs: ClassVar[tuple[TensorSpec, ...]] = ()
    v2_outputs: ClassVar[tuple[TensorSpec, ...]] = ()

    @abstractmethod
    def serves(self, model: ModelTraits) -> bool:
        """Whether a model with these traits can serve this task."""

    @abstractmethod
    async def decode(self, body: BaseModel, images: dict[str, list[bytes]], ctx: DecodeContext) -> Any:
        """A validated body and its raw images -> one item; InvalidInput etc. on bad input."""

    def batch_key(self, item: Any) -> Hashable:
        """Items share a batch only with equal keys (and the same plan): the padded text length,
        and the token map's layer when one is asked for."""
        length = getattr(item, "text_length", 0)
        layer = getattr(item, "token_map_layer", None)
        return length if layer is None else (length, layer)

    def weight(self, item: Any) -> int:
        """Rows of the model batch this item needs."""
        return 1

    @abstractmethod
    def run(self, model: BatchModel, items: list[Any]) -> list[Any]:
        """One batch of items (equal keys) -> one result per item."""

    @abstractmethod
    def encode(self, body: BaseModel, result: Any) -> dict:
        """A result -> the task's response fields (the compression report is added around them)."""

    def v2_tensors(self, fields: dict) -> dict[str, list]:
        """The response fields `encode` returned -> the elements of each of `v2_outputs`, flat (an
        output this response has no value for is left out)."""
        raise NotImplementedError(f"{self.name}: no Open Inference Protocol v2 outputs")

    @abstractmethod
    def warmup_items(self, ctx: DecodeContext, count: int) -> list[Any]:
        """`count` items with distinct images (see warmup_pixels), run before the service reports
        ready: once per level, then as full batches that calibrate admission control."""


def warmup_pixels(ctx: DecodeContext, count: int) -> list[np.ndarray]:
    """Distinct seeded-noise images: a batch of copies of one image would be timed too cheap on a
    model that runs its vision tower once per distinct image."""
    rng = np.random.default_rng(0)
    return [rng.standard_normal((3, ctx.image_size, ctx.image_size), dtype=np.float32) for _ in range(count)]


def token_map_layer(body: BaseModel, ctx: DecodeContext) -> int | None:
    """The layer a request wants its token map at (default: the last), None when it wants none."""
    if not getattr(body, "return_token_map", False):
        return None
    if ctx.token_map_layers is None:
        raise InvalidInput("return_token_map: this server's backend cannot return token maps (torch can)")
    layer = body.token_map_layer
    if layer is None:
        return ctx.token_map_layers
    if layer > ctx.token_map_layers:
        raise InvalidInput(f"token_map_layer: at most {ctx.token_map_layers} (after the last layer)")
    return layer


def token_map_field(token_map: Any) -> dict:
    """The response's `token_map` field, when the request asked for one."""
    return {} if token_map is None else {"token_map": token_map.to_dict()}


def check_top_k(top_k: int, limits) -> None:
    if top_k > limits.max_top_k:
        raise InvalidInput(f"top_k: at most {limits.max_top_k}")


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


@dataclass(frozen=True)
class Scored:
    label: str
    score: float


def top_labels(scores: np.ndarray, labels: list[str], k: int) -> list[Scored]:
    """The k best labels of one row of scores, best first (ties: the lower index)."""
    order = np.argsort(-scores, kind="stable")[: min(k, scores.shape[-1])]
    return [Scored(labels[i], float(scores[i])) for i in order]


_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    if task.name in _TASKS:
        raise ValueError(f"task {task.name!r} is already registered")
    _TASKS[task.name] = task
    return task


def unregister_task(name: str) -> None:
    _TASKS.pop(name, None)


def tasks() -> dict[str, Task]:
    import app.tasks  # noqa: F401 - registers the built-in tasks

    return dict(_TASKS)
