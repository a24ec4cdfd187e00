"""The ViT demo classifier (24 shape x colour classes), in two phases: first from scratch (its
encoder then initialises ViLT), and last, once the ViLT checkpoints are trained, again at a low
learning rate with self-distillation at a random method and level of the model at every step, so
one set of weights holds its accuracy under ToMe, TC-ViT and EViT.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from transformers import ViTConfig, ViTForImageClassification

from models.demo import data
from models.demo.paths import CLASSIFY_PHASE1, VIT_CLASSIFY
from models.demo.training import (
    ARCH,
    DROPOUT_FREE,
    PATCH,
    Context,
    Phase,
    Schedule,
    augment,
    batches,
    class_targets,
    distill_loss,
    optimise,
    save,
)
from models.families.registry import reducible
from models.preprocess import ImagePreprocessor

SCHEDULE = Schedule(steps=2000, batch=64, lr=1e-3)
DISTILL_SCHEDULE = Schedule(steps=500, batch=64, lr=3e-4, distill_from=0.0)


def classifier_config() -> ViTConfig:
    labels = data.class_labels()
    return ViTConfig(
        **ARCH,
        **DROPOUT_FREE,
        image_size=data.IMAGE_SIZE,
        patch_size=PATCH,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )


def train_classifier(
    train: data.Split, schedule: Schedule, seed: int, start: ViTForImageClassification | None = None
) -> ViTForImageClassification:
    """From scratch, or (start=...) a further phase on a trained classifier. Self-distillation
    (from schedule.distill_from on) samples every method the model offers."""
    model = ViTForImageClassification(classifier_config())
    if start is not None:
        model.load_state_dict(start.state_dict())
    ids = train.fact_ids()
    y = class_targets(train, ids)
    preprocess = ImagePreprocessor(data.IMAGE_SIZE)
    rm = reducible(model)
    rng, prng = np.random.default_rng(seed), random.Random(seed)
    stream = batches(len(ids), schedule.batch, rng)
    distill_step = int(schedule.distill_from * schedule.steps)

    def loss_fn(step: int) -> torch.Tensor:
        idx = next(stream)
        pixels = preprocess.from_uint8(augment(train.images[ids[idx]], rng))

        def run(plan):
            return rm(pixels, plan=plan).logits

        # transformers' own forward is the unreduced one (equal to ours) and trains faster on CPU.
        logits = model(pixel_values=pixels).logits
        loss = F.cross_entropy(logits, y[idx])
        if step >= distill_step:
            loss = loss + distill_loss(rm, rm.methods, logits, run, prng)
        return loss

    optimise(model, schedule, loss_fn, "classify")
    return model


def pretrain(ctx: Context) -> dict[str, torch.nn.Module]:
    vit = ctx.timed("classify", lambda schedule: train_classifier(ctx.split, schedule, ctx.seed))
    return {CLASSIFY_PHASE1: vit}


def finish(ctx: Context) -> dict[str, torch.nn.Module]:
    start = ctx.models[CLASSIFY_PHASE1]
    vit = ctx.timed(
        "classify_distill", lambda schedule: train_classifier(ctx.split, schedule, ctx.seed, start)
    )
    save(vit, ctx.out / VIT_CLASSIFY, meta={**ctx.report, "task": "classify"})
    return {VIT_CLASSIFY: vit}


PHASES = (
    Phase(requires=(), produces=(CLASSIFY_PHASE1,), schedules={"classify": SCHEDULE}, run=pretrain),
    Phase(
        requires=(CLASSIFY_PHASE1,),
        produces=(VIT_CLASSIFY,),
        schedules={"classify_distill": DISTILL_SCHEDULE},
        run=finish,
    ),
)
