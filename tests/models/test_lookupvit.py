"""LookupViT: shapes, the paper's FLOPs formula, save/load, the reused gathering attention, equality
with a plain reference computation, tracing a fixed grid, plans, and a few training steps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import ViTConfig, ViTForImageClassification

from models import NO_REDUCTION, ReductionPlan, named_plan, plan_for_target, reducible, resolve
from models.levels import candidate_plans
from models.loading import load_model
from models.lookupvit import (
    LookupViTConfig,
    LookupViTForImageClassification,
    block_flops,
    modeling,
    resize_matrix,
)

TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    lookup_intermediate_size=16,
    image_size=32,
    patch_size=4,  # 8 x 8 lookup grid
    grid_sizes=[1, 2, 3, 4, 6],
    num_labels=5,
)


def tiny(seed: int = 0, **changes) -> LookupViTForImageClassification:
    torch.manual_seed(seed)
    model = LookupViTForImageClassification(LookupViTConfig(**{**TINY, **changes})).eval()
    with torch.no_grad():  # LayerNorms start at identity; random affine parameters prove they are applied
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def images(batch: int = 3, seed: int = 1, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- shapes and FLOPs


@pytest.mark.parametrize("grid", [1, 2, 3, 6, 8])
def test_shapes_at_each_grid(grid):
    model = tiny()
    out = model(images(), grid=grid, output_attentions=True)
    assert out.logits.shape == out.compressed_logits.shape == out.lookup_logits.shape == (3, 5)
    assert out.compressed_hidden_state.shape == (3, grid * grid, 32)
    assert out.lookup_hidden_state.shape == (3, 64, 32)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (3, 4, grid * grid, 64)
    torch.testing.assert_close(out.logits, (out.compressed_logits + out.lookup_logits) / 2)
    with pytest.raises(ValueError):
        model(images(), grid=9)


@pytest.mark.parametrize("n,m,d", [(64, 1, 128), (64, 36, 128), (196, 49, 384), (576, 25, 768), (16, 16, 8)])
def test_block_flops_is_the_papers_formula(n, m, d):
    # C = (3NM + 2M^2) D + (4N + 15M) D^2 multiply-adds; tokenlean counts 2 FLOPs per multiply-add
    paper = (3 * n * m + 2 * m * m) * d + (4 * n + 15 * m) * d * d
    assert block_flops(n, m, d, mlp=4 * d, lookup_mlp=d // 2) == 2 * paper


def test_model_flops_trace_and_the_vit_comparison():
    rm = reducible(tiny())
    d = 32
    for grid in (1, 3, 6):
        plan = NO_REDUCTION if grid == 6 else ReductionPlan("lookupvit", grid=grid)
        m = grid * grid
        expected = 2 * 2 * ((3 * 64 * m + 2 * m * m) * d + (4 * 64 + 15 * m) * d * d)
        assert rm.flops(plan) == expected
        trace = rm(images(1), plan=plan).trace
        assert trace.flops == expected and trace.full_flops == rm.flops(NO_REDUCTION)
        assert trace.image_tokens == (64,) * 3 and trace.compressed_tokens == (m,) * 3
        assert trace.tokens == (64 + m,) * 3 and trace.kept_ratio == m / 64
        t = trace.to_dict()
        assert t["lookup_tokens_per_layer"] == [64] * 3 and t["compressed_tokens_per_layer"] == [m] * 3
    # the demo shapes (D 128, 4 layers, 8 x 8 patches): at 1 x 1 at most a third of the same-size
    # ViT's FLOPs (64 patches + [CLS])
    demo = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512)
    lookup = reducible(LookupViTForImageClassification(LookupViTConfig(**demo, lookup_intermediate_size=64)))
    vit = reducible(ViTForImageClassification(ViTConfig(**demo, image_size=64, patch_size=8)))
    assert lookup.flops(ReductionPlan("lookupvit", grid=1)) <= vit.flops(NO_REDUCTION) / 3


# ---------------------------------------------------------------- exactness


def test_resize_to_the_same_size_is_exactly_the_identity():
    x = torch.randn(2, 16, 8, 8)
    for antialias in (False, True):
        same = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False, antialias=antialias)
        assert torch.equal(same, x)
    assert torch.equal(resize_matrix(8, 8), torch.eye(64))
    model = tiny()
    lookup, compressed = model.lookupvit.embeddings(images(), grid=8)
    assert torch.equal(lookup, compressed)


@pytest.mark.parametrize("dst", [1, 2, 3, 5, 7])
def test_resize_matrix_is_the_antialiased_bilinear_resize(dst):
    grid = torch.randn(2, 16, 8, 8)
    expected = F.interpolate(grid, size=(dst, dst), mode="bilinear", align_corners=False, antialias=True)
    tokens = grid.flatten(2).transpose(1, 2)  # (B, 64, D) raster order
    got = (resize_matrix(8, dst) @ tokens).transpose(1, 2).reshape(2, 16, dst, dst)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(resize_matrix(8, dst).sum(1), torch.ones(dst * dst))


def reference_block(layer, lookup: torch.Tensor, compressed: torch.Tensor, attn_override=None):
    """One LookupViT block written out plainly: per head, explicit softmax, no fused kernels."""

    def ln(norm, x):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias

    def lin(linear, x):
        return x @ linear.weight.t() + (linear.bias if linear.bias is not None else 0)

    def gelu(x):
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))

    h, d = layer.num_heads, lookup.shape[-1]
    hd = d // h
    cols = [slice(i * hd, (i + 1) * hd) for i in range(h)]

    q = lin(layer.gather_q, ln(layer.gather_norm_compressed, compressed))
    hl = ln(layer.gather_norm_lookup, lookup)
    k, v = lin(layer.gather_k, hl), lin(layer.gather_v, hl)
    attn = [torch.softmax(q[..., c] @ k[..., c].transpose(-1, -2) / math.sqrt(hd), dim=-1) for c in cols]
    if attn_override is not None:
        attn = [attn_override[:, i] for i in range(h)]
    gathered = torch.cat([a @ v[..., c] for a, c in zip(attn, cols, strict=True)], -1)
    compressed = compressed + lin(layer.gather_o, gathered)

    x = ln(layer.norm1, compressed)
    q, k, v = lin(layer.q, x), lin(layer.k, x), lin(layer.v, x)
    heads = []
    for c in cols:
        p = torch.softmax(q[..., c] @ k[..., c].transpose(-1, -2) / math.sqrt(hd), dim=-1)
        heads.append(p @ v[..., c])
    compressed = compressed + lin(layer.o, torch.cat(heads, -1))
    x = ln(layer.norm2, compressed)
    compressed = compressed + lin(layer.mlp.fc2, gelu(lin(layer.mlp.fc1, x)))

    v = lin(layer.infuse_v, ln(layer.infuse_norm, compressed))
    update = torch.cat([a.transpose(-1, -2) @ v[..., c] for a, c in zip(attn, cols, strict=True)], -1)
    lookup = lookup + lin(layer.infuse_o, update)
    x = ln(layer.lookup_norm, lookup)
    lookup = lookup + lin(layer.lookup_mlp.fc2, gelu(lin(layer.lookup_mlp.fc1, x)))
    return lookup, compressed


def test_one_block_equals_a_plain_reference():
    model = tiny()
    layer = model.lookupvit.layers[0]
    lookup, compressed = torch.randn(2, 64, 32), torch.randn(2, 9, 32)
    got_lookup, got_compressed, _ = layer(lookup, compressed)
    ref_lookup, ref_compressed = reference_block(layer, lookup, compressed)
    torch.testing.assert_close(got_lookup, ref_lookup, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_compressed, ref_compressed, rtol=0, atol=1e-5)


@pytest.mark.parametrize("grid", [2, 8])
def test_whole_forward_equals_a_plain_reference(grid):
    model = tiny()
    base = model.lookupvit
    x = images()
    patches = F.conv2d(x, base.embeddings.projection.weight, base.embeddings.projection.bias, stride=4)
    pos = base.embeddings.position_embeddings.transpose(1, 2).reshape(1, 32, 8, 8)

    def resize(t):
        return F.interpolate(t, size=(grid, grid), mode="bilinear", align_corners=False, antialias=True)

    lookup = (patches + pos).flatten(2).transpose(1, 2)
    compressed = (resize(patches) + resize(pos)).flatten(2).transpose(1, 2)
    for layer in base.layers:
        lookup, compressed = reference_block(layer, lookup, compressed)
    pooled_c = base.compressed_norm(compressed).mean(1)
    pooled_l = base.lookup_norm(lookup).mean(1)
    logits = (model.compressed_classifier(pooled_c) + model.lookup_classifier(pooled_l)) / 2
    torch.testing.assert_close(model(x, grid=grid).logits, logits, rtol=0, atol=1e-5)
    # and through the engine: NO_REDUCTION is the model's highest-fidelity grid
    rm = reducible(model)
    plan = NO_REDUCTION if grid == rm.full_grid else ReductionPlan("lookupvit", grid=grid)
    torch.testing.assert_close(rm(x, plan=plan).logits, model(x, grid=grid).logits, rtol=0, atol=0)


def test_lookup_update_reuses_the_gathering_attention(monkeypatch):
    """The gathering attention is computed once per block and the infusion uses that very matrix:
    it is replaced by an arbitrary row-stochastic matrix, and the block's output must follow it in
    both directions. A recomputation of the scores or a second softmax for the lookup update would
    ignore the replacement and fail."""
    model = tiny()
    layer = model.lookupvit.layers[1]
    lookup, compressed = torch.randn(2, 64, 32), torch.randn(2, 4, 32)
    g = torch.Generator().manual_seed(3)
    replacement = torch.softmax(torch.randn(2, 4, 4, 64, generator=g) * 3, dim=-1)
    calls = []

    def spy(q, k, scale):
        calls.append(modeling_softmax(q, k, scale))
        return replacement

    modeling_softmax = modeling.gather_attention
    monkeypatch.setattr(modeling, "gather_attention", spy)
    got_lookup, got_compressed, attn = layer(lookup, compressed)
    assert len(calls) == 1 and attn is replacement
    ref_lookup, ref_compressed = reference_block(layer, lookup, compressed, attn_override=replacement)
    torch.testing.assert_close(got_compressed, ref_compressed, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_lookup, ref_lookup, rtol=0, atol=1e-5)
    # the replacement really changes the outcome (the test is not vacuous)
    plain_lookup, _ = reference_block(layer, lookup, compressed)
    assert (plain_lookup - ref_lookup).abs().max() > 1e-3
    # one gathering attention per block in a whole forward
    calls.clear()
    monkeypatch.setattr(
        modeling, "gather_attention", lambda q, k, s: calls.append(1) or modeling_softmax(q, k, s)
    )
    model(images(), grid=2)
    assert len(calls) == 2


# ---------------------------------------------------------------- save / load, export


def test_save_load_round_trip_through_the_service_loader(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = load_model(str(tmp_path))
    assert type(loaded) is LookupViTForImageClassification
    assert loaded.config.grid_sizes == [1, 2, 3, 4, 6] and loaded.config.default_grid == 6
    x = images()
    for grid in (1, 4, 6):
        assert torch.equal(loaded(x, grid=grid).logits, model(x, grid=grid).logits)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


class FixedGrid(torch.nn.Module):
    def __init__(self, model, grid: int):
        super().__init__()
        self.model, self.grid = model, grid

    def forward(self, pixel_values):
        return self.model(pixel_values, grid=self.grid).logits


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("grid", [1, 3, 8])
def test_traced_fixed_grid_matches_eager(grid):
    with torch.inference_mode(False):
        model = tiny()
        wrapper = FixedGrid(model, grid).eval()
        with torch.no_grad():
            traced = torch.jit.trace(wrapper, images(2, seed=5), check_trace=False)
            for seed in (6, 7):  # other inputs, other batch sizes: nothing was baked in
                x = images(4 if seed == 6 else 1, seed=seed)
                torch.testing.assert_close(traced(x), wrapper(x), rtol=0, atol=1e-5)


def test_a_loaded_model_exports_at_every_grid_before_any_eager_call(tmp_path):
    """The resize matrices are real buffers from the moment the model loads, so torch.export's
    fake-tensor tracing of a never-called model records the right constants."""
    tiny().save_pretrained(tmp_path, safe_serialization=True)
    with torch.inference_mode(False):
        model = load_model(str(tmp_path))
        buffers = dict(model.named_buffers())
        assert all(not b.is_meta for b in buffers.values())
        for grid in (1, 3, 7):
            assert torch.equal(buffers[f"lookupvit.embeddings.resize_{grid}"], resize_matrix(8, grid))
        for grid in (3, 1):
            exported = torch.export.export(FixedGrid(model, grid).eval(), (images(2, seed=5),))
            x = images(2, seed=6)
            with torch.no_grad():
                expected = model(x, grid=grid).logits
            torch.testing.assert_close(exported.module()(x), expected, rtol=0, atol=1e-5)
    assert not any("resize" in key for key in model.state_dict())  # never saved with the weights


# ---------------------------------------------------------------- plans


def test_levels_and_numeric_targets_pick_trained_grids():
    rm = reducible(tiny())
    full = rm.flops(NO_REDUCTION)
    assert named_plan(rm, "none") == NO_REDUCTION and rm.full_grid == 6
    high = named_plan(rm, "high")
    assert high.method == "lookupvit" and high.grid == 1 and high.level == "high"
    grids = [named_plan(rm, level).grid for level in ("low", "medium", "high")]
    assert grids == sorted(grids, reverse=True) and set(grids) <= {1, 2, 3, 4}
    assert resolve(rm, "medium").to_dict()["grid"] == named_plan(rm, "medium").grid
    achievable = [1 - rm.flops(p) / full for p in candidate_plans(rm, "lookupvit")]
    for target in (0.1, 0.3, 0.5, 0.7, 0.9):
        plan = plan_for_target(rm, target)
        saved = 1 - rm.flops(plan) / full
        assert abs(saved - target) == pytest.approx(min(abs(a - target) for a in achievable))
        assert plan == NO_REDUCTION or (plan.grid in rm.grids and plan.level == f"{target:g}")
    assert plan_for_target(rm, 0.0) == NO_REDUCTION
    with pytest.raises(ValueError):
        named_plan(rm, "low", "tome")
    with pytest.raises(ValueError):
        rm(images(1), plan=ReductionPlan("tome"))
    with pytest.raises(ValueError):
        ReductionPlan("lookupvit")  # a lookupvit plan names its grid
    with pytest.raises(ValueError):
        ReductionPlan("tome", grid=2)


# ---------------------------------------------------------------- training


def test_a_few_training_steps_reduce_the_loss():
    """Random grid per step, both heads' losses, on a tiny set of coloured squares."""
    with torch.inference_mode(False), torch.enable_grad():
        model = tiny(num_labels=4)
        g = torch.Generator().manual_seed(0)
        y = torch.arange(16) % 4
        colours = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1]])
        x = torch.randn(16, 3, 32, 32, generator=g) * 0.3
        x[:, :, 8:24, 8:24] += colours[y][:, :, None, None]
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
        model.train()
        losses = []
        for step in range(30):
            loss = model(x, grid=TINY["grid_sizes"][step % 5], labels=y).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


