"""The graph backends: exported graphs run by ONNX Runtime (CUDA when available, else CPU) or by
libtorch (TorchScript).

A GraphSet holds one loaded graph per (level, text length) of an export folder, after checking
the manifest's hashes. The eager model still provides plans, labels and token accounting.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from exporters.manifest import Manifest, ManifestError, load_manifest, weights_sha256
from models.backends.base import Backend, BatchOutput, register_backend
from models.levels import named_plan
from models.plan import LEVELS, NO_REDUCTION, ReductionPlan


def onnx_providers(device: str, available: list[str]) -> list[str]:
    """CUDA first when the service runs on a GPU and this onnxruntime build has it; CPU always."""
    if device.startswith("cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxGraph:
    def __init__(self, path: Path, device: str):
        import onnxruntime as ort

        self.providers = onnx_providers(device, ort.get_available_providers())
        options = ort.SessionOptions()
        # As many threads as torch uses, and no spin-waiting between calls: spinning threads
        # would take the cores from the event loop, image decoding and any eager model.
        options.intra_op_num_threads = torch.get_num_threads()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=self.providers)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        arrays = (np.ascontiguousarray(t.detach().cpu().numpy()) for t in inputs)
        feed = dict(zip(self.input_names, arrays, strict=True))
        return torch.from_numpy(self.session.run(None, feed)[0])


class TorchScriptGraph:
    def __init__(self, path: Path, device: str):
        self.device = torch.device(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated, still served
            self.module = torch.jit.load(str(path), map_location=self.device).eval()

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.module(*(t.to(self.device) for t in inputs))


RUNNERS = {"onnx": OnnxGraph, "torchscript": TorchScriptGraph}
BACKENDS = tuple(RUNNERS)


class GraphSet:
    """Every graph of one export folder, loaded for `backend` on `device`."""

    def __init__(self, folder: str | Path, backend: str, device: str = "cpu"):
        if backend not in RUNNERS:
            raise ValueError(f"unknown graph backend {backend!r}; expected one of {BACKENDS}")
        self.folder = Path(folder)
        self.manifest: Manifest = load_manifest(self.folder)
        if self.manifest.format != backend:
            raise ManifestError(
                f"{self.folder} holds {self.manifest.format} graphs, but the backend is {backend}"
            )
        self.graphs = {
            (g.level, g.text_length): RUNNERS[backend](self.folder / g.file, device)
            for g in self.manifest.graphs
        }

    def levels(self) -> list[str]:
        return self.manifest.levels()

    def text_length_for(self, needed: int) -> int:
        """The shortest exported question length that holds `needed` tokens (else the longest)."""
        lengths = [n for n in self.manifest.text_lengths() if n >= needed]
        return min(lengths) if lengths else max(self.manifest.text_lengths())

    def run(self, level: str, text_length: int, *inputs: torch.Tensor) -> torch.Tensor:
        graph = self.graphs.get((level, text_length))
        if graph is None:
            raise ManifestError(f"{self.folder}: no graph for level {level!r} at text length {text_length}")
        return graph(*inputs)


def check_compatible(manifest: Manifest, task: str, model) -> None:
    """Refuse graphs that were exported for another task, from other weights, or with level
    definitions that no longer match this version's plans."""
    if manifest.task != task:
        raise ManifestError(f"the export folder holds {manifest.task} graphs, not {task}")
    if manifest.weights_sha256 != weights_sha256(model.model):
        raise ManifestError(
            f"the graphs were exported from other weights ({manifest.model}) than the checkpoint "
            "being served; export again from this checkpoint"
        )
    for g in manifest.graphs:
        if named_plan(model, g.level, manifest.method).to_dict() != g.plan:
            raise ManifestError(f"level {g.level!r} of {manifest.method} is defined differently now")


class GraphBackend(Backend):
    """Runs the exported level graphs of one export folder. A named level must have been exported;
    a numeric target runs at the exported level whose FLOPs saving is closest."""

    def __init__(self, bundle, task: str, export_dir: str | None = None):
        super().__init__(bundle, task, export_dir)
        if not export_dir:
            raise ValueError(f"backend {self.name} needs an export folder for {task} (`tokenlean export`)")
        self.graphs = GraphSet(export_dir, self.name, str(bundle.device))
        check_compatible(self.graphs.manifest, task, bundle.model)

    @property
    def method(self) -> str:
        return self.graphs.manifest.method

    def levels(self) -> tuple[str, ...]:
        return tuple(self.graphs.levels())

    def runnable(self, plan: ReductionPlan) -> ReductionPlan:
        model, exported = self.bundle.model, self.levels()
        if plan.method not in ("none", self.method):
            raise ValueError(f"the {self.name} graphs were exported with {self.method} only")
        if plan.level in LEVELS:
            if plan.level not in exported:
                raise ValueError(
                    f"level {plan.level!r} was not exported; exported levels: {', '.join(exported)}"
                )
            return plan
        full = model.flops(NO_REDUCTION)
        saved = 1 - model.flops(plan) / full
        candidates = [named_plan(model, level, self.method) for level in exported]
        return min(candidates, key=lambda p: abs(1 - model.flops(p) / full - saved))

    def text_length(self, texts: list[str]) -> int:
        return self.graphs.text_length_for(self.bundle.padded_length(texts))

    def run(self, plan, pixels: np.ndarray, texts, text_length: int) -> BatchOutput:
        inputs = self.bundle.inputs(torch.from_numpy(pixels), texts, text_length or None)
        n_text = text_length if self.bundle.model.takes_text else 0
        logits = self.graphs.run(plan.level, n_text, *inputs.values())
        return BatchOutput(logits.float().cpu().numpy(), self.bundle.model.static_trace(plan, n_text))


@register_backend
class OnnxBackend(GraphBackend):
    name = "onnx"


@register_backend
class TorchScriptBackend(GraphBackend):
    name = "torchscript"
