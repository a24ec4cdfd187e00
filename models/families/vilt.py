"""Reduced forward for Hugging Face ViLT: ViltModel, ViltForQuestionAnswering and
ViltForImageAndTextRetrieval, with PuMer (prune + modality-aware merge), merge-only and
prune-only plans.

The image embedding is computed here, from the model's own modules, because transformers'
version shuffles the patch order at random (a multinomial draw), which would make bipartite
matching non-deterministic. Patches stay in raster order; the results equal transformers' up to
float rounding (ViLT is invariant to the order of its image tokens). Every image of a batch must
have the same valid size (the service resizes all images to one size); when an image has more
patches than config.max_image_length, an evenly spaced subset is kept where transformers draws a
random one.
"""

from __future__ import annotations

import torch
from torch import nn

from models.encoder import Block, Tokens, initial_tokens, run_encoder
from models.families.base import ModelFamily, PlanGraph, RandomConfig, ReducedOutput, ReducibleModel
from models.families.registry import register_family
from models.plan import NO_REDUCTION, ReductionPlan
from models.reduction.registry import TEXT_IMAGE

TEXT_BUCKET = 8  # texts are padded to a multiple of this many tokens

SUPPORTED = ("ViltModel", "ViltForQuestionAnswering", "ViltForImageAndTextRetrieval")


def _vilt_block(layer: nn.Module, heads: int) -> Block:
    a = layer.attention.attention

    def mlp(h: torch.Tensor) -> torch.Tensor:
        return layer.output.dense(layer.intermediate(h))

    return Block(
        layer.layernorm_before,
        a.query,
        a.key,
        a.value,
        layer.attention.output.dense,
        layer.layernorm_after,
        mlp,
        (layer.intermediate.dense, layer.output.dense),
        heads,
    )


