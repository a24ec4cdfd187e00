"""Named compression levels per family and method, and numeric FLOPs targets mapped to plans.

A numeric target t in [0, 0.9] is the fraction of encoder FLOPs to remove; it resolves to the
candidate plan of the method whose analytic FLOPs (at the model's nominal input) are closest.
"""

from __future__ import annotations

import dataclasses

from models.families.base import ReducibleModel
from models.plan import LEVELS, NO_REDUCTION, LayerSpec, ReductionPlan
from models.reduction.prune import round_half_up

MAX_TARGET = 0.9
DEFAULT_METHOD = {"vit": "tome", "vilt": "pumer", "lookupvit": "lookupvit"}

# ToMe / TC-ViT: r per layer = fraction x (unprotected tokens / layers). "high" on a 197-token,
# 12-layer ViT is r = 13, the setting the ToMe paper reports.
R_FRACTION = {"low": 0.3, "medium": 0.55, "high": 0.8}
# EViT: keep rate at a quarter, half and three quarters of the depth (3, 6, 9 of 12 layers).
EVIT_KEEP = {"low": 0.9, "medium": 0.7, "high": 0.5}
# PuMer (prune, merge image, merge text) at layers 2, 5, 8 of 12; "medium" is the paper's.
PUMER = {"low": (0.05, 0.15, 0.1), "medium": (0.1, 0.3, 0.2), "high": (0.2, 0.45, 0.3)}
PUMER_LAYERS_OF_12 = (2, 5, 8)
# Merge-only (ToMe on ViLT, modality-aware): fraction of each modality merged in every layer.
VILT_MERGE = {"low": (0.04, 0.03), "medium": (0.08, 0.06), "high": (0.12, 0.09)}
# Prune-only: PuMer's text-informed pruning alone, at PuMer's layers.
VILT_PRUNE = {"low": 0.15, "medium": 0.3, "high": 0.45}
# LookupViT: the trained compressed grid whose FLOPs saving (against the model's highest-fidelity
# grid, level none) is closest to these; "high" is the smallest trained grid.
LOOKUPVIT_SAVED = {"low": 0.25, "medium": 0.5}


def scaled_layers(layers_of_12: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    """Layer indices chosen for a 12-layer model, placed at the same relative depth."""
    scaled = {min(round_half_up(i * num_layers / 12), num_layers - 1) for i in layers_of_12}
    return tuple(sorted(scaled))


def _at_layers(num_layers: int, layers: tuple[int, ...], spec: LayerSpec) -> tuple[LayerSpec, ...]:
    return tuple(spec if i in layers else LayerSpec() for i in range(num_layers))


def _vit_unit_r(model: ReducibleModel) -> float:
    return (model.nominal_tokens()[1] - model.protected) / model.num_layers


def _evit_layers(num_layers: int) -> tuple[int, ...]:
    return scaled_layers((3, 6, 9), num_layers)


def _plan(method: str, level: str, layers: tuple[LayerSpec, ...]) -> ReductionPlan:
    return ReductionPlan(method=method, layers=layers, level=level)


def _lookupvit_plans(model: ReducibleModel) -> list[ReductionPlan]:
    """The unreduced model (its highest-fidelity grid), then each smaller trained grid."""
    smaller = sorted((g for g in model.grids if g < model.full_grid), reverse=True)
    return [NO_REDUCTION] + [ReductionPlan(method="lookupvit", grid=g) for g in smaller]


def _lookupvit_level(model: ReducibleModel, level: str) -> ReductionPlan:
    plans = _lookupvit_plans(model)
    if level == "high":
        best = plans[-1]
    else:
        full = model.flops(NO_REDUCTION)
        best = min(plans, key=lambda p: abs(1 - model.flops(p) / full - LOOKUPVIT_SAVED[level]))
    return dataclasses.replace(best, level=level)


def named_plan(model: ReducibleModel, level: str, method: str | None = None) -> ReductionPlan:
    """The plan of a named level (`none`, `low`, `medium`, `high`) for this model and method."""
    method = method or DEFAULT_METHOD[model.family]
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; expected one of {LEVELS}")
    if method not in model.methods:
        raise ValueError(f"{method!r} does not apply to {model.family}; use one of {model.methods}")
    if level == "none":
        return NO_REDUCTION
    if model.family == "lookupvit":
        return _lookupvit_level(model, level)
    n = model.num_layers
    if model.family == "vit":
        if method == "evit":
            return _plan(method, level, _at_layers(n, _evit_layers(n), LayerSpec(keep_rate=EVIT_KEEP[level])))
        r = round_half_up(R_FRACTION[level] * _vit_unit_r(model))
        return _plan(method, level, (LayerSpec(r=r),) * n)
    if method == "tome":
        image, text = VILT_MERGE[level]
        return _plan(method, level, (LayerSpec(merge_image=image, merge_text=text),) * n)
    layers = scaled_layers(PUMER_LAYERS_OF_12, n)
    if method == "prune":
        return _plan(method, level, _at_layers(n, layers, LayerSpec(prune=VILT_PRUNE[level])))
    k, r, t = PUMER[level]
    return _plan(method, level, _at_layers(n, layers, LayerSpec(prune=k, merge_image=r, merge_text=t)))


def candidate_plans(model: ReducibleModel, method: str) -> list[ReductionPlan]:
    """Plans of increasing strength a numeric target chooses from (level set by the caller)."""
    if model.family == "lookupvit":
        return _lookupvit_plans(model)
    n = model.num_layers
    if model.family == "vit":
        if method == "evit":
            layers = _evit_layers(n)
            return [
                _plan(method, "", _at_layers(n, layers, LayerSpec(keep_rate=keep / 100)))
                for keep in range(100, 4, -1)
            ]
        max_r = (model.nominal_tokens()[1] - model.protected) // 2
        return [_plan(method, "", (LayerSpec(r=r),) * n) for r in range(max_r + 1)]
    steps = [s / 50 for s in range(0, 201)]  # strength multipliers 0 .. 4 of "medium"
    if method == "tome":
        image, text = VILT_MERGE["medium"]
        specs = [LayerSpec(merge_image=min(image * s, 0.5), merge_text=min(text * s, 0.5)) for s in steps]
        return [_plan(method, "", (spec,) * n) for spec in specs]
    layers = scaled_layers(PUMER_LAYERS_OF_12, n)
    k, r, t = PUMER["medium"] if method == "pumer" else (VILT_PRUNE["medium"], 0.0, 0.0)
    specs = [
        LayerSpec(prune=min(k * s, 0.95), merge_image=min(r * s, 0.5), merge_text=min(t * s, 0.5))
        for s in steps
    ]
    return [_plan(method, "", _at_layers(n, layers, spec)) for spec in specs]


def plan_for_target(model: ReducibleModel, target: float, method: str | None = None) -> ReductionPlan:
    """The plan whose analytic FLOPs removal is closest to `target` (ties: the gentler plan)."""
    method = method or DEFAULT_METHOD[model.family]
    if not 0.0 <= target <= MAX_TARGET:
        raise ValueError(f"compression target must be in [0, {MAX_TARGET}], got {target}")
    if method not in model.methods:
        raise ValueError(f"{method!r} does not apply to {model.family}; use one of {model.methods}")
    if target == 0.0:
        return NO_REDUCTION
    full = model.flops(NO_REDUCTION)
    best = min(candidate_plans(model, method), key=lambda p: abs(1 - model.flops(p) / full - target))
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
