"""LookupViT's compression is its compressed grid: a level picks one of the grids the model was
trained with. The model (a GRID-layout family) provides `grids`, `full_grid` and `flops`."""

from __future__ import annotations

import dataclasses

from models.plan import NO_REDUCTION, ReductionPlan
from models.reduction.registry import GRID, ReductionMethod, register_method

# The trained grid whose FLOPs saving (against the model's highest-fidelity grid, level none) is
# closest to these; "high" is the smallest trained grid.
SAVED = {"low": 0.25, "medium": 0.5}


class LookupGrid(ReductionMethod):
    name = "lookupvit"
    layout = GRID
    summary = "LookupViT's compressed-token grid, chosen per call"

    def candidates(self, model):
        """The unreduced model (its highest-fidelity grid), then each smaller trained grid."""
        smaller = sorted((g for g in model.grids if g < model.full_grid), reverse=True)
        return [NO_REDUCTION] + [ReductionPlan(method=self.name, grid=g) for g in smaller]

    def level_plan(self, model, level):
        plans = self.candidates(model)
        if level == "high":
            best = plans[-1]
        else:
            full = model.flops(NO_REDUCTION)
            best = min(plans, key=lambda p: abs(1 - model.flops(p) / full - SAVED[level]))
        return dataclasses.replace(best, level=level)


register_method(LookupGrid())
