"""ToMe (bipartite soft matching, merge r tokens in every layer) on one image stream, and its
modality-aware variant on a joint text-image stream (image merges with image, text with text)."""

from __future__ import annotations

from models.plan import LayerSpec
from models.reduction.merge import bipartite_soft_matching, merge_count, merge_tokens
from models.reduction.methods.common import every_layer, plan, unprotected_per_layer
from models.reduction.methods.text_image import TextImageMethod
from models.reduction.prune import round_half_up
from models.reduction.registry import IMAGE, ReductionMethod, register_method

# r per layer = fraction x (unprotected tokens / layers). "high" on a 197-token, 12-layer ViT is
# r = 13, the setting the ToMe paper reports. TC-ViT uses the same table.
R_FRACTION = {"low": 0.3, "medium": 0.55, "high": 0.8}
# Text-image stream: fraction of each modality's unprotected tokens (image, text) merged per layer.
MODALITY_MERGE = {"low": (0.04, 0.03), "medium": (0.08, 0.06), "high": (0.12, 0.09)}


class RPerLayerMethod(ReductionMethod):
    """Removes r tokens in every layer, r from R_FRACTION (ToMe, TC-ViT)."""

    layout = IMAGE

    def level_plan(self, model, level):
        r = round_half_up(R_FRACTION[level] * unprotected_per_layer(model))
        return plan(self.name, level, every_layer(model, LayerSpec(r=r)))

    def candidates(self, model):
        max_r = (model.nominal_tokens()[1] - model.protected) // 2
        return [plan(self.name, "", every_layer(model, LayerSpec(r=r))) for r in range(max_r + 1)]


class ToMe(RPerLayerMethod):
    name = "tome"
    summary = "bipartite token merging, r tokens per layer"

    def count(self, spec, n_text, n_image, model):
        return n_text, n_image - merge_count(n_image, model.protected, spec.r)

    def reduce(self, spec, tokens, attn, plan, model):
        matching = bipartite_soft_matching(attn.metric(), spec.r, model.protected)
        x, size, source, _ = merge_tokens(matching, tokens.x, tokens.size, tokens.source, plan.weighted_merge)
        return tokens.reduced(x=x, size=size, source=source)


class ModalityAwareToMe(TextImageMethod):
    name = "tome"
    summary = "merge only: image with image, text with text, in every layer"

    def level_plan(self, model, level):
        image, text = MODALITY_MERGE[level]
        return plan(self.name, level, every_layer(model, LayerSpec(merge_image=image, merge_text=text)))

    def candidates(self, model):
        image, text = MODALITY_MERGE["medium"]
        return [
            plan(
                self.name,
                "",
                every_layer(model, LayerSpec(merge_image=min(image * s, 0.5), merge_text=min(text * s, 0.5))),
            )
            for s in self.strengths
        ]


register_method(ToMe())
register_method(ModalityAwareToMe())
