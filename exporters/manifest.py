"""manifest.json of an export folder: what each graph is, what it expects, and its sha256.

Loading verifies every hash before a graph is used, so a tampered, truncated or missing file is
refused with an error that names it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from pydantic import BaseModel, Field

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class ManifestError(ValueError):
    """An export folder that cannot be trusted or used."""


class TensorSpec(BaseModel):
    name: str
    dtype: str
    shape: list[int | str] = Field(description="'batch' marks the dynamic axis")


class GraphEntry(BaseModel):
    level: str
    text_length: int = Field(0, description="ViLT: the fixed question length in tokens; 0 otherwise")
    file: str
    sha256: str
    plan: dict
    flops: int
    full_flops: int
    flops_saved: float
    tokens_per_layer: list[int]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class Preprocessing(BaseModel):
    image_size: int
    mean: list[float]
    std: list[float]
    resample: str = "bilinear"
    tokenizer: str | None = Field(None, description="tokenizer folder or hub id the graphs expect")
    text_padding: str | None = None


class Manifest(BaseModel):
    format_version: int = FORMAT_VERSION
    task: str
    model: str
    architecture: str
    family: str
    method: str
    weights_sha256: str = Field(description="fingerprint of the weights the graphs were traced from")
    format: str
    opset: int | None = None
    torch_version: str
    labels: list[str]
    preprocessing: Preprocessing
    graphs: list[GraphEntry]

    def levels(self) -> list[str]:
        return list(dict.fromkeys(g.level for g in self.graphs))

    def text_lengths(self) -> list[int]:
        return sorted({g.text_length for g in self.graphs})

    def write(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST
        path.write_text(json.dumps(self.model_dump(), indent=2) + "\n")
        return path


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def weights_sha256(module: torch.nn.Module) -> str:
    """Hash of every parameter and buffer (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def load_manifest(folder: str | Path, verify: bool = True) -> Manifest:
    """Read and validate manifest.json; with verify, check that every graph file's hash matches."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{folder}: no {MANIFEST}; create the folder with `tokenlean export`")
    try:
        manifest = Manifest.model_validate_json(path.read_text())
    except ValueError as exc:
        raise ManifestError(f"{path}: not a valid tokenlean manifest: {exc}") from exc
    if manifest.format_version != FORMAT_VERSION:
        raise ManifestError(f"{path}: format_version {manifest.format_version}, expected {FORMAT_VERSION}")
    if verify:
        for g in manifest.graphs:
            file = folder / g.file
            if Path(g.file).is_absolute() or ".." in Path(g.file).parts:
                raise ManifestError(f"{path}: graph path {g.file!r} must stay inside the folder")
            if not file.is_file():
                raise ManifestError(f"{file}: listed in the manifest but missing")
            actual = file_sha256(file)
            if actual != g.sha256:
                raise ManifestError(
                    f"{file}: sha256 {actual} does not match the manifest ({g.sha256}); "
                    "the file was modified or truncated, re-export it"
                )
    return manifest
