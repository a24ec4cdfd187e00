"""Reduced forward for two-stream vision-language models (METER layout, models/two_stream/): the
vision tower runs under the plan's tower method through the vision family's own reduced forward,
the text tower runs unreduced, and the fusion layers run PuMer for two streams
(models/reduction/fusion.py) between their attention and their MLP.

A plan's layers are the vision tower's, then the fusion layers'. Traces count the text tokens
beside the image tokens through the tower layers (the text tower runs alongside); FLOPs add the
vision tower, the text tower and the fusion layers.

Rows with identical images (or identical texts) run their tower once: a retrieval request that
ranks N texts for one image runs the vision tower once and the text tower N times, and a batch
that holds the same image twice shares it.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
from torch import nn

from models.encoder import Tokens, initial_tokens
from models.families.base import ModelFamily, PlanGraph, ReducedOutput, ReducibleModel, linears
from models.families.registry import register_family
from models.families.vision import VisionTransformer
from models.plan import NO_REDUCTION, ReductionPlan
from models.reduction.attention import attention_probs, key_bias
from models.reduction.flops import FusionCost, LayerCost, encoder_flops
from models.reduction.fusion import fusion_count, reduce_streams
from models.reduction.registry import IMAGE, TWO_STREAM, get_method
from models.trace import Trace
from models.two_stream import (
    ARCHITECTURES,
    TwoStreamForImageTextMatching,
    TwoStreamForQuestionAnswering,
    TwoStreamModel,
)

TEXT_BUCKET = 8


def text_weight(text: Tokens) -> torch.Tensor:
    """Input tokens each text token stands for, 0 for padding: the weights of the text mean pool."""
    return text.size if text.valid is None else text.size * text.valid.to(text.size.dtype)


class VisionTower(VisionTransformer):
    """The vision tower at the two-stream model's input size (DINOv2's own config is for 518 px)."""

    def __init__(self, model: nn.Module, image_size: int):
        super().__init__(model)
        self.image_size = image_size

    def nominal_tokens(self) -> tuple[int, int]:
        return 0, (self.image_size // self.config.patch_size) ** 2 + self.protected


def text_layer_costs(text: nn.Module) -> list[LayerCost]:
    """BERT-like layers: Linear weights under `.attention` are attention, the rest the MLP."""
    costs = []
    for layer in text.encoder.layer:
        attn = linears(layer.attention)
        mlp = [m for m in linears(layer) if all(m is not a for a in attn)]
        costs.append(
            LayerCost(
                sum(m.weight.numel() for m in attn),
                text.config.hidden_size,
                sum(m.weight.numel() for m in mlp),
            )
        )
    return costs


def unique_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(distinct rows of t, index of each row's distinct row), or (t, None) when all differ."""
    if t.shape[0] == 1:
        return t, None
    unique, inverse = torch.unique(t.flatten(1), dim=0, return_inverse=True)
    if unique.shape[0] == t.shape[0]:
        return t, None
    return unique.view(-1, *t.shape[1:]), inverse


