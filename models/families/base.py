"""What every model family provides: its blocks, its token schedule and its reduced forward."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from models.encoder import Block
from models.plan import ReductionPlan
from models.reduction.flops import encoder_flops
from models.trace import Trace


@dataclass
class ReducedOutput:
    """Outputs of a reduced forward. last_hidden_state has the reduced token count; `sizes` says how
    many input tokens each of its tokens stands for, `sources` which ones (when tracked)."""

    last_hidden_state: torch.Tensor
    sizes: torch.Tensor
    trace: Trace
    pooler_output: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    sources: torch.Tensor | None = None
    text_valid: torch.Tensor | None = None


class ReducibleModel(ABC):
    """Wraps a loaded Hugging Face model (no copy of its weights) and runs it under a plan."""

    family: str
    methods: tuple[str, ...]

    def __init__(self, model: nn.Module, blocks: list[Block]):
        self.model = model
        self.blocks = blocks
        self.costs = [block.cost for block in blocks]

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def config(self):
        return self.model.config

    @abstractmethod
    def nominal_tokens(self) -> tuple[int, int]:
        """(text, image) tokens of a typical input, used to turn FLOPs targets into plans."""

    @abstractmethod
    def schedule(self, plan: ReductionPlan, n_text: int, n_image: int) -> list[tuple[int, int]]:
        """(text, image) tokens entering each layer, then after the last, that `plan` promises."""

    def check_plan(self, plan: ReductionPlan) -> None:
        if plan.method != "none" and plan.method not in self.methods:
            raise ValueError(f"{plan.method!r} does not apply to {self.family}; use one of {self.methods}")
        if plan.method != "none" and len(plan.layers) != self.num_layers:
            raise ValueError(f"plan has {len(plan.layers)} layers, model has {self.num_layers}")

    def flops(self, plan: ReductionPlan, n_text: int | None = None, n_image: int | None = None) -> int:
        nt, ni = self.nominal_tokens()
        counts = self.schedule(plan, nt if n_text is None else n_text, ni if n_image is None else n_image)
        return encoder_flops(self.costs, [t + i for t, i in counts])

    def make_trace(self, plan: ReductionPlan, counts: list[tuple[int, int]]) -> Trace:
        totals = [t + i for t, i in counts]
        return Trace(
            plan=plan,
            text_tokens=tuple(t for t, _ in counts),
            image_tokens=tuple(i for _, i in counts),
            flops=encoder_flops(self.costs, totals),
            full_flops=encoder_flops(self.costs, [totals[0]] * len(totals)),
        )

    def parameters_dtype(self) -> torch.dtype:
        return self.blocks[0].q.weight.dtype


def linears(module: nn.Module) -> tuple[nn.Linear, ...]:
    return tuple(m for m in module.modules() if isinstance(m, nn.Linear))
