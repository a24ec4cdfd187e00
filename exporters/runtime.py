"""Run exported graphs: ONNX Runtime (CUDA when available, else CPU) or libtorch (TorchScript).

A GraphSet holds one loaded graph per (level, text length) of an export folder, after checking
the manifest's hashes.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from exporters.manifest import Manifest, ManifestError, load_manifest

BACKENDS = ("torchscript", "onnx")


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
    from exporters.manifest import weights_sha256
    from models import named_plan

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
