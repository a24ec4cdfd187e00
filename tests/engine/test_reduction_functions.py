"""The pure reduction functions: merge invariants, pruning, condensation, EViT, attention."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_vilt, build_vision, pixels, vilt_inputs

from models import LayerSpec, ReductionPlan, named_plan, reducible
from models.reduction.attention import attend, key_bias
from models.reduction.condense import condense, connectivity
from models.reduction.evit import evit
from models.reduction.merge import bipartite_soft_matching, merge_sum, merge_tokens
from models.reduction.prune import text_to_image_saliency
from models.reduction.ranking import descending_rank, split_top_k, split_top_k_by_rank, top_k_mask


def _tokens(b=2, n=17, c=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, c, generator=g), torch.rand(b, n, generator=g) * 3 + 1


def test_matching_merges_the_most_similar_pairs_and_sizes_add_up():
    x, size = _tokens()
    m = bipartite_soft_matching(x, r=5, protected=1)
    out, new_size, _, _ = merge_tokens(m, x, size, None)
    assert out.shape == (2, 12, 8)
    torch.testing.assert_close(new_size.sum(1), size.sum(1))
    # Weighted sums are preserved: sum(x * size) is unchanged by merging.
    torch.testing.assert_close((out * new_size[..., None]).sum(1), (x * size[..., None]).sum(1))


@pytest.mark.parametrize("n, protected", [(11, 1), (12, 1), (12, 2), (9, 0)])
def test_merge_sum_matches_a_per_token_loop(n, protected):
    x, _ = _tokens(b=3, n=n)
    m = bipartite_soft_matching(x, r=4, protected=protected)
    out = merge_sum(m, x)
    for b in range(3):
        a, bb = x[b, protected::2], x[b, protected + 1 :: 2].clone()
        for s, d in zip(m.src[b, :, 0].tolist(), m.dst[b, :, 0].tolist(), strict=True):
            bb[d] += a[s]
        expected = torch.cat([x[b, :protected], a[m.unmerged[b, :, 0]], bb])
        torch.testing.assert_close(out[b], expected)
    # A traced graph takes the export path (scatter_add, no index_add) to the same sums.
    traced = torch.jit.trace(lambda t: merge_sum(m, t), (x,), check_trace=False)
    assert "index_add" not in str(traced.graph) and "scatter_add" in str(traced.graph)
    torch.testing.assert_close(traced(x), out)


def test_the_eager_top_k_split_is_the_traced_graphs_permutation_ties_included():
    g = torch.Generator().manual_seed(0)
    score = torch.randint(0, 4, (5, 40), generator=g).float()  # many ties
    for k in (0, 1, 13, 40):
        chosen, rest = split_top_k(score, k)
        by_rank = split_top_k_by_rank(score, k)
        assert torch.equal(chosen, by_rank[0]) and torch.equal(rest, by_rank[1])
        mask = top_k_mask(score, k)
        assert torch.equal(mask, descending_rank(score) < k)
        assert torch.equal(mask.nonzero()[:, 1].view(5, k), chosen)
    traced = torch.jit.trace(lambda s: split_top_k(s, 7), (score,), check_trace=False)
    assert "sort" not in str(traced.graph)
    assert torch.equal(traced(score)[0], split_top_k(score, 7)[0])


def test_merging_identical_tokens_changes_nothing():
    row = torch.randn(1, 1, 8)
    x = torch.cat([torch.randn(1, 1, 8), row.expand(1, 16, 8)], dim=1)
    out, size, _, _ = merge_tokens(bipartite_soft_matching(x, 6, 1), x, torch.ones(1, 17), None)
    torch.testing.assert_close(out[:, 1:], row.expand(1, 10, 8))
    torch.testing.assert_close(out[:, 0], x[:, 0])


def test_r_is_capped_at_half_the_unprotected_tokens():
    x, size = _tokens(n=9)
    m = bipartite_soft_matching(x, r=100, protected=2)
    assert m.r == 3
    assert merge_tokens(m, x, size, None)[0].shape[1] == 6


def test_padding_never_merges_into_real_tokens_when_avoidable():
    x, size = _tokens(b=1, n=13)
    valid = torch.ones(1, 13, dtype=torch.bool)
    valid[:, 7:] = False  # 6 padding tokens
    m = bipartite_soft_matching(x, r=5, protected=1, valid=valid)
    _, _, _, new_valid = merge_tokens(m, x, size, None, valid=valid)
    # 3 pad-pad merges are possible; the rest must be real-real: 6 real - 2 merged = 4 real left.
    tail_valid = valid[:, 1:]
    a, b = tail_valid[:, ::2], tail_valid[:, 1::2]
    src_valid = a.gather(1, m.src[..., 0])
    dst_valid = b.gather(1, m.dst[..., 0])
    assert bool((src_valid == dst_valid).all())
    assert int(new_valid.sum()) == int(valid.sum()) - int(src_valid.sum())


@pytest.mark.parametrize("kind", ["vit-cls", "deit-teacher", "dinov2"])
def test_protected_tokens_survive_in_place_and_sources_partition_the_input(kind):
    rm = reducible(build_vision(kind))
    for method in rm.methods:
        out = rm(pixels(2), plan=named_plan(rm, "high", method), track_source=True)
        src = out.sources
        n0 = src.shape[-1]
        for p in range(rm.protected):
            torch.testing.assert_close(
                src[:, p], torch.nn.functional.one_hot(torch.tensor(p), n0).float().expand(2, -1)
            )
        torch.testing.assert_close(src.sum(1), torch.ones(2, n0))  # every input token covered exactly once
        torch.testing.assert_close(src.sum(-1), out.sizes)
        torch.testing.assert_close(out.sizes.sum(1), torch.full((2,), float(n0)))


def test_vilt_pumer_keeps_both_cls_tokens_and_sizes_track_merges():
    rm = reducible(build_vilt("vilt-vqa"))
    inputs = vilt_inputs(batch=3)
    out = rm(**inputs, plan=named_plan(rm, "high", "pumer"), track_source=True)
    n_text = out.trace.text_tokens[-1]
    t0 = inputs["input_ids"].shape[1]
    src = out.sources
    assert src[:, 0, 0].eq(1).all() and src[:, 0].sum(-1).eq(1).all()  # text [CLS]
    assert src[:, n_text, t0].eq(1).all() and src[:, n_text].sum(-1).eq(1).all()  # image [CLS]
    torch.testing.assert_close(src.sum(-1), out.sizes)
    assert bool((src.sum(1) <= 1).all())  # pruned tokens are gone, none counted twice
    # text tokens only ever cover text inputs, image tokens image inputs
    assert src[:, :n_text, t0:].sum() == 0 and src[:, n_text:, :t0].sum() == 0


def test_pruning_ignores_padding_entirely():
    """Prune-only: a padded question gives the same answer as the same question unpadded."""
    rm = reducible(build_vilt("vilt-vqa"))
    inputs = vilt_inputs(batch=3)
    plan = named_plan(rm, "high", "prune")
    batched = rm(**inputs, plan=plan).logits
    for i in range(3):
        real = int(inputs["attention_mask"][i].sum())
        alone = rm(
            inputs["input_ids"][i : i + 1, :real],
            inputs["pixel_values"][i : i + 1],
            attention_mask=inputs["attention_mask"][i : i + 1, :real],
            plan=plan,
        ).logits
        assert (alone - batched[i]).abs().max() < 1e-5


def test_text_saliency_excludes_padding_rows():
    probs = torch.rand(1, 4, 6)
    valid = torch.tensor([[True, True, False, False]])
    torch.testing.assert_close(text_to_image_saliency(probs, valid), probs[:, :2].mean(1))
    probs_changed = probs.clone()
    probs_changed[:, 2:] = 100.0
    torch.testing.assert_close(text_to_image_saliency(probs_changed, valid), probs[:, :2].mean(1))


def test_connectivity_sums_attention_paths_up_to_order_k():
    w = torch.softmax(torch.randn(2, 5, 5), -1)
    torch.testing.assert_close(connectivity(w, 1), w)
    torch.testing.assert_close(connectivity(w, 3), w + w @ w + w @ w @ w)


def _hub_attention() -> torch.Tensor:
    """Every query attends most to token 1 (a hub); tokens 2..6 attend alike (0.6 to token 1, 0.3 to
    token 2), token 1 to itself. The class token attends to 1 and 2, so at alpha 0 they are kept."""
    probs = torch.full((1, 7, 7), 0.01)
    probs[0, 0, 1] = probs[0, 0, 2] = 0.45
    probs[0, 1, 1] = 0.9
    probs[0, 2:, 1] = 0.6
    probs[0, 2:, 2] = 0.3
    return probs / probs.sum(-1, keepdim=True)


def _fused(x, size, members):
    return (x[0, members] * size[0, members, None]).sum(0) / size[0, members].sum()


def test_condense_fuses_each_dropped_token_into_the_kept_token_with_its_connections():
    x, size = _tokens(b=1, n=7, c=4)
    out, new_size, _ = condense(x, size, None, _hub_attention(), r=4, protected=1, alpha=0.0)
    assert out.shape[1] == 3
    torch.testing.assert_close(out[:, :2], x[:, :2])  # the hub absorbs nothing
    torch.testing.assert_close(out[0, 2], _fused(x, size, [2, 3, 4, 5, 6]))
    torch.testing.assert_close(new_size.sum(), size.sum())


def test_condense_direct_fusion_sends_every_dropped_token_to_the_hub():
    x, size = _tokens(b=1, n=7, c=4)
    out, new_size, _ = condense(x, size, None, _hub_attention(), r=4, protected=1, alpha=0.0, fusion="direct")
    torch.testing.assert_close(out[0, 1], _fused(x, size, [1, 3, 4, 5, 6]))
    torch.testing.assert_close(out[0, 2], x[0, 2])
    torch.testing.assert_close(new_size.sum(), size.sum())
    with pytest.raises(ValueError):
        condense(x, size, None, _hub_attention(), r=4, fusion="nearest")


def test_evit_keeps_attentive_tokens_and_fuses_the_rest_into_one():
    x, size = _tokens(b=1, n=7, c=4)
    cls_attn = torch.tensor([[0.3, 0.2, 0.01, 0.15, 0.02, 0.3, 0.02]])
    out, new_size, _ = evit(x, size, None, cls_attn, keep_rate=0.5, protected=1)
    assert out.shape[1] == 1 + 3 + 1
    torch.testing.assert_close(out[0, :4], x[0, [0, 1, 3, 5]])
    w = cls_attn[0, [2, 4, 6]] * size[0, [2, 4, 6]]
    torch.testing.assert_close(out[0, 4], (x[0, [2, 4, 6]] * (w / w.sum())[:, None]).sum(0))
    torch.testing.assert_close(new_size.sum(), size.sum())


def test_proportional_attention_through_sdpa_equals_explicit_softmax():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=g) for _ in range(3))
    size = torch.randint(1, 6, (2, 9), generator=g).float()
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, 6:] = False
    bias = key_bias(size, valid, proportional=True, dtype=torch.float32)
    logits = q @ k.transpose(-1, -2) / math.sqrt(8) + size.log()[:, None, None, :]
    logits = logits.masked_fill(~valid[:, None, None, :], -math.inf)
    reference = logits.softmax(-1) @ v
    torch.testing.assert_close(attend(q, k, v, bias, 8**-0.5), reference, atol=1e-6, rtol=1e-5)
    assert key_bias(size, None, proportional=False, dtype=torch.float32) is None


def test_plain_mean_merge_is_available_and_differs_from_weighted():
    rm = reducible(build_vision("vit-cls"))
    px = pixels(2)
    layers = (LayerSpec(r=8),) * 4
    weighted = rm(px, plan=ReductionPlan("tome", layers)).logits
    plain = rm(
        px, plan=ReductionPlan("tome", layers, weighted_merge=False, proportional_attention=False)
    ).logits
    assert weighted.shape == plain.shape
    assert not torch.allclose(weighted, plain)
