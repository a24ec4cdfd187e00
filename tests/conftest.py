"""Tiny random models of every supported family, built in code (no downloads)."""

from __future__ import annotations

import io
import time

import pytest
import torch
from PIL import Image
from transformers import (
    BertConfig,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    ViltConfig,
    ViltForImageAndTextRetrieval,
    ViltForQuestionAnswering,
    ViltModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

IMAGE = 32
PATCH = 4  # 8 x 8 = 64 patches
SMALL = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128)


def _randomise_layerscale(model: torch.nn.Module) -> torch.nn.Module:
    """DINOv2 initialises LayerScale to a constant; random values prove it is applied."""
    for name, p in model.named_parameters():
        if "lambda1" in name:
            p.data.uniform_(0.2, 1.5)
    return model


def build_vision(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    vit = dict(SMALL, image_size=IMAGE, patch_size=PATCH, num_labels=5)
    builders = {
        "vit": lambda: ViTModel(ViTConfig(**vit)),
        "vit-cls": lambda: ViTForImageClassification(ViTConfig(**vit)),
        "deit-cls": lambda: DeiTForImageClassification(DeiTConfig(**vit)),
        "deit-teacher": lambda: DeiTForImageClassificationWithTeacher(DeiTConfig(**vit)),
        "dinov2": lambda: _randomise_layerscale(Dinov2Model(Dinov2Config(**vit))),
        "dinov2-cls": lambda: _randomise_layerscale(Dinov2ForImageClassification(Dinov2Config(**vit))),
        "clip-vision": lambda: CLIPVisionModel(CLIPVisionConfig(**SMALL, image_size=IMAGE, patch_size=PATCH)),
        "clip-vision-proj": lambda: CLIPVisionModelWithProjection(
            CLIPVisionConfig(**SMALL, image_size=IMAGE, patch_size=PATCH, projection_dim=16)
        ),
        "clip": lambda: CLIPModel(
            CLIPConfig(
                vision_config=dict(SMALL, image_size=IMAGE, patch_size=PATCH),
                text_config=dict(SMALL, vocab_size=100, max_position_embeddings=16),
                projection_dim=16,
            )
        ),
    }
    return builders[kind]().eval()


VISION_KINDS = [
    "vit",
    "vit-cls",
    "deit-cls",
    "deit-teacher",
    "dinov2",
    "dinov2-cls",
    "clip-vision",
    "clip-vision-proj",
    "clip",
]
VILT_KINDS = ["vilt", "vilt-vqa", "vilt-retrieval"]


def vilt_config(layers: int = 6) -> ViltConfig:
    return ViltConfig(
        **dict(SMALL, num_hidden_layers=layers),
        image_size=64,
        patch_size=8,  # 64 patches + image [CLS]
        max_position_embeddings=16,
        vocab_size=100,
        num_labels=7,
    )


def build_vilt(kind: str, layers: int = 6) -> torch.nn.Module:
    torch.manual_seed(0)
    cls = {
        "vilt": ViltModel,
        "vilt-vqa": ViltForQuestionAnswering,
        "vilt-retrieval": ViltForImageAndTextRetrieval,
    }
    return cls[kind](vilt_config(layers)).eval()


# "-text-query" / "-two-hop" / "-two-hop-placed": the VQA model whose heads read the image by the
# pooled text, once or twice, or twice knowing where the reads looked (image_pooling);
# "-counting": the last with a count path (answers "0" to "3" are its labels 0-3) and a read path
TWO_STREAM_KINDS = [
    "two-stream",
    "two-stream-vqa",
    "two-stream-vqa-text-query",
    "two-stream-vqa-two-hop",
    "two-stream-vqa-two-hop-placed",
    "two-stream-vqa-counting",
    "two-stream-retrieval",
]
POOLINGS = {
    "-text-query": "text_query",
    "-two-hop": "two_hop",
    "-two-hop-placed": "two_hop_placed",
    "-counting": "two_hop_placed",
}
TWO_STREAM_TOWERS = ["dinov2", "vit", "clip-vision"]


def two_stream_config(
    tower: str = "dinov2",
    fusion_layers: int = 2,
    text_query_layers=(1, 2, 3),
    image_pooling: str = "cls",
    counting: bool = False,
):
    """text_query_layers: tower layers with a question query (the `text-evit` method needs them).
    counting: with a count path over two attributes of 3 and 2 values, scoring labels 0-3, and a
    read path scoring the values' labels 4, 5, 6, 4 (two values, one answer) and none."""
    from models.two_stream import TwoStreamConfig

    vision = {
        "dinov2": lambda: Dinov2Config(**SMALL, image_size=64, patch_size=8),
        "vit": lambda: ViTConfig(**SMALL, image_size=64, patch_size=8),
        "clip-vision": lambda: CLIPVisionConfig(**SMALL, image_size=64, patch_size=8),
    }[tower]()
    text = BertConfig(
        vocab_size=100, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96
    )
    return TwoStreamConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        num_fusion_layers=fusion_layers,
        image_size=64,  # 64 patches + [CLS], the ViLT inputs' size
        max_text_tokens=16,
        num_labels=7,
        text_query_layers=list(text_query_layers),
        image_pooling=image_pooling,
        count_attributes=[3, 2] if counting else [],
        count_labels=[0, 1, 2, 3] if counting else [],
        read_labels=[4, 5, 6, 4, -1] if counting else [],
    )


