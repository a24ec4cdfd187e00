"""The two-stream (METER-layout) family on tiny random models built in code: exact at `none` and
whenever a plan removes nothing, every method and level on both stages, token counts as scheduled,
towers run once per distinct image or text, and checkpoints round-trip."""

from __future__ import annotations

import pytest
import torch
from conftest import TWO_STREAM_KINDS, TWO_STREAM_TOWERS, build_two_stream, vilt_inputs

from models import NO_REDUCTION, LayerSpec, ReductionPlan, reducible
from models.levels import named_plan, resolve
from models.loading import load_model
from models.plan import LEVELS
from models.two_stream.modeling import counted, read_objects

TOL = 1e-5


def inputs(batch: int = 4):
    named = vilt_inputs(batch=batch, text_len=12)
    return named["input_ids"], named["pixel_values"], named["attention_mask"]


def reference(model, ids, px, mask) -> dict[str, torch.Tensor]:
    out = model(ids, px, mask)
    ref = {"pooler_output": out.pooler_output}
    if out.logits is not None:
        ref["logits"] = out.logits
    return ref


def removes_nothing(rm) -> list[ReductionPlan]:
    """Per method, plans whose specs are set but round to zero tokens on these inputs."""
    fusion = LayerSpec(prune=0.001, merge_image=0.001, merge_text=0.01)
    tower = {
        "tome": LayerSpec(r=0),
        "tcvit": LayerSpec(r=0),
        "evit": LayerSpec(keep_rate=1.0),
        "text-evit": LayerSpec(keep_rate=1.0),
        "pumer": LayerSpec(),
    }
    return [
        ReductionPlan(m, (tower[m],) * rm.tower.num_layers + (fusion,) * rm.num_fusion_layers, level="noop")
        for m in rm.methods
    ]


@pytest.mark.parametrize("tower", TWO_STREAM_TOWERS)
@pytest.mark.parametrize("kind", TWO_STREAM_KINDS)
def test_plans_that_remove_nothing_equal_the_model(kind, tower):
    model = build_two_stream(kind, tower)
    rm = reducible(model)
    ids, px, mask = inputs()
    with torch.no_grad():
        ref = reference(model, ids, px, mask)
        for plan in [NO_REDUCTION, *removes_nothing(rm)]:
            out = rm(ids, px, mask, plan=plan)
            for key, value in ref.items():
                diff = (getattr(out, key) - value).abs().max().item()
                assert diff <= TOL, f"{kind}/{tower} {plan.method} {key}: {diff}"
            assert out.trace.flops == out.trace.full_flops


@pytest.mark.parametrize("level", LEVELS[1:])
def test_every_method_follows_its_schedule_on_both_stages(level):
    model = build_two_stream("two-stream-vqa")
    rm = reducible(model)
    ids, px, mask = inputs()
    for method in rm.methods:
        plan = named_plan(rm, level, method)
        with torch.no_grad():
            out = rm(ids, px, mask, plan=plan)
        assert torch.isfinite(out.logits).all()
        counts = rm.schedule(plan, ids.shape[1], rm.nominal_tokens()[1])
        assert out.trace.text_tokens == tuple(t for t, _ in counts)
        assert out.trace.image_tokens == tuple(i for _, i in counts)
        assert out.last_hidden_state.shape[1] == sum(counts[-1])
        assert out.trace.flops < out.trace.full_flops
        depth = rm.tower.num_layers
        fusion_reduced = counts[-1] != counts[depth]
        assert fusion_reduced, f"{method} {level} leaves the fusion layers alone"
        tower_reduced = counts[depth][1] < counts[0][1]
        assert tower_reduced == (method != "pumer"), f"{method} {level}: tower reduced? {tower_reduced}"


def test_levels_get_stronger_and_tower_methods_meet_at_equal_flops():
    rm = reducible(build_two_stream("two-stream-vqa"))
    full = rm.flops(NO_REDUCTION)
    kept = {m: [rm.flops(named_plan(rm, lv, m)) / full for lv in LEVELS] for m in rm.methods}
    for method, ratios in kept.items():
        assert ratios == sorted(ratios, reverse=True) and ratios[0] == 1.0, (method, ratios)
    for level in (1, 2, 3):  # tower methods aim at the same whole-model FLOPs per level
        spread = [kept[m][level] for m in ("tome", "tcvit", "evit", "text-evit")]
        assert max(spread) - min(spread) < 0.08, (LEVELS[level], spread)


