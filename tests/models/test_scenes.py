"""The scenes data set (models/demo/scenes): deterministic files, answers right by an independent
reading of each question against the scene graph, unique referents, small objects under one
16 px patch, a closed answer vocabulary, disjoint splits, a checked-in sample that is not stale,
and a torch-free command."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.demo.scenes import (
    ANSWERS,
    COLORS,
    QUESTION_TYPES,
    SAMPLE,
    SAMPLE_SCENES,
    SHAPES,
    SIZES,
    SPLITS,
    TARGET_SIZES,
    VERSION,
    Caption,
    Obj,
    Scene,
    generate,
    hard_negatives,
    load_split,
    make_scene,
    questions_for,
    render,
)
from models.demo.scenes.dataset import rng_for
from models.demo.scenes.graph import ATTRIBUTES, centre_density, covered_patches
from models.demo.vqa_corpus import scenes as scenes_corpus

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"train": 4, "val": 2, "test": 2}
PLURAL = {"circles": "circle", "squares": "square", "triangles": "triangle", "stars": "star"}
PLURAL |= {"diamonds": "diamond", "crosses": "cross"}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scenes")
    generate(out, seed=3, scenes=SMALL, questions_per_scene=6, progress=False)
    return out


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def records(folder: Path, split: str, name: str) -> list[dict]:
    return [json.loads(line) for line in (folder / split / name).read_text().splitlines()]


# --- an independent reading of questions and captions, on plain dicts ---------------------------


def described(objects: list[dict], words: list[str]) -> list[dict]:
    """Objects fitting words such as ["small", "red", "star"] or ["red", "object"]."""
    found = objects
    for word in words:
        if word in SIZES:
            found = [o for o in found if o["size"] == word]
        elif word in COLORS:
            found = [o for o in found if o["color"] == word]
        elif word in SHAPES:
            found = [o for o in found if o["shape"] == word]
        else:
            assert word == "object", word
    return found


def the(objects: list[dict], phrase: str) -> dict:
    found = described(objects, phrase.split())
    assert len(found) == 1, f"'the {phrase}' names {len(found)} objects"
    return found[0]


def box(o: dict) -> tuple[float, float, float, float]:
    half = o["extent"] / 2
    return o["x"] - half, o["y"] - half, o["x"] + half, o["y"] + half


def strictly(relation: str, a: dict, b: dict) -> bool:
    """a's box lies wholly on that side of b's box."""
    ax0, ay0, ax1, ay1 = box(a)
    bx0, by0, bx1, by1 = box(b)
    return {"left of": ax1 < bx0, "right of": ax0 > bx1, "above": ay1 < by0, "below": ay0 > by1}[relation]


REVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
RANK = {"small": 0, "medium": 1, "large": 2}


def expected_answer(question: str, objects: list[dict]) -> str:
    """The answer, worked out from the question's words and the scene's objects alone."""
    if m := re.fullmatch(r"is there an? (.+)\?", question):
        return "yes" if described(objects, m[1].split()) else "no"
    if m := re.fullmatch(r"how many (.+) are there\?", question):
        words = m[1].split()
        words[-1] = PLURAL.get(words[-1], "object" if words[-1] == "objects" else words[-1])
        return str(len(described(objects, words)))
    if m := re.fullmatch(r"what (color|shape) is the object nearest to the (.+)\?", question):
        ref = the(objects, m[2])
        others = sorted(
            (o for o in objects if o is not ref), key=lambda o: np.hypot(o["x"] - ref["x"], o["y"] - ref["y"])
        )
        d = [np.hypot(o["x"] - ref["x"], o["y"] - ref["y"]) for o in others[:2]]
        assert d[1] - d[0] >= 10, f"nearest to the {m[2]} is a close call: {d}"
        return others[0][m[1]]
    if m := re.fullmatch(r"what color is the (.+)\?", question):
        return the(objects, m[1])["color"]
    if m := re.fullmatch(r"what shape is the (.+)\?", question):
        return the(objects, m[1])["shape"]
    if m := re.fullmatch(r"what size is the (.+)\?", question):
        return the(objects, m[1])["size"]
    if m := re.fullmatch(r"is the (.+) (left of|right of|above|below) the (.+)\?", question):
        a, b = the(objects, m[1]), the(objects, m[3])
        if strictly(m[2], a, b):
            return "yes"
        assert strictly(REVERSE[m[2]], a, b), f"{question} is a close call"
        return "no"
    if m := re.fullmatch(r"is the (.+) (bigger|smaller) than the (.+)\?", question):
        a, b = the(objects, m[1]), the(objects, m[3])
        assert a["size"] != b["size"], f"{question}: both {a['size']}"
        return "yes" if (RANK[a["size"]] > RANK[b["size"]]) == (m[2] == "bigger") else "no"
    raise AssertionError(f"unknown question form: {question}")


def caption_true(caption: dict, objects: list[dict], relation_holds) -> bool:
    firsts = described(objects, list(caption["first"].values()))
    seconds = described(objects, list(caption["second"].values()))
    return any(a is not b and relation_holds(caption["relation"], a, b) for a in firsts for b in seconds)


def by_centres(relation: str, a: dict, b: dict) -> bool:
    return {
        "left of": a["x"] < b["x"],
        "right of": a["x"] > b["x"],
        "above": a["y"] < b["y"],
        "below": a["y"] > b["y"],
    }[relation]


# --- the tests ----------------------------------------------------------------------------------


def test_same_seed_writes_identical_files_and_another_seed_does_not(small_set, tmp_path):
    again = tmp_path / "again"
    generate(again, seed=3, scenes=SMALL, questions_per_scene=6, progress=False)
    first, second = files_of(small_set), files_of(again)
    assert first.keys() == second.keys()
    assert all(first[name] == second[name] for name in first), "the same seed wrote different bytes"
    other = tmp_path / "other"
    generate(other, seed=4, scenes=SMALL, questions_per_scene=6, progress=False)
    third = files_of(other)
    for name in first:
        if name.endswith((".png", ".jsonl")):
            assert first[name] != third[name], f"{name} did not change with the seed"


def test_manifest_lists_every_file_with_its_hash(small_set):
    import hashlib

    manifest = json.loads((small_set / "manifest.json").read_text())
    assert manifest["version"] == VERSION and manifest["seed"] == 3
    written = {k for k in files_of(small_set) if k != "manifest.json"}
    assert set(manifest["files"]) == written
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((small_set / name).read_bytes()).hexdigest() == digest
    for split in SPLITS:
        assert manifest["splits"][split]["scenes"] == SMALL[split]
        assert manifest["splits"][split]["questions"] == 6 * SMALL[split]


def test_every_answer_is_right_and_every_referent_unique(small_set):
    checked = Counter()
    for split in SPLITS:
        scenes = {r["id"]: r["objects"] for r in records(small_set, split, "scenes.jsonl")}
        for q in records(small_set, split, "questions.jsonl"):
            objects = scenes[q["scene"]]
            assert q["answer"] == expected_answer(q["question"], objects), q
            assert q["target_size"] in TARGET_SIZES
            targets = [objects[i] for i in q["targets"]]
            sizes = {o["size"] for o in targets}
            assert q["target_size"] == (sizes.pop() if len(sizes) == 1 else "multiple" if sizes else "none")
            checked[q["type"]] += 1
    # Many more scenes than the written set, in memory: every type, every form.
    for index in range(150):
        scene = make_scene(11, "train", index)
        objects = scene.to_dict()["objects"]
        for q in questions_for(scene, rng_for(11, "train", index, "questions"), 6):
            assert q.answer == expected_answer(q.text, objects), (scene.id, q)
            checked[q.type] += 1
    assert set(checked) == set(QUESTION_TYPES), checked


def test_answer_vocabulary_is_closed(small_set):
    assert len(ANSWERS) == len(set(ANSWERS))
    assert {"yes", "no", *map(str, range(11)), *COLORS, *SHAPES, *SIZES} == set(ANSWERS)
    for split in SPLITS:
        for q in records(small_set, split, "questions.jsonl"):
            assert q["answer"] in ANSWERS and q["type"] in QUESTION_TYPES


def test_answers_are_balanced():
    answers: dict[str, Counter] = {}
    for index in range(400):
        scene = make_scene(5, "train", index)
        for q in questions_for(scene, rng_for(5, "train", index, "questions"), 4):
            answers.setdefault(q.type, Counter())[q.answer] += 1
    for kind in ("exist", "relation", "compare"):
        share = answers[kind]["yes"] / sum(answers[kind].values())
        assert 0.42 < share < 0.58, (kind, answers[kind])
    counts = answers["count"]
    assert max(counts.values()) / sum(counts.values()) < 0.35, counts  # not "1" nearly always
    assert sum(n for a, n in counts.items() if int(a) >= 3) / sum(counts.values()) > 0.2
    for kind in ("color", "shape", "size"):
        assert max(answers[kind].values()) / sum(answers[kind].values()) < 0.5, answers[kind]


def test_scenes_keep_to_their_rules():
    for index in range(200):
        scene = make_scene(7, "val", index)
        assert 3 <= len(scene.objects) <= 10
        for o in scene.objects:
            x0, y0, x1, y1 = box(o.to_dict())
            assert 0 <= x0 and 0 <= y0 and x1 <= 224 and y1 <= 224, o
            if o.size == "small":
                assert o.extent < 16
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1 :]:
                ax0, ay0, ax1, ay1 = box(a.to_dict())
                bx0, by0, bx1, by1 = box(b.to_dict())
                inter = max(0, min(ax1, bx1) - max(ax0, bx0)) * max(0, min(ay1, by1) - max(ay0, by0))
                assert inter <= 0.1 * min(a.extent, b.extent) ** 2
                if a.color == b.color:
                    assert inter == 0


@pytest.mark.parametrize("size", [224, 448])
@pytest.mark.parametrize("shape", SHAPES)
def test_a_small_object_covers_less_than_one_patch(shape, size):
    plain = {"kind": "plain", "rgb": [220, 220, 220]}
    obj = Obj(shape, "black", "small", 100.25, 60.75, 14.0, (30, 30, 30))
    pixels = render(Scene("one", plain, (obj,)), size).astype(int)
    ys, xs = np.nonzero(np.abs(pixels - 220).max(axis=2) > 4)
    patch = 16 * size / 224
    assert 0 < xs.max() - xs.min() + 1 < patch and 0 < ys.max() - ys.min() + 1 < patch
    # Anti-aliased: edge pixels lie between the background and the object's colour.
    values = pixels[..., 0]
    assert np.sum((values > 40) & (values < 210)) > 10


def test_backgrounds_cannot_be_taken_for_objects():
    colours = np.array(list(COLORS.values()), dtype=float)
    for index in range(40):
        scene = make_scene(9, "test", index)
        background = render(Scene("bg", scene.background, ()), 224).reshape(-1, 3).astype(float)
        chroma = background.max(axis=1) - background.min(axis=1)
        assert chroma.max() <= 30, scene.background
        sample = background[::97]
        distance = np.linalg.norm(sample[:, None, :] - colours[None], axis=2)
        assert distance.min() > 80, scene.background


def test_splits_never_share_a_scene(small_set):
    seen_ids, seen_graphs = set(), set()
    for split in SPLITS:
        for r in records(small_set, split, "scenes.jsonl"):
            graph = json.dumps(r["objects"], sort_keys=True)
            assert r["id"] not in seen_ids and graph not in seen_graphs
            seen_ids.add(r["id"])
            seen_graphs.add(graph)
    for index in range(50):  # the same index in two splits is two scenes
        assert make_scene(0, "train", index).objects != make_scene(0, "test", index).objects


def test_captions_are_true_specific_and_their_hard_negatives_false(small_set):
    scenes = {}
    captions = []
    for split in SPLITS:
        scenes |= {r["id"]: r for r in records(small_set, split, "scenes.jsonl")}
        captions += records(small_set, split, "captions.jsonl")
    assert captions
    for c in captions:
        objects = scenes[c["scene"]]["objects"]
        assert caption_true(c, objects, strictly), c
        others = [s["objects"] for sid, s in scenes.items() if sid != c["scene"]]
        assert sum(caption_true(c, o, by_centres) for o in others) <= len(others) // 4
        scene = Scene.from_dict(scenes[c["scene"]])
        negatives = hard_negatives(scene, Caption.from_dict(c))
        assert len(negatives) >= 10
        for n in negatives:
            record = {"first": n.first, "relation": n.relation, "second": n.second}
            assert not caption_true(record, objects, by_centres), n.text
            changed = sum(n.first[k] != c["first"][k] for k in n.first)
            changed += sum(n.second[k] != c["second"][k] for k in n.second)
            assert changed + (n.relation != c["relation"]) == 1


def test_load_split_reads_the_sample():
    split = load_split(SAMPLE, "train")
    assert split.images.shape == (SAMPLE_SCENES["train"], 224, 224, 3) and split.images.dtype == np.uint8
    assert len(split.questions) == len(split.answers) == len(split.types) == len(split.question_image)
    assert split.question_image.max() < len(split.scenes)
    assert len(split.captions) == len(split.caption_image) > 0
    assert load_split(SAMPLE, "test", images=False).images is None


def test_covered_patches_are_the_grid_cells_an_objects_box_reaches_into():
    # 224 px in a 16 x 16 grid: 14 px cells. Box x 20-40, y 3-13 -> columns 1-2, row 0.
    obj = Obj("square", "red", "medium", x=30.0, y=8.0, extent=10.0, rgb=(255, 0, 0))
    cells = covered_patches([obj], 16).reshape(16, 16)
    assert sorted(zip(*np.nonzero(cells), strict=True)) == [(0, 1), (0, 2)]
    corner = Obj("star", "red", "small", x=212.0, y=221.0, extent=12.0, rgb=(255, 0, 0))  # y to 227
    assert np.flatnonzero(covered_patches([corner], 16)).tolist() == [15 * 16 + 14, 15 * 16 + 15]
    assert not covered_patches([], 16).any()


def test_centre_density_gives_each_object_a_unit_mass_around_its_centre():
    # 14 px cells: a centre on a cell's centre puts all its mass there; one on the corner where
    # four cells meet, a quarter in each
    on_centre = Obj("circle", "blue", "small", x=21.0, y=7.0, extent=12.0, rgb=(0, 0, 255))
    corner = Obj("star", "red", "large", x=56.0, y=56.0, extent=40.0, rgb=(255, 0, 0))
    density, attributes = centre_density([on_centre, corner], 16)
    grid = density.reshape(16, 16)
    assert grid[0, 1] == 1.0 and grid.sum() == pytest.approx(2.0)
    assert grid[3:5, 3:5].tolist() == [[0.25, 0.25], [0.25, 0.25]]
    values = [ATTRIBUTES[k].index(v) for k, v in (("color", "blue"), ("shape", "circle"), ("size", "small"))]
    assert attributes[1].tolist() == values
    assert (attributes[density == 0] == -100).all()
    # mass past the border stays in the edge cells
    edge = Obj("square", "green", "small", x=3.0, y=3.0, extent=6.0, rgb=(0, 255, 0))
    assert centre_density([edge], 16)[0].reshape(16, 16)[0, 0] == pytest.approx(1.0)
    split = load_split(SAMPLE, "train")
    corpus = scenes_corpus(split, grid=16)
    assert corpus.count_density.sum(axis=1) == pytest.approx([len(s.objects) for s in split.scenes])
    assert corpus.attribute_values == tuple(len(v) for v in ATTRIBUTES.values())
    # each image's objects' attributes, and the objects each question is about
    first = split.scenes[0].objects
    assert (corpus.object_attributes[0, len(first) :] == -1).all()
    assert corpus.object_attributes[0, 0].tolist() == [
        ATTRIBUTES[k].index(getattr(first[0], k)) for k in ATTRIBUTES
    ]
    # ... and those its first description names: of two objects, the first-named
    for q in range(len(split.questions)):
        assert np.flatnonzero(corpus.question_objects[q]).tolist() == sorted(split.targets[q])
        named = (
            split.targets[q][:1] if split.types[q] in ("relation", "nearest", "compare") else split.targets[q]
        )
        assert np.flatnonzero(corpus.question_referents[q]).tolist() == sorted(named)
    assert {"nearest", "count"} <= set(split.types)


def test_grounding_marks_the_cells_under_every_object_a_question_names():
    split = load_split(SAMPLE, "train")
    corpus = scenes_corpus(split, grid=16)
    assert corpus.grounding.shape == (len(split.questions), 256)
    assert scenes_corpus(split).grounding is None
    for q, (image, targets) in enumerate(zip(split.question_image, split.targets, strict=True)):
        row = corpus.grounding[q].reshape(16, 16)
        assert row.any() == bool(targets)
        for t in targets:
            o = split.scenes[image].objects[t]
            assert row[int(o.y // 14), int(o.x // 14)]  # the cell under its centre
    kept = corpus.first_images(3)
    assert len(kept.grounding) == len(kept.questions) == len(kept.object_grounding)


def named_in_order(question: str, objects: list[dict]) -> list[dict] | None:
    """The two objects a relation, nearest or compare question is about, in the order it names
    them; None for other forms."""
    pair = r"is the (.+) (?:left of|right of|above|below|bigger than|smaller than) the (.+)\?"
    if m := re.fullmatch(pair, question):
        return [the(objects, m[1]), the(objects, m[2])]
    if m := re.fullmatch(r"what (color|shape) is the object nearest to the (.+)\?", question):
        ref = the(objects, m[2])
        others = [o for o in objects if o is not ref]
        return [ref, min(others, key=lambda o: np.hypot(o["x"] - ref["x"], o["y"] - ref["y"]))]
    return None


def test_two_object_questions_list_their_objects_in_the_order_they_name_them():
    seen = Counter()
    for index in range(120):
        scene = make_scene(13, "train", index)
        objects = scene.to_dict()["objects"]
        for q in questions_for(scene, rng_for(13, "train", index, "questions"), 8):
            pair = named_in_order(q.text, objects)
            if pair is not None:
                assert [objects[t] for t in q.targets] == pair, q
                seen[q.type] += 1
    assert set(seen) == {"relation", "nearest", "compare"} and min(seen.values()) > 30, seen


def test_object_grounding_grounds_each_of_two_named_objects_apart():
    split = load_split(SAMPLE, "train")
    corpus = scenes_corpus(split, grid=16)
    assert corpus.object_grounding.shape == (len(split.questions), 2, 256)
    for q, (image, targets) in enumerate(zip(split.question_image, split.targets, strict=True)):
        first, second = corpus.object_grounding[q]
        if len(targets) != 2:
            assert (first == corpus.grounding[q]).all() and (second == corpus.grounding[q]).all()
            continue
        for row, t in zip((first, second), targets, strict=True):
            assert (row == covered_patches([split.scenes[image].objects[t]], 16)).all()
        assert ((first | second) == corpus.grounding[q]).all()


def test_the_checked_in_sample_is_what_the_generator_writes_now(tmp_path):
    manifest = json.loads((SAMPLE / "manifest.json").read_text())
    assert manifest["version"] == VERSION, "the generator's version changed: regenerate the sample"
    fresh = generate(
        tmp_path,
        seed=manifest["seed"],
        size=manifest["size"],
        scenes=SAMPLE_SCENES,
        questions_per_scene=manifest["questions_per_scene"],
        progress=False,
    )
    # PNG bytes depend on the zlib build; the pixels and every other byte must not.
    assert {k: v for k, v in fresh.items() if k != "files"} == {
        k: v for k, v in manifest.items() if k != "files"
    }
    stale = "stale sample: regenerate with `tokenlean data scenes --sample --out models/demo/scenes_sample`"
    assert set(fresh["files"]) == set(manifest["files"]), stale
    for name in fresh["files"]:
        if name.endswith(".png"):
            with Image.open(SAMPLE / name) as old, Image.open(tmp_path / name) as new:
                assert np.array_equal(np.asarray(old), np.asarray(new)), f"{stale} ({name})"
        else:
            assert (SAMPLE / name).read_bytes() == (tmp_path / name).read_bytes(), f"{stale} ({name})"
    size = sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file())
    assert size < 1_000_000


def test_the_command_writes_a_set(tmp_path, capsys):
    from app.cli import main

    main(["data", "scenes", "--out", str(tmp_path), "--seed", "2", "--size", "96", "--train-scenes", "2"]
         + ["--val-scenes", "1", "--test-scenes", "1", "--questions-per-scene", "3", "--quiet"])  # fmt: skip
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["seed"] == 2 and manifest["splits"]["train"]["questions"] == 6
    with Image.open(tmp_path / "val" / "images" / "val-000000.png") as im:
        assert im.size == (96, 96) and im.mode == "RGB"
    assert "answers per question type" in capsys.readouterr().out


def test_the_command_and_the_generator_import_no_tensor_library():
    code = (
        "import sys\nimport models.demo.data_cli, models.demo.scenes\nfrom app.cli import main\n"
        "try:\n    main(['data', 'scenes', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
