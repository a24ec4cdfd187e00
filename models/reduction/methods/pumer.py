"""PuMer: text-informed pruning of image tokens plus modality-aware merging, at layers 2, 5, 8 of
12 (the same relative depth in other depths)."""

from __future__ import annotations

from models.plan import LayerSpec
from models.reduction.methods.common import plan
from models.reduction.methods.text_image import TextImageMethod
from models.reduction.registry import register_method
from models.reduction.schedule import at_layers, scaled_layers

# (prune, merge image, merge text); "medium" is the paper's.
LEVELS = {"low": (0.05, 0.15, 0.1), "medium": (0.1, 0.3, 0.2), "high": (0.2, 0.45, 0.3)}
LAYERS_OF_12 = (2, 5, 8)


def at_pumer_layers(model, spec: LayerSpec) -> tuple[LayerSpec, ...]:
    return at_layers(model.num_layers, scaled_layers(LAYERS_OF_12, model.num_layers), spec)


class PuMer(TextImageMethod):
    name = "pumer"
    summary = "text-informed pruning + modality-aware merging"

    def level_plan(self, model, level):
        k, r, t = LEVELS[level]
        return plan(self.name, level, at_pumer_layers(model, LayerSpec(prune=k, merge_image=r, merge_text=t)))

    def candidates(self, model):
        k, r, t = LEVELS["medium"]
        return [
            plan(
                self.name,
                "",
                at_pumer_layers(
                    model,
                    LayerSpec(
                        prune=min(k * s, 0.95), merge_image=min(r * s, 0.5), merge_text=min(t * s, 0.5)
                    ),
                ),
            )
            for s in self.strengths
        ]


register_method(PuMer())
