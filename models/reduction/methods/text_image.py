"""The reducer every method on a joint text-image stream (ViLT) runs: PuMer's text-informed pruning
of image tokens, then modality-aware merging (image with image, text with text). A method's plan
decides which of the three it uses.

Layout: [text tokens (text [CLS] first), image tokens (image [CLS] first)]. Both [CLS] tokens are
protected: the text one feeds the pooler; the image one is kept too (the PuMer reference does not
protect it). Ratios are fractions of the unprotected tokens of that modality entering the layer;
the image merge count is measured before pruning, as in PuMer.
"""

from __future__ import annotations

import torch

from models.plan import LayerSpec
from models.reduction.merge import bipartite_soft_matching, merge_count, merge_tokens
from models.reduction.prune import (
    gather_tokens,
    prune_count,
    round_half_up,
    text_to_image_saliency,
    top_k_indices,
)
from models.reduction.registry import TEXT_IMAGE, ReductionMethod


def counts(spec: LayerSpec, n_text: int, n_image: int) -> tuple[int, int, int, int]:
    """(pruned image tokens, merged image tokens, merged text tokens, image tokens after pruning)."""
    candidates = n_image - 1
    pruned = prune_count(candidates, spec.prune) if spec.prune > 0 else 0
    kept = n_image - pruned
    merged_image = merge_count(kept, 1, round_half_up(spec.merge_image * candidates))
    merged_text = merge_count(n_text, 1, round_half_up(spec.merge_text * (n_text - 1)))
    return pruned, merged_image, merged_text, kept


class TextImageMethod(ReductionMethod):
    layout = TEXT_IMAGE
    # Strength multipliers 0 .. 4 of the method's `medium` setting: the numeric-target candidates.
    strengths = tuple(s / 50 for s in range(0, 201))

    def count(self, spec, n_text, n_image, model):
        pruned, merged_image, merged_text, kept = counts(spec, n_text, n_image)
        return n_text - merged_text, kept - merged_image

    def reduce(self, spec, tokens, attn, plan, model):
        t = tokens.n_text
        pruned, merged_image, merged_text, kept = counts(spec, t, tokens.n_image)
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
