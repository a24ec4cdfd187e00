"""Deterministic top-k splits built from comparisons, cumsum and scatter only.

`torch.sort(stable=True)` has no ONNX equivalent, and ONNX TopK and torch.topk may break ties
differently, so the reducers rank tokens here instead: a token's rank is the number of tokens
with a higher score, plus the number of earlier tokens with an equal one (a stable descending
sort). The result is an exact permutation, the same in eager mode, TorchScript and ONNX Runtime.
The pairwise comparison is O(N^2) booleans per row, cheap next to the attention that produced
the scores, but a dozen small operations: in eager mode a stable sort gives the same permutation
in three (a quarter of the time at batch 1), so only graphs being traced or exported take the
comparison path.
"""

from __future__ import annotations

import torch


def capturing_graph() -> bool:
    """True while torch.jit.trace, TorchScript or torch.export (the ONNX exporter) records a graph."""
    return (
        torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
    )


def descending_rank(score: torch.Tensor) -> torch.Tensor:
    """Rank of each entry of score (B, N) in a stable descending sort: 0 for the highest."""
    position = torch.arange(score.shape[-1], device=score.device)
    other, this = score[:, None, :], score[:, :, None]
    earlier = position[None, :] < position[:, None]
    ahead = (other > this) | ((other == this) & earlier)
    return ahead.sum(dim=-1)


def split_top_k(score: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices of the k highest scores, indices of the others) per row, both in position order.

    Ties break by position: of equal scores, the earlier token counts as higher.
    """
    if capturing_graph():
        return split_top_k_by_rank(score, k)
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    return order[:, :k].sort(dim=-1).values, order[:, k:].sort(dim=-1).values


def top_k_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """(B, N) bool: the k highest scores per row, ties broken as in split_top_k."""
    if capturing_graph():
        return descending_rank(score) < k
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter(-1, order[:, :k], True)


def split_top_k_by_rank(score: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """split_top_k from comparisons, cumsum and scatter only (what traced graphs record)."""
    chosen = (descending_rank(score) < k).long()
    # Slot of each token in the output: chosen tokens first, then the others, each in position order.
    slot = torch.where(chosen.bool(), chosen.cumsum(dim=-1) - 1, k + (1 - chosen).cumsum(dim=-1) - 1)
    position = torch.arange(score.shape[-1], device=score.device).expand_as(slot)
    order = torch.empty_like(slot).scatter(-1, slot, position)
    return order[:, :k], order[:, k:]
