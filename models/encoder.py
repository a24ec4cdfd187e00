"""One pre-norm transformer encoder loop shared by every model family, with a reducer between
attention and MLP. Blocks reference the loaded Hugging Face modules; no weight is copied."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from models.plan import LayerSpec, ReductionPlan
from models.reduction.attention import attend, attention_probs, key_bias
from models.reduction.flops import LayerCost


@dataclass(frozen=True)
class Block:
    """The parts of one pre-norm layer: x += ls1(attn(norm1(x))); reduce; x += ls2(mlp(norm2(x)))."""

    norm1: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    norm2: nn.Module
    mlp: Callable[[torch.Tensor], torch.Tensor]
    mlp_linears: tuple[nn.Linear, ...]
    num_heads: int
    ls1: nn.Module | None = None
    ls2: nn.Module | None = None

    @property
    def cost(self) -> LayerCost:
        attn = sum(lin.weight.numel() for lin in (self.q, self.k, self.v, self.o))
        return LayerCost(attn, self.q.out_features, sum(lin.weight.numel() for lin in self.mlp_linears))


@dataclass(frozen=True)
class Tokens:
    """The token state of one forward: hidden states plus what reduction needs to track.

    size (B, N): input tokens each token stands for. source (B, N, N0) or None: which input
    tokens each token covers. valid (B, N) bool or None: False marks padding. The first n_text
    tokens are text (ViLT); the rest are image tokens. unit_size: no token was merged yet, so
    proportional attention has nothing to add. query (B, layers, D) or None: a per-layer query
    from outside the stream (a two-stream model's question, in this encoder's width) that a
    text-informed reducer scores tokens by. source_by_layer: when sources are tracked, the source
    entering each layer run so far (then after the last): what token maps are drawn from.
    """

    x: torch.Tensor
    size: torch.Tensor
    source: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    n_text: int = 0
    unit_size: bool = True
    query: torch.Tensor | None = None
    source_by_layer: tuple[torch.Tensor, ...] = ()

    @property
    def n_image(self) -> int:
        return self.x.shape[1] - self.n_text

    def reduced(self, **changes) -> Tokens:
        return replace(self, unit_size=False, **changes)

    def source_recorded(self) -> Tokens:
        """These tokens with their current source appended to source_by_layer (when tracked)."""
        if self.source is None:
            return self
        return replace(self, source_by_layer=(*self.source_by_layer, self.source))


def initial_tokens(
    x: torch.Tensor, valid: torch.Tensor | None = None, n_text: int = 0, track_source: bool = False
) -> Tokens:
    b, n, _ = x.shape
    size = torch.ones(b, n, dtype=x.dtype, device=x.device)
    source = None
    if track_source:
        source = torch.eye(n, dtype=x.dtype, device=x.device).expand(b, n, n)
    return Tokens(x=x, size=size, source=source, valid=valid, n_text=n_text).source_recorded()


class AttentionView:
    """What a reducer may read from layer `layer`'s attention: head-averaged keys and probabilities."""

    def __init__(
        self, q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float, layer: int = 0
    ):
        self._q, self._k, self._bias, self._scale = q, k, bias, scale
        self.layer = layer

    def metric(self) -> torch.Tensor:
        """Keys averaged over heads, (B, N, head_dim): ToMe's similarity metric."""
        return self._k.mean(dim=1)

    def probs(self, rows: slice) -> torch.Tensor:
        return attention_probs(self._q, self._k, self._bias, self._scale, rows)

    def query_probs(self, query: torch.Tensor) -> torch.Tensor:
        """Head-averaged attention of an outside query (B, D), split into this layer's heads, to
        every token: (B, N)."""
        b, heads, _, head_dim = self._k.shape
        q = query.to(self._k.dtype).view(b, heads, 1, head_dim)
        return attention_probs(q, self._k, self._bias, self._scale, slice(None))[:, 0]


Reducer = Callable[[LayerSpec, Tokens, AttentionView, ReductionPlan], Tokens]


def run_encoder(
    blocks: list[Block], tokens: Tokens, plan: ReductionPlan, reducer: Reducer
) -> tuple[Tokens, list[tuple[int, int]]]:
    """Run every block; returns the final tokens and (text, image) token counts entering each
    layer plus after the last one."""
    counts = [(tokens.n_text, tokens.n_image)]
    for i, block in enumerate(blocks):
        x = tokens.x
        b, n, _ = x.shape
        h = block.norm1(x)
        head_dim = block.q.out_features // block.num_heads
        q, k, v = (
            proj(h).view(b, n, block.num_heads, head_dim).transpose(1, 2)
            for proj in (block.q, block.k, block.v)
        )
        bias = key_bias(
            None if tokens.unit_size else tokens.size, tokens.valid, plan.proportional_attention, x.dtype
        )
        scale = head_dim**-0.5
        attn = attend(q, k, v, bias, scale).transpose(1, 2).reshape(b, n, -1)
        attn = block.o(attn)
        x = x + (block.ls1(attn) if block.ls1 is not None else attn)
        tokens = replace(tokens, x=x)

        spec = plan.spec(i)
        if not spec.is_identity:
            tokens = reducer(spec, tokens, AttentionView(q, k, bias, scale, i), plan)

        x = tokens.x
        mlp = block.mlp(block.norm2(x))
        tokens = replace(tokens, x=x + (block.ls2(mlp) if block.ls2 is not None else mlp)).source_recorded()
        counts.append((tokens.n_text, tokens.n_image))
    return tokens, counts
