"""The easy-VQA data set (PyPI package `easy-vqa`): images, questions, answers and the facts
(shape, colour) of each image, which captions and class labels are made from.

Facts come from the data set's own questions: an answer that names a shape or colour, a
"what ..." question that names one, or a yes/no question whose truth names or rules one out.
Images whose facts stay ambiguous (about 1 in 9) are left out of the retrieval and
classification sets; every image keeps its questions for VQA.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "gray", "teal", "black", "yellow", "brown")
IMAGE_SIZE = 64


@dataclass(frozen=True)
class Split:
    name: str
    images: np.ndarray  # (num_images, 64, 64, 3) uint8, indexed by image id
    questions: tuple[str, ...]
    answers: tuple[str, ...]
    question_image: np.ndarray  # image id of each question
    facts: dict[int, tuple[str, str]]  # image id -> (shape, colour), only where unambiguous

    def fact_ids(self) -> np.ndarray:
        return np.array(sorted(self.facts), dtype=np.int64)


def answers() -> tuple[str, ...]:
    import easy_vqa

    return tuple(easy_vqa.get_answers())


def class_label(shape: str, color: str) -> str:
    """The class of an image with these facts, e.g. "red circle"."""
    return f"{color} {shape}"


def class_labels() -> tuple[str, ...]:
    """Shape x colour classes, e.g. "red circle"."""
    return tuple(class_label(shape, color) for shape in SHAPES for color in COLORS)


def caption(shape: str, color: str) -> str:
    return f"a {color} {shape}"


def infer_facts(questions, answers_, image_ids) -> dict[int, tuple[str, str]]:
    named: dict[int, set[str]] = {}
    ruled_out: dict[int, set[str]] = {}
    vocabulary = set(SHAPES) | set(COLORS)
    for question, answer, image in zip(questions, answers_, image_ids, strict=True):
        words = question.rstrip("?").split()
        mentioned = [w for w in words if w in vocabulary]
        yes_set, no_set = named.setdefault(image, set()), ruled_out.setdefault(image, set())
        if answer in vocabulary:
            yes_set.add(answer)
        if words[0] == "what":
            yes_set.update(mentioned)
            continue
        true_statement = (answer == "yes") != ("not" in words or "no" in words)
        (yes_set if true_statement else no_set).update(mentioned)
    facts = {}
    for image, yes_set in named.items():
        shape = [s for s in SHAPES if s in yes_set] or [s for s in SHAPES if s not in ruled_out[image]]
        color = [c for c in COLORS if c in yes_set] or [c for c in COLORS if c not in ruled_out[image]]
        if len(shape) == 1 and len(color) == 1:
            facts[image] = (shape[0], color[0])
    return facts


@cache
def load_split(name: str) -> Split:
    """`train` or `test`, as the package splits them (we never tune on test)."""
    import easy_vqa

    questions, answers_, image_ids = getattr(easy_vqa, f"get_{name}_questions")()
    paths = getattr(easy_vqa, f"get_{name}_image_paths")()
    images = np.zeros((len(paths), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for image_id, path in paths.items():
        with Image.open(path) as im:
            images[image_id] = np.asarray(im.convert("RGB"))
    return Split(
        name=name,
        images=images,
        questions=tuple(questions),
        answers=tuple(answers_),
        question_image=np.asarray(image_ids, dtype=np.int64),
        facts=infer_facts(questions, answers_, image_ids),
    )


def vocabulary(split: Split) -> list[str]:
    words = {w for q in split.questions for w in q.replace("?", " ?").split()}
    words |= {w for f in split.facts.values() for w in caption(*f).split()}
    return sorted(words)