def test_numeric_targets_reach_the_whole_model_flops():
    rm = reducible(build_two_stream("two-stream-vqa"))
    full = rm.flops(NO_REDUCTION)
    for target in (0.05, 0.3, 0.5):
        plan = resolve(rm, target, "tome")
        assert abs(1 - rm.flops(plan) / full - target) < 0.05, (target, rm.flops(plan) / full)


def test_fusion_flops_by_hand():
    rm = reducible(build_two_stream("two-stream-vqa", fusion_layers=1))
    d, mlp = 32, 2 * 32 * 64
    t, i = 16, 65  # nominal text tokens, 8 x 8 patches + [CLS]
    by_hand = 2 * (8 * d * d * (t + i) + 2 * d * (t * t + i * i) + 4 * d * t * i + mlp * (t + i))
    assert rm.fusion_cost.flops(t, i, t, i) == by_hand
    counts = rm.schedule(NO_REDUCTION, t, i)
    tower = sum(c.flops(i, i) for c in rm.tower.costs)
    text = sum(c.flops(t, t) for c in rm.text_costs)
    assert rm.flops(NO_REDUCTION) == tower + text + by_hand
    assert len(counts) == rm.num_layers + 1


def test_each_distinct_image_and_text_runs_its_tower_once():
    model = build_two_stream("two-stream-retrieval")
    rm = reducible(model)
    ids, px, mask = inputs(batch=4)
    px[1] = px[0]
    px[3] = px[0]
    ids[2], mask[2] = ids[0], mask[0]
    seen = {"vision": [], "text": []}
    hooks = [
        model.two_stream.vision.embeddings.register_forward_hook(
            lambda m, a, o: seen["vision"].append(o.shape[0])
        ),
        model.two_stream.text.register_forward_hook(
            lambda m, a, kw, o: seen["text"].append(kw["input_ids"].shape[0]), with_kwargs=True
        ),
    ]
    plan = named_plan(rm, "medium", "tome")
    with torch.no_grad():
        shared = rm(ids, px, mask, plan=plan)
        assert seen == {"vision": [2], "text": [3]}
        alone = rm(ids, px, mask, plan=plan, dedupe=False)
    for h in hooks:
        h.remove()
    assert (shared.logits - alone.logits).abs().max().item() <= TOL


def test_checkpoints_round_trip(tmp_path):
    model = build_two_stream("two-stream-vqa", "vit")
    model.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert type(loaded) is type(model)
    ids, px, mask = inputs()
    plan = named_plan(reducible(model), "high")
    with torch.no_grad():
        a = reducible(model)(ids, px, mask, plan=plan).logits
        b = reducible(loaded)(ids, px, mask, plan=plan).logits
    assert torch.equal(a, b)


def test_padding_never_changes_a_rows_answer():
    """A question's logits do not depend on how far the batch pads it (text merging counts follow
    the padded length, so the service pads per length bucket; here the bucket is fixed)."""
    model = build_two_stream("two-stream-vqa")
    rm = reducible(model)
    ids, px, mask = inputs(batch=3)
    plan = named_plan(rm, "medium", "pumer")
    with torch.no_grad():
        batch = rm(ids, px, mask, plan=plan).logits
        single = torch.cat(
            [rm(ids[k : k + 1], px[k : k + 1], mask[k : k + 1], plan=plan).logits for k in range(3)]
        )
    assert (batch - single).abs().max().item() <= 1e-4


