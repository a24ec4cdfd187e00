"""TC-ViT: condense r tokens per layer by attention connectivity and dominance."""

from __future__ import annotations

from models.reduction.condense import condense, condense_count
from models.reduction.methods.tome import RPerLayerMethod
from models.reduction.registry import register_method


class TCViT(RPerLayerMethod):
    name = "tcvit"
    summary = "token condensation by attention connectivity and dominance, r tokens per layer"
    plan_parameters = ("order", "alpha")

    def count(self, spec, n_text, n_image, model):
        return n_text, n_image - condense_count(n_image, model.protected, spec.r)

    def reduce(self, spec, tokens, attn, plan, model):
        x, size, source = condense(
            tokens.x,
            tokens.size,
            tokens.source,
            attn.probs(slice(None)),
            spec.r,
            model.protected,
            plan.order,
            plan.alpha,
        )
        return tokens.reduced(x=x, size=size, source=source)


register_method(TCViT())
