"""What a benchmark compares: every method at every level, the unreduced model, and the baseline
of feeding the unreduced model a smaller image (the papers' "lower input resolution")."""

from __future__ import annotations

from dataclasses import dataclass

from models.families.base import ReducibleModel
from models.levels import named_plan
from models.plan import LEVELS, NO_REDUCTION, ReductionPlan

RESOLUTION = "resolution"


@dataclass(frozen=True)
class Variant:
    """One row of a benchmark. `model` names which model of the subject runs it (the classify
    subject holds the ViT and the LookupViT); `size` is the input image side in pixels."""

    method: str
    level: str
    plan: ReductionPlan
    size: int
    model: str = "main"

    @property
    def name(self) -> str:
        return "none" if self.method == "none" else f"{self.method} {self.level}"


def input_size(rm: ReducibleModel) -> int:
    return int(rm.config.image_size)


def flops_at(rm: ReducibleModel, plan: ReductionPlan, size: int, n_text: int | None = None) -> int:
    return rm.flops(plan, n_text=n_text, n_image=rm.image_tokens_at(size))


def resolution_sizes(rm: ReducibleModel, n_text: int | None = None) -> dict[str, int]:
    """Per level, the smaller input side (a multiple of the patch) whose FLOPs saving is closest to
    that of the model's default method at that level: the baseline at matched cost."""
    full = rm.config.image_size
    patch = rm.config.patch_size
    unreduced = flops_at(rm, NO_REDUCTION, full, n_text)
    candidates = range(full - patch, patch - 1, -patch)

    def saved(plan: ReductionPlan, size: int) -> float:
        return 1 - flops_at(rm, plan, size, n_text) / unreduced

    sizes = {}
    for level in LEVELS[1:]:
        target = saved(named_plan(rm, level, rm.default_method), full)
        sizes[level] = min(candidates, key=lambda s, t=target: abs(saved(NO_REDUCTION, s) - t))
    return sizes


def variants_of(
    rm: ReducibleModel,
    methods: list[str] | None = None,
    resolution: bool = True,
    model: str = "main",
    n_text: int | None = None,
) -> list[Variant]:
    """`none`, then each method at low / medium / high, then the lower-resolution baseline."""
    full = input_size(rm)
    rows = [Variant("none", "none", NO_REDUCTION, full, model)]
    for method in methods or rm.methods:
        rows += [Variant(method, lv, named_plan(rm, lv, method), full, model) for lv in LEVELS[1:]]
    if resolution:
        seen = {full}
        for level, size in resolution_sizes(rm, n_text).items():
            if size not in seen:  # coarse patch grids can map two levels to one size
                seen.add(size)
                rows.append(Variant(RESOLUTION, level, NO_REDUCTION, size, model))
    return rows