def test_text_evit_keeps_the_image_tokens_the_question_points_at():
    """One image, two questions: EViT keeps the same tokens for both; text-evit, whose query comes
    from the question, keeps different ones. Rows that share the image run the tower once each
    under text-evit, and a batch answers as its rows do alone."""
    model = build_two_stream("two-stream-vqa")
    rm = reducible(model)
    ids, px, mask = inputs(batch=2)
    px[1] = px[0]
    with torch.no_grad():
        for proj in model.two_stream.text_query:  # a query strong enough to decide the ranking
            proj.weight.mul_(50)
        for method, differ in (("evit", False), ("text-evit", True)):
            tower = named_plan(rm, "low", method).layers[: rm.tower.num_layers]
            plan = ReductionPlan(method, tower + (LayerSpec(),) * rm.num_fusion_layers)  # fusion untouched
            out = rm(ids, px, mask, plan=plan, track_source=True)
            kept = [set(out.sources[r].argmax(-1).tolist()) for r in range(2)]
            assert (kept[0] != kept[1]) == differ, method
        plan = named_plan(rm, "high", "text-evit")
        batch = rm(ids, px, mask, plan=plan).logits
        single = torch.cat(
            [rm(ids[k : k + 1], px[k : k + 1], mask[k : k + 1], plan=plan).logits for k in range(2)]
        )
    assert (batch - single).abs().max().item() <= 1e-4
    assert rm.flops(plan) == rm.flops(named_plan(rm, "high", "evit"))


def test_text_evit_needs_a_query_at_every_layer_evit_prunes_at():
    assert "text-evit" in reducible(build_two_stream("two-stream-vqa")).methods
    for layers in ((), (1, 2)):  # none, or not at every pruning layer (1, 2, 3 of 4)
        rm = reducible(build_two_stream("two-stream-vqa", text_query_layers=layers))
        assert "text-evit" not in rm.methods
        with pytest.raises(ValueError, match="does not apply"):
            ids, px, mask = inputs(batch=1)
            rm(ids, px, mask, plan=named_plan(reducible(build_two_stream()), "high", "text-evit"))


def test_text_query_pooling_weighs_a_merged_token_as_the_patches_it_stands_for():
    pool = build_two_stream("two-stream-vqa-text-query").two_stream.image_query
    g = torch.Generator().manual_seed(0)
    text, a, b = (torch.randn(2, 1, 32, generator=g) for _ in range(3))
    repeated, _ = pool(text[:, 0], torch.cat([a, b, b], dim=1), torch.ones(2, 3))
    merged, look = pool(text[:, 0], torch.cat([a, b], dim=1), torch.tensor([[1.0, 2.0]] * 2))
    assert torch.allclose(repeated, merged, atol=1e-6)
    assert torch.allclose(look.sum(1), torch.ones(2), atol=1e-6)


def test_two_hop_phrases_weigh_a_merged_text_token_as_the_tokens_it_stands_for_and_skip_padding():
    pool = build_two_stream("two-stream-vqa-two-hop").two_stream.image_query
    g = torch.Generator().manual_seed(0)
    a, b, pad = (torch.randn(2, 1, 32, generator=g) for _ in range(3))
    repeated = pool.phrases(torch.cat([a, b, b], dim=1), torch.ones(2, 3))
    merged = pool.phrases(torch.cat([a, b], dim=1), torch.tensor([[1.0, 2.0]] * 2))
    assert torch.allclose(repeated, merged, atol=1e-6)
    padded = pool.phrases(torch.cat([a, b, pad], dim=1), torch.tensor([[1.0, 1.0, 0.0]] * 2))
    assert torch.allclose(padded, pool.phrases(torch.cat([a, b], dim=1), torch.ones(2, 2)), atol=1e-6)


def two_hop_pool_and_inputs(kind: str, seed: int):
    """A tiny model's two-read pooling and inputs for it: 2 questions of 5 text tokens (their mean
    the pooled text) and 9 image tokens, 32 wide; the generator for more."""
    pool = build_two_stream(kind).two_stream.image_query
    g = torch.Generator().manual_seed(seed)
    tokens, image = torch.randn(2, 5, 32, generator=g), torch.randn(2, 9, 32, generator=g)
    return pool, tokens, tokens.mean(1), image, g


