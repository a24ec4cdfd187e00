"""The LookupViT demo classifier (`tokenlean train-demo`, last phase; `--only lookupvit` alone,
from the ViT demo classifier saved in out/classify).

Same classes, labels, images, preprocessing and size as the ViT demo classifier (hidden 128,
4 layers, 4 heads, MLP 512, 64 px images, 8 x 8 patches). Every step samples the compressed grid
from the trained set (1x1 ... 6x6), so one set of weights serves every grid; the loss is the mean
of the two heads' cross-entropies.

The recipe was chosen on a held-out slice of the train split (its last 400 labelled images,
model trained on the rest; the test split was not looked at), accuracy at grids 1 ... 6:
from scratch, 1500 steps: 71-75 %; from scratch with distillation from the ViT demo classifier
(KL to each head, weight 1): 74-79 %; initialised from the ViT demo classifier (init_from_vit):
800 steps 97.5-98.8 %, 1100 steps 98.5-99.5 %, 1200 steps 99.0-99.3 %, 1500 steps 99.3-99.5 %.
Shapes (circle, rectangle, triangle) are what a from-scratch LookupViT learns slowly here (colour
was right 100 % of the time); the ViT's patch embedding and attention weights carry them. So:
initialised from the ViT demo classifier, 1200 steps (218.6 s on 2 cores; 1500 steps, about
275 s, would leave no margin in this phase's 5-minute budget), no distillation (it did not help
from scratch, and the initialised model left little to gain).
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from models.demo import data
from models.demo.paths import LOOKUPVIT_CLASSIFY, VIT_CLASSIFY
from models.demo.training import (
    ARCH,
    PATCH,
    Context,
    Phase,
    Schedule,
    augment,
    batches,
    class_targets,
    optimise,
    save,
)
from models.lookupvit import LookupViTConfig, LookupViTForImageClassification
from models.preprocess import ImagePreprocessor

GRIDS = (1, 2, 3, 4, 5, 6)
SCHEDULE = Schedule(steps=1200, batch=64, lr=1e-3)


def lookupvit_config() -> LookupViTConfig:
    labels = data.class_labels()
    return LookupViTConfig(
        hidden_size=ARCH["hidden_size"],
        num_hidden_layers=ARCH["num_hidden_layers"],
        num_attention_heads=ARCH["num_attention_heads"],
        intermediate_size=ARCH["intermediate_size"],  # p = 4
        lookup_intermediate_size=ARCH["hidden_size"] // 2,  # q = 2
        image_size=data.IMAGE_SIZE,
        patch_size=PATCH,
        grid_sizes=list(GRIDS),
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )


def init_from_vit(model: LookupViTForImageClassification, vit: torch.nn.Module) -> None:
    """Copy a same-size ViT classifier's weights into every part of the LookupViT that has a
    counterpart: patch embedding, position embeddings (without [CLS]), each layer's attention,
    norms and MLP into the compressed tokens' ViT block and into the cross-attention (gathering:
    q, k, v, o; infusion: v, o), the final norm and the classifier into both heads. The lookup MLP
    (width D / 2) has no counterpart and keeps its random initialisation."""
    src, dst = vit.vit, model.lookupvit

    def copy(d: torch.nn.Module, s: torch.nn.Module) -> None:
        d.load_state_dict(s.state_dict())

    with torch.no_grad():
        copy(dst.embeddings.projection, src.embeddings.patch_embeddings.projection)
        dst.embeddings.position_embeddings.copy_(src.embeddings.position_embeddings[:, 1:])
        for d, s in zip(dst.layers, src.layers, strict=True):
            a = s.attention
            for target, source in (
                (d.gather_norm_compressed, s.layernorm_before),
                (d.gather_norm_lookup, s.layernorm_before),
                (d.gather_q, a.q_proj),
                (d.gather_k, a.k_proj),
                (d.gather_v, a.v_proj),
                (d.gather_o, a.o_proj),
                (d.norm1, s.layernorm_before),
                (d.q, a.q_proj),
                (d.k, a.k_proj),
                (d.v, a.v_proj),
                (d.o, a.o_proj),
                (d.norm2, s.layernorm_after),
                (d.mlp.fc1, s.mlp.fc1),
                (d.mlp.fc2, s.mlp.fc2),
                (d.infuse_norm, s.layernorm_before),
                (d.infuse_v, a.v_proj),
                (d.infuse_o, a.o_proj),
            ):
                copy(target, source)
        for norm in (dst.lookup_norm, dst.compressed_norm):
            copy(norm, src.layernorm)
        for head in (model.lookup_classifier, model.compressed_classifier):
            copy(head, vit.classifier)


def train_lookupvit(
    train: data.Split, schedule: Schedule, seed: int, start: torch.nn.Module
) -> LookupViTForImageClassification:
    """Initialised from `start`, a same-size ViT classifier (init_from_vit), then trained on every
    train image with known facts at a grid drawn from GRIDS each step."""
    model = LookupViTForImageClassification(lookupvit_config())
    init_from_vit(model, start)
    ids = train.fact_ids()
    y = class_targets(train, ids)
    preprocess = ImagePreprocessor(data.IMAGE_SIZE)
    rng, grid_rng = np.random.default_rng(seed), random.Random(seed)
    stream = batches(len(ids), schedule.batch, rng)

    def loss_fn(step: int) -> torch.Tensor:
        idx = next(stream)
        pixels = preprocess.from_uint8(augment(train.images[ids[idx]], rng))
        return model(pixels, grid=grid_rng.choice(GRIDS), labels=y[idx]).loss

    optimise(model, schedule, loss_fn, "lookupvit")
    return model


def train_phase(ctx: Context) -> dict[str, torch.nn.Module]:
    """Train, then save to out/lookupvit-classify with its timing and the machine's load."""
    load_at_start = [round(x, 2) for x in os.getloadavg()]  # other processes share the CPU?
    vit = ctx.models[VIT_CLASSIFY]
    model = ctx.timed("lookupvit", lambda schedule: train_lookupvit(ctx.split, schedule, ctx.seed, vit))
    schedule, seconds = ctx.schedules["lookupvit"], ctx.report["seconds"]["lookupvit"]
    meta = {
        "seed": ctx.seed,
        "task": "classify",
        "architecture": type(model).__name__,
        "schedule": {k: v for k, v in vars(schedule).items() if k != "distill_from"},
        "grids": list(GRIDS),
        "initialised_from": "ViT demo classifier",
        "distill_weight": 0.0,  # no distillation from the ViT's logits (see above)
        "seconds": {"lookupvit": seconds},
        "steps_per_second": round(schedule.steps / seconds, 2),
        "threads": torch.get_num_threads(),
        "loadavg_at_start": load_at_start,
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    save(model, ctx.out / LOOKUPVIT_CLASSIFY, meta=meta)
    return {LOOKUPVIT_CLASSIFY: model}


PHASES = (
    Phase(
        requires=(VIT_CLASSIFY,),
        produces=(LOOKUPVIT_CLASSIFY,),
        schedules={"lookupvit": SCHEDULE},
        run=train_phase,
    ),
)
