"""LookupViT (Koner et al., "LookupViT: Compressing visual information to a limited number of tokens",
ECCV 2024), written from the paper's description; the paper has no official code.

Two token sets run through every block: the N lookup tokens (the full patch grid) and M compressed
tokens, made by bilinear resizing of the patch-embedding grid and of the position-embedding grid
to g x g (M = g^2, chosen per call). Each block:

1. information gathering: compressed tokens attend to the lookup tokens (cross-attention; queries
   from the compressed tokens, keys and values from the lookup tokens); its attention matrix A
   (per head, M x N) is kept;
2. refinement: a standard pre-norm ViT block (self-attention + MLP of width p D, p = 4) on the
   compressed tokens only;
3. global context infusion: the lookup tokens are updated from the refined compressed tokens with
   A transposed (N x M) as the attention weights — no new attention scores, no second softmax —
   then a low-dimensional MLP of width D / q (q = 2) on the lookup tokens.

Lookup tokens never attend to each other, so the cost is linear in N. Two classifiers, on the
mean-pooled compressed and the mean-pooled lookup tokens; at inference their logits are averaged.

Choices the paper leaves open (documented in docs/methods.md, LookupViT): pre-norm LayerNorms on
every branch input and on both outputs; the resize is antialiased bilinear (a triangle filter over
the whole source grid, what a downsampling `jax.image.resize` does), expressed as a fixed (M x N)
matrix so an exported graph holds a constant matmul; A^T is used as is (its columns are not
renormalised).

The forward has no data-dependent control flow: the grid is a Python int, so tracing a fixed grid
(torch.jit.trace, ONNX) gives a static graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from models.lookupvit.configuration import LookupViTConfig


def block_flops(n: int, m: int, dim: int, mlp: int, lookup_mlp: int) -> int:
    """Analytic FLOPs of one LookupViT block, 2 FLOPs per multiply-add as everywhere in tokenlean.

    Multiply-adds: gathering q (M D^2), k and v (2 N D^2), scores and A V (2 N M D), output (M D^2);
    refinement: q, k, v, o (4 M D^2), scores and values (2 M^2 D), MLP (2 M D mlp); infusion:
    v (M D^2), A^T V (N M D), output (N D^2); lookup MLP (2 N D lookup_mlp). With mlp = 4 D and
    lookup_mlp = D / 2 this is the paper's C = (3NM + 2M^2) D + (4N + 15M) D^2, term for term. Not
    counted, as for every model here: norms, softmax, activations, biases, the resize that makes
    the compressed tokens (N M D, once per forward), patch embedding, pooling and heads.
    """
    macs = (
        (3 * n * m + 2 * m * m) * dim
        + (3 * n + 7 * m) * dim * dim
        + 2 * n * dim * lookup_mlp
        + 2 * m * dim * mlp
    )
    return 2 * macs


def resize_matrix(src: int, dst: int) -> torch.Tensor:
    """(dst^2, src^2) weights of an antialiased bilinear resize of a src x src grid (raster order)
    to dst x dst: `R @ tokens` resizes a (B, src^2, D) token grid. The identity when dst == src.
    Always a real CPU tensor, even under a meta-device or inference-mode context."""
    with torch.inference_mode(False), torch.no_grad():
        eye = torch.eye(src * src, dtype=torch.float64, device="cpu").view(src * src, 1, src, src)
        out = F.interpolate(eye, size=(dst, dst), mode="bilinear", align_corners=False, antialias=True)
        return out.reshape(src * src, dst * dst).t().contiguous().float()


def gather_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """The information-gathering attention matrix A = softmax(q k^T * scale) over the lookup keys:
    (B, H, M, N). The only attention-score computation of the cross-attention; the infusion step
    reuses its result (module-level, so tests can check that)."""
    return torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LookupViTEmbeddings(nn.Module):
    def __init__(self, config: LookupViTConfig):
        super().__init__()
        self.side = config.lookup_grid
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embeddings = nn.Parameter(torch.zeros(1, self.side * self.side, config.hidden_size))
        # One resize matrix per smaller grid, built with the model: constants of the module, so a
        # tracer (ONNX, TorchScript) records them as they are and never builds one itself.
        for grid in range(1, self.side):
            self.register_buffer(f"resize_{grid}", resize_matrix(self.side, grid), persistent=False)

    def forward(self, pixel_values: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(lookup tokens (B, N, D), compressed tokens (B, grid^2, D)); raster order."""
        patches = self.projection(pixel_values).flatten(2).transpose(1, 2)
        if not torch.jit.is_tracing() and patches.shape[1] != self.side * self.side:
            raise ValueError(
                f"expected a {self.side} x {self.side} patch grid, got {patches.shape[1]} patches"
            )
        pos = self.position_embeddings
        lookup = patches + pos
        if grid == self.side:  # resizing to the same size is the identity
            return lookup, lookup
        r = getattr(self, f"resize_{grid}").to(dtype=patches.dtype)
        return lookup, torch.matmul(r, patches) + torch.matmul(r, pos)


