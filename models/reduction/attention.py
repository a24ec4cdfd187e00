"""Attention with proportional attention and padding as one additive key bias.

The bias (B, 1, 1, N) holds log(size) of each key (proportional attention) and a large negative
value for padding keys. It goes to `scaled_dot_product_attention` as a float mask, so the fused
kernel stays in use; with nothing to add the mask is None and the call is the plain one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def key_bias(
    size: torch.Tensor | None, valid: torch.Tensor | None, proportional: bool, dtype: torch.dtype
) -> torch.Tensor | None:
    """Additive attention bias over keys, (B, 1, 1, N), or None when it would be all zeros."""
    bias = None
    if proportional and size is not None:
        bias = size.to(dtype).log()
    if valid is not None:
        blocked = torch.zeros(valid.shape, dtype=dtype, device=valid.device)
        blocked = blocked.masked_fill(~valid, torch.finfo(dtype).min)
        bias = blocked if bias is None else bias + blocked
    return None if bias is None else bias[:, None, None, :]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float):
    """softmax(q k^T * scale + bias) v for (B, H, N, d) tensors."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def attention_probs(
    q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float, rows: slice
) -> torch.Tensor:
    """Head-averaged attention probabilities of the query rows `rows`: (B, len(rows), N).

    Reducers that score tokens by attention (PuMer, TC-ViT, EViT) need probabilities, which the
    fused kernel does not return; only the rows they read are recomputed.
    """
    logits = (q[:, :, rows] @ k.transpose(-1, -2)) * scale
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1).mean(dim=1)
