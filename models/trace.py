"""What one reduced forward did: tokens per layer and the FLOPs it cost against the full model."""

from __future__ import annotations

from dataclasses import dataclass

from models.plan import ReductionPlan


@dataclass(frozen=True)
class Trace:
    """text_tokens[i] / image_tokens[i]: tokens entering layer i; the last entry is after the last
    layer. Vision transformers have no text tokens (all zeros); their [CLS] counts as image."""

    plan: ReductionPlan
    text_tokens: tuple[int, ...]
    image_tokens: tuple[int, ...]
    flops: int
    full_flops: int

    @property
    def tokens(self) -> tuple[int, ...]:
        return tuple(t + i for t, i in zip(self.text_tokens, self.image_tokens, strict=True))

    @property
    def kept_ratio(self) -> float:
        """Tokens after the last layer over tokens entering the first."""
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
            "kept_ratio": round(self.kept_ratio, 4),
            "flops": self.flops,
            "full_flops": self.full_flops,
            "flops_saved": round(self.flops_saved, 4),
        }
