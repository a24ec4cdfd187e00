"""Load a supported model: a Hugging Face hub id or local folder, or a named full-size config with
random weights (`random:<name>`, declared by the families; for speed measurements where no
checkpoint can be downloaded)."""

from __future__ import annotations

import transformers
from torch import nn

from models.families.base import ReducibleModel
from models.families.registry import (
    custom_architecture,
    families,
    random_config,
    random_config_names,
    reducible,
)

RANDOM = "random:"


def load_model(name_or_path: str, seed: int = 0) -> nn.Module:
    """Weights load from safetensors only: a pickled checkpoint is refused, never unpickled."""
    name_or_path = str(name_or_path)
    if name_or_path.startswith(RANDOM):
        import torch

        spec = random_config(name_or_path.removeprefix(RANDOM))
        if spec is None:
            raise ValueError(f"unknown {name_or_path!r}; expected one of {random_config_names()}")
        torch.manual_seed(seed)
        config = getattr(transformers, spec.config_class)(**spec.kwargs)
        return getattr(transformers, spec.architecture)(config).eval()
    families()  # families with architectures of their own register their configs with AutoConfig
    config = transformers.AutoConfig.from_pretrained(name_or_path)
    architectures = config.architectures or []
    cls = None
    if architectures:
        cls = getattr(transformers, architectures[0], None) or custom_architecture(architectures[0])
    if cls is None:
        raise ValueError(f"{name_or_path}: config names no supported architecture ({architectures})")
    return cls.from_pretrained(name_or_path, use_safetensors=True).eval()


def load_reducible(name_or_path: str, seed: int = 0) -> ReducibleModel:
    return reducible(load_model(name_or_path, seed))