def build_two_stream(
    kind: str = "two-stream-vqa", tower: str = "dinov2", fusion_layers: int = 2, text_query_layers=(1, 2, 3)
):
    from models.two_stream import TwoStreamForImageTextMatching, TwoStreamForQuestionAnswering, TwoStreamModel

    torch.manual_seed(0)
    cls = {
        "two-stream": TwoStreamModel,
        "two-stream-vqa": TwoStreamForQuestionAnswering,
        "two-stream-vqa-text-query": TwoStreamForQuestionAnswering,
        "two-stream-vqa-two-hop": TwoStreamForQuestionAnswering,
        "two-stream-vqa-two-hop-placed": TwoStreamForQuestionAnswering,
        "two-stream-vqa-counting": TwoStreamForQuestionAnswering,
        "two-stream-retrieval": TwoStreamForImageTextMatching,
    }[kind]
    pooling = next((p for suffix, p in POOLINGS.items() if kind.endswith(suffix)), "cls")
    config = two_stream_config(tower, fusion_layers, text_query_layers, pooling, kind.endswith("-counting"))
    return _randomise_layerscale(cls(config)).eval()


def vilt_inputs(batch: int = 3, text_len: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    """Questions of different lengths, right-padded like a tokenizer does."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 100, (batch, text_len), generator=g)
    attention_mask = torch.ones(batch, text_len, dtype=torch.long)
    for i in range(1, batch):
        real = max(3, text_len - 3 * i)
        attention_mask[i, real:] = 0
        input_ids[i, real:] = 0
    pixel_values = torch.randn(batch, 3, 64, 64, generator=g)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def pixels(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def png_bytes(color=(255, 0, 0), size=(64, 64)) -> bytes:
    """A light background with one coloured square, like an easy-VQA image."""
    image = Image.new("RGB", size, (240, 240, 240))
    image.paste(Image.new("RGB", (24, 24), color), (20, 20))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def loaded_status(client, polls: int = 1200) -> str:
    """Poll /readyz while the models load; the final status ("ready" or "failed")."""
    for _ in range(polls):
        status = client.get("/readyz").json()["status"]
        if status != "loading":
            return status
        time.sleep(0.05)
    raise AssertionError("the service was still loading")


def wait_ready(client) -> None:
    status = loaded_status(client)
    assert status == "ready", f"service did not become ready: {status}"


@pytest.fixture(scope="session", autouse=True)
def _admission_limits_lifted():
    """Every service a test starts (in process or as a subprocess) admits whatever it is sent.

    The default limits refuse requests while the event loop runs 30 ms late, which a busy CI
    machine reaches while a model loads; tests of answers would then see 503s. Admission is
    tested where it is the subject, with limits those tests set themselves.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOKENLEAN_BATCHING__MAX_EVENT_LOOP_LAG_MS", "600000")
        mp.setenv("TOKENLEAN_BATCHING__MAX_QUEUE_WAIT_MS", "600000")
        yield


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.inference_mode():
        yield
