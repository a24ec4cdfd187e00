"""TC-ViT token condensation: keep the tokens most relevant by connectivity and dominance,
fuse every other token into the kept token it is most connected to.

Choices the paper leaves open, made here:
- connectivity score of token j = incoming connectivity (column of the order-K matrix), normalised
  to sum to 1 like dominance, so that alpha weighs two distributions of the same scale;
- protected tokens ([CLS], distillation) are always kept and never receive fused tokens, so the
  classifier's input is not blended (the same rule ToMe applies).
"""

from __future__ import annotations

import torch

from models.reduction.prune import gather_tokens, split_by_score

DEFAULT_ORDER = 1
DEFAULT_ALPHA = 0.5


def condense_count(num_tokens: int, protected: int, r: int) -> int:
    """Tokens removed: r, leaving at least one unprotected token."""
    return min(max(r, 0), max(num_tokens - protected - 1, 0))


def connectivity(probs: torch.Tensor, order: int = DEFAULT_ORDER) -> torch.Tensor:
    """Order-K connectivity: W + W^2 + ... + W^K for head-averaged attention W (B, N, N)."""
    total = probs
    power = probs
    for _ in range(order - 1):
        power = power @ probs
        total = total + power
    return total


def relevance(conn: torch.Tensor, probs: torch.Tensor, alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """alpha * connectivity score + (1 - alpha) * dominance (attention from the class token)."""
    incoming = conn.sum(dim=1)
    incoming = incoming / incoming.sum(dim=-1, keepdim=True)
    dominance = probs[:, 0]
    return alpha * incoming + (1 - alpha) * dominance


def condense(
    x: torch.Tensor,
    size: torch.Tensor,
    source: torch.Tensor | None,
    probs: torch.Tensor,
    r: int,
    protected: int = 1,
    order: int = DEFAULT_ORDER,
    alpha: float = DEFAULT_ALPHA,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Remove r tokens from x (B, N, C) given head-averaged attention probs (B, N, N)."""
    n = x.shape[1]
    r = condense_count(n, protected, r)
    conn = connectivity(probs, order)
    score = relevance(conn, probs, alpha)
    score = torch.cat([torch.full_like(score[:, :protected], torch.inf), score[:, protected:]], dim=1)
    keep, drop = split_by_score(score, n - r)

    # Most connected kept, unprotected token for each dropped token.
    link = gather_tokens(conn, drop).gather(2, keep[:, None, :].expand(-1, r, -1))
    link[:, :, :protected] = -torch.inf
    target = link.argmax(dim=-1)

    def fuse(t: torch.Tensor) -> torch.Tensor:
        t3 = t if t.dim() == 3 else t[..., None]
        kept = gather_tokens(t3, keep)
        moved = gather_tokens(t3, drop)
        out = kept.scatter_add(1, target[..., None].expand(-1, -1, t3.shape[-1]), moved)
        return out if t.dim() == 3 else out[..., 0]

    new_size = fuse(size)
    new_x = fuse(x * size[..., None]) / new_size[..., None]
    new_source = fuse(source) if source is not None else None
    return new_x, new_size, new_source