class LookupViTLayer(nn.Module):
    """One LookupViT block: gathering (MHBC lookup -> compressed), a ViT block on the compressed
    tokens, infusion (MHBC compressed -> lookup, reusing A) and the lookup tokens' small MLP."""

    def __init__(self, config: LookupViTConfig):
        super().__init__()
        d, eps, bias = config.hidden_size, config.layer_norm_eps, config.qkv_bias
        self.num_heads = config.num_attention_heads
        self.head_dim = d // self.num_heads
        # 1. information gathering: compressed queries, lookup keys and values
        self.gather_norm_compressed = nn.LayerNorm(d, eps=eps)
        self.gather_norm_lookup = nn.LayerNorm(d, eps=eps)
        self.gather_q = nn.Linear(d, d, bias=bias)
        self.gather_k = nn.Linear(d, d, bias=bias)
        self.gather_v = nn.Linear(d, d, bias=bias)
        self.gather_o = nn.Linear(d, d)
        # 2. refinement: a standard pre-norm ViT block on the compressed tokens
        self.norm1 = nn.LayerNorm(d, eps=eps)
        self.q = nn.Linear(d, d, bias=bias)
        self.k = nn.Linear(d, d, bias=bias)
        self.v = nn.Linear(d, d, bias=bias)
        self.o = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, eps=eps)
        self.mlp = Mlp(d, config.intermediate_size, config.hidden_act)
        # 3. global context infusion: values from the compressed tokens, weights A^T
        self.infuse_norm = nn.LayerNorm(d, eps=eps)
        self.infuse_v = nn.Linear(d, d, bias=bias)
        self.infuse_o = nn.Linear(d, d)
        self.lookup_norm = nn.LayerNorm(d, eps=eps)
        self.lookup_mlp = Mlp(d, config.lookup_intermediate_size, config.hidden_act)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    @staticmethod
    def _merge(x: torch.Tensor) -> torch.Tensor:
        b, h, n, hd = x.shape
        return x.transpose(1, 2).reshape(b, n, h * hd)

    def forward(
        self, lookup: torch.Tensor, compressed: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (lookup, compressed, A) with A the gathering attention (B, H, M, N)."""
        scale = self.head_dim**-0.5
        # 1. gathering
        h_lookup = self.gather_norm_lookup(lookup)
        q = self._heads(self.gather_q(self.gather_norm_compressed(compressed)))
        k, v = self._heads(self.gather_k(h_lookup)), self._heads(self.gather_v(h_lookup))
        attn = gather_attention(q, k, scale)
        compressed = compressed + self.gather_o(self._merge(torch.matmul(attn, v)))
        # 2. refinement
        h = self.norm1(compressed)
        q, k, v = (self._heads(proj(h)) for proj in (self.q, self.k, self.v))
        compressed = compressed + self.o(self._merge(F.scaled_dot_product_attention(q, k, v)))
        compressed = compressed + self.mlp(self.norm2(compressed))
        # 3. infusion with A^T: each lookup token takes the compressed tokens' values, weighted by
        # how much each compressed token attended to it
        v = self._heads(self.infuse_v(self.infuse_norm(compressed)))
        lookup = lookup + self.infuse_o(self._merge(torch.matmul(attn.transpose(-1, -2), v)))
        lookup = lookup + self.lookup_mlp(self.lookup_norm(lookup))
        return lookup, compressed, attn


@dataclass
class LookupViTModelOutput(ModelOutput):
    """Final (normalised) token states of both sets; gathering attentions when asked for."""

    lookup_hidden_state: torch.Tensor | None = None
    compressed_hidden_state: torch.Tensor | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class LookupViTClassifierOutput(ModelOutput):
    """logits: the mean of the two heads' logits. loss (with labels): the mean of both heads'
    cross-entropies."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    compressed_logits: torch.Tensor | None = None
    lookup_logits: torch.Tensor | None = None
    lookup_hidden_state: torch.Tensor | None = None
    compressed_hidden_state: torch.Tensor | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class LookupViTPreTrainedModel(PreTrainedModel):
    config_class = LookupViTConfig
    config: LookupViTConfig
    base_model_prefix = "lookupvit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["LookupViTEmbeddings", "LookupViTLayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, LookupViTEmbeddings):
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=self.config.initializer_range)
            for grid in range(1, module.side):  # not in checkpoints: rebuilt after loading
                init.copy_(getattr(module, f"resize_{grid}"), resize_matrix(module.side, grid))

    def check_grid(self, grid: int | None) -> int:
        grid = self.config.default_grid if grid is None else int(grid)
        if not 1 <= grid <= self.config.lookup_grid:
            raise ValueError(f"grid must be in [1, {self.config.lookup_grid}], got {grid}")
        return grid