def expand(t: torch.Tensor | None, inverse: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or inverse is None else t.index_select(0, inverse)


class TwoStreamTransformer(ReducibleModel):
    protected = 1  # per stream: its [CLS]
    takes_text = True

    def __init__(self, model: nn.Module):
        if not isinstance(
            model, TwoStreamModel | TwoStreamForQuestionAnswering | TwoStreamForImageTextMatching
        ):
            raise TypeError(f"{type(model).__name__} is not a two-stream model")
        self.family = TWO_STREAM_FAMILY
        self.base = model if isinstance(model, TwoStreamModel) else model.two_stream
        cfg = self.base.config
        self.tower = VisionTower(self.base.vision, cfg.image_size)
        super().__init__(model, self.tower.blocks)
        self.text_costs = text_layer_costs(self.base.text)
        self._covered: dict[str, bool] = {}
        mlp = self.base.layers[0].text if self.base.layers else None
        self.fusion_cost = FusionCost(
            cfg.hidden_size, mlp.fc1.weight.numel() + mlp.fc2.weight.numel() if mlp is not None else 0
        )

    @property
    def methods(self) -> tuple[str, ...]:
        """The family's methods, less the text-informed ones unless the model has a text query at
        every layer their tower method prunes at."""
        return tuple(m for m in self.family.methods if self.offers(get_method(m, TWO_STREAM)))

    def offers(self, method) -> bool:
        return not method.text_informed or self.queries_cover(method.tower)

    def queries_cover(self, tower_method: str) -> bool:
        """Every tower layer `tower_method`'s plans prune at has a text query (computed once)."""
        if tower_method not in self._covered:
            queried = set(self.base.config.text_query_layers)
            plans = get_method(tower_method, IMAGE).candidates(self.tower)
            pruned = {i for p in plans for i, spec in enumerate(p.layers) if not spec.is_identity}
            self._covered[tower_method] = bool(queried) and pruned <= queried
        return self._covered[tower_method]

    def text_informed(self, plan: ReductionPlan) -> bool:
        return plan.method != "none" and get_method(plan.method, TWO_STREAM).text_informed

    @property
    def num_fusion_layers(self) -> int:
        return len(self.base.layers)

    @property
    def num_layers(self) -> int:
        return self.tower.num_layers + self.num_fusion_layers

    @property
    def head(self) -> str | None:
        if isinstance(self.model, TwoStreamForQuestionAnswering):
            return "classifier"
        return "matching" if isinstance(self.model, TwoStreamForImageTextMatching) else None

    @property
    def max_text_tokens(self) -> int:
        return self.base.config.max_text_tokens

    def nominal_tokens(self) -> tuple[int, int]:
        return self.max_text_tokens, self.tower.nominal_tokens()[1]

    # ----------------------------------------------------------------- plans and FLOPs

    def tower_plan(self, plan: ReductionPlan) -> ReductionPlan:
        tower = None if plan.method == "none" else get_method(plan.method, TWO_STREAM).tower
        if tower is None:
            return NO_REDUCTION
        return replace(plan, method=tower, layers=plan.layers[: self.tower.num_layers])

    def schedule(self, plan: ReductionPlan, n_text: int, n_image: int) -> list[tuple[int, int]]:
        tower = self.tower.schedule(self.tower_plan(plan), 0, n_image)
        counts = [(n_text, i) for _, i in tower]
        n_image = counts[-1][1]
        for k in range(self.num_fusion_layers):
            spec = plan.spec(self.tower.num_layers + k)
            if not spec.is_identity:
                n_text, n_image = fusion_count(spec, n_text, n_image)
            counts.append((n_text, n_image))
        return counts

    def _flops(self, counts: list[tuple[int, int]]) -> int:
        depth = self.tower.num_layers
        tower = encoder_flops(self.tower.costs, [i for _, i in counts[: depth + 1]])
        text = encoder_flops(self.text_costs, [counts[0][0]] * (len(self.text_costs) + 1))
        fusion = sum(
            self.fusion_cost.flops(*counts[depth + k], *counts[depth + k + 1])
            for k in range(self.num_fusion_layers)
        )
        return tower + text + fusion

    def flops(self, plan: ReductionPlan, n_text: int | None = None, n_image: int | None = None) -> int:
        nt, ni = self.nominal_tokens()
        return self._flops(
            self.schedule(plan, nt if n_text is None else n_text, ni if n_image is None else n_image)
        )

    def make_trace(self, plan: ReductionPlan, counts: list[tuple[int, int]]) -> Trace:
        return Trace(
            plan=plan,
            text_tokens=tuple(t for t, _ in counts),
            image_tokens=tuple(i for _, i in counts),
            flops=self._flops(counts),
            full_flops=self._flops(self.schedule(NO_REDUCTION, *counts[0])),
        )

    # ----------------------------------------------------------------- forward

    def fuse(
        self, text: Tokens, image: Tokens, plan: ReductionPlan, counts: list[tuple[int, int]]
    ) -> tuple[Tokens, Tokens]:
        """The fusion layers under `plan` from tower outputs already at the fusion width; appends
        the token counts after each layer to `counts`."""
        depth = self.tower.num_layers
        for k, layer in enumerate(self.base.layers):
            dtype = text.x.dtype
            text_bias = key_bias(
                None if text.unit_size else text.size, text.valid, plan.proportional_attention, dtype
            )
            image_bias = key_bias(
                None if image.unit_size else image.size, None, plan.proportional_attention, dtype
            )
            t, i, att = layer.attend(text.x, image.x, text_bias, image_bias)
            text, image = replace(text, x=t), replace(image, x=i)
            spec = plan.spec(depth + k)
            n_text, n_image = text.x.shape[1], image.x.shape[1]
            if not spec.is_identity and fusion_count(spec, n_text, n_image) != (n_text, n_image):
                text, image = reduce_streams(
                    spec,
                    text,
                    image,
                    att.text_keys.mean(dim=1),
                    att.image_keys.mean(dim=1),
                    partial(
                        attention_probs,
                        att.text_cross_queries,
                        att.image_cross_keys,
                        image_bias,
                        att.scale,
                        slice(None),
                    ),
                    plan.weighted_merge,
                )
            t, i = layer.feed_forward(text.x, image.x)
            text, image = replace(text, x=t), replace(image, x=i).source_recorded()
            counts.append((text.x.shape[1], image.x.shape[1]))
        return text, image

    def __call__(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        plan: ReductionPlan = NO_REDUCTION,
        track_source: bool = False,
        dedupe: bool = True,
        always_mask: bool = False,
    ) -> ReducedOutput:
        """dedupe: run each tower once per distinct row (off in exported graphs, whose shapes
        cannot depend on the data). always_mask: apply attention_mask even when it masks nothing
        (one exported graph then serves padded and unpadded batches)."""
        self.check_plan(plan)
        if input_ids.shape[0] != pixel_values.shape[0]:
            raise ValueError("input_ids and pixel_values must have the same batch size")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)

        text_in = torch.stack([input_ids, attention_mask], dim=1)
        text_in, text_rows = unique_rows(text_in) if dedupe else (text_in, None)
        text_states = expand(self.base.text_tokens(text_in[:, 0], text_in[:, 1]), text_rows)
        query = None
        if self.text_informed(plan):
            # The tower's tokens then depend on the question: it runs once per row.
            query = self.base.text_queries(text_states, attention_mask)
            dedupe = False
        pixels, image_rows = unique_rows(pixel_values) if dedupe else (pixel_values, None)
        vision = self.tower(pixels, plan=self.tower_plan(plan), track_source=track_source, query=query)
        tower_tokens = expand(vision.last_hidden_state, image_rows)
        object_scores = self.base.object_scores(text_states, attention_mask, tower_tokens)
        t, i = self.base.enter(text_states, tower_tokens)

        masks = always_mask or not bool(attention_mask.all())
        text = initial_tokens(t, valid=attention_mask.bool() if masks else None)
        sizes = expand(vision.sizes, image_rows)
        image = Tokens(
            x=i,
            size=sizes,
            source=expand(vision.sources, image_rows),
            unit_size=self.tower_plan(plan).removes_nothing,
        )
        counts = [(input_ids.shape[1], n) for n in vision.trace.image_tokens]
        text, image = self.fuse(text, image, plan, counts)
        t, i, pooled = self.base.pool(text.x, image.x, text_weight(text), image.size, object_scores)
        logits = self.model.head(pooled) if self.head is not None else None
        maps = {}
        if track_source:  # the tower's layers, then the fusion layers' image tokens
            fusion = tuple(s[:, :, self.tower.protected :] for s in image.source_by_layer)
            tower = tuple(expand(s, image_rows) for s in vision.patch_sources)
            maps = {"patch_sources": tower + fusion, "patch_grid": vision.patch_grid}
        return ReducedOutput(
            last_hidden_state=torch.cat([t, i], dim=1),
            sizes=torch.cat([text.size, image.size], dim=1),
            trace=self.make_trace(plan, counts),
            pooler_output=pooled,
            logits=logits,
            sources=image.source,
            text_valid=text.valid,
            **maps,
        )