class ViltTransformer(ReducibleModel):
    protected = 1  # per modality: the text [CLS] and the image [CLS]
    takes_text = True

    def __init__(self, model: nn.Module):
        name = type(model).__name__
        if name not in SUPPORTED:
            raise TypeError(f"{name} is not a supported ViLT model ({SUPPORTED})")
        self.family = VILT
        self.base = model if name == "ViltModel" else model.vilt
        heads = self.base.config.num_attention_heads
        super().__init__(model, [_vilt_block(layer, heads) for layer in self.base.encoder.layer])

    def nominal_tokens(self) -> tuple[int, int]:
        cfg = self.base.config
        return cfg.max_position_embeddings, (cfg.image_size // cfg.patch_size) ** 2 + 1

    @property
    def head(self) -> str | None:
        return {"ViltForQuestionAnswering": "classifier", "ViltForImageAndTextRetrieval": "matching"}.get(
            self.kind
        )

    @property
    def max_text_tokens(self) -> int:
        return self.base.config.max_position_embeddings

    def image_layout(
        self, h: int, w: int, pixel_mask: torch.Tensor | None, device: torch.device
    ) -> tuple[int, int, torch.Tensor | None]:
        """(rows, columns) of the valid patches of an h x w patch grid, and the raster indices of
        the patches kept when there are more than config.max_image_length (None: all)."""
        valid_h, valid_w = h, w
        if pixel_mask is not None:
            mask = nn.functional.interpolate(pixel_mask[:, None].float(), size=(h, w)).long()[:, 0]
            rows, cols = mask[:, :, 0].sum(dim=1), mask[:, 0, :].sum(dim=1)
            if not (bool((rows == rows[0]).all()) and bool((cols == cols[0]).all())):
                raise ValueError("all images in a batch must have the same size; resize them to one size")
            valid_h, valid_w = int(rows[0]), int(cols[0])
        limit = self.base.config.max_image_length
        keep = None
        if isinstance(limit, int) and 0 < limit < valid_h * valid_w:
            keep = torch.linspace(0, valid_h * valid_w - 1, limit, device=device).round().long()
        return valid_h, valid_w, keep

    def embed_image(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> torch.Tensor:
        emb = self.base.embeddings
        cfg = self.base.config
        patches = emb.patch_embeddings(pixel_values)  # (B, D, h, w)
        b, d, h, w = patches.shape
        valid_h, valid_w, keep = self.image_layout(h, w, pixel_mask, patches.device)
        grid = cfg.image_size // cfg.patch_size
        spatial = emb.position_embeddings[:, 1:].transpose(1, 2).reshape(1, d, grid, grid)
        pos = nn.functional.interpolate(spatial, size=(valid_h, valid_w), mode="bilinear", align_corners=True)
        x = (patches[:, :, :valid_h, :valid_w] + pos).flatten(2).transpose(1, 2)
        if keep is not None:
            x = x[:, keep]
        cls = (emb.cls_token + emb.position_embeddings[:, :1]).expand(b, -1, -1)
        return torch.cat([cls, x], dim=1)

    def patch_sources(
        self, tokens: Tokens, counts: list[tuple[int, int]], pixel_values: torch.Tensor, pixel_mask
    ) -> dict:
        """ReducedOutput's patch_sources and patch_grid: each layer's image tokens (after its text
        tokens) over the image patches' columns (after the text tokens' and the image [CLS]'s);
        patches left out by max_image_length are covered by no token."""
        patch = self.base.config.patch_size
        h, w = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
        valid_h, valid_w, keep = self.image_layout(h, w, pixel_mask, pixel_values.device)
        first = counts[0][0] + 1
        sources = []
        for (n_text, _), source in zip(counts, tokens.source_by_layer, strict=True):
            image = source[:, n_text:, first:]
            if keep is not None:
                full = image.new_zeros(*image.shape[:2], valid_h * valid_w)
                image = full.index_copy(2, keep, image)
            sources.append(image)
        return {"patch_sources": tuple(sources), "patch_grid": (valid_h, valid_w)}

    def embed(
        self, input_ids, attention_mask, token_type_ids, pixel_values, pixel_mask, image_token_type_idx
    ):
        emb = self.base.embeddings
        text = emb.text_embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        text = text + emb.token_type_embeddings(torch.zeros_like(input_ids))
        pixel_values = pixel_values.to(self.parameters_dtype())
        image = self.embed_image(pixel_values, pixel_mask)
        image_types = torch.full(image.shape[:2], image_token_type_idx, dtype=torch.long, device=image.device)
        image = image + emb.token_type_embeddings(image_types)
        return torch.cat([text, image], dim=1)

    def __call__(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        pixel_mask: torch.Tensor | None = None,
        plan: ReductionPlan = NO_REDUCTION,
        track_source: bool = False,
        image_token_type_idx: int = 1,
        always_mask: bool = False,
    ) -> ReducedOutput:
        """always_mask: apply attention_mask even when it masks nothing (graph export: the same graph
        then serves padded and unpadded batches, with no branch on the mask's values)."""
        self.check_plan(plan)
        if input_ids.shape[0] != pixel_values.shape[0]:
            raise ValueError("input_ids and pixel_values must have the same batch size")
        x = self.embed(
            input_ids, attention_mask, token_type_ids, pixel_values, pixel_mask, image_token_type_idx
        )
        n_text = input_ids.shape[1]
        valid = None
        if attention_mask is not None and (always_mask or not bool(attention_mask.all())):
            image_valid = torch.ones(x.shape[0], x.shape[1] - n_text, dtype=torch.bool, device=x.device)
            valid = torch.cat([attention_mask.bool(), image_valid], dim=1)
        tokens = initial_tokens(x, valid=valid, n_text=n_text, track_source=track_source)
        tokens, counts = run_encoder(self.blocks, tokens, plan, self.reducer(plan))

        seq = self.base.layernorm(tokens.x)
        pooled = self.base.pooler(seq) if self.base.pooler is not None else None
        logits = None
        if self.kind == "ViltForQuestionAnswering":
            logits = self.model.classifier(pooled)
        elif self.kind == "ViltForImageAndTextRetrieval":
            logits = self.model.rank_output(pooled)
        text_valid = tokens.valid[:, : tokens.n_text] if tokens.valid is not None else None
        return ReducedOutput(
            last_hidden_state=seq,
            sizes=tokens.size,
            trace=self.make_trace(plan, counts),
            pooler_output=pooled,
            logits=logits,
            sources=tokens.source,
            text_valid=text_valid,
            **self.patch_sources(tokens, counts, pixel_values, pixel_mask) if track_source else {},
        )


class ViltFamily(ModelFamily):
    name = "vilt"
    layout = TEXT_IMAGE
    default_method = "pumer"
    demo_recipe = "models.demo.vilt"
    architectures = SUPPORTED
    random_configs = {
        "vilt-b32": RandomConfig(
            "ViltForQuestionAnswering",
            "ViltConfig",
            dict(image_size=384, patch_size=32, max_position_embeddings=40, num_labels=3129),
        )
    }

    def wrap(self, model: nn.Module) -> ViltTransformer:
        return ViltTransformer(model)

    def export_text_lengths(self, model: ReducibleModel) -> list[int]:
        """Every padded text length the service can ask for: multiples of 8 up to the limit."""
        limit = model.max_text_tokens
        lengths = list(range(TEXT_BUCKET, limit + 1, TEXT_BUCKET))
        return lengths if lengths and lengths[-1] == limit else [*lengths, limit]

    def graph(self, model: ReducibleModel, plan: ReductionPlan) -> nn.Module:
        # The mask is applied even when it masks nothing: one graph serves padded and unpadded batches.
        return PlanGraph(model, plan, always_mask=True).eval()

    def example_inputs(self, model, batch, text_length=0, size=None, seed=0, padded=True):
        """With padding, every other text is cut to half the length."""
        inputs = super().example_inputs(model, batch, text_length, size, seed, padded)
        g = torch.Generator().manual_seed(seed + 1)
        text_length = text_length or model.max_text_tokens
        ids = torch.randint(1, model.config.vocab_size, (batch, text_length), generator=g)
        mask = torch.ones(batch, text_length, dtype=torch.long)
        if padded:
            mask[::2, max(1, text_length // 2) :] = 0
        return {"input_ids": ids * mask, "attention_mask": mask, **inputs}


VILT = register_family(ViltFamily())
