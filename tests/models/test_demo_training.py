"""Pieces of the demo training recipes that decide what a model learns."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import build_two_stream, two_stream_config, vilt_inputs
from torch import nn

from models.demo.scenes import ANSWERS as SCENE_ANSWERS
from models.demo.scenes import SAMPLE, load_split
from models.demo.training import Context, Schedule, build_tokenizer, optimise, train_mode
from models.demo.two_stream import (
    COUNT_PATH,
    DENSITY_WEIGHT,
    READ_PATH,
    RELATION_PATH,
    TOWER_SETTINGS,
    TowerCache,
    accept_loss,
    balanced_batches,
    count_loss,
    draw_tower_setting,
    freeze_towers,
    fused_logits,
    grounding_loss,
    grounding_targets,
    locate_loss,
    patch_centres,
    position_loss,
    refer_loss,
    start_as_identity,
    train_counting,
    train_reading,
    train_relations,
    unreduced_fusion,
    with_counting,
    with_placed_reads,
    with_reading,
)
from models.demo.vqa_corpus import question_form, scenes
from models.families.registry import reducible
from models.levels import named_plan
from models.two_stream import TwoStreamForQuestionAnswering


def test_frozen_towers_train_without_dropout():
    tower = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1))
    for p in tower.parameters():
        p.requires_grad_(False)
    model = nn.Sequential(tower, nn.Linear(4, 4), nn.Dropout(0.1))
    model.eval()
    train_mode(model)
    assert not tower.training and not tower[1].training
    assert model.training and model[1].training and model[2].training


def test_question_forms_tell_what_the_wording_gives_away():
    assert question_form("what color is the shape?", "red") == ("open", "color")
    assert question_form("what is the blue shape?", "circle") == ("open", "shape")
    assert question_form("is there a red shape?", "no") == ("yes/no", "color", False, "no")
    assert question_form("is there not a circle in the image?", "yes") == ("yes/no", "shape", True, "yes")
    assert question_form("does the image not contain a triangle?", "no") == ("yes/no", "shape", True, "no")


def test_balanced_batches_draw_every_form_alike():
    # a raw mix where "no" outnumbers "yes" nine to one
    forms = [("yes/no", "color", False, "no")] * 900 + [("yes/no", "color", False, "yes")] * 100
    stream = balanced_batches(forms, 100, np.random.default_rng(0))
    drawn = Counter(forms[i][3] for _ in range(20) for i in next(stream))
    assert 0.45 < drawn["yes"] / 2000 < 0.55


def test_shared_forms_get_their_share_of_every_batch_on_top_of_the_balanced_draw():
    forms = [("count",)] * 700 + [("relation",)] * 100 + [("colour",)] * 100 + [("exist",)] * 100
    stream = balanced_batches(forms, 100, np.random.default_rng(0), {("relation",): 0.5})
    drawn = Counter(forms[i][0] for _ in range(40) for i in next(stream))
    assert 0.59 < drawn["relation"] / 4000 < 0.66  # 0.5 + 0.5 / 4
    assert 0.09 < drawn["count"] / 4000 < 0.16  # 0.5 / 4
    plain, unshared = (
        balanced_batches(forms, 50, np.random.default_rng(1)),
        balanced_batches(forms, 50, np.random.default_rng(1), {}),
    )
    assert all((next(plain) == next(unshared)).all() for _ in range(3))
    with pytest.raises(ValueError, match="shares"):
        next(balanced_batches(forms, 10, np.random.default_rng(0), {("nearest",): 0.5}))


def tiny_scenes_model(tmp_path):
    """A tiny two_hop_placed model answering the scenes set, the sample's training corpus, a
    tokenizer for it and a tower cache of random outputs."""
    split = load_split(SAMPLE, "train")
    corpus = scenes(split, grid=8)
    config = two_stream_config(image_pooling="two_hop_placed")
    config.num_labels = len(SCENE_ANSWERS)
    config.id2label = dict(enumerate(SCENE_ANSWERS))
    config.label2id = {a: i for i, a in enumerate(SCENE_ANSWERS)}
    torch.manual_seed(0)
    model = TwoStreamForQuestionAnswering(config)
    freeze_towers(model)
    words = sorted({w for q in corpus.questions for w in q.rstrip("?").split()} | {"?"})
    tokenizer = build_tokenizer(tmp_path / "tokenizer", words, 16)
    # every tower setting: the same random 64 px tower outputs ([CLS] + 8 x 8 patches)
    x = torch.randn(len(corpus.images), 65, model.config.vision_config.hidden_size).half()
    cache = TowerCache(
        {s: x for s in TOWER_SETTINGS}, {s: torch.ones(x.shape[:2]).half() for s in TOWER_SETTINGS}
    )
    return model, corpus, tokenizer, cache


def run_stage(tmp_path, model, corpus, tokenizer, cache, stage, name: str, steps: int) -> set[str]:
    """Run a training stage a few steps on the tiny model; the parameters it changed. Also checks
    that afterwards the same parameters train as before."""
    ctx = Context(tmp_path, None, 0, 1.0, {"seconds": {}}, {name: Schedule(steps, 8, 1e-2)})
    with torch.inference_mode(False), torch.enable_grad():  # the tests run in inference mode
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trained_before = {n for n, p in model.named_parameters() if p.requires_grad}
        stage(ctx, model, corpus, tokenizer, cache)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trained_before
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def test_the_relation_stage_trains_the_relation_path_and_nothing_else(tmp_path):
    with torch.inference_mode(False):
        model, corpus, tokenizer, cache = tiny_scenes_model(tmp_path)
    changed = run_stage(
        tmp_path, model, corpus, tokenizer, cache, train_relations, "two-stream-scenes-relations", 3
    )
    assert changed and all(n.startswith(RELATION_PATH) for n in changed)
    assert all(any(n.startswith(prefix) for n in changed) for prefix in RELATION_PATH)


def test_the_count_stage_trains_the_count_path_and_nothing_else(tmp_path):
    with torch.inference_mode(False):
        model, corpus, tokenizer, cache = tiny_scenes_model(tmp_path)
        model = with_counting(model, corpus.attribute_values)
    changed = run_stage(
        tmp_path, model, corpus, tokenizer, cache, train_counting, "two-stream-scenes-count", 4
    )
    assert changed and all(n.startswith(COUNT_PATH) for n in changed)
    parts = ("detect", "accept", "scale")  # the detector (count_loss), which values count, how much
    assert all(any(n.startswith(f"two_stream.counter.{part}.") for n in changed) for part in parts)


def test_the_read_stage_trains_the_read_path_and_nothing_else(tmp_path):
    from models.demo.scenes.graph import ATTRIBUTES

    with torch.inference_mode(False):
        model, corpus, tokenizer, cache = tiny_scenes_model(tmp_path)
        model = with_reading(with_counting(model, corpus.attribute_values), ATTRIBUTES.values())
    changed = run_stage(tmp_path, model, corpus, tokenizer, cache, train_reading, "two-stream-scenes-read", 4)
    assert changed and all(n.startswith(READ_PATH) for n in changed)
    parts = ("refer", "locate", "weigh")  # which object is described (refer_loss), where, how much
    assert all(any(n.startswith(f"two_stream.reader.{part}.") for n in changed) for part in parts)


def test_the_refer_loss_is_small_when_the_description_takes_exactly_the_objects_it_names():
    model = build_two_stream("two-stream-vqa-counting")  # attributes of 3 and 2 values
    last = model.two_stream.reader.refer[-1]
    with torch.no_grad():  # whatever the question: the second colour, the first shape
        last.weight.zero_()
        last.bias.copy_(torch.tensor([-30.0, 30.0, -30.0, 30.0, -30.0]))
    question = torch.randn(1, model.config.text_config.hidden_size)
    objects = torch.tensor([[[0, 0], [1, 0], [1, 1], [-1, -1]]])
    assert refer_loss(model, question, objects, torch.tensor([[False, True, False, False]])).item() < 1e-5
    assert refer_loss(model, question, objects, torch.tensor([[True, False, False, True]])).item() > 5


def test_the_locate_loss_is_the_distance_from_each_patch_token_to_its_patch_centre():
    model = build_two_stream("two-stream-vqa-counting")
    locate = model.two_stream.reader.locate
    tower = torch.randn(2, 65, model.config.vision_config.hidden_size)  # [CLS] + 8 x 8 patches
    with torch.no_grad():  # a locate that puts every token at the image centre
        locate[-1].weight.zero_()
        locate[-1].bias.zero_()
    assert locate_loss(model, tower).item() == pytest.approx(patch_centres(8).abs().mean().item(), rel=1e-5)


def test_the_count_loss_weighs_the_density_error_and_the_attributes_of_cells_with_an_object():
    model = build_two_stream("two-stream-vqa-counting")
    image = torch.randn(2, 65, model.config.vision_config.hidden_size)  # vision tower tokens
    density, attributes = model.two_stream.counter.detections(image[:, 1:])
    labels = torch.stack([a.argmax(-1) for a in attributes], -1)
    labels[1] = -100  # the second image has no object: no attribute to learn there
    cross_entropy = sum(
        F.cross_entropy(a[0], labels[0, :, k]).item() for k, a in enumerate(attributes)
    )  # the right attributes' cross-entropy is the smallest there is, and above zero
    assert count_loss(model, image, density, labels).item() == pytest.approx(cross_entropy, rel=1e-5)
    off = count_loss(model, image, density + 0.5, labels).item()
    assert off == pytest.approx(cross_entropy + DENSITY_WEIGHT * 0.25, rel=1e-5)
    nothing = torch.full_like(labels, -100)
    assert count_loss(model, image, density + 0.5, nothing).item() == pytest.approx(DENSITY_WEIGHT * 0.25)


def test_the_accept_loss_is_small_when_the_question_counts_exactly_the_objects_it_is_about():
    model = build_two_stream("two-stream-vqa-counting")  # attributes of 3 and 2 values
    last = model.two_stream.counter.accept[-1]
    with torch.no_grad():  # whatever the question: the first colour, any shape
        last.weight.zero_()
        last.bias.copy_(torch.tensor([30.0, -30.0, -30.0, 30.0, 30.0]))
    question = torch.randn(1, model.config.text_config.hidden_size)
    objects = torch.tensor([[[0, 0], [0, 1], [1, 0], [-1, -1]]])  # three objects, then none
    right = torch.tensor([[True, True, False, False]])
    assert accept_loss(model, question, objects, right).item() < 1e-5
    wrong = torch.tensor([[True, False, True, True]])  # the padding row does not count either way
    assert accept_loss(model, question, objects, wrong).item() > 5


def test_fusion_training_sees_every_tower_method_and_level_and_none_a_quarter_of_the_time():
    assert TOWER_SETTINGS == (
        "none",
        "evit/low",
        "evit/medium",
        "evit/high",
        "tome/low",
        "tome/medium",
        "tome/high",
    )
    rng = random.Random(0)
    drawn = Counter(draw_tower_setting(rng) for _ in range(4000))
    assert set(drawn) == set(TOWER_SETTINGS)
    assert 0.22 < drawn["none"] / 4000 < 0.28


@torch.inference_mode(False)
def test_lr_scales_slow_down_the_parts_named():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(16, 4)
    optimise(model, Schedule(5, 16, 1e-2), lambda step: model(x).pow(2).mean(), "t", [(model[0], 0.0)])
    after = list(model.parameters())
    assert all(torch.equal(b, a) for b, a in zip(before[:2], after[:2], strict=True))  # frozen by scale 0
    assert not any(torch.equal(b, a) for b, a in zip(before[2:], after[2:], strict=True))


def test_fusion_layers_that_start_as_identity_pass_the_towers_outputs_through():
    model = build_two_stream("two-stream-vqa")
    start_as_identity(model)
    inputs = vilt_inputs()
    base = model.two_stream
    text = base.text_tokens(inputs["input_ids"], inputs["attention_mask"])
    t, i = base.enter(text, base.vision_tokens(inputs["pixel_values"]))
    out = base(**inputs)
    assert torch.allclose(out.text_hidden_state, base.text_norm(t), atol=1e-6)
    assert torch.allclose(out.image_hidden_state, base.image_norm(i), atol=1e-6)


def test_grounding_loss_is_minus_log_the_attention_mass_on_the_named_objects():
    patches = torch.zeros(3, 8, dtype=torch.bool)
    patches[0, :2] = True  # two patches named
    patches[1, 5] = True
    # nothing named in row 2 ("is there a red star?" -> no): it does not count
    on_target = torch.zeros(3, 9)  # [CLS] first
    on_target[0, 1:3] = torch.tensor([0.9, 0.1])  # inside the named patches, however spread
    on_target[1, 6] = 1.0
    on_target[2, 0] = 1.0
    assert grounding_loss([on_target], patches).item() == pytest.approx(0.0, abs=1e-6)
    uniform = torch.full((3, 9), 1 / 9)
    expected = -(np.log(2 / 9) + np.log(1 / 9)) / 2
    assert grounding_loss([uniform, on_target], patches).item() == pytest.approx(expected / 2, rel=1e-5)
    assert grounding_loss([uniform], torch.zeros(3, 8, dtype=torch.bool)) is None
    # one target per look: the second look is graded on its own patches
    elsewhere = torch.zeros(3, 8, dtype=torch.bool)
    elsewhere[0, 7], elsewhere[1, 0] = True, True
    assert grounding_loss([on_target, on_target], [patches, elsewhere]).item() == pytest.approx(
        -np.log(1e-6) / 2, rel=1e-5
    )


def test_two_reads_are_grounded_each_on_its_own_object():
    split = load_split(SAMPLE, "train")
    corpus = scenes(split, grid=16)
    pairs = np.array([len(t) == 2 for t in split.targets])
    questions = np.flatnonzero(pairs)[:4]
    assert len(grounding_targets(corpus, questions, layers=2, reads=0)) == 2  # "cls": no read
    one = grounding_targets(corpus, questions, layers=2, reads=1)
    two = grounding_targets(corpus, questions, layers=2, reads=2)
    assert (len(one), len(two)) == (3, 4)  # 2 fusion layers' looks, then 1 or 2 reads
    for target in (*one, *two[:2]):
        assert (target.numpy() == corpus.grounding[questions]).all()
    for k in (0, 1):
        assert (two[2 + k].numpy() == corpus.object_grounding[questions, k]).all()
        assert not (two[2 + k].numpy() == corpus.grounding[questions]).all()


@pytest.mark.parametrize(
    "kind",
    [
        "two-stream-vqa",
        "two-stream-vqa-text-query",
        "two-stream-vqa-two-hop",
        "two-stream-vqa-two-hop-placed",
    ],
)
def test_the_grounded_forward_is_the_unreduced_fused_forward(kind):
    rm = reducible(build_two_stream(kind))
    inputs = vilt_inputs()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    x = rm.base.vision_tokens(inputs["pixel_values"])
    size = torch.ones(x.shape[:2])
    logits, looks, _ = unreduced_fusion(rm, ids, mask, x)
    assert torch.allclose(logits, fused_logits(rm, ids, mask, x, size, "none", "none"), atol=1e-5)
    assert (
        len(looks)
        == rm.num_fusion_layers + {"vqa": 0, "query": 1, "hop": 2, "placed": 2}[kind.rpartition("-")[2]]
    )
    for look in looks:
        assert look.shape == x.shape[:2] and torch.allclose(look.sum(1), torch.ones(len(x)), atol=1e-5)
    # the recipe grounds each look on its own target (the tiny model's 8 x 8 grid, sample scenes)
    corpus = scenes(load_split(SAMPLE, "train"), grid=8)
    layers = rm.num_fusion_layers
    targets = grounding_targets(corpus, np.arange(len(x)) + 5, layers, len(looks) - layers)
    assert len(targets) == len(looks) and all(t.shape == (len(x), 64) for t in targets)


def test_train_demo_only_names_a_family_with_a_recipe(tmp_path):
    from app.cli import main

    with pytest.raises(SystemExit) as refused:
        main(["train-demo", "--only", "nope", "--out", str(tmp_path)])
    assert "two-stream" in str(refused.value) and "'nope'" in str(refused.value)
    assert not any(tmp_path.iterdir())


def test_the_position_loss_is_zero_when_the_position_map_gives_each_patch_its_centre():
    model = build_two_stream("two-stream-vqa-two-hop-placed")  # 64 px, 8 px patches: an 8 x 8 grid
    where = model.two_stream.image_query.where
    centres = patch_centres(8)
    assert centres[0].tolist() == [-0.875, -0.875] and centres[1].tolist() == [-0.625, -0.875]  # raster
    with torch.no_grad():
        where.weight.zero_()
        where.weight[0, 0] = where.weight[1, 1] = 1.0  # read (x, y) from the first two channels
        where.bias.zero_()
    image = torch.randn(2, 65, 32)  # [CLS], then the patches
    image[:, 1:, :2] = centres
    assert position_loss(model, image).item() == 0
    image[:, 1:, :2] = centres.flip(0)
    assert position_loss(model, image).item() > 0.1


@pytest.mark.parametrize(("level", "method"), [("none", None), ("high", "pumer"), ("medium", "tome")])
def test_a_two_hop_model_grown_into_placed_reads_answers_as_it_did(level, method):
    two_hop = build_two_stream("two-stream-vqa-two-hop")
    grown = with_placed_reads(two_hop).eval()
    assert grown.config.image_pooling == "two_hop_placed" and grown.config.image_reads == 3
    inputs = vilt_inputs()
    ids, px, mask = inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"]
    before, after = reducible(two_hop), reducible(grown)
    plan = named_plan(before, level, method)
    expected = before(ids, px, mask, plan=plan).logits
    assert torch.allclose(after(ids, px, mask, plan=plan).logits, expected, atol=1e-5)
    # what it has to learn is trainable, the towers are not
    trainable = {n for n, p in grown.named_parameters() if p.requires_grad}
    assert {"two_stream.image_query.where.weight", "two_stream.image_query.relate.weight"} <= trainable
    assert not any(n.startswith(("two_stream.vision.", "two_stream.text.")) for n in trainable)


def assert_grown_answers_as_before(model, grown, level: str, method: str | None, new: set[str]) -> None:
    """`grown` answers exactly as `model` under the method at the level; the `new` parameters
    train, the towers do not."""
    inputs = vilt_inputs()
    ids, px, mask = inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"]
    before, after = reducible(model), reducible(grown)
    plan = named_plan(before, level, method)
    assert torch.equal(after(ids, px, mask, plan=plan).logits, before(ids, px, mask, plan=plan).logits)
    trainable = {n for n, p in grown.named_parameters() if p.requires_grad}
    assert new <= trainable
    assert not any(n.startswith(("two_stream.vision.", "two_stream.text.")) for n in trainable)


@pytest.mark.parametrize(("level", "method"), [("none", None), ("high", "pumer"), ("medium", "tome")])
def test_a_model_grown_a_count_path_answers_as_it_did(level, method):
    placed = build_two_stream("two-stream-vqa-two-hop-placed")
    placed.config.id2label = {0: "yes", 1: "no", 2: "0", 3: "1", 4: "2", 5: "red", 6: "blue"}
    placed.config.label2id = {a: i for i, a in placed.config.id2label.items()}
    grown = with_counting(placed, (3, 2)).eval()
    assert grown.config.count_labels == [2, 3, 4] and grown.config.count_attributes == [3, 2]
    new = {"two_stream.counter.detect.0.weight", "two_stream.counter.scale.weight"}
    assert_grown_answers_as_before(placed, grown, level, method, new)
    with pytest.raises(ValueError, match="already has a count path"):
        with_counting(grown, (3, 2))


@pytest.mark.parametrize(
    ("level", "method"), [("none", None), ("high", "pumer"), ("medium", "tome"), ("high", "evit")]
)
def test_a_model_grown_a_read_path_answers_as_it_did(level, method):
    placed = build_two_stream("two-stream-vqa-two-hop-placed")
    answers = ["yes", "no", "0", "1", "2", "red", "circle"]
    placed.config.id2label = dict(enumerate(answers))
    placed.config.label2id = {a: i for i, a in enumerate(answers)}
    counting = with_counting(placed, (3, 2)).eval()
    grown = with_reading(counting, [("red", "green", "blue"), ("circle", "star")]).eval()
    assert grown.config.read_labels == [5, -1, -1, 6, -1]
    new = {"two_stream.reader.locate.1.weight", "two_stream.reader.weigh.weight"}
    assert_grown_answers_as_before(counting, grown, level, method, new)
    with pytest.raises(ValueError, match="without a read path"):
        with_reading(grown, [("red", "green", "blue"), ("circle", "star")])
    with pytest.raises(ValueError, match="with a count path"):
        with_reading(placed, [("red", "green", "blue"), ("circle", "star")])
    with pytest.raises(ValueError, match="attribute values"):
        with_reading(counting, [("red", "green"), ("circle", "star")])


def test_a_model_without_number_answers_grows_no_count_path():
    with pytest.raises(ValueError, match="no number answers"):
        with_counting(build_two_stream("two-stream-vqa-two-hop-placed"), (3, 2))


def test_only_a_two_hop_model_grows_placed_reads():
    with pytest.raises(ValueError, match="two_hop"):
        with_placed_reads(build_two_stream("two-stream-vqa-text-query"))
