"""LookupViT: a trained compressed-token architecture whose compression (the compressed grid) is
chosen per call. Importing this package registers it with transformers' Auto classes, so
`AutoConfig` / `AutoModelForImageClassification.from_pretrained` load its checkpoints (no remote
code)."""

from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from models.lookupvit.configuration import LookupViTConfig
from models.lookupvit.modeling import (
    LookupViTClassifierOutput,
    LookupViTForImageClassification,
    LookupViTModel,
    LookupViTModelOutput,
    LookupViTPreTrainedModel,
    block_flops,
    resize_matrix,
)

AutoConfig.register(LookupViTConfig.model_type, LookupViTConfig, exist_ok=True)
AutoModel.register(LookupViTConfig, LookupViTModel, exist_ok=True)
AutoModelForImageClassification.register(LookupViTConfig, LookupViTForImageClassification, exist_ok=True)

# Architecture names (config.json "architectures") -> classes, for loaders that look them up.
ARCHITECTURES = {cls.__name__: cls for cls in (LookupViTModel, LookupViTForImageClassification)}

__all__ = [
    "ARCHITECTURES",
    "LookupViTClassifierOutput",
    "LookupViTConfig",
    "LookupViTForImageClassification",
    "LookupViTModel",
    "LookupViTModelOutput",
    "LookupViTPreTrainedModel",
    "block_flops",
    "resize_matrix",
]
