"""What one reduced forward did: tokens per layer and the FLOPs it cost against the full model."""

from __future__ import annotations

from dataclasses import dataclass

from models.plan import ReductionPlan


@dataclass(frozen=True)
class Trace:
    """text_tokens[i] / image_tokens[i]: tokens entering layer i; the last entry is after the last
    layer. Vision transformers have no text tokens (all zeros); their [CLS] counts as image.

    LookupViT: image_tokens are its lookup tokens (N, the patch grid) and compressed_tokens its
    compressed tokens (M) per layer; `tokens` counts both, and kept_ratio is M / N, the share of
    tokens that get full self-attention and the wide MLP."""

    plan: ReductionPlan
    text_tokens: tuple[int, ...]
    image_tokens: tuple[int, ...]
    flops: int
    full_flops: int
    compressed_tokens: tuple[int, ...] = ()

    @property
    def tokens(self) -> tuple[int, ...]:
        compressed = self.compressed_tokens or (0,) * len(self.image_tokens)
        return tuple(
            t + i + c for t, i, c in zip(self.text_tokens, self.image_tokens, compressed, strict=True)
        )

    @property
    def kept_ratio(self) -> float:
        """Tokens after the last layer over tokens entering the first (LookupViT: M / N)."""
        if self.compressed_tokens:
            return self.compressed_tokens[-1] / self.image_tokens[0]
        return self.tokens[-1] / self.tokens[0]

    @property
    def flops_saved(self) -> float:
        return 1.0 - self.flops / self.full_flops

    def to_dict(self) -> dict:
        has_text = any(self.text_tokens)
        return {
            "plan": self.plan.to_dict(),
            "tokens_per_layer": list(self.tokens),
            **({"text_tokens_per_layer": list(self.text_tokens)} if has_text else {}),
            **({"image_tokens_per_layer": list(self.image_tokens)} if has_text else {}),
            **(
                {
                    "lookup_tokens_per_layer": list(self.image_tokens),
                    "compressed_tokens_per_layer": list(self.compressed_tokens),
                }
                if self.compressed_tokens
                else {}
            ),
            "kept_ratio": round(self.kept_ratio, 4),
            "flops": self.flops,
            "full_flops": self.full_flops,
            "flops_saved": round(self.flops_saved, 4),
        }
