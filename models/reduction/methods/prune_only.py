"""Prune only: PuMer's text-informed pruning of image tokens alone, at PuMer's layers."""

from __future__ import annotations

from models.plan import LayerSpec
from models.reduction.methods.common import plan
from models.reduction.methods.pumer import at_pumer_layers
from models.reduction.methods.text_image import TextImageMethod
from models.reduction.registry import register_method

PRUNED = {"low": 0.15, "medium": 0.3, "high": 0.45}  # fraction of image tokens pruned per reducer


class PruneOnly(TextImageMethod):
    name = "prune"
    summary = "text-informed pruning of image tokens only"

    def level_plan(self, model, level):
        return plan(self.name, level, at_pumer_layers(model, LayerSpec(prune=PRUNED[level])))

    def candidates(self, model):
        k = PRUNED["medium"]
        return [
            plan(self.name, "", at_pumer_layers(model, LayerSpec(prune=min(k * s, 0.95))))
            for s in self.strengths
        ]


register_method(PruneOnly())
