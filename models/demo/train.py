"""`tokenlean train-demo`: the embedded demo checkpoints, trained from scratch on easy-VQA.

Each model family names the module of its demo recipe (`demo_recipe`: models.demo.vision,
models.demo.vilt, models.demo.lookupvit); a recipe declares its phases, what each requires and
produces (models/demo/training.py), and the phases run in an order that satisfies them. As ViLT
itself was built: a ViT classifier first (shape x colour); its patch embedding and encoder
initialise ViLT, which learns VQA; the VQA model's encoder initialises the image-text matching
(retrieval) model; then the classifier trains again at a low learning rate; last, the LookupViT
classifier starts from it. The last phases of VQA and retrieval, and the whole second classifier
phase, add self-distillation: each step also runs a reduced plan at a random level and pulls its
logits towards the unreduced ones (KL, as PuMer's distillation), so one set of weights holds
accuracy when reduced.

Seeded, but not bitwise reproducible: CPU float reductions vary with thread timing, and these
small models' training is sensitive to it (the classifier most: see docs/demo-models.md).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import torch

from models.demo import data
from models.demo.paths import CHECKPOINTS
from models.demo.training import Context, Phase
from models.families.registry import families
from models.loading import load_model

__all__ = ["CHECKPOINTS", "ordered", "phases", "recipes", "train_demo"]


def recipes() -> dict[str, ModuleType]:
    """The demo recipe module of every family that has one, by family name."""
    return {str(f): importlib.import_module(f.demo_recipe) for f in families() if f.demo_recipe}


def ordered(candidates: list[Phase], available: set[str]) -> list[Phase]:
    """`candidates` in an order where every requirement is in `available` or produced by an earlier
    phase; among the phases that could run next, the first in the list. Independent phases do not
    affect one another's weights (each schedule reseeds), only where the run's time goes."""
    done, pending, order = set(available), list(candidates), []
    while pending:
        ready = next((p for p in pending if set(p.requires) <= done), None)
        if ready is None:
            missing = sorted({r for p in pending for r in p.requires} - done)
            raise ValueError(f"no phase produces {missing} (or the phases require each other)")
        pending.remove(ready)
        order.append(ready)
        done |= set(ready.produces)
    return order


def phases(out: Path, only: str | None = None, data_set: str = "easy-vqa") -> tuple[list[Phase], list[str]]:
    """The phases to run, in order, and the models they require that none of them produces (to be
    loaded from out/<name>). `only`: a family name, whose recipe then runs alone. `data_set`: the
    phases that train on it ("easy-vqa", the defaults; or "scenes")."""
    by_family = recipes()
    if only is not None and only not in by_family:
        raise ValueError(f"only: one of {sorted(by_family)} or None, got {only!r}")
    # Listed by family name, then in their recipe's order: the run order does not depend on the
    # order the families registered in.
    chosen = [
        p
        for name in sorted(by_family)
        if only in (None, name)
        for p in by_family[name].PHASES
        if p.data == data_set
    ]
    if not chosen:
        raise ValueError(f"no recipe {'of ' + only + ' ' if only else ''}trains on {data_set}")
    produced = {name for p in chosen for name in p.produces}
    loaded = sorted({r for p in chosen for r in p.requires} - produced)
    missing = [name for name in loaded if not (out / name / "config.json").is_file()]
    if missing:
        raise FileNotFoundError(f"train-demo --only {only} starts from {missing}, which {out} does not hold")
    return ordered(chosen, set(loaded)), loaded


def train_demo(
    out: Path = CHECKPOINTS,
    seed: int = 0,
    scale: float = 1.0,
    only: str | None = None,
    scenes: Path | None = None,
    distill: bool = False,
) -> dict:
    """Train and save every family's demo checkpoints under `out`. `scale` shrinks the schedules
    (smoke runs). `only` (a family name, e.g. "lookupvit") runs that family's recipe alone; what
    it requires is loaded from out/<name> (LookupViT: the ViT classifier in out/classify).
    `scenes`: a folder `tokenlean data scenes` wrote; the phases that train on it run instead of
    the easy-VQA ones. `distill`: the two-stream VQA recipe adds PuMer's distillation."""
    run, loaded = phases(out, only, "easy-vqa" if scenes is None else "scenes")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    schedules = {name: s.scaled(scale) for p in run for name, s in p.schedules.items()}
    report = {
        "seed": seed,
        "schedules": {k: vars(s) for k, s in schedules.items()},
        "distill": distill,
        "seconds": {},
    }
    split = data.load_split("train")
    ctx = Context(out, split, seed, scale, report, schedules, scenes=scenes, distill=distill)
    ctx.models |= {name: load_model(str(out / name)) for name in loaded}
    for phase in run:
        models = phase.run(ctx)
        if set(models) != set(phase.produces):
            raise RuntimeError(f"a phase that produces {phase.produces} returned {sorted(models)}")
        ctx.models |= models
    return report
