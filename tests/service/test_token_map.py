"""Token maps: which input patches each token of a layer stands for, for every family and method
(tiny models built in code), and the opt-in `return_token_map` field of the HTTP API (the shipped
demo checkpoints: two-stream VQA, ViLT retrieval, LookupViT classification)."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
from conftest import build_two_stream, build_vilt, build_vision, pixels, png_bytes, vilt_inputs, wait_ready
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import CHECKPOINTS, Settings
from models import NO_REDUCTION, named_plan, reducible
from models.backends.base import register_backend, unregister_backend
from models.backends.eager import EagerBackend
from models.lookupvit import LookupViTConfig, LookupViTForImageClassification
from models.token_map import PRUNED

B64 = base64.b64encode(png_bytes()).decode()


def lookupvit():
    """8 x 8 patches; the unreduced model's compressed grid is 6 x 6."""
    torch.manual_seed(0)
    config = LookupViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        lookup_intermediate_size=16, image_size=32, patch_size=4, grid_sizes=[1, 3, 6], num_labels=5,
    )  # fmt: skip
    return reducible(LookupViTForImageClassification(config).eval())


# family -> (reducible model, its forward's inputs)
CASES = {
    "vit": lambda: (reducible(build_vision("vit-cls")), {"pixel_values": pixels(2)}),
    "deit": lambda: (reducible(build_vision("deit-teacher")), {"pixel_values": pixels(2)}),
    "dinov2": lambda: (reducible(build_vision("dinov2-cls")), {"pixel_values": pixels(2)}),
    "vilt": lambda: (reducible(build_vilt("vilt-vqa", layers=4)), vilt_inputs(batch=2)),
    "two-stream": lambda: (reducible(build_two_stream()), vilt_inputs(batch=2)),
    "lookupvit": lambda: (lookupvit(), {"pixel_values": pixels(2)}),
}


def maps_at_every_layer(rm, inputs, plan):
    out = rm(**inputs, plan=plan, track_source=True)
    layers = len(out.trace.tokens)
    assert len(out.patch_sources) == layers
    return out, [rm.token_maps(out, layer) for layer in range(layers)]


def image_tokens(rm, out, layer: int) -> int:
    """Tokens of the layer that stand for image patches, from the trace: its image tokens less
    the protected ones (LookupViT: its compressed tokens)."""
    if out.trace.compressed_tokens:
        return out.trace.compressed_tokens[layer]
    return out.trace.image_tokens[layer] - rm.protected


@pytest.mark.parametrize("family", sorted(CASES))
def test_every_patch_is_its_own_token_at_none(family):
    rm, inputs = CASES[family]()
    out, maps = maps_at_every_layer(rm, inputs, NO_REDUCTION)
    rows, cols = maps[0][0].grid
    patches = rows * cols
    for layer, row_maps in enumerate(maps):
        for m in row_maps:
            assert m.layer == layer
            if family == "lookupvit":  # its largest trained grid (6 x 6) over the 8 x 8 patches
                assert m.tokens == 36 and sorted(set(m.token_of_patch.tolist())) == list(range(36))
            else:
                assert m.tokens == patches
                np.testing.assert_array_equal(m.token_of_patch, np.arange(patches))
    if family != "lookupvit":
        assert patches == image_tokens(rm, out, 0)


@pytest.mark.parametrize("family", sorted(CASES))
def test_coverage_sums_to_the_input_patches_under_every_method(family):
    rm, inputs = CASES[family]()
    for method in rm.methods:
        plan = named_plan(rm, "high", method)
        out, maps = maps_at_every_layer(rm, inputs, plan)
        for layer, row_maps in enumerate(maps):
            # each patch lies under one token at most: no patch is counted twice
            columns = out.patch_sources[layer].sum(dim=1)
            assert bool(((columns == 0) | (columns == 1)).all()), (method, layer)
            for m in row_maps:
                counts = np.bincount(m.token_of_patch[m.token_of_patch != PRUNED], minlength=m.tokens)
                assert counts.sum() + (m.token_of_patch == PRUNED).sum() == m.token_of_patch.size
                assert (counts > 0).all() and len(counts) == m.tokens, (method, layer)
                assert m.tokens == image_tokens(rm, out, layer), (method, layer)
        last = maps[-1][0]
        if rm.family.layout == "image":  # merging and fusing keep every patch: sizes count them
            assert (last.token_of_patch != PRUNED).all(), method
            sizes = out.sizes[0, rm.protected :].numpy()
            np.testing.assert_array_equal(np.bincount(last.token_of_patch), sizes)
        if method == "prune" or (method == "pumer" and family == "vilt"):
            assert (last.token_of_patch == PRUNED).any(), method
        if rm.family.layout != "grid":
            assert last.tokens < maps[0][0].tokens, f"{method} at high removed nothing"


@pytest.mark.parametrize("family", sorted(CASES))
def test_tracking_sources_leaves_the_forward_unchanged(family):
    rm, inputs = CASES[family]()
    plan = named_plan(rm, "medium")
    plain = rm(**inputs, plan=plan)
    tracked = rm(**inputs, plan=plan, track_source=True)
    assert plain.patch_sources is None
    assert torch.equal(plain.logits, tracked.logits)
    assert plain.trace == tracked.trace


