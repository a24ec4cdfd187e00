"""Writing and reading the scenes data set: train / val / test splits from one seed.

Layout of an output folder:

    manifest.json                 generator version, seed, size, counts, answer distributions,
                                  sha256 of every file and of each split's pixels
    <split>/scenes.jsonl          one scene graph per line (id, image, background, objects)
    <split>/questions.jsonl       scene, question, answer, type, targets, target_size
    <split>/captions.jsonl        scene, caption, first, relation, second
    <split>/images/<id>.png       RGB, size x size

Every scene draws from its own seed, derived from (seed, split, index, stream): splits never share
a scene, a smaller set is a prefix of a bigger one, and the same arguments write the same bytes
(JSON lines with sorted keys, PNGs with fixed parameters and no metadata).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from models.demo.scenes.captions import CAPTIONS_PER_SCENE, Caption, captions_for
from models.demo.scenes.graph import REFERENCE, Scene, sample_objects
from models.demo.scenes.questions import QUESTION_TYPES, questions_for
from models.demo.scenes.render import render, sample_background

GENERATOR = "tokenlean scenes"
VERSION = "3"  # bump whenever the same arguments would write different files
# Version 3: a question's targets in the order it names them (version 2 sorted them), so a reader
# can ground "the first object" and "the second"; images, questions and answers are version 2's.
SPLITS = ("train", "val", "test")
DEFAULT_SCENES = {"train": 5000, "val": 500, "test": 1000}
# 120k / 2k / 5k questions. Version 1 asked 4 per training scene: a model learning to look then
# memorised the training scenes instead (docs/demo-models.md); a scene's first 4 are the same.
DEFAULT_QUESTIONS_PER_SCENE = {"train": 24, "val": 4, "test": 5}
SAMPLE_SCENES = {"train": 16, "val": 4, "test": 4}
SAMPLE = Path(__file__).resolve().parents[1] / "scenes_sample"  # checked in; `--sample` rewrites it
PNG = {"format": "PNG", "compress_level": 6, "optimize": False}  # zlib level: fixed, so bytes are too
_STREAMS = {"scene": 0, "questions": 1, "captions": 2}


def rng_for(seed: int, split: str, index: int, stream: str) -> np.random.Generator:
    key = (SPLITS.index(split), index, _STREAMS[stream])
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def scene_id(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def make_scene(seed: int, split: str, index: int) -> Scene:
    rng = rng_for(seed, split, index, "scene")
    background = sample_background(rng)
    return Scene(scene_id(split, index), background, sample_objects(rng))


def _jsonl(records) -> bytes:
    return b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in records)


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, **PNG)
    return buffer.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def distribution(records: list[dict], key: str) -> dict[str, dict[str, int]]:
    """{question type: {value of key: count}} over question records."""
    table: dict[str, Counter] = {kind: Counter() for kind in QUESTION_TYPES}
    for r in records:
        table[r["type"]][r[key]] += 1
    return {kind: dict(sorted(c.items())) for kind, c in table.items() if c}


def generate(
    out: str | Path,
    seed: int = 0,
    size: int = REFERENCE,
    scenes: dict[str, int] | None = None,
    questions_per_scene: int | dict[str, int] | None = None,
    captions_per_scene: int = CAPTIONS_PER_SCENE,
    progress: bool = True,
) -> dict:
    """Write every split under `out` and return the manifest."""
    from tqdm import tqdm

    scenes = {**DEFAULT_SCENES, **(scenes or {})}
    if questions_per_scene is None:
        questions_per_scene = DEFAULT_QUESTIONS_PER_SCENE
    elif isinstance(questions_per_scene, int):
        questions_per_scene = dict.fromkeys(SPLITS, questions_per_scene)
    out = Path(out)
    files: dict[str, str] = {}
    splits: dict[str, dict] = {}
    bar = tqdm(total=sum(scenes[s] for s in SPLITS), desc="scenes", unit="scene", disable=not progress)
    for split in SPLITS:
        folder = out / split
        images = folder / "images"
        images.mkdir(parents=True, exist_ok=True)
        keep = {f"{scene_id(split, i)}.png" for i in range(scenes[split])}
        for stale in images.glob(f"{split}-*.png"):  # left by an earlier, bigger run
            if stale.name not in keep:
                stale.unlink()
        scene_records, question_records, caption_records = [], [], []
        pixels_hash = hashlib.sha256()
        for index in range(scenes[split]):
            scene = make_scene(seed, split, index)
            pixels = render(scene, size)
            pixels_hash.update(pixels.tobytes())
            data = png_bytes(pixels)
            name = f"images/{scene.id}.png"
            (folder / name).write_bytes(data)
            files[f"{split}/{name}"] = _sha256(data)
            scene_records.append({**scene.to_dict(), "image": name})
            asked = questions_for(scene, rng_for(seed, split, index, "questions"), questions_per_scene[split])
            question_records += [q.to_dict(scene.id) for q in asked]
            written = captions_for(scene, rng_for(seed, split, index, "captions"), captions_per_scene)
            caption_records += [c.to_dict(scene.id) for c in written]
            bar.update()
        for name, records in (
            ("scenes.jsonl", scene_records),
            ("questions.jsonl", question_records),
            ("captions.jsonl", caption_records),
        ):
            data = _jsonl(records)
            (folder / name).write_bytes(data)
            files[f"{split}/{name}"] = _sha256(data)
        splits[split] = {
            "scenes": len(scene_records),
            "questions": len(question_records),
            "captions": len(caption_records),
            "pixels_sha256": pixels_hash.hexdigest(),
            "answers": distribution(question_records, "answer"),
            "target_sizes": distribution(question_records, "target_size"),
        }
    bar.close()
    manifest = {
        "generator": GENERATOR,
        "version": VERSION,
        "seed": seed,
        "size": size,
        "questions_per_scene": questions_per_scene,
        "captions_per_scene": captions_per_scene,
        "splits": splits,
        "files": dict(sorted(files.items())),
    }
    (out / "manifest.json").write_bytes(json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n")
    return manifest


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


@dataclass(frozen=True)
class SceneSplit:
    name: str
    scene_ids: tuple[str, ...]
    scenes: tuple[Scene, ...]  # scene graphs, indexed like images
    images: np.ndarray | None  # (num_scenes, size, size, 3) uint8; None when not loaded
    questions: tuple[str, ...]
    answers: tuple[str, ...]
    types: tuple[str, ...]
    target_sizes: tuple[str, ...]
    # per question: the objects (indices into its scene) it names, in the order it names them
    targets: tuple[tuple[int, ...], ...]
    question_image: np.ndarray  # scene index of each question
    captions: tuple[Caption, ...]
    caption_image: np.ndarray  # scene index of each caption

    @property
    def caption_texts(self) -> tuple[str, ...]:
        return tuple(c.text for c in self.captions)


def load_split(folder: str | Path, name: str, images: bool = True) -> SceneSplit:
    """One split of a generated folder (or of SAMPLE): scene graphs, questions, captions and,
    unless images=False, every image as one uint8 array."""
    root = Path(folder) / name
    scene_records = read_jsonl(root / "scenes.jsonl")
    index = {r["id"]: i for i, r in enumerate(scene_records)}
    pixels = None
    if images:
        arrays = []
        for r in scene_records:
            with Image.open(root / r["image"]) as im:
                arrays.append(np.asarray(im.convert("RGB")))
        pixels = np.stack(arrays) if arrays else np.zeros((0, 0, 0, 3), dtype=np.uint8)
    questions = read_jsonl(root / "questions.jsonl")
    captions = read_jsonl(root / "captions.jsonl")
    return SceneSplit(
        name=name,
        scene_ids=tuple(r["id"] for r in scene_records),
        scenes=tuple(Scene.from_dict(r) for r in scene_records),
        images=pixels,
        questions=tuple(q["question"] for q in questions),
        answers=tuple(q["answer"] for q in questions),
        types=tuple(q["type"] for q in questions),
        target_sizes=tuple(q["target_size"] for q in questions),
        targets=tuple(tuple(q["targets"]) for q in questions),
        question_image=np.array([index[q["scene"]] for q in questions], dtype=np.int64),
        captions=tuple(Caption.from_dict(c) for c in captions),
        caption_image=np.array([index[c["scene"]] for c in captions], dtype=np.int64),
    )


def format_distribution(manifest: dict, split: str | None = None) -> str:
    """Answers per question type (summed over splits unless one is named), one line per type."""
    names = [split] if split else list(manifest["splits"])
    table: dict[str, Counter] = {}
    for name in names:
        for kind, answers in manifest["splits"][name]["answers"].items():
            table.setdefault(kind, Counter()).update(answers)
    lines = []
    for kind in QUESTION_TYPES:
        if kind in table:
            total = sum(table[kind].values())
            parts = ", ".join(
                f"{a} {n / total:.0%}" for a, n in sorted(table[kind].items(), key=_answer_order)
            )
            lines.append(f"{kind:>8} {total:>6}  {parts}")
    return "\n".join(lines)


def _answer_order(item: tuple[str, int]):
    answer = item[0]
    return (0, int(answer), "") if answer.isdigit() else (1, 0, answer)


def cached_test_split(seed: int = 0) -> Path:
    """A folder holding the default test split at `seed`, generated on first use under the tower
    cache (models/towers.py cache_root) and reused after: benchmarks and evaluations on the scenes
    set need no prior `tokenlean data scenes`. Other splits are written empty."""
    from models.towers import cache_root

    folder = cache_root() / f"scenes-v{VERSION}-seed{seed}"
    if not (folder / "manifest.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        for stale in folder.parent.glob(folder.name + ".*"):  # left by an interrupted run
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + "."))
        try:
            scenes = {"train": 0, "val": 0, "test": DEFAULT_SCENES["test"]}
            generate(tmp, seed=seed, scenes=scenes, progress=False)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return folder