class TwoStreamFamily(ModelFamily):
    name = "two-stream"
    layout = TWO_STREAM
    # EViT in the vision tower: at batch 1 its pruning costs less bookkeeping than ToMe's matching,
    # so at equal FLOPs it runs faster (docs/demo-models.md); ToMe stays selectable per request.
    default_method = "evit"
    demo_recipe = "models.demo.two_stream"
    architectures = tuple(ARCHITECTURES)
    custom_architectures = ARCHITECTURES

    def wrap(self, model: nn.Module) -> TwoStreamTransformer:
        return TwoStreamTransformer(model)

    def export_text_lengths(self, model: ReducibleModel) -> list[int]:
        """Every padded text length the service can ask for: multiples of 8 up to the limit."""
        limit = model.max_text_tokens
        lengths = list(range(TEXT_BUCKET, limit + 1, TEXT_BUCKET))
        return lengths if lengths and lengths[-1] == limit else [*lengths, limit]

    def graph(self, model: ReducibleModel, plan: ReductionPlan) -> nn.Module:
        return PlanGraph(model, plan, always_mask=True, dedupe=False).eval()

    def example_inputs(self, model, batch, text_length=0, size=None, seed=0, padded=True):
        """With padding, every other text is cut to half the length."""
        inputs = super().example_inputs(model, batch, text_length, size, seed, padded)
        g = torch.Generator().manual_seed(seed + 1)
        text_length = text_length or model.max_text_tokens
        vocab = model.base.config.text_config.vocab_size
        ids = torch.randint(1, vocab, (batch, text_length), generator=g)
        mask = torch.ones(batch, text_length, dtype=torch.long)
        if padded:
            mask[::2, max(1, text_length // 2) :] = 0
        return {"input_ids": ids * mask, "attention_mask": mask, **inputs}


TWO_STREAM_FAMILY = register_family(TwoStreamFamily())
