"""Drawing a scene graph: a light, nearly grey background (plain, noise, stripes or a gradient)
and the objects, drawn four times over size and box-filtered down so edges are anti-aliased.

Only integer and basic floating-point arithmetic (no trigonometry at run time, no library
resampling filter) decides a pixel, so an image does not depend on the machine's maths library.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from models.demo.scenes.graph import REFERENCE, Obj, Scene

SUPERSAMPLE = 4
BACKGROUNDS = ("plain", "noise", "stripes", "gradient")
ANGLES = tuple(range(0, 180, 15))  # stripe and gradient directions, degrees
# Unit directions of ANGLES, rounded so no last-bit difference of a libm can show.
_DIRECTIONS = {a: (round(math.cos(math.radians(a)), 6), round(math.sin(math.radians(a)), 6)) for a in ANGLES}
# Background tones stay light and low in saturation: never confusable with an object's colour.
LIGHT = (196, 236)
TINT = 6
NOISE = (4, 8)
STRIPE_DEPTH = (10, 22)
STRIPE_PERIOD = (10, 36)  # reference pixels
GRADIENT_SPAN = (15, 40)
LIGHTEST = 245


def _star(points: int = 5, inner: float = 0.4) -> tuple[tuple[float, float], ...]:
    vertices = []
    for k in range(2 * points):
        radius = 0.5 if k % 2 == 0 else 0.5 * inner
        angle = math.radians(-90 + 180 * k / points)
        vertices.append((radius * math.cos(angle), radius * math.sin(angle)))
    top, bottom = min(v for _, v in vertices), max(v for _, v in vertices)
    shift = -(top + bottom) / 2  # centre the star vertically in its box
    return tuple((round(u, 6), round(v + shift, 6)) for u, v in vertices)


_ARM = 0.18
# Each shape fills the unit box [-0.5, 0.5]^2 (y down); the circle is drawn as an ellipse.
POLYGONS = {
    "square": ((-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)),
    "triangle": ((0.0, -0.5), (0.5, 0.5), (-0.5, 0.5)),
    "diamond": ((0.0, -0.5), (0.5, 0.0), (0.0, 0.5), (-0.5, 0.0)),
    "star": _star(),
    "cross": (
        (-_ARM, -0.5), (_ARM, -0.5), (_ARM, -_ARM), (0.5, -_ARM), (0.5, _ARM), (_ARM, _ARM),
        (_ARM, 0.5), (-_ARM, 0.5), (-_ARM, _ARM), (-0.5, _ARM), (-0.5, -_ARM), (-_ARM, -_ARM),
    ),
}  # fmt: skip


def sample_background(rng: np.random.Generator) -> dict:
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    grey = int(rng.integers(LIGHT[0], LIGHT[1] + 1))
    rgb = [grey + int(t) for t in rng.integers(-TINT, TINT + 1, size=3)]
    background = {"kind": kind, "rgb": rgb}
    if kind == "noise":
        background["amplitude"] = int(rng.integers(NOISE[0], NOISE[1] + 1))
        background["seed"] = int(rng.integers(2**31))
    elif kind == "stripes":
        background["depth"] = int(rng.integers(STRIPE_DEPTH[0], STRIPE_DEPTH[1] + 1))
        background["period"] = int(rng.integers(STRIPE_PERIOD[0], STRIPE_PERIOD[1] + 1))
        background["angle"] = ANGLES[int(rng.integers(len(ANGLES)))]
    elif kind == "gradient":
        span = int(rng.integers(GRADIENT_SPAN[0], GRADIENT_SPAN[1] + 1))
        span = -span if grey + span > LIGHTEST or rng.integers(2) else span
        background["rgb2"] = [min(c + span, LIGHTEST) for c in rgb]
        background["angle"] = ANGLES[int(rng.integers(len(ANGLES)))]
    return background


def render_background(background: dict, size: int) -> np.ndarray:
    """(size, size, 3) float32 in 0-255."""
    rgb = np.asarray(background["rgb"], dtype=np.float32)
    kind = background["kind"]
    if kind == "plain":
        return np.broadcast_to(rgb, (size, size, 3)).copy()
    if kind == "noise":
        amplitude = background["amplitude"]
        noise = np.random.default_rng(background["seed"]).integers(-amplitude, amplitude + 1, (size, size))
        return rgb + noise[..., None].astype(np.float32)
    centres = (np.arange(size, dtype=np.float64) + 0.5) * (REFERENCE / size)  # reference pixels
    cos, sin = _DIRECTIONS[background["angle"]]
    along = centres[None, :] * cos + centres[:, None] * sin
    if kind == "stripes":
        t = along / background["period"]
        triangle = np.abs(2 * (t - np.floor(t)) - 1)  # 0..1 and back, once a period
        soft = np.clip((triangle - 0.5) * 3 + 0.5, 0, 1)  # soft-edged bands
        return (rgb - background["depth"] * soft[..., None]).astype(np.float32)
    if kind == "gradient":
        lo, hi = min(0.0, cos, sin, cos + sin) * REFERENCE, max(0.0, cos, sin, cos + sin) * REFERENCE
        t = ((along - lo) / (hi - lo))[..., None]
        rgb2 = np.asarray(background["rgb2"], dtype=np.float64)
        return (rgb * (1 - t) + rgb2 * t).astype(np.float32)
    raise ValueError(f"unknown background {kind!r}")


def draw_object(draw: ImageDraw.ImageDraw, mask: ImageDraw.ImageDraw, obj: Obj, scale: float) -> None:
    """Draw on the supersampled canvas and its coverage mask; scale maps reference pixels to it."""

    def point(u: float, v: float) -> tuple[float, float]:
        # PIL fills the pixels whose index lies inside; -0.5 lines pixel centres up with the shape.
        return ((obj.x + u * obj.extent) * scale - 0.5, (obj.y + v * obj.extent) * scale - 0.5)

    if obj.shape == "circle":
        box = [*point(-0.5, -0.5), *point(0.5, 0.5)]
        draw.ellipse(box, fill=obj.rgb)
        mask.ellipse(box, fill=255)
        return
    polygon = [point(u, v) for u, v in POLYGONS[obj.shape]]
    draw.polygon(polygon, fill=obj.rgb)
    mask.polygon(polygon, fill=255)


def render(scene: Scene, size: int = REFERENCE) -> np.ndarray:
    """The scene as a (size, size, 3) uint8 array."""
    big = size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), (0, 0, 0))
    coverage = Image.new("L", (big, big), 0)
    draw, mask = ImageDraw.Draw(canvas), ImageDraw.Draw(coverage)
    for obj in scene.objects:  # in order: a later object covers an earlier one
        draw_object(draw, mask, obj, big / REFERENCE)
    # Box filter: each output pixel averages its SUPERSAMPLE^2 samples. Uncovered samples are black,
    # so the averaged colour is premultiplied by the averaged coverage.
    premultiplied = np.asarray(canvas.reduce(SUPERSAMPLE), dtype=np.float32)
    alpha = np.asarray(coverage.reduce(SUPERSAMPLE), dtype=np.float32)[..., None] / 255
    image = render_background(scene.background, size) * (1 - alpha) + premultiplied
    return np.clip(np.floor(image + 0.5), 0, 255).astype(np.uint8)
