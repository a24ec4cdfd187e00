"""Compression requests to plans: a named level, or a numeric target t in [0, 0.9] (the fraction
of encoder FLOPs to remove), which resolves to the candidate plan of the method whose analytic
FLOPs (at the model's nominal input) are closest. Level tables live with each method
(models/reduction/methods/); which methods a model offers, with its family."""

from __future__ import annotations

import dataclasses

from models.families.base import ReducibleModel
from models.plan import LEVELS, NO_REDUCTION, ReductionPlan
from models.reduction.registry import ReductionMethod, get_method

MAX_TARGET = 0.9


def method_of(model: ReducibleModel, method: str | None) -> ReductionMethod:
    method = method or model.default_method
    if method not in model.methods:
        raise ValueError(f"{method!r} does not apply to {model.family}; use one of {model.methods}")
    return get_method(method, model.family.layout)


def named_plan(model: ReducibleModel, level: str, method: str | None = None) -> ReductionPlan:
    """The plan of a named level (`none`, `low`, `medium`, `high`) for this model and method."""
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; expected one of {LEVELS}")
    impl = method_of(model, method)
    if level == "none":
        return NO_REDUCTION
    return impl.level_plan(model, level)


def candidate_plans(model: ReducibleModel, method: str | None = None) -> list[ReductionPlan]:
    """Plans of increasing strength a numeric target chooses from (level set by the caller)."""
    return method_of(model, method).candidates(model)


def plan_for_target(model: ReducibleModel, target: float, method: str | None = None) -> ReductionPlan:
    """The plan whose analytic FLOPs removal is closest to `target` (ties: the gentler plan)."""
    if not 0.0 <= target <= MAX_TARGET:
        raise ValueError(f"compression target must be in [0, {MAX_TARGET}], got {target}")
    impl = method_of(model, method)
    if target == 0.0:
        return NO_REDUCTION
    full = model.flops(NO_REDUCTION)
    best = min(impl.candidates(model), key=lambda p: abs(1 - model.flops(p) / full - target))
    if best.removes_nothing:
        return NO_REDUCTION
    return dataclasses.replace(best, level=f"{target:g}")


def resolve(model: ReducibleModel, compression: str | float, method: str | None = None) -> ReductionPlan:
    """A level name or a FLOPs fraction -> plan."""
    if isinstance(compression, str):
        try:
            compression = float(compression)
        except ValueError:
            return named_plan(model, compression, method)
    return plan_for_target(model, float(compression), method)
