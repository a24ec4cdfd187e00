"""Methods of two-stream models (METER layout): what runs in the vision tower, plus PuMer in the
co-attention fusion layers.

`pumer` is PuMer as its paper applies it to METER: text-informed pruning and modality-aware merging
in every fusion layer, towers untouched. `tome`, `tcvit` and `evit` run that method inside the
vision tower (text-agnostic: the tower never sees the text) and PuMer in the fusion layers, so one
plan reduces both stages. `text-evit` is EViT's schedule in the tower with the tokens kept chosen
by the question instead of [CLS] (models/reduction/methods/evit.py), on models trained with text
query projections. Their levels are defined on the whole model's FLOPs (vision tower, text
tower and fusion): each level keeps about LEVEL_FLOPS of the unreduced model's, with the fusion at
PuMer's setting of that level and the tower's strength chosen to reach the total. So methods
compare at equal FLOPs, level by level.
"""

from __future__ import annotations

from typing import ClassVar

from models.plan import LayerSpec, ReductionPlan
from models.reduction.methods.common import plan
from models.reduction.methods.pumer import LEVELS as PUMER_LEVELS
from models.reduction.methods.text_image import TextImageMethod
from models.reduction.registry import IMAGE, TWO_STREAM, ReductionMethod, get_method, register_method

# Fraction of the unreduced model's FLOPs each level keeps (tower methods).
LEVEL_FLOPS = {"low": 0.7, "medium": 0.5, "high": 0.35}


def fusion_spec(level: str, strength: float = 1.0) -> LayerSpec:
    k, r, t = PUMER_LEVELS[level]
    return LayerSpec(
        prune=min(k * strength, 0.95), merge_image=min(r * strength, 0.5), merge_text=min(t * strength, 0.5)
    )


def joined(model, tower: tuple[LayerSpec, ...], fusion: LayerSpec) -> tuple[LayerSpec, ...]:
    """Tower layers' specs, then `fusion` at every fusion layer."""
    return (*tower, *((fusion,) * model.num_fusion_layers))


class TwoStreamMethod(ReductionMethod):
    layout = TWO_STREAM
    tower: ClassVar[str | None] = None  # the IMAGE-layout method run inside the vision tower
    # The tower method scores image tokens by the question (the text tower runs first): only
    # models with text query projections (TwoStreamConfig.text_query_layers) offer it.
    text_informed: ClassVar[bool] = False

    def tower_candidates(self, model) -> list[tuple[LayerSpec, ...]]:
        return [p.layers for p in get_method(self.tower, IMAGE).candidates(model.tower)]

    def closest(self, model, plans: list[ReductionPlan], kept: float) -> ReductionPlan:
        full = model.flops(ReductionPlan())
        return min(plans, key=lambda p: abs(model.flops(p) / full - kept))

    def level_plan(self, model, level):
        fusion = fusion_spec(level)
        plans = [
            plan(self.name, level, joined(model, tower, fusion)) for tower in self.tower_candidates(model)
        ]
        return self.closest(model, plans, LEVEL_FLOPS[level])

    def candidates(self, model):
        """Fusion strength 0 -> 1 of PuMer's `medium` with the tower untouched, then the tower
        strengthening with the fusion at `medium`."""
        identity = (LayerSpec(),) * model.tower.num_layers
        gentle = [
            plan(self.name, "", joined(model, identity, fusion_spec("medium", s / 10))) for s in range(11)
        ]
        medium = fusion_spec("medium")
        return gentle + [
            plan(self.name, "", joined(model, tower, medium)) for tower in self.tower_candidates(model)[1:]
        ]


class FusionPuMer(TwoStreamMethod):
    name = "pumer"
    summary = "PuMer in the fusion layers (text-informed pruning + modality-aware merging); towers untouched"

    def level_plan(self, model, level):
        return plan(
            self.name, level, joined(model, (LayerSpec(),) * model.tower.num_layers, fusion_spec(level))
        )

    def candidates(self, model):
        identity = (LayerSpec(),) * model.tower.num_layers
        return [
            plan(self.name, "", joined(model, identity, fusion_spec("medium", s)))
            for s in TextImageMethod.strengths
        ]


class TowerToMe(TwoStreamMethod):
    name = "tome"
    tower = "tome"
    summary = "ToMe in the vision tower, PuMer in the fusion layers"


class TowerTCViT(TwoStreamMethod):
    name = "tcvit"
    tower = "tcvit"
    summary = "TC-ViT in the vision tower, PuMer in the fusion layers"
    plan_parameters = ("order", "alpha")


class TowerEViT(TwoStreamMethod):
    name = "evit"
    tower = "evit"
    summary = "EViT in the vision tower, PuMer in the fusion layers"


class TowerTextEViT(TwoStreamMethod):
    name = "text-evit"
    tower = "evit"
    text_informed = True
    summary = (
        "EViT in the vision tower keeping the image tokens the question attends to most (a learned "
        "projection of the text tower's output), PuMer in the fusion layers"
    )


for _method in (FusionPuMer(), TowerToMe(), TowerTCViT(), TowerEViT(), TowerTextEViT()):
    register_method(_method)