def test_two_hop_second_read_depends_on_the_first_and_each_look_is_a_distribution():
    pool, tokens, text, image, g = two_hop_pool_and_inputs("two-stream-vqa-two-hop", 1)
    reads, looks = pool(tokens, None, text, image, None)
    assert reads.shape == (2, 2, 32) and looks.shape == (2, 2, 9)
    assert torch.allclose(looks.sum(-1), torch.ones(2, 2), atol=1e-6)
    # the first read changes when the image does, and so does the second through its query
    other = image.clone()
    other[:, 4:] = torch.randn(2, 5, 32, generator=g)
    reads2, looks2 = pool(tokens, None, text, other, None)
    assert not torch.allclose(reads[:, 0], reads2[:, 0])
    second_phrase = pool.phrases(tokens, None)[:, 1]
    second_query = text + pool.second_query(torch.cat([text, second_phrase, reads[:, 0]], -1))
    expected, _ = pool.second(second_query, image, None)
    assert torch.allclose(reads[:, 1], expected, atol=1e-6)


def test_placed_two_hop_reads_a_merged_image_token_as_the_patches_it_stands_for():
    pool = build_two_stream("two-stream-vqa-two-hop-placed").two_stream.image_query
    g = torch.Generator().manual_seed(2)
    tokens = torch.randn(2, 5, 32, generator=g)
    a, b = torch.randn(2, 3, 32, generator=g), torch.randn(2, 1, 32, generator=g)
    text = tokens.mean(1)
    repeated, looks = pool(tokens, None, text, torch.cat([a, b, b], dim=1), torch.ones(2, 5))
    merged, merged_looks = pool(
        tokens, None, text, torch.cat([a, b], dim=1), torch.tensor([[1.0] * 3 + [2.0]] * 2)
    )
    assert repeated.shape == (2, 3, 32)  # two reads and their offset
    assert torch.allclose(repeated, merged, atol=1e-5)
    assert torch.allclose(looks[..., 3] + looks[..., 4], merged_looks[..., 3], atol=1e-6)


def test_placed_two_hop_relates_where_the_reads_looked_by_a_phrase_and_steers_the_second_read():
    pool, tokens, text, image, _ = two_hop_pool_and_inputs("two-stream-vqa-two-hop-placed", 3)
    summaries, looks = pool(tokens, None, text, image, None)
    at = looks @ pool.where(image)
    relation = pool.relate(pool.phrases(tokens, None)[:, 2]).view(2, 32, 2)
    assert torch.allclose(summaries[:, 2], (relation @ (at[:, 0] - at[:, 1])[..., None])[..., 0], atol=1e-6)
    # the second read's logits add a learned multiple of each token's distance from the first read
    with torch.no_grad():
        pool.near.weight.zero_()
        pool.near.bias.copy_(torch.tensor([5.0, 0.0] * pool.heads))  # prefer tokens near the first read
    _, near = pool(tokens, None, text, image, None)
    with torch.no_grad():
        pool.near.bias.copy_(torch.tensor([-5.0, 0.0] * pool.heads))  # prefer tokens far from it
    _, far = pool(tokens, None, text, image, None)
    first_at = looks[:, :1] @ pool.where(image)
    distance = (pool.where(image) - first_at).norm(dim=-1)
    assert ((near[:, 1] * distance).sum(-1) < (far[:, 1] * distance).sum(-1)).all()
    assert torch.allclose(near[:, 0], far[:, 0])  # the first read does not depend on it


def test_the_count_is_the_density_of_the_objects_whose_every_attribute_the_question_accepts():
    # three tokens: one object each at the first two (density 1), background at the third
    density = torch.tensor([[1.0, 1.0, 0.0]])
    sure = 30.0  # logits this far apart are a certainty
    colour = torch.tensor([[[sure, 0.0], [0.0, sure], [sure, 0.0]]])  # red, blue, (red)
    shape = torch.tensor([[[sure, 0.0], [sure, 0.0], [0.0, sure]]])  # circle, circle, (square)
    every = torch.ones(1, 2)
    assert counted(density, [colour, shape], [every, every]).item() == pytest.approx(2.0)
    red = torch.tensor([[1.0, 0.0]])
    assert counted(density, [colour, shape], [red, every]).item() == pytest.approx(1.0)
    squares = torch.tensor([[0.0, 1.0]])
    assert counted(density, [colour, shape], [every, squares]).item() == pytest.approx(0.0, abs=1e-6)
    # a token half sure of its object's colour counts half of it
    colour[0, 1] = 0.0
    assert counted(density, [colour, shape], [red, every]).item() == pytest.approx(1.5)


