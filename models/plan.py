"""ReductionPlan: an immutable, hashable description of what one forward call removes.

A plan is an argument of the forward call, never state on the model, so concurrent calls with
different plans can share one set of weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

LEVELS = ("none", "low", "medium", "high")


@dataclass(frozen=True)
class LayerSpec:
    """What one encoder layer does between its attention and its MLP.

    Vision transformers: `r` tokens removed (ToMe merges, TC-ViT condenses) or EViT `keep_rate`.
    ViLT (PuMer family): fractions of the tokens entering the layer; `prune` and `merge_image` of
    the image tokens, `merge_text` of the text tokens.
    """

    r: int = 0
    keep_rate: float = 1.0
    prune: float = 0.0
    merge_image: float = 0.0
    merge_text: float = 0.0

    @property
    def is_identity(self) -> bool:
        return (
            self.r <= 0
            and self.keep_rate >= 1.0
            and self.prune <= 0
            and self.merge_image <= 0
            and self.merge_text <= 0
        )

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v != LayerSpec.__dataclass_fields__[k].default}


IDENTITY = LayerSpec()


@dataclass(frozen=True)
class ReductionPlan:
    """method + one LayerSpec per encoder layer (+ the level it came from, for reporting).

    proportional_attention: add log(size) of each key to the attention logits (ToMe).
    weighted_merge: merged tokens are size-weighted means; False is PuMer's plain mean.
    grid: grid-layout methods (LookupViT): side of the compressed-token grid (grid x grid
    tokens); no layers. Which methods and grids a model accepts is checked by the model.
    """

    method: str = "none"
    layers: tuple[LayerSpec, ...] = ()
    level: str = "none"
    proportional_attention: bool = True
    weighted_merge: bool = True
    # TC-ViT parameters: connectivity order K and the connectivity/dominance mix alpha.
    order: int = field(default=1)
    alpha: float = field(default=0.5)
    grid: int = 0

    def __post_init__(self) -> None:
        if self.method != "none":
            from models.reduction.registry import method_names

            if self.method not in method_names():
                raise ValueError(
                    f"unknown method {self.method!r}; expected one of {('none', *method_names())}"
                )
        if self.order < 1:
            raise ValueError("connectivity order must be >= 1")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError("alpha must be in [0, 1]")
        if self.method != "none":
            from models.reduction.registry import chooses_grid

            if chooses_grid(self.method) != (self.grid > 0):
                raise ValueError(f"a {self.method} plan needs a grid >= 1 only if the method chooses a grid")
        elif self.grid:
            raise ValueError("the unreduced plan has no grid")

    @property
    def removes_nothing(self) -> bool:
        """A grid plan names a compressed grid, which is never the unreduced model (that is
        NO_REDUCTION: the model's highest-fidelity grid)."""
        if self.grid > 0:
            return False
        return self.method == "none" or all(spec.is_identity for spec in self.layers)

    def spec(self, layer: int) -> LayerSpec:
        return self.layers[layer] if self.method != "none" and layer < len(self.layers) else IDENTITY

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "level": self.level,
            "layers": {str(i): s.to_dict() for i, s in enumerate(self.layers) if not s.is_identity},
            "proportional_attention": self.proportional_attention,
            "weighted_merge": self.weighted_merge,
            **{name: getattr(self, name) for name in _plan_parameters(self.method)},
            **({"grid": self.grid} if self.grid > 0 else {}),
        }


def _plan_parameters(method: str) -> tuple[str, ...]:
    """Plan fields a method reads besides its layers (TC-ViT: order, alpha), shown in reports."""
    if method == "none":
        return ()
    from models.reduction.registry import plan_parameters

    return plan_parameters(method)


NO_REDUCTION = ReductionPlan()
