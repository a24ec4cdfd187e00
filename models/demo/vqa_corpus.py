"""What the two-stream recipe trains VQA on, whatever the data set: images, questions with their
answers and images, the answer vocabulary, and the form of each question (batches draw every form
alike). Built from easy-VQA (the defaults) or from the scenes set (`tokenlean data scenes`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.demo import data
from models.demo.scenes import ANSWERS as SCENE_ANSWERS
from models.demo.scenes import SceneSplit
from models.demo.scenes.graph import ATTRIBUTES, MAX_OBJECTS, centre_density, covered_patches

TWO_OBJECT_TYPES = ("relation", "nearest", "compare")  # scene question types naming two objects


@dataclass(frozen=True)
class VQACorpus:
    name: str
    images: np.ndarray  # (N, H, W, 3) uint8
    questions: tuple[str, ...]
    answers: tuple[str, ...]
    question_image: np.ndarray  # image index of each question
    vocabulary: tuple[str, ...]  # the answer classes, in head order
    forms: tuple[tuple, ...]  # per question: what batches balance over
    # (questions, patches) bool: the image patches of the objects each question names (raster
    # order); None when the data has no scene graphs (easy-VQA). Questions naming nothing that is
    # there ("is there a red star?" -> no) have an empty row.
    grounding: np.ndarray | None = None
    # (questions, 2, patches) bool: the patches of the object a question names first, then of the
    # other, for questions about two objects (relation, nearest, compare); both rows `grounding`'s
    # for the rest. What a two-read image pooling is grounded on ("two_hop").
    object_grounding: np.ndarray | None = None
    # Per image, where its objects' centres are and their attributes (graph.centre_density): what a
    # count path is trained on; None without scene graphs. attribute_values: how many values each
    # attribute takes.
    count_density: np.ndarray | None = None  # (images, patches) float32
    count_attributes: np.ndarray | None = None  # (images, patches, attributes) int64, -100: none
    attribute_values: tuple[int, ...] = ()
    # Per image its objects' attributes (images, MAX_OBJECTS, attributes) int64, -1 past the last;
    # per question the objects it is about (questions, MAX_OBJECTS) bool: for a counting question
    # the objects it counts. What a count path learns which objects a question counts from.
    object_attributes: np.ndarray | None = None
    question_objects: np.ndarray | None = None
    # (questions, MAX_OBJECTS) bool: the objects the question's first description names (for
    # "nearest", relation and size comparison the first-named object; otherwise question_objects):
    # what a read path learns which object a question describes from.
    question_referents: np.ndarray | None = None

    def first_images(self, n: int) -> VQACorpus:
        """The corpus cut to its first n images and their questions."""
        keep = np.flatnonzero(self.question_image < n)
        return VQACorpus(
            self.name,
            self.images[:n],
            tuple(self.questions[i] for i in keep),
            tuple(self.answers[i] for i in keep),
            self.question_image[keep],
            self.vocabulary,
            tuple(self.forms[i] for i in keep),
            None if self.grounding is None else self.grounding[keep],
            None if self.object_grounding is None else self.object_grounding[keep],
            None if self.count_density is None else self.count_density[:n],
            None if self.count_attributes is None else self.count_attributes[:n],
            self.attribute_values,
            None if self.object_attributes is None else self.object_attributes[:n],
            None if self.question_objects is None else self.question_objects[keep],
            None if self.question_referents is None else self.question_referents[keep],
        )


def question_form(question: str, answer: str) -> tuple:
    """What an easy-VQA question's wording says about its answer: open (by the answer's kind), or
    yes/no by its subject (a colour or a shape), its negation and its answer."""
    if answer not in ("yes", "no"):
        return ("open", "color" if answer in data.COLORS else "shape")
    words = question.rstrip("?").split()
    negated = "not" in words or "no" in words
    return ("yes/no", "color" if set(words) & set(data.COLORS) else "shape", negated, answer)


def easy_vqa(split: data.Split) -> VQACorpus:
    """easy-VQA: "is there a red shape?" is answered "no" seven times out of eight, so a model
    trained on the raw mix learns to answer yes/no questions from their wording; balanced over
    question_form, it has to look at the image."""
    return VQACorpus(
        "easy-vqa",
        split.images,
        split.questions,
        split.answers,
        split.question_image,
        data.answers(),
        tuple(question_form(q, a) for q, a in zip(split.questions, split.answers, strict=True)),
    )


def scenes(split: SceneSplit, grid: int | None = None) -> VQACorpus:
    """The scenes set balances its answers within each question type by construction, so batches
    only balance the types (counting and relations are as frequent as colour questions).
    grid: the model's patch grid side, for `grounding` and the count targets (None: neither)."""
    grounding = by_object = density = attributes = None
    objects = np.full((len(split.scenes), MAX_OBJECTS, len(ATTRIBUTES)), -1, dtype=np.int64)
    for s, scene in enumerate(split.scenes):
        for k, o in enumerate(scene.objects):
            objects[s, k] = [values.index(getattr(o, name)) for name, values in ATTRIBUTES.items()]
    about = np.zeros((len(split.questions), MAX_OBJECTS), dtype=bool)
    referents = np.zeros_like(about)
    for q, (targets, kind) in enumerate(zip(split.targets, split.types, strict=True)):
        about[q, list(targets)] = True
        referents[q, list(targets[:1] if kind in TWO_OBJECT_TYPES else targets)] = True
    if grid is not None:
        rows, pairs = [], []
        for s, targets in zip(split.question_image, split.targets, strict=True):
            named = [split.scenes[s].objects[t] for t in targets]
            rows.append(covered_patches(named, grid))
            pairs.append([covered_patches([o], grid) for o in named] if len(named) == 2 else [rows[-1]] * 2)
        grounding = np.stack(rows) if rows else np.zeros((0, grid * grid), dtype=bool)
        by_object = np.stack(pairs) if pairs else np.zeros((0, 2, grid * grid), dtype=bool)
        maps = [centre_density(scene.objects, grid) for scene in split.scenes]
        density = np.stack([m[0] for m in maps]) if maps else np.zeros((0, grid * grid), np.float32)
        attributes = (
            np.stack([m[1] for m in maps]) if maps else np.zeros((0, grid * grid, len(ATTRIBUTES)), np.int64)
        )
    return VQACorpus(
        "scenes",
        split.images,
        split.questions,
        split.answers,
        split.question_image,
        SCENE_ANSWERS,
        tuple((t,) for t in split.types),
        grounding,
        by_object,
        density,
        attributes,
        tuple(len(values) for values in ATTRIBUTES.values()),
        objects,
        about,
        referents,
    )
