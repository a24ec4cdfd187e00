"""Run exported graphs: ONNX Runtime (CUDA when available, else CPU) or libtorch (TorchScript).

A GraphSet holds one loaded graph per (level, text length) of an export folder, after checking
the manifest's hashes.
"""

from __future__ import annotations

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
        self.session = ort.InferenceSession(str(path), providers=self.providers)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        arrays = (np.ascontiguousarray(t.detach().cpu().numpy()) for t in inputs)
        feed = dict(zip(self.input_names, arrays, strict=True))
        return torch.from_numpy(self.session.run(None, feed)[0])


class TorchScriptGraph:
    def __init__(self, path: Path, device: str):
        self.device = torch.device(device)
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
        self.backend = backend
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
