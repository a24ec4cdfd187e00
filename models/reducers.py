"""Glue between a layer's LayerSpec and the pure reduction functions, plus the token counts each
reducer promises (the same functions decide both, so plans and forwards cannot disagree)."""

from __future__ import annotations

import torch

from models.encoder import AttentionView, Reducer, Tokens
from models.plan import LayerSpec, ReductionPlan
from models.reduction.condense import condense, condense_count
from models.reduction.evit import evit, evit_count
from models.reduction.merge import bipartite_soft_matching, merge_count, merge_tokens
from models.reduction.prune import (
    gather_tokens,
    prune_count,
    round_half_up,
    text_to_image_saliency,
    top_k_indices,
)

# ---------------------------------------------------------------- vision transformers


def vision_count(method: str, spec: LayerSpec, n: int, protected: int) -> int:
    """Tokens leaving the reducer of a vision transformer layer that `n` tokens enter."""
    if spec.is_identity:
        return n
    if method == "tome":
        return n - merge_count(n, protected, spec.r)
    if method == "tcvit":
        return n - condense_count(n, protected, spec.r)
    if method == "evit":
        return evit_count(n, protected, spec.keep_rate)
    raise ValueError(f"method {method!r} does not apply to vision transformers")


def vision_reducer(method: str, protected: int) -> Reducer:
    def reduce(spec: LayerSpec, tokens: Tokens, attn: AttentionView, plan: ReductionPlan) -> Tokens:
        n = tokens.x.shape[1]
        if vision_count(method, spec, n, protected) == n:
            return tokens
        if method == "tome":
            matching = bipartite_soft_matching(attn.metric(), spec.r, protected)
            x, size, source, _ = merge_tokens(
                matching, tokens.x, tokens.size, tokens.source, plan.weighted_merge
            )
        elif method == "tcvit":
            probs = attn.probs(slice(None))
            x, size, source = condense(
                tokens.x, tokens.size, tokens.source, probs, spec.r, protected, plan.order, plan.alpha
            )
        else:
            cls_attn = attn.probs(slice(0, 1))[:, 0]
            x, size, source = evit(tokens.x, tokens.size, tokens.source, cls_attn, spec.keep_rate, protected)
        return tokens.reduced(x=x, size=size, source=source)

    return reduce


# ---------------------------------------------------------------- ViLT (PuMer)
# Layout: [text tokens (text [CLS] first), image tokens (image [CLS] first)]. Both [CLS] tokens
# are protected: the text one feeds the pooler; the image one is kept too (the PuMer reference
# does not protect it). Ratios are fractions of the unprotected tokens of that modality entering
# the layer; the image merge count is measured before pruning, as in PuMer.


def vilt_counts(spec: LayerSpec, n_text: int, n_image: int) -> tuple[int, int, int, int]:
    """(pruned image tokens, merged image tokens, merged text tokens, image tokens after pruning)."""
    candidates = n_image - 1
    pruned = prune_count(candidates, spec.prune) if spec.prune > 0 else 0
    kept = n_image - pruned
    merged_image = merge_count(kept, 1, round_half_up(spec.merge_image * candidates))
    merged_text = merge_count(n_text, 1, round_half_up(spec.merge_text * (n_text - 1)))
    return pruned, merged_image, merged_text, kept


def vilt_count(spec: LayerSpec, n_text: int, n_image: int) -> tuple[int, int]:
    """(text, image) tokens leaving the reducer."""
    pruned, merged_image, merged_text, kept = vilt_counts(spec, n_text, n_image)
    return n_text - merged_text, kept - merged_image


def vilt_reducer(spec: LayerSpec, tokens: Tokens, attn: AttentionView, plan: ReductionPlan) -> Tokens:
    t = tokens.n_text
    pruned, merged_image, merged_text, kept = vilt_counts(spec, t, tokens.n_image)
    if pruned == merged_image == merged_text == 0:
        return tokens
    x, size, source, valid = tokens.x, tokens.size, tokens.source, tokens.valid
    metric = attn.metric()
    text_valid = valid[:, :t] if valid is not None else None

    if pruned:
        text_probs = attn.probs(slice(0, t))[:, :, t + 1 :]
        saliency = text_to_image_saliency(text_probs, text_valid)
        keep = top_k_indices(saliency, kept - 1) + (t + 1)
        head = torch.arange(t + 1, device=x.device).expand(x.shape[0], -1)
        index = torch.cat([head, keep], dim=1)
        x, size, source, metric = (gather_tokens(v, index) for v in (x, size, source, metric))
        valid = gather_tokens(valid, index)

    def merge(part: slice, r: int, part_valid: torch.Tensor | None):
        seg_x, seg_size = x[:, part], size[:, part]
        seg_source = source[:, part] if source is not None else None
        if r == 0:
            return seg_x, seg_size, seg_source, part_valid
        matching = bipartite_soft_matching(metric[:, part], r, protected=1, valid=part_valid)
        return merge_tokens(matching, seg_x, seg_size, seg_source, plan.weighted_merge, part_valid)

    tx, ts, tsrc, tvalid = merge(slice(0, t), merged_text, text_valid)
    ix, isz, isrc, _ = merge(slice(t, None), merged_image, None)
    new_valid = None
    if tvalid is not None:
        new_valid = torch.cat([tvalid, torch.ones_like(isz, dtype=torch.bool)], dim=1)
    return tokens.reduced(
        x=torch.cat([tx, ix], dim=1),
        size=torch.cat([ts, isz], dim=1),
        source=torch.cat([tsrc, isrc], dim=1) if source is not None else None,
        valid=new_valid,
        n_text=t - merged_text,
    )
