"""The backend contract and its registry. A backend loads what it needs for one checkpoint, runs
a batch under a plan (numpy in, numpy out, so callers never touch tensors) and describes itself.

Adding a backend: one module that subclasses Backend and calls `register_backend(...)`; the
`backend` setting then selects it by name.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from models.plan import LEVELS, ReductionPlan
from models.token_map import TokenMap
from models.trace import Trace

if TYPE_CHECKING:
    from models.bundle import ModelBundle

# The built-in backends and the modules that register them, imported when one is first used.
BUILTIN = {"torch": "models.backends.eager", "onnx": "exporters.runtime", "torchscript": "exporters.runtime"}


@dataclass(frozen=True)
class BatchOutput:
    logits: np.ndarray  # float32, one row per input row
    trace: Trace
    peak_memory_bytes: int | None = None  # accelerator memory peak of this call, when measured
    token_maps: tuple[TokenMap, ...] | None = None  # one per row, when asked for


class Backend(ABC):
    name: ClassVar[str]
    # run(..., token_map_layer=...) returns token maps (models/token_map.py); graph backends cannot.
    token_maps: ClassVar[bool] = False

    def __init__(self, bundle: ModelBundle, task: str, export_dir: str | None = None):
        """Load for one checkpoint (`bundle`) serving `task`; graph backends read `export_dir`."""
        self.bundle = bundle
        self.task = task

    @property
    def method(self) -> str | None:
        """The only method this backend can run, when it is fixed (exported graphs)."""
        return None

    def levels(self) -> tuple[str, ...]:
        """Named levels it can run."""
        return LEVELS

    def runnable(self, plan: ReductionPlan) -> ReductionPlan:
        """The plan it will run for `plan`; ValueError when it cannot run it."""
        return plan

    def text_length(self, texts: list[str]) -> int:
        """Tokens a batch holding these texts is padded to."""
        return self.bundle.padded_length(texts)

    @abstractmethod
    def run(
        self, plan: ReductionPlan, pixels: np.ndarray, texts: list[str] | None, text_length: int
    ) -> BatchOutput:
        """Logits for rows (pixels[i], texts[i]); texts padded to text_length tokens. A backend
        with `token_maps` also takes `token_map_layer` (int or None): then it returns each row's
        token map at that layer."""

    def describe(self) -> dict:
        return {"backend": self.name, "device": str(self.bundle.device)}


_BACKENDS: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    _BACKENDS[cls.name] = cls
    return cls


def unregister_backend(name: str) -> None:
    _BACKENDS.pop(name, None)


def backend_names() -> tuple[str, ...]:
    return tuple(dict.fromkeys([*BUILTIN, *_BACKENDS]))


def get_backend(name: str) -> type[Backend]:
    if name not in _BACKENDS and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {backend_names()}")
    return _BACKENDS[name]
