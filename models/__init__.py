"""tokenlean's ML core: token reduction for Hugging Face vision and vision-language transformers."""

from torch import nn

from models.families import LookupViT, ReducedOutput, ReducibleModel, ViltTransformer, VisionTransformer
from models.families import lookupvit as _lookupvit
from models.families import vilt as _vilt
from models.families import vision as _vision
from models.levels import named_plan, plan_for_target, resolve
from models.plan import NO_REDUCTION, LayerSpec, ReductionPlan
from models.trace import Trace


def reducible(model: nn.Module) -> ReducibleModel:
    """Wrap a loaded Hugging Face model so it runs under a ReductionPlan (weights are shared)."""
    name = type(model).__name__
    if name in _vilt.SUPPORTED:
        return ViltTransformer(model)
    if name in _vision.SUPPORTED:
        return VisionTransformer(model)
    if name in _lookupvit.SUPPORTED:
        return LookupViT(model)
    supported = sorted((*_vilt.SUPPORTED, *_vision.SUPPORTED, *_lookupvit.SUPPORTED))
    raise TypeError(f"{name} is not supported; supported: {supported}")


__all__ = [
    "NO_REDUCTION",
    "LayerSpec",
    "ReducedOutput",
    "ReducibleModel",
    "ReductionPlan",
    "Trace",
    "named_plan",
    "plan_for_target",
    "reducible",
    "resolve",
]
