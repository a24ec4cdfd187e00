"""Questions about a scene, each answered from its scene graph, with a type tag and the size tag
of the objects it is about (graph.size_tag: their shared size class, "multiple", or "none").

Types: exist, count, color, shape, size, relation, nearest, compare. Objects a question names
are unique under its description; yes/no types flip a fair coin for the answer first, and a
count question picks its answer uniformly among the counts the scene offers, so no type is
answerable from its wording alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.demo.scenes.graph import (
    COLORS,
    OPPOSITE,
    PLURALS,
    RELATIONS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    clearly,
    matching,
    nearest,
    phrase,
    size_tag,
    unique_description,
    with_article,
)

MAX_COUNT = 10
ANSWERS = (
    "yes",
    "no",
    *(str(n) for n in range(MAX_COUNT + 1)),
    *COLORS,
    *SHAPES,
    *SIZES,
)  # the fixed answer vocabulary: every answer is one of these
YES_NO_TYPES = ("exist", "relation", "compare")
# Relative frequency of each type before fallbacks (a type the scene cannot ask is redrawn).
TYPE_WEIGHTS = {
    "exist": 3.0,
    "count": 3.0,
    "color": 2.0,
    "shape": 2.0,
    "size": 1.5,
    "relation": 3.0,
    "nearest": 2.0,
    "compare": 2.0,
}
QUESTION_TYPES = tuple(TYPE_WEIGHTS)
TARGET_SIZES = (*SIZES, "multiple", "none")
# How an object may be named: the first form that picks it out alone is used.
NAMED = (("color", "shape"), ("size", "color", "shape"))
EXIST_WITH_SIZE = 0.35  # share of existence questions that also name a size


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    type: str
    # indices of the objects the question is about, in the order it names them (relation, nearest,
    # compare: the first-named object first; exist, count: scene order)
    targets: tuple[int, ...]
    target_size: str

    def to_dict(self, scene_id: str) -> dict:
        return {
            "scene": scene_id,
            "question": self.text,
            "answer": self.answer,
            "type": self.type,
            "targets": list(self.targets),
            "target_size": self.target_size,
        }


def _question(scene: Scene, text: str, answer: str, kind: str, targets: list[Obj]) -> Question:
    indices = tuple(next(i for i, o in enumerate(scene.objects) if o is t) for t in targets)
    return Question(text, answer, kind, indices, size_tag(targets))


def _shuffled(rng: np.random.Generator, items) -> list:
    items = list(items)
    return [items[i] for i in rng.permutation(len(items))]


def exist(scene: Scene, rng: np.random.Generator, yes: bool) -> Question | None:
    """ "is there a (small) red star?"; a "no" changes one attribute of an object in the scene."""
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    form = ("size", "color", "shape") if rng.random() < EXIST_WITH_SIZE else ("color", "shape")
    description = {k: getattr(obj, k) for k in form}
    if not yes:
        values = {"size": SIZES, "color": tuple(COLORS), "shape": SHAPES}
        options = [(k, v) for k in form for v in values[k] if v != description[k]]
        for key, value in _shuffled(rng, options):
            changed = {**description, key: value}
            if not matching(scene, changed):
                description = changed
                break
        else:
            return None
    found = matching(scene, description)
    text = f"is there {with_article(phrase(description))}?"
    return _question(scene, text, "yes" if found else "no", "exist", found)


def count(scene: Scene, rng: np.random.Generator, yes: bool) -> Question | None:
    """ "how many triangles / red objects / small objects / red stars / objects are there?\""""
    candidates = [(f"how many {PLURALS[s]} are there?", {"shape": s}) for s in SHAPES]
    candidates += [(f"how many {c} objects are there?", {"color": c}) for c in COLORS]
    candidates += [(f"how many {z} objects are there?", {"size": z}) for z in SIZES]
    candidates += [("how many objects are there?", {})]
    combos = sorted({(o.color, o.shape) for o in scene.objects})
    candidates += [(f"how many {c} {PLURALS[s]} are there?", {"color": c, "shape": s}) for c, s in combos]
    by_answer: dict[int, list] = {}
    for text, description in candidates:
        by_answer.setdefault(len(matching(scene, description)), []).append((text, description))
    answers = sorted(by_answer)
    options = by_answer[answers[int(rng.integers(len(answers)))]]
    text, description = options[int(rng.integers(len(options)))]
    found = matching(scene, description)
    return _question(scene, text, str(len(found)), "count", found)


