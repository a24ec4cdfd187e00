"""The two-stream family exports like the others: one graph per plan, ONNX Runtime and TorchScript
equal to the eager reduced model (padded and unpadded batches), on a tiny random model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import build_two_stream

from exporters.export import export_task
from exporters.runtime import GraphSet
from models import named_plan
from models.bundle import load_bundle

CHECKPOINTS = Path(__file__).resolve().parents[2] / "models" / "checkpoints"
QUESTIONS = ["what shape is this?", "is there a blue triangle in the image or not?", "what color?"]


@pytest.fixture(
    scope="module",
    params=[
        "two-stream-vqa",
        "two-stream-vqa-text-query",
        "two-stream-vqa-two-hop",
        "two-stream-vqa-two-hop-placed",
        "two-stream-vqa-counting",
    ],
)
def checkpoint(tmp_path_factory, request) -> Path:
    """A tiny two-stream VQA model (heads reading the image's [CLS], or the image read by the
    pooled text, once, or twice knowing where the reads looked, and those with a count path) with
    the ViLT demo's small
    word-piece tokenizer (its ids fit the tiny text tower's vocabulary)."""
    folder = tmp_path_factory.mktemp("two-stream")
    build_two_stream(request.param, "dinov2").save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(CHECKPOINTS / "vqa" / name, folder / name)
    return folder


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_two_stream_graphs_equal_the_eager_reduced_model(checkpoint, tmp_path, fmt):
    with torch.inference_mode(False):
        export_task("vqa", checkpoint, tmp_path, fmt, levels=("none", "high"), lengths=[16], progress=False)
    graphs = GraphSet(tmp_path, fmt)
    bundle = load_bundle(checkpoint)
    assert bundle.tokenizer.vocab_size <= bundle.model.base.config.text_config.vocab_size
    for level in ("none", "high"):
        plan = named_plan(bundle.model, level)
        for batch in (1, 3):
            pixels = torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
            texts = QUESTIONS[:batch]
            eager = bundle.forward(pixels, texts, plan, 16).logits
            enc = bundle.encode_texts(texts, 16)
            exported = graphs.run(level, 16, enc["input_ids"], enc["attention_mask"], pixels)
            assert (exported - eager).abs().max().item() <= 1e-4, (fmt, level, batch)
    entries = {g.level: g for g in graphs.manifest.graphs}
    assert entries["high"].flops < entries["none"].flops
