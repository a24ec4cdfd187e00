"""One compression plan frozen into an nn.Module whose forward is a pure tensor function: the
thing torch.onnx.export and torch.jit.trace capture. Token counts are fixed by the plan (and, for
ViLT, by the text length the graph is exported at); the batch size stays free."""

from __future__ import annotations

import torch
from torch import nn

from models.families import ReducibleModel
from models.plan import ReductionPlan

VISION_INPUTS = ("pixel_values",)
VILT_INPUTS = ("input_ids", "attention_mask", "pixel_values")
OUTPUTS = ("logits",)


class PlanGraph(nn.Module):
    """logits = model(inputs) under one fixed plan. Build with plan_graph()."""

    input_names: tuple[str, ...] = ()

    def __init__(self, model: ReducibleModel, plan: ReductionPlan):
        super().__init__()
        self.reducible = model
        self.hf_model = model.model  # registers the weights as this module's parameters
        self.plan = plan


class VisionGraph(PlanGraph):
    input_names = VISION_INPUTS

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.reducible(pixel_values, plan=self.plan).logits


class ViltGraph(PlanGraph):
    input_names = VILT_INPUTS

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor
    ) -> torch.Tensor:
        out = self.reducible(
            input_ids, pixel_values, attention_mask=attention_mask, plan=self.plan, always_mask=True
        )
        return out.logits


def plan_graph(model: ReducibleModel, plan: ReductionPlan) -> PlanGraph:
    return (ViltGraph if model.family == "vilt" else VisionGraph)(model, plan).eval()


def example_inputs(model: ReducibleModel, batch: int, text_length: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs of the right shapes and dtypes to trace with (the values do not matter). Half of
    the questions are padded, so the padding path is the one traced."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size, generator=g)
    if model.family != "vilt":
        return (pixels,)
    ids = torch.randint(1, cfg.vocab_size, (batch, text_length), generator=g)
    mask = torch.ones(batch, text_length, dtype=torch.long)
    mask[::2, max(1, text_length // 2) :] = 0
    return ids * mask, mask, pixels