def _attribute(
    scene: Scene, rng: np.random.Generator, kind: str, forms, template: str, noun: str = "object"
) -> Question | None:
    for obj in _shuffled(rng, scene.objects):
        description = unique_description(scene, obj, forms)
        if description is not None:
            return _question(
                scene, template.format(phrase(description, noun)), getattr(obj, kind), kind, [obj]
            )
    return None


def color(scene: Scene, rng: np.random.Generator, yes: bool) -> Question | None:
    """ "what color is the (small) square?\""""
    return _attribute(scene, rng, "color", (("shape",), ("size", "shape")), "what color is the {}?")


def shape(scene: Scene, rng: np.random.Generator, yes: bool) -> Question | None:
    """ "what shape is the (small) red object?\""""
    return _attribute(scene, rng, "shape", (("color",), ("size", "color")), "what shape is the {}?")


def size(scene: Scene, rng: np.random.Generator, yes: bool) -> Question | None:
    """ "what size is the red star?\""""
    return _attribute(scene, rng, "size", (("color", "shape"),), "what size is the {}?")


def _named(scene: Scene, forms=NAMED) -> list[tuple[Obj, dict]]:
    named = []
    for obj in scene.objects:
        description = unique_description(scene, obj, forms)
        if description is not None:
            named.append((obj, description))
    return named


def relation(scene: Scene, rng: np.random.Generator, yes: bool) -> Question | None:
    """ "is the red circle left of the blue star?"; asked only when the answer is clear (graph.clearly)."""
    named = _named(scene)
    facts = [
        (a, da, rel, b, db)
        for a, da in named
        for b, db in named
        if a is not b
        for rel in RELATIONS
        if clearly(rel, a, b)
    ]
    if not facts:
        return None
    a, da, rel, b, db = facts[int(rng.integers(len(facts)))]
    if not yes:  # a clearly-true fact turned into a clearly-false one
        if rng.integers(2):
            rel = OPPOSITE[rel]
        else:
            a, da, b, db = b, db, a, da
    text = f"is the {phrase(da)} {rel} the {phrase(db)}?"
    return _question(scene, text, "yes" if clearly(rel, a, b) else "no", "relation", [a, b])


def nearest_to(scene: Scene, rng: np.random.Generator, yes: bool) -> Question | None:
    """ "what color (shape) is the object nearest to the blue star?", when the nearest is clear."""
    options = [(ref, d, near) for ref, d in _named(scene) if (near := nearest(scene, ref)) is not None]
    if not options:
        return None
    ref, description, near = options[int(rng.integers(len(options)))]
    kind = ("color", "shape")[int(rng.integers(2))]
    text = f"what {kind} is the object nearest to the {phrase(description)}?"
    return _question(scene, text, getattr(near, kind), "nearest", [ref, near])


def compare(scene: Scene, rng: np.random.Generator, yes: bool) -> Question | None:
    """ "is the red circle bigger (smaller) than the blue star?" for objects of different size
    classes, named without their size."""
    named = _named(scene, (("color", "shape"),))
    rank = {s: i for i, s in enumerate(SIZES)}
    pairs = [(a, da, b, db) for a, da in named for b, db in named if rank[a.size] > rank[b.size]]
    if not pairs:
        return None
    big, dbig, small, dsmall = pairs[int(rng.integers(len(pairs)))]
    word = ("bigger", "smaller")[int(rng.integers(2))]
    first, dfirst, second, dsecond = (
        (big, dbig, small, dsmall) if word == "bigger" else (small, dsmall, big, dbig)
    )
    if not yes:
        first, dfirst, second, dsecond = second, dsecond, first, dfirst
    truth = rank[first.size] > rank[second.size] if word == "bigger" else rank[first.size] < rank[second.size]
    text = f"is the {phrase(dfirst)} {word} than the {phrase(dsecond)}?"
    return _question(scene, text, "yes" if truth else "no", "compare", [first, second])


GENERATORS = {
    "exist": exist,
    "count": count,
    "color": color,
    "shape": shape,
    "size": size,
    "relation": relation,
    "nearest": nearest_to,
    "compare": compare,
}


def questions_for(scene: Scene, rng: np.random.Generator, n: int) -> list[Question]:
    """n different questions (fewer only if the scene cannot offer them)."""
    kinds = list(TYPE_WEIGHTS)
    weights = np.array([TYPE_WEIGHTS[k] for k in kinds])
    weights /= weights.sum()
    out: list[Question] = []
    seen: set[str] = set()
    for _ in range(50 * n):
        if len(out) == n:
            break
        kind = kinds[int(rng.choice(len(kinds), p=weights))]
        question = GENERATORS[kind](scene, rng, bool(rng.random() < 0.5))
        if question is not None and question.text not in seen:
            seen.add(question.text)
            out.append(question)
    return out
