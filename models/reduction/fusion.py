"""PuMer on two streams (METER's co-attention fusion layers), as pure tensor functions: prune the
image tokens the text attends to least (text -> image cross-attention), then merge image tokens
with image tokens and text tokens with text tokens (bipartite matching on each stream's own
self-attention keys). Each stream's first token ([CLS]) is protected.

Ratios are those of the joint-stream reducer (models/reduction/methods/text_image.py): fractions of
each modality's unprotected tokens entering the layer; the image merge count is taken before
pruning, as in PuMer.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from models.encoder import Tokens
from models.plan import LayerSpec
from models.reduction.merge import bipartite_soft_matching, merge_tokens
from models.reduction.methods.text_image import counts
from models.reduction.prune import gather_tokens, text_to_image_saliency, top_k_indices


def fusion_count(spec: LayerSpec, n_text: int, n_image: int) -> tuple[int, int]:
    """(text, image) tokens leaving a fusion layer's reducer."""
    pruned, merged_image, merged_text, kept = counts(spec, n_text, n_image)
    return n_text - merged_text, kept - merged_image


def reduce_streams(
    spec: LayerSpec,
    text: Tokens,
    image: Tokens,
    text_metric: torch.Tensor,
    image_metric: torch.Tensor,
    text_to_image,
    weighted: bool,
) -> tuple[Tokens, Tokens]:
    """text_metric (B, T, C) / image_metric (B, I, C): each stream's head-averaged keys.
    text_to_image(): head-averaged text -> image cross-attention probabilities (B, T, I), called
    only when something is pruned."""
    pruned, merged_image, merged_text, kept = counts(spec, text.x.shape[1], image.x.shape[1])
    x, size, source = image.x, image.size, image.source
    if pruned:
        saliency = text_to_image_saliency(text_to_image()[:, :, 1:], text.valid)
        keep = top_k_indices(saliency, kept - 1) + 1
        index = torch.cat([torch.zeros_like(keep[:, :1]), keep], dim=1)
        x, size, source, image_metric = (gather_tokens(v, index) for v in (x, size, source, image_metric))
    if merged_image:
        matching = bipartite_soft_matching(image_metric, merged_image, protected=1)
        x, size, source, _ = merge_tokens(matching, x, size, source, weighted)
    if pruned or merged_image:
        image = replace(image, x=x, size=size, source=source, unit_size=False)
    if merged_text:
        matching = bipartite_soft_matching(text_metric, merged_text, protected=1, valid=text.valid)
        tx, tsize, tsource, tvalid = merge_tokens(
            matching, text.x, text.size, text.source, weighted, text.valid
        )
        text = replace(text, x=tx, size=tsize, source=tsource, valid=tvalid, unit_size=False)
    return text, image