def test_layers_out_of_range_and_untracked_forwards_are_refused():
    rm, inputs = CASES["vit"]()
    out = rm(**inputs, plan=NO_REDUCTION, track_source=True)
    with pytest.raises(ValueError, match="layer"):
        rm.token_maps(out, rm.num_layers + 1)
    with pytest.raises(ValueError, match="track_source"):
        rm.token_maps(rm(**inputs, plan=NO_REDUCTION), 0)


# ---------------------------------------------------------------- the HTTP field


@pytest.fixture(scope="module")
def client():
    settings = Settings(
        warmup=False,
        models={
            "retrieval": {"checkpoint": str(CHECKPOINTS / "retrieval")},  # ViLT, 64 px
            "classify": {"checkpoint": str(CHECKPOINTS / "lookupvit-classify")},
        },
    )
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


def post(client, task: str, **fields):
    payload = {"image": B64, **fields}
    if task == "vqa":
        payload.setdefault("question", "what color is the shape?")
    if task == "retrieval":
        payload["texts"] = ["a red circle", "a blue square", "a green triangle"]
    r = client.post(f"/v1/{task}", json=payload)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("task", ["vqa", "retrieval", "classify"])
def test_token_map_is_off_by_default(client, task):
    assert post(client, task, compression="high")["token_map"] is None


@pytest.mark.parametrize("task", ["vqa", "retrieval", "classify"])
def test_token_map_covers_the_patches_and_is_the_identity_at_none(client, task):
    lookup = task == "classify"  # LookupViT: its compressed grid
    for level in ("none", "medium", "high"):
        body = post(client, task, compression=level, return_token_map=True)
        m = body["token_map"]
        per_layer = body["tokens"]["per_layer"]
        assert m["layer"] == len(per_layer) - 1  # default: after the last layer
        rows, cols = m["grid"]
        patches = np.asarray(m["token_of_patch"])
        assert patches.shape == (rows * cols,)
        kept = patches[patches != PRUNED]
        assert sorted(set(kept.tolist())) == list(range(m["tokens"]))
        if lookup:
            assert m["tokens"] == body["tokens"]["compressed_per_layer"][-1]
        else:
            assert m["tokens"] == body["tokens"]["image_per_layer"][-1] - 1  # less the image [CLS]
        if level == "none" and not lookup:
            assert patches.tolist() == list(range(rows * cols))
        if level == "high" and not lookup:
            assert m["tokens"] < rows * cols
    # the same answer with and without the map
    plain = post(client, task, compression="high")
    mapped = post(client, task, compression="high", return_token_map=True)
    key = {"vqa": "answers", "retrieval": "ranking", "classify": "labels"}[task]
    assert plain[key] == mapped[key]


def test_token_map_at_a_chosen_layer(client):
    first = post(client, "vqa", compression="high", return_token_map=True, token_map_layer=0)
    assert first["token_map"]["layer"] == 0
    assert first["token_map"]["tokens"] == len(first["token_map"]["token_of_patch"])
    # multipart: form fields as text
    r = client.post(
        "/v1/vqa",
        files={"image": ("s.png", png_bytes(), "image/png")},
        data={"question": "what shape is it?", "return_token_map": "true", "token_map_layer": "3"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["token_map"]["layer"] == 3


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"return_token_map": True, "token_map_layer": 99}, "token_map_layer: at most"),
        ({"return_token_map": True, "token_map_layer": -1}, "token_map_layer"),
        ({"return_token_map": True, "token_map_layer": True}, "token_map_layer"),
        ({"token_map_layer": 1}, "needs return_token_map"),
    ],
)
def test_bad_token_map_requests_are_422(client, fields, message):
    r = client.post("/v1/vqa", json={"image": B64, "question": "what color?", **fields})
    assert r.status_code == 422, r.text
    assert message in r.json()["error"]["message"]


def test_token_map_is_documented_in_openapi(client):
    schema = client.get("/openapi.json").json()
    vqa = schema["paths"]["/v1/vqa"]["post"]["requestBody"]["content"]
    assert "return_token_map" in vqa["application/json"]["schema"]["properties"]
    assert "return_token_map" in vqa["multipart/form-data"]["schema"]["properties"]
    token_map = schema["components"]["schemas"]["TokenMap"]
    assert {"layer", "grid", "tokens", "token_of_patch"} <= set(token_map["properties"])


class LogitsOnly(EagerBackend):
    """A backend that cannot return token maps, as the exported graphs cannot."""

    name = "logits-only"
    token_maps = False


def test_a_backend_without_token_maps_refuses_them():
    register_backend(LogitsOnly)
    try:
        settings = Settings(
            warmup=False,
            backend=LogitsOnly.name,
            models={"vqa": {"enabled": False}, "retrieval": {"enabled": False}},
        )
        with TestClient(create_app(settings)) as c:
            wait_ready(c)
            assert post(c, "classify")["token_map"] is None
            r = c.post("/v1/classify", json={"image": B64, "return_token_map": True})
            assert r.status_code == 422, r.text
            assert "cannot return token maps" in r.json()["error"]["message"]
    finally:
        unregister_backend(LogitsOnly.name)


def test_token_maps_are_v1_only(client):
    image = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [B64]}
    body = {"inputs": [image], "parameters": {"return_token_map": True}}
    r = client.post("/v2/models/classify/infer", json=body)
    assert r.status_code == 422, r.text
    assert "unknown parameter 'return_token_map'" in r.json()["error"]
    del body["parameters"]
    assert client.post("/v2/models/classify/infer", json=body).status_code == 200
