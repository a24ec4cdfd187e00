"""ToMe bipartite soft matching and size-weighted merging, as pure tensor functions.

Tokens are (batch, tokens, channels). The first `protected` tokens ([CLS], distillation) never
take part: they are split off, left untouched and put back in front, so they stay in place.
The remaining tokens alternate between set A (even) and set B (odd); the `r` A tokens whose best
B match is most similar are merged into that match. The output order is
[protected, unmerged A in their original order, B].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.reduction.ranking import split_top_k

# Similarity given to pairs that must not merge (a padding token and a real one). Finite, so a
# forced merge still picks the least bad pair instead of producing NaNs.
FORBIDDEN_SCORE = -1e4


def max_merges(num_tokens: int, protected: int) -> int:
    """The most tokens bipartite matching can remove: half of the unprotected tokens."""
    return max(num_tokens - protected, 0) // 2


def merge_count(num_tokens: int, protected: int, r: int) -> int:
    return min(max(r, 0), max_merges(num_tokens, protected))


@dataclass(frozen=True)
class Matching:
    """Which A tokens survive and where the others go; indices relative to the unprotected tail,
    plus `slot`: the output position every input token lands in."""

    protected: int
    unmerged: torch.Tensor  # (B, Na - r, 1) positions in A that survive
    src: torch.Tensor  # (B, r, 1) positions in A that are merged away
    dst: torch.Tensor  # (B, r, 1) positions in B they are merged into
    slot: torch.Tensor  # (B, N) output position of each input token

    @property
    def r(self) -> int:
        return self.src.shape[1]


def output_slots(protected: int, unmerged: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, n: int):
    """Output position of each of n input tokens (B, N): protected tokens keep theirs, surviving
    A tokens follow in their order, then B; a merged A token lands on its B match's position.
    Merging is then one scatter-add of every token into its slot, whatever it merges."""
    batch, kept = unmerged.shape[0], unmerged.shape[1]
    first_b = protected + kept
    a_slots = torch.empty(batch, (n - protected + 1) // 2, dtype=torch.long, device=unmerged.device)
    a_slots = a_slots.scatter(
        1, unmerged, torch.arange(protected, first_b, device=unmerged.device).expand(batch, -1)
    )
    a_slots = a_slots.scatter(1, src, dst + first_b)
    b_slots = torch.arange(first_b, first_b + (n - protected) // 2, device=unmerged.device).expand(batch, -1)
    # Interleave A (even tail positions) and B (odd); an odd tail has one more A token.
    pairs = torch.stack([a_slots[:, : b_slots.shape[1]], b_slots], dim=-1).flatten(1)
    head = torch.arange(protected, device=unmerged.device).expand(batch, -1)
    return torch.cat([head, pairs, a_slots[:, b_slots.shape[1] :]], dim=1)


def bipartite_soft_matching(
    metric: torch.Tensor, r: int, protected: int = 0, valid: torch.Tensor | None = None
) -> Matching:
    """Match tokens by cosine similarity of `metric` (B, N, C).

    `valid` (B, N) bool, optional: tokens may only merge with tokens of the same validity, so
    padding never blends into real tokens unless nothing else is left.
    """
    r = merge_count(metric.shape[1], protected, r)
    tail = metric[:, protected:]
    tail = tail / tail.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a, b = tail[:, ::2], tail[:, 1::2]
    scores = a @ b.transpose(-1, -2)
    if valid is not None:
        v = valid[:, protected:]
        mismatch = v[:, ::2, None] != v[:, 1::2][:, None, :]
        scores = scores.masked_fill(mismatch, FORBIDDEN_SCORE)

    best_score, best_dst = scores.max(dim=-1)
    src, unmerged = split_top_k(best_score, r)
    dst = best_dst.gather(1, src)
    slot = output_slots(protected, unmerged, src, dst, metric.shape[1])
    return Matching(protected, unmerged[..., None], src[..., None], dst[..., None], slot)


def merge_sum(m: Matching, x: torch.Tensor) -> torch.Tensor:
    """Sum merged tokens of x (B, N, C) into their destinations: (B, N - r, C)."""
    batch, n, channels = x.shape
    out = x.new_zeros(batch, n - m.r, channels)
    return out.scatter_add(1, m.slot[..., None].expand(-1, -1, channels), x)


def merge_weighted(
    m: Matching, x: torch.Tensor, size: torch.Tensor, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average merged tokens weighted by `weight` (defaults to size); sizes add up.

    x (B, N, C), size (B, N) -> x (B, N - r, C), size (B, N - r).
    """
    w = (size if weight is None else weight)[..., None]
    # One scatter for the weighted values, their weights and (when they differ) the sizes.
    parts = [x * w, w] if weight is None else [x * w, w, size[..., None]]
    merged = merge_sum(m, torch.cat(parts, dim=-1))
    channels = x.shape[-1]
    merged_x, merged_w = merged[..., :channels], merged[..., channels : channels + 1]
    return merged_x / merged_w, merged[..., -1]


def merge_tokens(
    m: Matching,
    x: torch.Tensor,
    size: torch.Tensor,
    source: torch.Tensor | None,
    weighted: bool = True,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Merge hidden states, sizes, source maps and validity with one matching.

    `weighted=False` is PuMer's plain mean: every current token counts once, whatever it covers.
    Padding (valid == False) gets a negligible weight so a forced real+padding merge keeps the
    real token's value; a merged token is valid if any part of it was.
    """
    weight = size if weighted else torch.ones_like(size)
    if valid is not None:
        weight = weight * (valid.to(weight.dtype) * (1 - 1e-6) + 1e-6)
    x, size = merge_weighted(m, x, size, weight)
    if source is not None:
        source = merge_sum(m, source)
    if valid is not None:
        valid = merge_sum(m, valid.to(x.dtype)[..., None])[..., 0] > 0
    return x, size, source, valid
