"""Analytic FLOPs of encoder layers from their actual token counts.

Counted per layer (one multiply-add = 2 FLOPs): the q, k, v and output projections and the two
attention products on the tokens entering the layer, and the MLP on the tokens leaving the
reducer (reduction sits between attention and MLP). Not counted: norms, softmax, activations,
the reducers' own work, embeddings and heads. Encoder FLOPs are what compression levels target.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerCost:
    attn_weights: int  # multiply-adds per token of the q, k, v, o projections
    attn_dim: int  # heads * head_dim: multiply-adds per (query, key) pair, for each product
    mlp_weights: int  # multiply-adds per token of the MLP

    def flops(self, tokens_in: int, tokens_out: int) -> int:
        attention = tokens_in * self.attn_weights + 2 * tokens_in * tokens_in * self.attn_dim
        return 2 * (attention + tokens_out * self.mlp_weights)


def encoder_flops(costs: list[LayerCost], tokens: list[int]) -> int:
    """tokens[i] enter layer i; tokens[i + 1] leave its reducer (len(tokens) == len(costs) + 1)."""
    return sum(c.flops(tokens[i], tokens[i + 1]) for i, c in enumerate(costs))


@dataclass(frozen=True)
class FusionCost:
    """One co-attention fusion layer (METER): per stream self-attention, cross-attention to the
    other stream, MLP. width: the fusion width D; mlp_weights: one stream's MLP multiply-adds per
    token."""

    width: int
    mlp_weights: int

    def flops(self, text_in: int, image_in: int, text_out: int, image_out: int) -> int:
        d, t, i = self.width, text_in, image_in
        # Self-attention q, k, v, o on each stream's tokens; cross-attention q, o on its own and
        # k, v on the other stream's.
        projections = 8 * d * d * (t + i)
        products = 2 * d * (t * t + i * i) + 4 * d * t * i
        return 2 * (projections + products + self.mlp_weights * (text_out + image_out))
