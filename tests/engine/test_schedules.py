"""Each method at each named level removes exactly the tokens its plan promises."""

from __future__ import annotations

import pytest
import torch
from conftest import build_vilt, build_vision, pixels, vilt_inputs
from transformers import ViltConfig, ViltForQuestionAnswering, ViTConfig, ViTForImageClassification

from models import LayerSpec, ReductionPlan, named_plan, reducible
from models.reduction.schedule import scaled_layers

LEVELS = ("low", "medium", "high")


@pytest.mark.parametrize("kind", ["vit-cls", "deit-teacher", "dinov2", "clip"])
@pytest.mark.parametrize("level", LEVELS)
def test_vision_levels_follow_their_schedule(kind, level):
    model = build_vision(kind)
    rm = reducible(model)
    px = pixels(batch=2)
    full = rm(px)
    for method in rm.methods:
        plan = named_plan(rm, level, method)
        out = rm(px, plan=plan, track_source=True)
        promised = [i for _, i in rm.schedule(plan, 0, out.trace.tokens[0])]
        assert list(out.trace.tokens) == promised
        assert out.trace.tokens[-1] < out.trace.tokens[0]
        assert out.last_hidden_state.shape[1] == promised[-1]
        for key in ("logits", "pooler_output"):
            if getattr(full, key) is not None:
                assert getattr(out, key).shape == getattr(full, key).shape
        assert out.trace.flops == rm.flops(plan)
        assert 0 < out.trace.flops < out.trace.full_flops


@pytest.mark.parametrize("method", ["pumer", "tome", "prune"])
@pytest.mark.parametrize("level", LEVELS)
def test_vilt_levels_follow_their_schedule(method, level):
    rm = reducible(build_vilt("vilt-vqa"))
    inputs = vilt_inputs(batch=3, text_len=12)
    plan = named_plan(rm, level, method)
    out = rm(**inputs, plan=plan)
    promised = rm.schedule(plan, 12, 65)
    assert list(zip(out.trace.text_tokens, out.trace.image_tokens, strict=True)) == promised
    assert out.logits.shape == (3, 7)
    assert out.text_valid is None or out.text_valid.shape == (3, promised[-1][0])
    assert out.trace.tokens[-1] < out.trace.tokens[0]


def test_tome_r13_on_vit_s_leaves_41_tokens():
    """The ToMe paper: r = 13 on a 197-token, 12-layer ViT-S leaves 41 tokens; our `high`."""
    cfg = ViTConfig(
        hidden_size=48,
        num_hidden_layers=12,
        num_attention_heads=3,
        intermediate_size=96,
        image_size=224,
        patch_size=16,
    )
    rm = reducible(ViTForImageClassification(cfg).eval())
    plan = named_plan(rm, "high", "tome")
    assert {s.r for s in plan.layers} == {13}
    out = rm(torch.randn(1, 3, 224, 224), plan=plan)
    assert out.trace.tokens == tuple(197 - 13 * i for i in range(13))
    assert out.trace.tokens[-1] == 41


def test_pumer_medium_on_12_layer_vilt_by_hand():
    """Layers 2, 5, 8 with k=0.1, r=0.3, t=0.2 on 40 text + 145 image tokens, worked out by hand:
    layer 2: image 144 candidates -> prune 14, merge 43: 145 -> 88; text 39 -> merge 8: 40 -> 32
    layer 5: image 87 -> prune 9, merge 26: 88 -> 53;  text 31 -> merge 6: 32 -> 26
    layer 8: image 52 -> prune 5, merge 16: 53 -> 32;  text 25 -> merge 5: 26 -> 21"""
    cfg = ViltConfig(
        hidden_size=48,
        num_hidden_layers=12,
        num_attention_heads=3,
        intermediate_size=96,
        max_position_embeddings=40,
        num_labels=3,
        vocab_size=50,
    )
    rm = reducible(ViltForQuestionAnswering(cfg).eval())
    plan = named_plan(rm, "medium", "pumer")
    assert [i for i, s in enumerate(plan.layers) if not s.is_identity] == [2, 5, 8]
    ids = torch.randint(1, 50, (2, 40))
    out = rm(ids, torch.randn(2, 3, 384, 384), plan=plan)
    text = (40, 40, 40, 32, 32, 32, 26, 26, 26, 21, 21, 21, 21)
    image = (145, 145, 145, 88, 88, 88, 53, 53, 53, 32, 32, 32, 32)
    assert out.trace.text_tokens == text
    assert out.trace.image_tokens == image


def test_pumer_layers_scale_with_depth():
    assert scaled_layers((2, 5, 8), 12) == (2, 5, 8)
    assert scaled_layers((2, 5, 8), 6) == (1, 3, 4)
    assert scaled_layers((2, 5, 8), 4) == (1, 2, 3)


def test_plan_layer_count_must_match_model():
    rm = reducible(build_vision("vit-cls"))
    with pytest.raises(ValueError, match="layers"):
        rm(pixels(1), plan=ReductionPlan("tome", (LayerSpec(r=2),) * 3))
    with pytest.raises(ValueError, match="does not apply"):
        rm(pixels(1), plan=ReductionPlan("pumer", (LayerSpec(prune=0.1),) * 4))
