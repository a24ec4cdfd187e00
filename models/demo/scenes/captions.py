"""Retrieval captions: "a small red star left of a large blue circle", true of their scene, and hard
negatives that change one attribute (or the relation) so that the caption becomes false.

A caption is true when some object matches its first part and another its second, in that
relation. Captions are written only for pairs in a clear relation (graph.clearly); a negative
counts as false only when no pair satisfies it even by centres alone (graph.loosely), so neither
depends on a pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.demo.scenes.graph import (
    COLORS,
    OPPOSITE,
    RELATIONS,
    SHAPES,
    SIZES,
    Scene,
    clearly,
    loosely,
    matching,
    phrase,
    with_article,
)

CAPTIONS_PER_SCENE = 2
ATTRIBUTES = (("size", SIZES), ("color", tuple(COLORS)), ("shape", SHAPES))


@dataclass(frozen=True)
class Caption:
    first: dict  # size, color and shape of the first object
    relation: str  # one of graph.RELATIONS, or "and" when the scene has no clear relation
    second: dict

    @property
    def text(self) -> str:
        return f"{with_article(phrase(self.first))} {self.relation} {with_article(phrase(self.second))}"

    def to_dict(self, scene_id: str) -> dict:
        return {
            "scene": scene_id,
            "caption": self.text,
            "first": self.first,
            "relation": self.relation,
            "second": self.second,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Caption:
        return cls(dict(d["first"]), d["relation"], dict(d["second"]))


def holds(scene: Scene, caption: Caption, strict: bool = False) -> bool:
    """Some pair of objects fits the caption; strict: in a clear relation, else by centres."""
    relate = clearly if strict else loosely
    for a in matching(scene, caption.first):
        for b in matching(scene, caption.second):
            if a is not b and (caption.relation == "and" or relate(caption.relation, a, b)):
                return True
    return False


def _describe(obj) -> dict:
    return {"size": obj.size, "color": obj.color, "shape": obj.shape}


def captions_for(scene: Scene, rng: np.random.Generator, n: int = CAPTIONS_PER_SCENE) -> list[Caption]:
    """Up to n different captions of clearly related pairs."""
    facts = sorted(
        {
            (tuple(_describe(a).values()), rel, tuple(_describe(b).values()))
            for a in scene.objects
            for b in scene.objects
            if a is not b
            for rel in RELATIONS
            if clearly(rel, a, b)
        }
    )
    keys = ("size", "color", "shape")
    if not facts:  # every pair overlaps on both axes: name two objects
        a, b = scene.objects[0], scene.objects[1]
        return [Caption(_describe(a), "and", _describe(b))]
    picked = rng.choice(len(facts), size=min(n, len(facts)), replace=False)
    return [
        Caption(
            dict(zip(keys, facts[i][0], strict=True)), facts[i][1], dict(zip(keys, facts[i][2], strict=True))
        )
        for i in picked
    ]


def hard_negatives(scene: Scene, caption: Caption) -> list[Caption]:
    """Every caption one change away (an attribute of either object, or the relation reversed)
    that is false of the scene, in a fixed order."""
    changed = []
    for part in ("first", "second"):
        for key, values in ATTRIBUTES:
            for value in values:
                description = getattr(caption, part)
                if value != description[key]:
                    new = {**description, key: value}
                    changed.append(
                        Caption(new, caption.relation, caption.second)
                        if part == "first"
                        else Caption(caption.first, caption.relation, new)
                    )
    if caption.relation in OPPOSITE:
        changed.append(Caption(caption.first, OPPOSITE[caption.relation], caption.second))
    return [c for c in changed if not holds(scene, c)]
