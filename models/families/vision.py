"""Reduced forward for Hugging Face vision transformers: ViT, DeiT, DINOv2 and CLIP's vision tower.

All are pre-norm encoders; they differ in where their parts live, how many leading tokens are
protected (DeiT's distillation token), LayerScale (DINOv2), CLIP's pre-layernorm, and the head.
Pooling over patch tokens is size-weighted, so it equals the plain mean when nothing merged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from models.encoder import Block, Tokens, initial_tokens, run_encoder
from models.families.base import ModelFamily, RandomConfig, ReducedOutput, ReducibleModel, linears
from models.families.registry import register_family
from models.plan import NO_REDUCTION, ReductionPlan
from models.reduction.registry import IMAGE


@dataclass(frozen=True)
class _Layout:
    """Where a family keeps its parts."""

    layers: Callable[[nn.Module], nn.ModuleList]
    block: Callable[[nn.Module, int], Block]
    protected: int = 1


def _vit_block(layer: nn.Module, heads: int) -> Block:
    a = layer.attention
    return Block(
        layer.layernorm_before,
        a.q_proj,
        a.k_proj,
        a.v_proj,
        a.o_proj,
        layer.layernorm_after,
        layer.mlp,
        linears(layer.mlp),
        heads,
    )


def _dinov2_block(layer: nn.Module, heads: int) -> Block:
    a = layer.attention
    return Block(
        layer.norm1,
        a.q_proj,
        a.k_proj,
        a.v_proj,
        a.o_proj,
        layer.norm2,
        layer.mlp,
        linears(layer.mlp),
        heads,
        layer.layer_scale1,
        layer.layer_scale2,
    )


def _clip_block(layer: nn.Module, heads: int) -> Block:
    a = layer.self_attn
    return Block(
        layer.layer_norm1,
        a.q_proj,
        a.k_proj,
        a.v_proj,
        a.out_proj,
        layer.layer_norm2,
        layer.mlp,
        linears(layer.mlp),
        heads,
    )


_VIT = _Layout(lambda base: base.layers, _vit_block)
_DEIT = _Layout(lambda base: base.layers, _vit_block, protected=2)
_DINOV2 = _Layout(lambda base: base.encoder.layer, _dinov2_block)
_CLIP = _Layout(lambda base: base.encoder.layers, _clip_block)

VIT_SMALL = dict(
    hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, num_labels=1000
)

# Hugging Face class name -> (attribute holding the backbone or None, layout).
SUPPORTED = {
    "ViTModel": (None, _VIT),
    "ViTForImageClassification": ("vit", _VIT),
    "DeiTModel": (None, _DEIT),
    "DeiTForImageClassification": ("deit", _DEIT),
    "DeiTForImageClassificationWithTeacher": ("deit", _DEIT),
    "Dinov2Model": (None, _DINOV2),
    "Dinov2ForImageClassification": ("dinov2", _DINOV2),
    "CLIPVisionModel": (None, _CLIP),
    "CLIPVisionModelWithProjection": ("vision_model", _CLIP),
    "CLIPModel": ("vision_model", _CLIP),
    "CLIPForImageClassification": ("vision_model", _CLIP),
}


def weighted_patch_mean(seq: torch.Tensor, sizes: torch.Tensor, protected: int) -> torch.Tensor:
    w = sizes[:, protected:, None]
    return (seq[:, protected:] * w).sum(dim=1) / w.sum(dim=1)


class VisionTransformer(ReducibleModel):
    def __init__(self, model: nn.Module):
        name = type(model).__name__
        if name not in SUPPORTED:
            raise TypeError(f"{name} is not a supported vision transformer ({sorted(SUPPORTED)})")
        attr, layout = SUPPORTED[name]
        self.family = VISION
        self.base = getattr(model, attr) if attr else model
        self.protected = layout.protected
        heads = self.base.config.num_attention_heads
        super().__init__(model, [layout.block(layer, heads) for layer in layout.layers(self.base)])

    @property
    def config(self):
        return self.base.config

    def nominal_tokens(self) -> tuple[int, int]:
        cfg = self.base.config
        return 0, (cfg.image_size // cfg.patch_size) ** 2 + self.protected

    @property
    def head(self) -> str | None:
        return "classifier" if "Classification" in self.kind else None

    def embed(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool) -> torch.Tensor:
        pixel_values = pixel_values.to(self.parameters_dtype())
        if self.kind.startswith("Dinov2"):
            return self.base.embeddings(pixel_values)
        # Another input size than the one trained on: position embeddings are resized to its grid.
        size = self.base.config.image_size
        interpolate_pos_encoding = interpolate_pos_encoding or tuple(pixel_values.shape[-2:]) != (size, size)
        x = self.base.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        if self.kind.startswith("CLIP"):
            x = self.base.pre_layrnorm(x)
        return x

    def __call__(
        self,
        pixel_values: torch.Tensor,
        plan: ReductionPlan = NO_REDUCTION,
        track_source: bool = False,
        interpolate_pos_encoding: bool = False,
        query: torch.Tensor | None = None,
    ) -> ReducedOutput:
        """query (B, layers, hidden): what a text-informed reducer scores tokens by (encoder.Tokens)."""
        self.check_plan(plan)
        x = self.embed(pixel_values, interpolate_pos_encoding)
        tokens = initial_tokens(x, track_source=track_source)
        if query is not None:
            tokens = replace(tokens, query=query)
        tokens, counts = run_encoder(self.blocks, tokens, plan, self.reducer(plan))
        seq, sizes = tokens.x, tokens.size
        pooled = logits = None
        kind, m = self.kind, self.model

        if kind.startswith("CLIP"):
            pooled = self.base.post_layernorm(seq[:, 0])
            if kind in ("CLIPModel", "CLIPVisionModelWithProjection"):
                pooled = m.visual_projection(pooled)
            elif kind == "CLIPForImageClassification":
                logits = m.classifier(weighted_patch_mean(seq, sizes, 1))
        else:
            seq = self.base.layernorm(seq)
            if kind.startswith("Dinov2"):
                pooled = seq[:, 0]
                if kind == "Dinov2ForImageClassification":
                    logits = m.classifier(torch.cat([seq[:, 0], weighted_patch_mean(seq, sizes, 1)], dim=1))
            elif getattr(self.base, "pooler", None) is not None:
                pooled = self.base.pooler(seq)
            if kind == "DeiTForImageClassificationWithTeacher":
                logits = (m.cls_classifier(seq[:, 0]) + m.distillation_classifier(seq[:, 1])) / 2
            elif kind in ("ViTForImageClassification", "DeiTForImageClassification"):
                logits = m.classifier(seq[:, 0])

        return ReducedOutput(
            last_hidden_state=seq,
            sizes=sizes,
            trace=self.make_trace(plan, counts),
            pooler_output=pooled,
            logits=logits,
            sources=tokens.source,
            **self.patch_sources(tokens, pixel_values) if track_source else {},
        )

    def patch_sources(self, tokens: Tokens, pixel_values: torch.Tensor) -> dict:
        """ReducedOutput's patch_sources and patch_grid: the sources' columns after the protected
        tokens are the patches, in raster order."""
        patch = self.config.patch_size
        grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
        sources = tuple(s[:, :, self.protected :] for s in tokens.source_by_layer)
        return {"patch_sources": sources, "patch_grid": grid}


class VisionFamily(ModelFamily):
    name = "vit"
    layout = IMAGE
    default_method = "tome"
    demo_recipe = "models.demo.vision"
    architectures = tuple(SUPPORTED)
    random_configs = {
        "vit-s16": RandomConfig("ViTForImageClassification", "ViTConfig", VIT_SMALL),
        "vit-b16": RandomConfig("ViTForImageClassification", "ViTConfig", dict(num_labels=1000)),
        "deit-s16": RandomConfig("DeiTForImageClassificationWithTeacher", "DeiTConfig", VIT_SMALL),
    }

    def wrap(self, model: nn.Module) -> VisionTransformer:
        return VisionTransformer(model)


VISION = register_family(VisionFamily())
