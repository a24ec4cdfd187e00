"""The model-family registry: every family registers its one ModelFamily object here, and the
rest of the code finds the family of a model (or of a checkpoint's architecture) through it."""

from __future__ import annotations

from torch import nn

from models.families.base import ModelFamily, RandomConfig, ReducibleModel

_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    if family.name in _FAMILIES:
        raise ValueError(f"model family {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    return family


def families() -> tuple[ModelFamily, ...]:
    import models.families.builtin  # noqa: F401 - registers the built-in families

    return tuple(_FAMILIES.values())


def family_of(model: nn.Module) -> ModelFamily:
    for family in families():
        if family.recognises(model):
            return family
    supported = sorted(a for f in families() for a in f.architectures)
    raise TypeError(f"{type(model).__name__} is not supported; supported: {supported}")


def reducible(model: nn.Module) -> ReducibleModel:
    """Wrap a loaded Hugging Face model so it runs under a ReductionPlan (weights are shared)."""
    return family_of(model).wrap(model)


def custom_architecture(name: str) -> type | None:
    """A model class that is not in transformers (e.g. LookupViT), by its config.json name."""
    for family in families():
        if name in family.custom_architectures:
            return family.custom_architectures[name]
    return None


def random_config(name: str) -> RandomConfig | None:
    """`random:<name>` full-size configs, declared by their families."""
    for family in families():
        if name in family.random_configs:
            return family.random_configs[name]
    return None


def random_config_names() -> tuple[str, ...]:
    return tuple(f"random:{n}" for f in families() for n in f.random_configs)
