"""PuMer text-informed pruning of image tokens, and the gather helper every pruner uses."""

from __future__ import annotations

import torch

from models.reduction.ranking import split_top_k


def gather_tokens(t: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    """Select tokens `index` (B, K) along dim 1 of t (B, N, ...)."""
    if t is None:
        return None
    expanded = index.view(*index.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])
    return t.gather(1, expanded)


def text_to_image_saliency(text_probs: torch.Tensor, text_valid: torch.Tensor | None) -> torch.Tensor:
    """Saliency of each image token: attention it receives from the real text tokens.

    text_probs (B, T, I): head-averaged attention from text queries to image keys.
    text_valid (B, T) bool: real text tokens; padding rows are excluded.
    Returns (B, I): the attention summed over real text tokens divided by their number.
    """
    if text_valid is None:
        return text_probs.mean(dim=1)
    w = text_valid.to(text_probs.dtype)
    return (text_probs * w[..., None]).sum(dim=1) / w.sum(dim=1, keepdim=True).clamp_min(1)


def top_k_indices(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores per row, returned in ascending position order."""
    return split_top_k(score, k)[0]


def split_by_score(score: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices of the k highest scores, indices of the others) per row, in position order.

    Ties break by position, so the split is deterministic (and the same after export).
    """
    return split_top_k(score, k)


def prune_count(num_tokens: int, ratio: float) -> int:
    """Tokens removed from `num_tokens` candidates at prune ratio `ratio`; at least one stays."""
    return min(round_half_up(ratio * num_tokens), max(num_tokens - 1, 0))


def round_half_up(value: float) -> int:
    """Ratios times lengths round half up (Python's round() would round 43.5 to 44 but 42.5 to 42)."""
    return int(value + 0.5)
