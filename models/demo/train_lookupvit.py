"""The LookupViT demo classifier (`tokenlean train-demo`, last phase; `--only lookupvit` alone).

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
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.demo import data
from models.demo.train import ARCH, PATCH, Schedule, augment, batches, optimise, save, seed_everything
from models.lookupvit import LookupViTConfig, LookupViTForImageClassification
from models.tasks.preprocess import ImagePreprocessor

GRIDS = (1, 2, 3, 4, 5, 6)
SCHEDULE = Schedule(steps=1200, batch=64, lr=1e-3)
WARM_START = True  # initialise from the ViT demo classifier (init_from_vit)
DISTILL_WEIGHT = 0.0  # > 0: KL from the ViT demo classifier's logits to each head


def lookupvit_config(grids: tuple[int, ...] = GRIDS) -> LookupViTConfig:
    labels = data.class_labels()
    return LookupViTConfig(
        hidden_size=ARCH["hidden_size"],
        num_hidden_layers=ARCH["num_hidden_layers"],
        num_attention_heads=ARCH["num_attention_heads"],
        intermediate_size=ARCH["intermediate_size"],  # p = 4
        lookup_intermediate_size=ARCH["hidden_size"] // 2,  # q = 2
        image_size=data.IMAGE_SIZE,
        patch_size=PATCH,
        grid_sizes=list(grids),
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


def class_targets(split: data.Split, ids: np.ndarray) -> torch.Tensor:
    labels = data.class_labels()
    return torch.tensor([labels.index(f"{split.facts[int(i)][1]} {split.facts[int(i)][0]}") for i in ids])


def train_lookupvit(
    train: data.Split,
    schedule: Schedule,
    seed: int,
    ids: np.ndarray | None = None,
    teacher: torch.nn.Module | None = None,
    distill_weight: float = DISTILL_WEIGHT,
    grids: tuple[int, ...] = GRIDS,
    start: torch.nn.Module | None = None,
) -> LookupViTForImageClassification:
    """Train on the images `ids` (default: every train image with known facts). `teacher`: a
    classifier over the same labels whose logits each head is pulled towards (KL). `start`: a
    same-size ViT classifier to initialise from (init_from_vit)."""
    model = LookupViTForImageClassification(lookupvit_config(grids))
    if start is not None:
        init_from_vit(model, start)
    ids = train.fact_ids() if ids is None else ids
    y = class_targets(train, ids)
    preprocess = ImagePreprocessor(data.IMAGE_SIZE)
    rng, grid_rng = np.random.default_rng(seed), random.Random(seed)
    stream = batches(len(ids), schedule.batch, rng)
    if teacher is not None:
        teacher.eval()

    def loss_fn(step: int) -> torch.Tensor:
        idx = next(stream)
        pixels = preprocess.from_uint8(augment(train.images[ids[idx]], rng))
        out = model(pixels, grid=grid_rng.choice(grids), labels=y[idx])
        loss = out.loss
        if teacher is not None:
            with torch.no_grad():
                target = teacher(pixel_values=pixels).logits.log_softmax(-1)
            kl = sum(
                F.kl_div(logits.log_softmax(-1), target, log_target=True, reduction="batchmean")
                for logits in (out.compressed_logits, out.lookup_logits)
            )
            loss = loss + distill_weight * kl / 2
        return loss

    optimise(model, schedule, loss_fn, "lookupvit")
    return model


@torch.inference_mode()
def grid_accuracy(
    model, split: data.Split, ids: np.ndarray, grids: tuple[int, ...] = GRIDS
) -> dict[int, float]:
    """Accuracy of the averaged heads at each grid on the images `ids` of `split`."""
    preprocess = ImagePreprocessor(data.IMAGE_SIZE)
    y = class_targets(split, ids)
    result = {}
    for grid in grids:
        correct = 0
        for start in range(0, len(ids), 256):
            pixels = preprocess.from_uint8(split.images[ids[start : start + 256]])
            correct += int((model(pixels, grid=grid).logits.argmax(-1) == y[start : start + 256]).sum())
        result[grid] = correct / len(ids)
    return result


def load_teacher(path: Path) -> torch.nn.Module:
    from transformers import ViTForImageClassification

    return ViTForImageClassification.from_pretrained(path, use_safetensors=True).eval()


def train_demo_lookupvit(
    out: Path, train: data.Split, seed: int, scale: float, report: dict, vit: torch.nn.Module | None = None
) -> LookupViTForImageClassification:
    """The train-demo phase: train, then save to out/classify-lookupvit with its timing. `vit`: the
    ViT demo classifier (loaded from out/classify when not given and the recipe needs it)."""
    schedule = Schedule(max(1, int(SCHEDULE.steps * scale)), SCHEDULE.batch, SCHEDULE.lr)
    if vit is None and (WARM_START or DISTILL_WEIGHT > 0):
        vit = load_teacher(out / "classify")
    seed_everything(seed)
    load_at_start = [round(x, 2) for x in os.getloadavg()]  # other processes share the CPU?
    begin = time.perf_counter()
    model = train_lookupvit(
        train,
        schedule,
        seed,
        teacher=vit if DISTILL_WEIGHT > 0 else None,
        start=vit if WARM_START else None,
    )
    seconds = round(time.perf_counter() - begin, 1)
    meta = {
        "seed": seed,
        "task": "classify",
        "architecture": "LookupViTForImageClassification",
        "schedule": {k: v for k, v in vars(schedule).items() if k != "distill_from"},
        "grids": list(GRIDS),
        "initialised_from": "ViT demo classifier" if WARM_START else "random",
        "distill_weight": DISTILL_WEIGHT,
        "seconds": {"lookupvit": seconds},
        "steps_per_second": round(schedule.steps / seconds, 2),
        "threads": torch.get_num_threads(),
        "loadavg_at_start": load_at_start,
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    report["seconds"]["lookupvit"] = seconds
    save(model, out / "classify-lookupvit", meta=meta)
    return model
