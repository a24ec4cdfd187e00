"""The reduction-method registry: one ReductionMethod per (name, token layout).

A method knows its level table (the plan of `low`, `medium`, `high` on a given model), the plans
a numeric FLOPs target chooses from, how many tokens its reducer leaves, and the reducer itself.
A model family declares the token layout its encoder runs (one image stream, a joint text-image
stream, a compressed grid); the methods registered for that layout are the ones it offers.

Adding a method: one module under `models/reduction/methods/` that subclasses ReductionMethod and
calls `register_method(...)`; nothing else changes (the API, OpenAPI, `tokenlean plans` and
`/v1/models` read this registry). This module imports no tensor library.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from models.encoder import AttentionView, Tokens
    from models.families.base import ReducibleModel
    from models.plan import LayerSpec, ReductionPlan

# Token layouts a family's encoder can run.
IMAGE = "image"  # one stream: protected tokens ([CLS], ...) then image patches
TEXT_IMAGE = "text+image"  # one joint stream: text tokens ([CLS] first), then image tokens ([CLS] first)
GRID = "grid"  # a compressed-token architecture whose compression is its grid (LookupViT)
# A vision tower and a text tower, then co-attention fusion layers (METER): a plan's layers are the
# vision tower's, then the fusion layers'.
TWO_STREAM = "two-stream"


class ReductionMethod(ABC):
    """One reduction method on one token layout. Instances are stateless."""

    name: ClassVar[str]
    layout: ClassVar[str]
    summary: ClassVar[str] = ""
    plan_parameters: ClassVar[tuple[str, ...]] = ()  # ReductionPlan fields it reads besides layers

    @abstractmethod
    def level_plan(self, model: ReducibleModel, level: str) -> ReductionPlan:
        """The plan of a named level (`low`, `medium` or `high`) on this model."""

    @abstractmethod
    def candidates(self, model: ReducibleModel) -> list[ReductionPlan]:
        """Plans of increasing strength that a numeric FLOPs target chooses from."""

    def count(self, spec: LayerSpec, n_text: int, n_image: int, model: ReducibleModel) -> tuple[int, int]:
        """(text, image) tokens leaving this layer's reducer when (n_text, n_image) enter it."""
        raise NotImplementedError(f"{self.name} has no per-layer reducer")

    def reduce(
        self, spec: LayerSpec, tokens: Tokens, attn: AttentionView, plan: ReductionPlan, model: ReducibleModel
    ) -> Tokens:
        """The reducer between a layer's attention and its MLP."""
        raise NotImplementedError(f"{self.name} has no per-layer reducer")


_METHODS: dict[tuple[str, str], ReductionMethod] = {}
_BUILTINS_LOADED = False


def register_method(method: ReductionMethod, replace: bool = False) -> ReductionMethod:
    key = (method.name, method.layout)
    if method.name == "none":
        raise ValueError("'none' is the unreduced model, not a method")
    if key in _METHODS and not replace:
        raise ValueError(f"method {method.name!r} is already registered for layout {method.layout!r}")
    _METHODS[key] = method
    return method


def unregister_method(name: str, layout: str) -> None:
    _METHODS.pop((name, layout), None)


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        import models.reduction.methods  # noqa: F401 - registers the built-in methods


def get_method(name: str, layout: str) -> ReductionMethod:
    _load_builtins()
    try:
        return _METHODS[(name, layout)]
    except KeyError:
        raise ValueError(
            f"method {name!r} does not apply to a {layout} model; use one of {methods_for(layout)}"
        ) from None


def methods_for(layout: str) -> tuple[str, ...]:
    """Registered method names for a token layout, in registration order."""
    _load_builtins()
    return tuple(name for name, lay in _METHODS if lay == layout)


def method_names() -> tuple[str, ...]:
    """Every registered method name (any layout), sorted."""
    _load_builtins()
    return tuple(sorted({name for name, _ in _METHODS}))


def plan_parameters(name: str) -> tuple[str, ...]:
    """Plan fields besides the layers that a method reads (shown in its plan's report)."""
    _load_builtins()
    for (method, _), impl in _METHODS.items():
        if method == name:
            return impl.plan_parameters
    return ()


def chooses_grid(name: str) -> bool:
    """A method of a compressed-grid architecture: its plans name a grid instead of layers."""
    _load_builtins()
    layouts = {layout for method, layout in _METHODS if method == name}
    return bool(layouts) and layouts <= {GRID}
