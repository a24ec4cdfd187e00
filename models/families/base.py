"""What a model family is: one registered ModelFamily object that recognises the Hugging Face
models it can run, wraps them in its ReducibleModel, and owns everything else that differs between
families (token layout and default method, nominal tokens, FLOPs, the export graph, example inputs
for export and benchmarks, full-size random configs). Code outside a family's own module asks the
family or the wrapped model; it never compares family names."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models.encoder import Block, Reducer
from models.plan import NO_REDUCTION, LayerSpec, ReductionPlan
from models.reduction.flops import encoder_flops
from models.reduction.registry import get_method, methods_for
from models.token_map import TokenMap, token_maps
from models.trace import Trace


@dataclass
class ReducedOutput:
    """Outputs of a reduced forward. last_hidden_state has the reduced token count; `sizes` says how
    many input tokens each of its tokens stands for, `sources` which ones (when tracked).

    With track_source, patch_sources: for each layer (tokens entering it, then after the last, as
    the trace counts them), which input image patches each token covers, (B, N_layer, P), and
    patch_grid: the (rows, columns) of those P patches (models/token_map.py)."""

    last_hidden_state: torch.Tensor
    sizes: torch.Tensor
    trace: Trace
    pooler_output: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    sources: torch.Tensor | None = None
    text_valid: torch.Tensor | None = None
    patch_sources: tuple[torch.Tensor, ...] | None = None
    patch_grid: tuple[int, int] | None = None


@dataclass(frozen=True)
class RandomConfig:
    """A full-size architecture with random weights (`random:<name>`): speed, never accuracy."""

    architecture: str  # transformers class name
    config_class: str  # transformers config class name
    kwargs: Mapping[str, Any]


class ModelFamily(ABC):
    """One per family, registered once (models.families.registry)."""

    name: str
    layout: str  # the token layout its methods are registered for (models.reduction.registry)
    default_method: str
    architectures: tuple[str, ...]  # class names of the models it wraps
    # Architectures that are not transformers classes: name -> class, for the checkpoint loader.
    custom_architectures: Mapping[str, type] = {}
    random_configs: Mapping[str, RandomConfig] = {}
    # Module (under models/demo/) holding the recipe that trains this family's demo checkpoints.
    demo_recipe: str | None = None

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<model family {self.name}>"

    def recognises(self, model: nn.Module) -> bool:
        return type(model).__name__ in self.architectures

    @abstractmethod
    def wrap(self, model: nn.Module) -> ReducibleModel:
        """A ReducibleModel over `model`'s own modules (no weight is copied)."""

    @property
    def methods(self) -> tuple[str, ...]:
        return methods_for(self.layout)

    def export_text_lengths(self, model: ReducibleModel) -> list[int]:
        """Text lengths an exported graph is fixed at (one graph each); [0] when it takes no text."""
        return [0]

    def graph(self, model: ReducibleModel, plan: ReductionPlan) -> nn.Module:
        """An nn.Module whose forward(*inputs in model.input_names order) -> logits runs `plan`:
        what torch.onnx.export and torch.jit.trace capture."""
        return PlanGraph(model, plan).eval()

    def example_inputs(
        self,
        model: ReducibleModel,
        batch: int,
        text_length: int = 0,
        size: int | None = None,
        seed: int = 0,
        padded: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Random inputs of the right shapes and dtypes (export tracing, random-weight benchmarks).
        padded: some texts are shorter than text_length (the path an exporter must trace); False
        gives every row text_length real tokens (the length FLOPs are counted at)."""
        cfg = model.config
        size = size or cfg.image_size
        g = torch.Generator().manual_seed(seed)
        return {"pixel_values": torch.randn(batch, cfg.num_channels, size, size, generator=g)}


class PlanGraph(nn.Module):
    """logits = model(**inputs) under one fixed plan, inputs in model.input_names order."""

    def __init__(self, model: ReducibleModel, plan: ReductionPlan, **call_options):
        super().__init__()
        self.reducible = model
        self.hf_model = model.model  # registers the weights as this module's parameters
        self.plan = plan
        self.input_names = model.input_names
        self.call_options = call_options

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        named = dict(zip(self.input_names, inputs, strict=True))
        return self.reducible(**named, plan=self.plan, **self.call_options).logits


class ReducibleModel(ABC):
    """Wraps a loaded Hugging Face model (no copy of its weights) and runs it under a plan.

    takes_text: the forward takes input_ids and attention_mask besides pixel_values.
    head: what its logits are: "classifier" (one score per label) or "matching" (one image-text
    matching score per pair); None for a backbone without a head.
    """

    family: ModelFamily
    protected: int = 0
    takes_text: bool = False

    def __init__(self, model: nn.Module, blocks: list[Block]):
        self.model = model
        self.blocks = blocks
        self.costs = [block.cost for block in blocks]

    @property
    def kind(self) -> str:
        return type(self.model).__name__

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def config(self):
        return self.model.config

    @property
    def methods(self) -> tuple[str, ...]:
        return self.family.methods

    @property
    def default_method(self) -> str:
        return self.family.default_method

    @property
    def input_names(self) -> tuple[str, ...]:
        return ("input_ids", "attention_mask", "pixel_values") if self.takes_text else ("pixel_values",)

    @property
    def head(self) -> str | None:
        return None

    @property
    def max_text_tokens(self) -> int | None:
        return None

    @abstractmethod
    def nominal_tokens(self) -> tuple[int, int]:
        """(text, image) tokens of a typical input, used to turn FLOPs targets into plans."""

    def image_tokens_at(self, size: int) -> int:
        """Image tokens (protected ones included) of a size x size input."""
        cfg = self.config
        nominal = self.nominal_tokens()[1]
        return nominal - (cfg.image_size // cfg.patch_size) ** 2 + (size // cfg.patch_size) ** 2

    def schedule(self, plan: ReductionPlan, n_text: int, n_image: int) -> list[tuple[int, int]]:
        """(text, image) tokens entering each layer, then after the last, that `plan` promises."""
        counts = [(n_text, n_image)]
        method = None if plan.method == "none" else get_method(plan.method, self.family.layout)
        for i in range(self.num_layers):
            spec = plan.spec(i)
            if method is not None and not spec.is_identity:
                n_text, n_image = method.count(spec, n_text, n_image, self)
            counts.append((n_text, n_image))
        return counts

    def reducer(self, plan: ReductionPlan) -> Reducer:
        """The encoder loop's reducer for `plan`: the method's, skipped where it removes nothing."""
        if plan.method == "none":
            return _no_reduction
        method = get_method(plan.method, self.family.layout)

        def reduce(spec: LayerSpec, tokens, attn, plan: ReductionPlan):
            n_text, n_image = tokens.n_text, tokens.n_image
            if method.count(spec, n_text, n_image, self) == (n_text, n_image):
                return tokens
            return method.reduce(spec, tokens, attn, plan, self)

        return reduce

    def check_plan(self, plan: ReductionPlan) -> None:
        if plan.method != "none" and plan.method not in self.methods:
            raise ValueError(f"{plan.method!r} does not apply to {self.family}; use one of {self.methods}")
        if plan.grid:
            raise ValueError(f"{self.family} models have no compressed grid")
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

    def static_trace(self, plan: ReductionPlan, n_text: int = 0) -> Trace:
        """The trace of a forward at the nominal image size whose token counts the plan fixes."""
        return self.make_trace(plan, self.schedule(plan, n_text, self.nominal_tokens()[1]))

    def parameters_dtype(self) -> torch.dtype:
        return self.blocks[0].q.weight.dtype

    def token_maps(self, out: ReducedOutput, layer: int) -> list[TokenMap]:
        """One token map per row of a forward run with track_source=True, at `layer` (an index into
        the trace's per-layer counts: 0 .. num_layers)."""
        if out.patch_sources is None or out.patch_grid is None:
            raise ValueError("token maps need a forward with track_source=True")
        if not 0 <= layer < len(out.patch_sources):
            raise ValueError(f"token map layer must be in [0, {len(out.patch_sources) - 1}], got {layer}")
        return token_maps(out.patch_sources[layer].float().cpu().numpy(), out.patch_grid, layer)

    @abstractmethod
    def __call__(self, *args, plan: ReductionPlan = NO_REDUCTION, **kwargs) -> ReducedOutput: ...


def _no_reduction(spec, tokens, attn, plan):
    return tokens


def linears(module: nn.Module) -> tuple[nn.Linear, ...]:
    return tuple(m for m in module.modules() if isinstance(m, nn.Linear))
