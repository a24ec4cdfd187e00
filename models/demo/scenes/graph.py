"""The scene graph: objects (shape, colour, size class, centre and extent), how a scene is sampled
from a random generator, and the geometric predicates questions and captions are built on.

Coordinates are reference pixels of a 224 px image (quarter-pixel steps, exact in binary), with
y pointing down; a scene renders at any size by scaling them. Every object's nominal box is a
square of side `extent` centred on (x, y): the shapes are drawn to fill it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

REFERENCE = 224  # the image side the coordinates are given in

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
PLURALS = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "diamond": "diamonds",
    "cross": "crosses",
}
# Saturated colours (or black): far from every background, which is light and nearly grey.
COLORS = {
    "red": (214, 39, 40),
    "orange": (247, 129, 23),
    "yellow": (236, 200, 24),
    "green": (44, 160, 44),
    "cyan": (23, 190, 207),
    "blue": (31, 87, 220),
    "purple": (148, 62, 189),
    "black": (30, 30, 30),
}
COLOR_JITTER = 10  # each channel of an object's colour moves by at most this much
SIZES = ("small", "medium", "large")
# Extent of each size class in reference pixels, inclusive: a small object spans less than one
# 16 px patch at 224 px, and neighbouring classes never come near each other.
EXTENTS = {"small": (11, 14), "medium": (22, 28), "large": (38, 48)}
MIN_OBJECTS, MAX_OBJECTS = 3, 10
BORDER = 2.0  # every object's box stays this far inside the image
MAX_OVERLAP = 0.08  # of the smaller box, between objects of different colours
SAME_COLOR_GAP = 2.0  # objects of one colour never touch (they would read as one blob)
PLACEMENT_TRIES = 200

# Geometric margins, reference pixels: relations and "nearest" are only asserted when no pixel
# or two would change them.
CLEAR_GAP = 2.0  # "a left of b": a's box ends at least this far before b's begins
NEAREST_MARGIN = 14.0  # the nearest object is this much nearer than the second nearest
NEAREST_RATIO = 1.25  # ... and the second nearest at least this many times as far


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    x: float  # centre
    y: float
    extent: float
    rgb: tuple[int, int, int]  # the drawn colour: the named colour plus a small jitter

    @property
    def x0(self) -> float:
        return self.x - self.extent / 2

    @property
    def x1(self) -> float:
        return self.x + self.extent / 2

    @property
    def y0(self) -> float:
        return self.y - self.extent / 2

    @property
    def y1(self) -> float:
        return self.y + self.extent / 2

    def to_dict(self) -> dict:
        return {
            "shape": self.shape,
            "color": self.color,
            "size": self.size,
            "x": self.x,
            "y": self.y,
            "extent": self.extent,
            "rgb": list(self.rgb),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Obj:
        return cls(d["shape"], d["color"], d["size"], d["x"], d["y"], d["extent"], tuple(d["rgb"]))


@dataclass(frozen=True)
class Scene:
    id: str
    background: dict  # kind and parameters (see render.BACKGROUNDS)
    objects: tuple[Obj, ...]  # in drawing order: larger objects first, so none hides a smaller one

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "background": self.background,
            "objects": [o.to_dict() for o in self.objects],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(d["id"], d["background"], tuple(Obj.from_dict(o) for o in d["objects"]))


def overlap(a: Obj, b: Obj) -> float:
    """Area of the intersection of two boxes."""
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(w, 0.0) * max(h, 0.0)


def gap(a: Obj, b: Obj) -> float:
    """Distance between two boxes (0 when they touch or overlap)."""
    dx = max(a.x0 - b.x1, b.x0 - a.x1, 0.0)
    dy = max(a.y0 - b.y1, b.y0 - a.y1, 0.0)
    return math.sqrt(dx * dx + dy * dy)


def centre_distance(a: Obj, b: Obj) -> float:
    return math.sqrt((a.x - b.x) ** 2 + (a.y - b.y) ** 2)


def covered_patches(objects: Sequence[Obj], grid: int) -> np.ndarray:
    """(grid * grid,) bool in raster order: the cells of a grid x grid split of the image that any
    of the objects' boxes reaches into."""
    cell = REFERENCE / grid
    covered = np.zeros((grid, grid), dtype=bool)
    for o in objects:
        c0, c1 = (min(grid - 1, max(0, int(v // cell))) for v in (o.x0, o.x1))
        r0, r1 = (min(grid - 1, max(0, int(v // cell))) for v in (o.y0, o.y1))
        covered[r0 : r1 + 1, c0 : c1 + 1] = True
    return covered.reshape(-1)


ATTRIBUTES = {"color": tuple(COLORS), "shape": SHAPES, "size": SIZES}  # what the count path classifies


def centre_density(objects: Sequence[Obj], grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Where the objects' centres are on a grid x grid split of the image, as a count path is
    trained to map them: (density (grid * grid,) float32, attributes (grid * grid, len(ATTRIBUTES))
    int64). Each centre's unit mass is split bilinearly over the (up to) four cells whose centres
    surround it, so the map sums to the number of objects and moves smoothly with them; a cell's
    attributes (indices into ATTRIBUTES' values) are those of the object giving it the most mass,
    -100 where no object gives it any."""
    cell = REFERENCE / grid
    density = np.zeros((grid, grid), dtype=np.float32)
    heaviest = np.zeros((grid, grid), dtype=np.float32)
    attributes = np.full((grid, grid, len(ATTRIBUTES)), -100, dtype=np.int64)
    for o in objects:
        gx, gy = o.x / cell - 0.5, o.y / cell - 0.5  # in cell-centre units
        x0, y0 = math.floor(gx), math.floor(gy)
        values = [ATTRIBUTES[k].index(getattr(o, k)) for k in ATTRIBUTES]
        for column in (x0, x0 + 1):
            for row in (y0, y0 + 1):
                w = (1 - abs(gx - column)) * (1 - abs(gy - row))
                cx, cy = min(grid - 1, max(0, column)), min(grid - 1, max(0, row))  # mass stays in
                density[cy, cx] += w
                if w > heaviest[cy, cx]:
                    heaviest[cy, cx] = w
                    attributes[cy, cx] = values
    return density.reshape(-1), attributes.reshape(grid * grid, -1)


def fits(new: Obj, placed: list[Obj]) -> bool:
    for o in placed:
        if o.color == new.color:
            if gap(o, new) < SAME_COLOR_GAP:
                return False
        elif overlap(o, new) > MAX_OVERLAP * min(o.extent, new.extent) ** 2:
            return False
    return True


def quarter(rng: np.random.Generator, low: float, high: float) -> float:
    """A multiple of 1/4 in [low, high]."""
    return int(rng.integers(int(np.ceil(low * 4)), int(np.floor(high * 4)) + 1)) / 4


def sample_objects(rng: np.random.Generator) -> tuple[Obj, ...]:
    """3-10 objects of uniformly random shape, colour and size class at random places; an object
    that finds no place in PLACEMENT_TRIES tries would be left out (none is, in practice: even ten
    large ones cover under half of the image)."""
    n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    drafts = []
    for _ in range(n):
        size = SIZES[int(rng.integers(len(SIZES)))]
        low, high = EXTENTS[size]
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
        rgb = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[color], jitter, strict=True))
        drafts.append(
            (SHAPES[int(rng.integers(len(SHAPES)))], color, size, int(rng.integers(low, high + 1)), rgb)
        )
    # Largest first: it packs better, and drawing in this order keeps small objects on top.
    drafts.sort(key=lambda d: -d[3])
    placed: list[Obj] = []
    for shape, color, size, extent, rgb in drafts:
        lo, hi = BORDER + extent / 2, REFERENCE - BORDER - extent / 2
        for _ in range(PLACEMENT_TRIES):
            obj = Obj(shape, color, size, quarter(rng, lo, hi), quarter(rng, lo, hi), float(extent), rgb)
            if fits(obj, placed):
                placed.append(obj)
                break
    return tuple(placed)


# Relations, asserted only when clear: a's box lies entirely on that side of b's, CLEAR_GAP apart.
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def clearly(relation: str, a: Obj, b: Obj) -> bool:
    if relation == "left of":
        return a.x1 + CLEAR_GAP <= b.x0
    if relation == "right of":
        return b.x1 + CLEAR_GAP <= a.x0
    if relation == "above":
        return a.y1 + CLEAR_GAP <= b.y0
    if relation == "below":
        return b.y1 + CLEAR_GAP <= a.y0
    raise ValueError(relation)


def loosely(relation: str, a: Obj, b: Obj) -> bool:
    """The relation by centres alone: what a statement must not satisfy to count as false."""
    if relation == "left of":
        return a.x < b.x
    if relation == "right of":
        return a.x > b.x
    if relation == "above":
        return a.y < b.y
    if relation == "below":
        return a.y > b.y
    raise ValueError(relation)


def nearest(scene: Scene, ref: Obj) -> Obj | None:
    """The object nearest to `ref` when that is beyond doubt: nearest by centre distance with a
    margin (NEAREST_MARGIN and NEAREST_RATIO over the second nearest), and nearest by box gap too."""
    others = [o for o in scene.objects if o is not ref]
    if len(others) < 2:
        return others[0] if others else None
    by_centre = sorted(others, key=lambda o: centre_distance(o, ref))
    first, second = by_centre[0], by_centre[1]
    d1, d2 = centre_distance(first, ref), centre_distance(second, ref)
    if d2 - d1 < NEAREST_MARGIN or d2 < NEAREST_RATIO * d1:
        return None
    gaps = sorted(gap(o, ref) for o in others)
    if gap(first, ref) != gaps[0] or gaps[1] - gaps[0] < CLEAR_GAP:
        return None
    return first


def size_tag(objects) -> str:
    """The size class every object shares, "multiple" when they differ, "none" without objects."""
    sizes = {o.size for o in objects}
    if not sizes:
        return "none"
    return sizes.pop() if len(sizes) == 1 else "multiple"


def matching(scene: Scene, description: dict) -> list[Obj]:
    return [o for o in scene.objects if all(getattr(o, k) == v for k, v in description.items())]


def unique_description(scene: Scene, obj: Obj, forms) -> dict | None:
    """The first form (a tuple of attribute names) whose values pick out `obj` alone."""
    for form in forms:
        description = {k: getattr(obj, k) for k in form}
        if len(matching(scene, description)) == 1:
            return description
    return None


def phrase(description: dict, noun: str = "object") -> str:
    """ "small red star", "red object" (no shape named), "small square"."""
    words = [description[k] for k in ("size", "color") if k in description]
    return " ".join([*words, description.get("shape", noun)])


def with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words