def test_the_count_path_scores_only_the_number_answers():
    model = build_two_stream("two-stream-vqa-counting")
    ids, px, mask = inputs()
    with torch.no_grad():
        before = model(ids, px, mask).logits
        model.two_stream.counter.scale.bias.add_(1.0)
        after = model(ids, px, mask).logits
    numbers = model.config.count_labels
    others = [i for i in range(model.config.num_labels) if i not in numbers]
    assert torch.equal(before[:, others], after[:, others])
    assert not torch.allclose(before[:, numbers], after[:, numbers])
    # the scores are -scale (n - count)^2: their differences between answers are quadratic in n
    reads = len(model.config.read_labels)
    scores = model.two_stream(ids, px, mask).pooler_output[:, -len(numbers) - reads : -reads]
    second = scores[:, 2:] - 2 * scores[:, 1:-1] + scores[:, :-2]
    assert torch.allclose(second, second[:, :1].expand_as(second), atol=1e-4)


def test_the_read_path_reads_the_described_object_and_the_one_nearest_to_it():
    # tokens in a row: the described object at 0, background at 0.2, objects at 0.5 and 1.0
    where = torch.tensor([[[0.0, 0.0], [0.2, 0.0], [0.5, 0.0], [1.0, 0.0]]])
    density = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    described = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    colour = torch.eye(4)[None, :, :3].clone()  # token k's object has colour k (background: none)
    colour[0, 1] = 1 / 3
    own, nearest = read_objects(density, [colour], described, where)
    assert torch.allclose(own[0], torch.tensor([[1.0, 0.0, 0.0]]), atol=1e-4)
    assert torch.allclose(nearest[0], torch.tensor([[0.0, 0.0, 1.0]]), atol=0.01)
    # the object at 0.5 moved past the one at 1.0: that one is the nearest now
    far = where.clone()
    far[0, 2, 0] = 1.6
    assert torch.allclose(
        read_objects(density, [colour], described, far)[1][0], torch.tensor([[0, 0, 0.0]]), atol=0.01
    )
    assert read_objects(density, [torch.eye(4)[None]], described, far)[1][0][0, 3] > 0.98
    # described elsewhere: the object at 1.0 is described, the one at 0.5 is nearest to it
    other = torch.tensor([[0.0, 0.0, 0.0, 1.0]])
    own, nearest = read_objects(density, [torch.eye(4)[None]], other, where)
    assert own[0][0, 3] > 0.98 and nearest[0][0, 2] > 0.98


def test_the_read_path_scores_only_the_attribute_values_answers():
    model = build_two_stream("two-stream-vqa-counting")  # values' labels 4, 5, 6, 4 and none
    ids, px, mask = inputs()
    reader = model.two_stream.reader
    with torch.no_grad():
        reader.weigh.bias.add_(1.0)
        out = model(ids, px, mask)
        scores = out.pooler_output[:, -5:]  # the five values' scores
        reader.weigh.weight.zero_()
        reader.weigh.bias.zero_()
        silent = model(ids, px, mask).logits
        reader.refer[-1].bias.add_(3.0)  # what the question describes matters only through weigh
        assert torch.equal(model(ids, px, mask).logits, silent)
    assert torch.equal(out.logits[:, :4], silent[:, :4])  # the number answers' logits
    added = out.logits - silent
    # label 4 gets the first and the fourth value's scores; the fifth value is no answer
    assert torch.allclose(added[:, 4], scores[:, 0] + scores[:, 3], atol=1e-5)
    assert torch.allclose(added[:, 5:], scores[:, 1:3], atol=1e-5)
    assert (scores[:, :4].abs() > 1e-3).all()


def test_a_count_path_needs_its_labels_and_attributes_together():
    from conftest import two_stream_config

    config = two_stream_config()
    with pytest.raises(ValueError, match="go together"):
        type(config)(**{**config.to_dict(), "count_attributes": [3]})
    counting = two_stream_config(counting=True)
    with pytest.raises(ValueError, match="read path needs a count path"):
        type(counting)(**{**counting.to_dict(), "read_labels": [4, 5]})
