"""Load a supported model: a Hugging Face hub id or local folder, or a named full-size config with
random weights (`random:<name>`, declared by the families; for speed measurements where no
checkpoint can be downloaded). A checkpoint whose config names `tokenlean_weight_sources` gets
those submodules' weights from their tower sources (models/towers.py)."""

from __future__ import annotations

import re

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
from models.towers import load_weight_sources, sourced_prefixes, weight_sources

__all__ = ["RANDOM", "load_model", "load_reducible", "sourced_prefixes"]

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
    sources = weight_sources(config)
    if not sources:
        return cls.from_pretrained(name_or_path, use_safetensors=True).eval()
    model = _from_pretrained_without(cls, name_or_path, sources)
    return load_weight_sources(model, sources).eval()


def _from_pretrained_without(cls: type, name_or_path: str, prefixes) -> nn.Module:
    """`cls.from_pretrained` with no "newly initialized" warning for the weights under `prefixes`
    (they are loaded from their sources next); any other missing weight is still reported.
    transformers reads the patterns to ignore from the class while building the model, so a
    subclass carries them for this call and the model gets its own class back afterwards."""
    patterns = {rf"^{re.escape(p)}\." for p in prefixes}
    ignore = set(cls._keys_to_ignore_on_load_missing or ()) | patterns
    quiet = type(
        cls.__name__, (cls,), {"_keys_to_ignore_on_load_missing": ignore, "__module__": cls.__module__}
    )
    quiet.__qualname__ = cls.__qualname__
    model = quiet.from_pretrained(name_or_path, use_safetensors=True)
    model.__class__ = cls
    model._keys_to_ignore_on_load_missing = set(model._keys_to_ignore_on_load_missing) - patterns
    return model


def load_reducible(name_or_path: str, seed: int = 0) -> ReducibleModel:
    return reducible(load_model(name_or_path, seed))
