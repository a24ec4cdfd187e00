"""The two-stream (METER-layout) vision-language model. Importing this package registers it with
transformers' Auto classes, so `AutoConfig.from_pretrained` reads its checkpoints (no remote code)."""

from transformers import AutoConfig, AutoModel

from models.two_stream.configuration import TwoStreamConfig
from models.two_stream.modeling import (
    FusionAttention,
    FusionLayer,
    TwoStreamForImageTextMatching,
    TwoStreamForQuestionAnswering,
    TwoStreamModel,
    TwoStreamOutput,
    padding_bias,
)

AutoConfig.register(TwoStreamConfig.model_type, TwoStreamConfig, exist_ok=True)
AutoModel.register(TwoStreamConfig, TwoStreamModel, exist_ok=True)

# Architecture names (config.json "architectures") -> classes, for loaders that look them up.
ARCHITECTURES = {
    cls.__name__: cls
    for cls in (TwoStreamModel, TwoStreamForQuestionAnswering, TwoStreamForImageTextMatching)
}

__all__ = [
    "ARCHITECTURES",
    "FusionAttention",
    "FusionLayer",
    "TwoStreamConfig",
    "TwoStreamForImageTextMatching",
    "TwoStreamForQuestionAnswering",
    "TwoStreamModel",
    "TwoStreamOutput",
    "padding_bias",
]
