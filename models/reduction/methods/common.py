"""Building blocks the built-in methods share."""

from __future__ import annotations

from typing import TYPE_CHECKING

from models.plan import LayerSpec, ReductionPlan

if TYPE_CHECKING:
    from models.families.base import ReducibleModel


def plan(method: str, level: str, layers: tuple[LayerSpec, ...]) -> ReductionPlan:
    return ReductionPlan(method=method, layers=layers, level=level)


def every_layer(model: ReducibleModel, spec: LayerSpec) -> tuple[LayerSpec, ...]:
    return (spec,) * model.num_layers


def unprotected_per_layer(model: ReducibleModel) -> float:
    """N / L: unprotected image tokens of the nominal input over the number of layers."""
    return (model.nominal_tokens()[1] - model.protected) / model.num_layers
