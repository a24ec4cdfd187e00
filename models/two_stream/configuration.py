"""Two-stream (METER-layout) configuration: plain data, saved as config.json with the checkpoint."""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

IMAGE_POOLING = ("cls", "text_query", "two_hop", "two_hop_placed")
# image summaries the heads get, per pooling ("two_hop_placed": two reads and their offset)
IMAGE_READS = {"cls": 1, "text_query": 1, "two_hop": 2, "two_hop_placed": 3}


class TwoStreamConfig(PretrainedConfig):
    """A vision tower (any ViT-like Hugging Face config: DINOv2, ViT, DeiT, CLIP vision), a text
    tower (any BERT-like encoder config) and `num_fusion_layers` co-attention fusion layers of
    `hidden_size` width, as in METER (Dou et al., CVPR 2022).

    image_size: the input size the model runs at, which may differ from the vision tower's own
    `image_size` (DINOv2's position grid is for 518 px; its embeddings interpolate to the input).
    max_text_tokens: the longest text the service passes (padding included).
    tokenlean_weight_sources: {submodule prefix: tower source} for towers whose weights come from an
    installed package rather than this checkpoint (models/towers.py); None when it holds them all.
    text_query_layers: vision tower layers (0-based) that get a query projected from the text
    tower's pooled output, which text-informed pruning in the tower scores image tokens by; empty:
    the model has no such projections (and no `text-evit` method).
    image_pooling: what the heads read of the image stream: "cls", its [CLS] token (METER's
    pooler), or "text_query", the image tokens read by attention with the pooled text as the query
    (on multi-object scenes the fusion layers with a [CLS] pooler do not learn to answer about the
    object a question names: docs/demo-models.md), or "two_hop", two such reads for questions about
    two objects: the first by the phrase the question names first, the second by the other phrase
    and what the first read (modeling.TwoHopPool), or "two_hop_placed", the same two reads told
    where they looked (modeling.PlacedTwoHopPool).
    count_attributes: how many values each attribute of an object takes (e.g. colours, shapes, sizes)
    for the count path (modeling.ObjectCount), which detects objects among the vision tower's
    tokens and classifies each by these attributes; empty: the model has no count path.
    count_labels: the label ids of the answers 0, 1, 2, ... in order, which the count path scores.
    read_labels: with a count path, the label id of each attribute value (count_attributes' values
    in order, -1 for a value that is no answer), which the read path (modeling.ObjectRead) scores:
    "what color is the star?" and "what shape is the object nearest to the red circle?" answered
    from the count path's detections; empty: no read path.
    """

    model_type = "tokenlean-two-stream"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="dinov2"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert"),
    }

    vision_config: PretrainedConfig | dict | None = None
    text_config: PretrainedConfig | dict | None = None
    hidden_size: int = 384
    num_fusion_layers: int = 2
    num_attention_heads: int = 6
    intermediate_size: int = 1536
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    image_size: int = 224
    max_text_tokens: int = 32
    tokenlean_weight_sources: dict | None = None
    text_query_layers: list[int] | tuple[int, ...] = ()
    image_pooling: str = "cls"
    count_attributes: list[int] | tuple[int, ...] = ()
    count_labels: list[int] | tuple[int, ...] = ()
    read_labels: list[int] | tuple[int, ...] = ()

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.image_pooling not in IMAGE_POOLING:
            raise ValueError(f"image_pooling {self.image_pooling!r} is not one of {IMAGE_POOLING}")
        if bool(self.count_attributes) != bool(self.count_labels):
            raise ValueError("count_attributes and count_labels go together (a count path needs both)")
        if any(n < 1 for n in self.count_attributes):
            raise ValueError(f"count_attributes {self.count_attributes} must be positive value counts")
        if self.read_labels and len(self.read_labels) != sum(self.count_attributes):
            raise ValueError(
                f"read_labels has {len(self.read_labels)} entries; the count path's attributes take "
                f"{sum(self.count_attributes)} values (a read path needs a count path)"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of the patch size {self.patch_size}"
            )

    @property
    def image_reads(self) -> int:
        return IMAGE_READS[self.image_pooling]

    @property
    def places_reads(self) -> bool:
        """Whether the pooling decodes image token positions (trained on the patch centres)."""
        return self.image_pooling == "two_hop_placed"

    @property
    def counts_objects(self) -> bool:
        """Whether the model has a count path (modeling.ObjectCount)."""
        return bool(self.count_labels)

    @property
    def reads_objects(self) -> bool:
        """Whether the model has a read path (modeling.ObjectRead) beside its count path."""
        return bool(self.read_labels)

    @property
    def patch_size(self) -> int:
        return int(self.vision_config.patch_size)

    @property
    def num_channels(self) -> int:
        return int(getattr(self.vision_config, "num_channels", 3))
