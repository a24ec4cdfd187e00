"""LookupViT under a plan: the plan picks the compressed grid; FLOPs are the paper's per-block count.

The unreduced model (NO_REDUCTION, level `none`) is the model's highest-fidelity setting, its
config's `default_grid` (the largest trained grid); a `lookupvit` plan names a smaller grid. FLOPs
saved are relative to that setting, like every other method's relative to its unreduced model.
"""

from __future__ import annotations

import torch
from torch import nn

from models.families.base import ModelFamily, ReducedOutput, ReducibleModel
from models.families.registry import register_family
from models.lookupvit import (
    ARCHITECTURES,
    LookupViTForImageClassification,
    LookupViTModel,
    block_flops,
)
from models.plan import NO_REDUCTION, ReductionPlan
from models.reduction.registry import GRID
from models.trace import Trace


class LookupViT(ReducibleModel):
    protected = 0

    def __init__(self, model: nn.Module):
        if not isinstance(model, LookupViTForImageClassification | LookupViTModel):
            raise TypeError(f"{type(model).__name__} is not a LookupViT model")
        # ReducibleModel.__init__ derives costs from transformers blocks; LookupViT counts its own.
        self.family = LOOKUPVIT
        self.model = model
        self.base = model.lookupvit if isinstance(model, LookupViTForImageClassification) else model
        self.blocks = list(self.base.layers)

    @property
    def config(self):
        return self.model.config

    @property
    def grids(self) -> tuple[int, ...]:
        """Trained grid sides, ascending."""
        return tuple(self.config.grid_sizes)

    @property
    def full_grid(self) -> int:
        return self.config.default_grid

    @property
    def head(self) -> str | None:
        return "classifier" if isinstance(self.model, LookupViTForImageClassification) else None

    def grid(self, plan: ReductionPlan) -> int:
        return plan.grid if plan.grid > 0 else self.full_grid

    def nominal_tokens(self) -> tuple[int, int]:
        return 0, self.config.lookup_grid**2

    def check_plan(self, plan: ReductionPlan) -> None:
        if plan.method not in ("none", *self.methods):
            raise ValueError(f"{plan.method!r} does not apply to {self.family}; use one of {self.methods}")
        if plan.method != "none" and not 1 <= plan.grid <= self.config.lookup_grid:
            raise ValueError(f"grid must be in [1, {self.config.lookup_grid}], got {plan.grid}")

    def counts(self, plan: ReductionPlan, n_image: int | None = None) -> tuple[int, int]:
        """(lookup tokens N, compressed tokens M) in every layer."""
        n = self.nominal_tokens()[1] if n_image is None else n_image
        return n, self.grid(plan) ** 2

    def schedule(self, plan: ReductionPlan, n_text: int, n_image: int) -> list[tuple[int, int]]:
        """(0, N + M) entering each layer and after the last: both token sets, every layer."""
        n, m = self.counts(plan, n_image)
        return [(0, n + m)] * (self.num_layers + 1)

    def layer_flops(self, n: int, m: int) -> int:
        cfg = self.config
        return block_flops(n, m, cfg.hidden_size, cfg.intermediate_size, cfg.lookup_intermediate_size)

    def flops(self, plan: ReductionPlan, n_text: int | None = None, n_image: int | None = None) -> int:
        return self.num_layers * self.layer_flops(*self.counts(plan, n_image))

    def make_trace(self, plan: ReductionPlan, counts: list[tuple[int, int]] | None = None) -> Trace:
        n, m = self.counts(plan)
        steps = self.num_layers + 1
        return Trace(
            plan=plan,
            text_tokens=(0,) * steps,
            image_tokens=(n,) * steps,
            compressed_tokens=(m,) * steps,
            flops=self.flops(plan),
            full_flops=self.flops(NO_REDUCTION),
        )

    def parameters_dtype(self) -> torch.dtype:
        return self.base.embeddings.projection.weight.dtype

    def __call__(
        self, pixel_values: torch.Tensor, plan: ReductionPlan = NO_REDUCTION, track_source: bool = False
    ) -> ReducedOutput:
        """last_hidden_state: the final compressed tokens (each stands for N / M patches); logits:
        the mean of the two heads (classification models). track_source: patch_sources assign
        each patch to the compressed token its resize draws on most (the same in every layer);
        there are no merge `sources`."""
        self.check_plan(plan)
        grid = self.grid(plan)
        out = self.model(pixel_values, grid=grid)
        seq = out.compressed_hidden_state
        n, m = self.counts(plan)
        return ReducedOutput(
            last_hidden_state=seq,
            sizes=torch.full(seq.shape[:2], n / m, dtype=seq.dtype, device=seq.device),
            trace=self.make_trace(plan),
            pooler_output=seq.mean(dim=1),
            logits=getattr(out, "logits", None),
            **self.patch_sources(grid, seq.shape[0], seq.device) if track_source else {},
        )

    def patch_sources(self, grid: int, batch: int, device: torch.device) -> dict:
        """Each patch (lookup token) goes to the compressed token whose cell of the resized grid
        its centre lies in: one block of patches per compressed token, the same in every layer."""
        side = self.config.lookup_grid
        cell = ((torch.arange(side, device=device) + 0.5) * grid / side).long()  # per patch row / column
        owner = (cell[:, None] * grid + cell[None, :]).flatten()
        sources = torch.zeros(grid * grid, side * side, device=device)
        sources[owner, torch.arange(side * side, device=device)] = 1.0
        return {
            "patch_sources": (sources.expand(batch, -1, -1),) * (self.num_layers + 1),
            "patch_grid": (side, side),
        }


class LookupViTFamily(ModelFamily):
    name = "lookupvit"
    layout = GRID
    default_method = "lookupvit"
    demo_recipe = "models.demo.lookupvit"
    architectures = tuple(ARCHITECTURES)
    custom_architectures = ARCHITECTURES

    def wrap(self, model: nn.Module) -> LookupViT:
        return LookupViT(model)


LOOKUPVIT = register_family(LookupViTFamily())
