"""TC-ViT token condensation: keep the tokens most relevant by connectivity and dominance,
fuse every other token into the kept token it is most connected to.

Choices the paper leaves open, made here:
- connectivity score of token j = incoming connectivity (column of the order-K matrix), normalised
  to sum to 1 like dominance, so that alpha weighs two distributions of the same scale;
- "most connected" between a dropped token i and a kept token j is read as the similarity of their
  connections: the cosine of rows i and j of the order-K connectivity matrix (the two tokens
  attend, along paths of length <= K, to the same tokens). The direct entry C[i, j] (how much i
  attends to j), the literal reading, funnels the dropped tokens into the few tokens every query
  attends to: on the demo classifier 8.7 of the 9 tokens dropped in a layer (97 % background) went
  to one kept shape token, which became 90 % background, and TC-ViT lost 1.5 points on the train
  split where pruning without fusion lost none. With connection profiles, 2 % of the dropped
  tokens fuse into a token of another kind (background vs shape) and accuracy equals `none`. On
  the pretrained DINOv2-S/14 of bench/fidelity.py the direct rule is worse as well (photo [CLS]
  cosine 0.949 vs 0.975 at `medium`). `fusion="direct"` keeps the literal reading for comparison;
- protected tokens ([CLS], distillation) are always kept and never receive fused tokens, so the
  classifier's input is not blended (the same rule ToMe applies).
"""

from __future__ import annotations

import torch

from models.reduction.prune import gather_tokens, split_by_score

DEFAULT_ORDER = 1
DEFAULT_ALPHA = 0.5
FUSIONS = ("profile", "direct")


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


def fusion_affinity(conn: torch.Tensor, keep: torch.Tensor, drop: torch.Tensor, fusion: str) -> torch.Tensor:
    """How connected each dropped token is to each kept token: (B, dropped, kept).

    profile: cosine of their rows of the connectivity matrix (they connect to the same tokens);
    direct: the connectivity from the dropped token to the kept one, C[drop, keep].
    """
    if fusion == "profile":
        rows = conn / conn.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return gather_tokens(rows, drop) @ gather_tokens(rows, keep).transpose(1, 2)
    if fusion == "direct":
        return gather_tokens(conn, drop).gather(2, keep[:, None, :].expand(-1, drop.shape[1], -1))
    raise ValueError(f"unknown fusion {fusion!r}; expected one of {FUSIONS}")


def condense(
    x: torch.Tensor,
    size: torch.Tensor,
    source: torch.Tensor | None,
    probs: torch.Tensor,
    r: int,
    protected: int = 1,
    order: int = DEFAULT_ORDER,
    alpha: float = DEFAULT_ALPHA,
    fusion: str = "profile",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Remove r tokens from x (B, N, C) given head-averaged attention probs (B, N, N)."""
    n = x.shape[1]
    r = condense_count(n, protected, r)
    conn = connectivity(probs, order)
    score = relevance(conn, probs, alpha)
    score = torch.cat([torch.full_like(score[:, :protected], torch.inf), score[:, protected:]], dim=1)
    keep, drop = split_by_score(score, n - r)

    # Most connected kept, unprotected token for each dropped token (protected tokens are kept
    # first: their scores are infinite and kept tokens come in position order).
    link = fusion_affinity(conn, keep, drop, fusion)
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