# ---------------------------------------------------------------- served by /v1/classify


def test_classify_endpoint_serves_the_shipped_lookupvit_checkpoint():
    import base64
    import io
    import time

    from fastapi.testclient import TestClient
    from PIL import Image

    from app.main import create_app
    from app.settings import CHECKPOINTS, Settings

    image = Image.new("RGB", (64, 64), (240, 240, 240))
    image.paste(Image.new("RGB", (24, 24), (255, 0, 0)), (20, 20))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    settings = Settings(
        models={
            "vqa": {"enabled": False},
            "retrieval": {"enabled": False},
            "classify": {"checkpoint": str(CHECKPOINTS / "lookupvit-classify")},
        }
    )
    with TestClient(create_app(settings)) as client:
        for _ in range(600):
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        (info,) = client.get("/v1/models").json()["models"]
        assert info["family"] == "lookupvit" and info["default_method"] == "lookupvit"
        assert info["architecture"] == "LookupViTForImageClassification"
        assert info["levels"]["none"]["flops_saved"] == 0 < info["levels"]["high"]["flops_saved"]
        bodies = {}
        for compression in ("none", "high", 0.5):
            r = client.post("/v1/classify", json={"image": b64, "compression": compression, "top_k": 2})
            assert r.status_code == 200, r.text
            bodies[compression] = r.json()
        none, high, half = bodies["none"], bodies["high"], bodies[0.5]
        assert high["label"] == "red rectangle" and none["label"] == "red rectangle"
        assert none["compression"]["method"] == "none" and none["flops"]["saved"] == 0
        assert high["compression"]["method"] == "lookupvit" and high["compression"]["plan"]["grid"] == 1
        assert high["tokens"]["lookup_per_layer"] == [64] * 5
        assert high["tokens"]["compressed_per_layer"] == [1] * 5
        assert high["tokens"]["kept_ratio"] == pytest.approx(1 / 64, abs=1e-4)
        assert high["flops"]["full"] == none["flops"]["reduced"] > high["flops"]["reduced"]
        assert half["compression"]["level"] == "0.5" and abs(half["flops"]["saved"] - 0.5) < 0.1
        r = client.post("/v1/classify", json={"image": b64, "compression": "low", "method": "tome"})
        assert r.status_code == 422
