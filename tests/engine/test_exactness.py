"""A plan that removes nothing must reproduce the unmodified Hugging Face model."""

from __future__ import annotations

import pytest
import torch
from conftest import VILT_KINDS, VISION_KINDS, build_vilt, build_vision, pixels, vilt_inputs

from models import NO_REDUCTION, LayerSpec, ReductionPlan, reducible

TOL = 1e-5


def removes_nothing(method: str, layers: int) -> list[ReductionPlan]:
    specs = {
        "tome": [LayerSpec(r=0)],
        "tcvit": [LayerSpec(r=0)],
        "evit": [LayerSpec(keep_rate=1.0)],
        # Ratios this small round to zero tokens on these inputs.
        "pumer": [LayerSpec(), LayerSpec(prune=0.001, merge_image=0.001, merge_text=0.01)],
        "prune": [LayerSpec(prune=0.0)],
    }[method]
    return [ReductionPlan(method, (spec,) * layers, level="noop") for spec in specs]


def reference_vision(kind: str, model: torch.nn.Module, px: torch.Tensor) -> dict[str, torch.Tensor]:
    if kind == "clip":
        feats = model.get_image_features(pixel_values=px)
        return {"pooler_output": getattr(feats, "pooler_output", feats)}
    out = model(pixel_values=px)
    if kind == "clip-vision-proj":
        return {"pooler_output": out.image_embeds, "last_hidden_state": out.last_hidden_state}
    return {
        k: getattr(out, k)
        for k in ("logits", "pooler_output", "last_hidden_state")
        if getattr(out, k, None) is not None
    }


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.shape == ref.shape, what
    assert (ours - ref).abs().max().item() <= TOL, f"{what}: max abs diff {(ours - ref).abs().max().item()}"


@pytest.mark.parametrize("kind", VISION_KINDS)
def test_vision_identity_plans_equal_transformers(kind):
    model = build_vision(kind)
    rm = reducible(model)
    px = pixels(batch=3)
    ref = reference_vision(kind, model, px)
    assert ref, "no reference output"
    plans = [NO_REDUCTION] + [p for m in rm.methods for p in removes_nothing(m, rm.num_layers)]
    for plan in plans:
        out = rm(px, plan=plan)
        for key, value in ref.items():
            assert_close(getattr(out, key), value, f"{kind} {plan.method} {key}")
        assert out.trace.flops == out.trace.full_flops


@pytest.mark.parametrize("kind", VILT_KINDS)
def test_vilt_identity_plans_equal_transformers_with_padded_questions(kind):
    model = build_vilt(kind)
    rm = reducible(model)
    inputs = vilt_inputs(batch=3)
    assert len(set(inputs["attention_mask"].sum(1).tolist())) == 3, "questions must differ in length"
    ref = model(**inputs)
    text_len = inputs["input_ids"].shape[1]
    for plan in [NO_REDUCTION] + [p for m in rm.methods for p in removes_nothing(m, rm.num_layers)]:
        out = rm(**inputs, plan=plan)
        if kind == "vilt":
            assert_close(out.pooler_output, ref.pooler_output, f"{plan.method} pooler")
            # transformers shuffles image tokens; the text part is comparable position by position.
            assert_close(
                out.last_hidden_state[:, :text_len], ref.last_hidden_state[:, :text_len], "text states"
            )
        else:
            assert_close(out.logits, ref.logits, f"{kind} {plan.method} logits")
        assert out.trace.tokens == (text_len + 65,) * (rm.num_layers + 1)


def test_vilt_with_full_pixel_mask_matches_no_mask():
    model = build_vilt("vilt-vqa")
    rm = reducible(model)
    inputs = vilt_inputs(batch=2)
    mask = torch.ones(2, 64, 64, dtype=torch.long)
    assert_close(rm(**inputs, pixel_mask=mask).logits, model(**inputs, pixel_mask=mask).logits, "logits")


def test_vilt_images_of_different_valid_sizes_are_refused():
    rm = reducible(build_vilt("vilt-vqa"))
    mask = torch.ones(2, 64, 64, dtype=torch.long)
    mask[1, 40:] = 0
    with pytest.raises(ValueError, match="same size"):
        rm(**vilt_inputs(batch=2), pixel_mask=mask)
