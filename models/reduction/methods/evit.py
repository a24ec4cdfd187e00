"""EViT: keep the tokens [CLS] attends to most at a quarter, half and three quarters of the depth.

When the tokens carry a query from outside the stream (a two-stream model's question, for its
`text-evit` method), the tokens that query attends to most through the layer's keys are kept
instead: text-informed pruning inside the vision tower, at EViT's token counts and FLOPs."""

from __future__ import annotations

from models.plan import LayerSpec
from models.reduction.evit import evit, evit_count
from models.reduction.methods.common import plan
from models.reduction.registry import IMAGE, ReductionMethod, register_method
from models.reduction.schedule import at_layers, scaled_layers

KEEP = {"low": 0.9, "medium": 0.7, "high": 0.5}  # "medium" is the paper's
LAYERS_OF_12 = (3, 6, 9)


class EViT(ReductionMethod):
    name = "evit"
    layout = IMAGE
    summary = "keep the tokens [CLS] attends to most, fuse the rest into one"

    def _plan(self, model, level, keep):
        layers = scaled_layers(LAYERS_OF_12, model.num_layers)
        return plan(self.name, level, at_layers(model.num_layers, layers, LayerSpec(keep_rate=keep)))

    def level_plan(self, model, level):
        return self._plan(model, level, KEEP[level])

    def candidates(self, model):
        return [self._plan(model, "", keep / 100) for keep in range(100, 4, -1)]

    def count(self, spec, n_text, n_image, model):
        return n_text, evit_count(n_image, model.protected, spec.keep_rate)

    def reduce(self, spec, tokens, attn, plan, model):
        if tokens.query is None:
            scores = attn.probs(slice(0, 1))[:, 0]
        else:
            scores = attn.query_probs(tokens.query[:, attn.layer])
        x, size, source = evit(tokens.x, tokens.size, tokens.source, scores, spec.keep_rate, model.protected)
        return tokens.reduced(x=x, size=size, source=source)


register_method(EViT())
