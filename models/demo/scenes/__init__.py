"""Multi-object scenes generated in code (numpy and PIL only): images, questions with answers
computed from each scene graph, and retrieval captions, deterministic from a seed.

`tokenlean data scenes --out DIR` writes the train / val / test splits; SAMPLE is a small set
checked into the repository; `load_split(folder, name)` reads a split back.
"""

from models.demo.scenes.captions import Caption, captions_for, hard_negatives, holds
from models.demo.scenes.dataset import (
    DEFAULT_QUESTIONS_PER_SCENE,
    DEFAULT_SCENES,
    SAMPLE,
    SAMPLE_SCENES,
    SPLITS,
    VERSION,
    SceneSplit,
    generate,
    load_split,
    make_scene,
)
from models.demo.scenes.graph import COLORS, SHAPES, SIZES, Obj, Scene
from models.demo.scenes.questions import ANSWERS, QUESTION_TYPES, TARGET_SIZES, Question, questions_for
from models.demo.scenes.render import render

__all__ = [
    "ANSWERS",
    "COLORS",
    "DEFAULT_QUESTIONS_PER_SCENE",
    "DEFAULT_SCENES",
    "QUESTION_TYPES",
    "SAMPLE",
    "SAMPLE_SCENES",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "TARGET_SIZES",
    "VERSION",
    "Caption",
    "Obj",
    "Question",
    "Scene",
    "SceneSplit",
    "captions_for",
    "generate",
    "hard_negatives",
    "holds",
    "load_split",
    "make_scene",
    "questions_for",
    "render",
]
