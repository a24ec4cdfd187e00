"""Load a supported model: a Hugging Face hub id or local folder, or a named full-size config with
random weights (for speed measurements where no checkpoint can be downloaded)."""

from __future__ import annotations

import transformers
from torch import nn

from models import lookupvit, reducible
from models.families import ReducibleModel

VIT_SMALL = dict(
    hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, num_labels=1000
)

# Full-size architectures with random weights: the shapes that decide speed, not accuracy.
RANDOM_CONFIGS = {
    "random:vilt-b32": (
        "ViltForQuestionAnswering",
        transformers.ViltConfig,
        dict(image_size=384, patch_size=32, max_position_embeddings=40, num_labels=3129),
    ),
    "random:vit-s16": (
        "ViTForImageClassification",
        transformers.ViTConfig,
        VIT_SMALL,
    ),
    "random:vit-b16": ("ViTForImageClassification", transformers.ViTConfig, dict(num_labels=1000)),
    "random:deit-s16": (
        "DeiTForImageClassificationWithTeacher",
        transformers.DeiTConfig,
        VIT_SMALL,
    ),
}


def load_model(name_or_path: str, seed: int = 0) -> nn.Module:
    """Weights load from safetensors only: a pickled checkpoint is refused, never unpickled."""
    if name_or_path in RANDOM_CONFIGS:
        import torch

        cls_name, config_cls, kwargs = RANDOM_CONFIGS[name_or_path]
        torch.manual_seed(seed)
        return getattr(transformers, cls_name)(config_cls(**kwargs)).eval()
    # models.lookupvit registered its config with AutoConfig when imported (above).
    config = transformers.AutoConfig.from_pretrained(name_or_path)
    architectures = config.architectures or []
    cls = None
    if architectures:
        cls = getattr(transformers, architectures[0], None) or lookupvit.ARCHITECTURES.get(architectures[0])
    if cls is None:
        raise ValueError(f"{name_or_path}: config names no supported architecture ({architectures})")
    return cls.from_pretrained(name_or_path, use_safetensors=True).eval()


def load_reducible(name_or_path: str) -> ReducibleModel:
    return reducible(load_model(name_or_path))