class LookupViTModel(LookupViTPreTrainedModel):
    def __init__(self, config: LookupViTConfig):
        super().__init__(config)
        self.embeddings = LookupViTEmbeddings(config)
        self.layers = nn.ModuleList([LookupViTLayer(config) for _ in range(config.num_hidden_layers)])
        self.lookup_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.compressed_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def forward(
        self, pixel_values: torch.Tensor, grid: int | None = None, output_attentions: bool = False, **kwargs
    ) -> LookupViTModelOutput:
        """grid: side of the compressed grid (grid^2 tokens); None is the config's default_grid."""
        grid = self.check_grid(grid)
        pixel_values = pixel_values.to(self.embeddings.projection.weight.dtype)
        lookup, compressed = self.embeddings(pixel_values, grid)
        attentions = []
        for layer in self.layers:
            lookup, compressed, attn = layer(lookup, compressed)
            attentions.append(attn)
        return LookupViTModelOutput(
            lookup_hidden_state=self.lookup_norm(lookup),
            compressed_hidden_state=self.compressed_norm(compressed),
            attentions=tuple(attentions) if output_attentions else None,
        )


class LookupViTForImageClassification(LookupViTPreTrainedModel):
    def __init__(self, config: LookupViTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.lookupvit = LookupViTModel(config)
        self.compressed_classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.lookup_classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        grid: int | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool = False,
        **kwargs,
    ) -> LookupViTClassifierOutput:
        out = self.lookupvit(pixel_values, grid=grid, output_attentions=output_attentions)
        compressed_logits = self.compressed_classifier(out.compressed_hidden_state.mean(dim=1))
        lookup_logits = self.lookup_classifier(out.lookup_hidden_state.mean(dim=1))
        loss = None
        if labels is not None:
            loss = (F.cross_entropy(compressed_logits, labels) + F.cross_entropy(lookup_logits, labels)) / 2
        return LookupViTClassifierOutput(
            loss=loss,
            logits=(compressed_logits + lookup_logits) / 2,
            compressed_logits=compressed_logits,
            lookup_logits=lookup_logits,
            lookup_hidden_state=out.lookup_hidden_state,
            compressed_hidden_state=out.compressed_hidden_state,
            attentions=out.attentions,
        )
