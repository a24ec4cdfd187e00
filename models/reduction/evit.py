"""EViT: keep the tokens the class token attends to most, fuse the rest into one token.

Deliberate difference from the reference: the fused token is the attention-weighted *mean* of
the inattentive tokens (times their sizes), not the raw attention-weighted sum, which shrinks
the token's norm by the attention mass it received. Its size is the sum of theirs, so
proportional attention still gives it the weight of everything it stands for.
"""

from __future__ import annotations

import math

import torch

from models.reduction.prune import gather_tokens, split_by_score


def evit_kept(num_tokens: int, protected: int, keep_rate: float) -> int:
    """Unprotected tokens kept at this keep rate."""
    candidates = num_tokens - protected
    return max(min(math.ceil(keep_rate * candidates - 1e-9), candidates), 0)


def evit_count(num_tokens: int, protected: int, keep_rate: float) -> int:
    """Tokens after EViT: protected + kept + one fused token when anything was dropped."""
    kept = evit_kept(num_tokens, protected, keep_rate)
    return protected + kept + (1 if kept < num_tokens - protected else 0)


def evit(
    x: torch.Tensor,
    size: torch.Tensor,
    source: torch.Tensor | None,
    cls_attn: torch.Tensor,
    keep_rate: float,
    protected: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """cls_attn (B, N): head-averaged attention of the class token to every token."""
    n = x.shape[1]
    kept = evit_kept(n, protected, keep_rate)
    if kept == n - protected:
        return x, size, source
    keep, drop = split_by_score(cls_attn[:, protected:], kept)
    keep, drop = keep + protected, drop + protected

    drop_size = gather_tokens(size, drop)
    weight = gather_tokens(cls_attn, drop).clamp_min(0) * drop_size
    weight = weight / weight.sum(dim=1, keepdim=True).clamp_min(1e-12)
    fused_x = (gather_tokens(x, drop) * weight[..., None]).sum(dim=1, keepdim=True)
    fused_size = drop_size.sum(dim=1, keepdim=True)

    new_x = torch.cat([x[:, :protected], gather_tokens(x, keep), fused_x], dim=1)
    new_size = torch.cat([size[:, :protected], gather_tokens(size, keep), fused_size], dim=1)
    new_source = None
    if source is not None:
        fused_source = gather_tokens(source, drop).sum(dim=1, keepdim=True)
        new_source = torch.cat([source[:, :protected], gather_tokens(source, keep), fused_source], dim=1)
    return new_x, new_size, new_source
