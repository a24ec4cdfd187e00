"""The ViLT demo checkpoints, as ViLT itself was built: VQA initialised from the first-phase ViT
classifier (patch embedding, position embeddings, encoder layers), then image-text matching
(retrieval) initialised from the VQA model's encoder. The last part of each adds
self-distillation at a random level of PuMer (its merge-only and prune-only variants are left to
generalise). Both share one WordPiece tokenizer built from the data set's words.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from transformers import ViltConfig, ViltForImageAndTextRetrieval, ViltForQuestionAnswering

from models.demo import data
from models.demo.paths import CLASSIFY_PHASE1, RETRIEVAL, VQA
from models.demo.training import (
    ARCH,
    DROPOUT_FREE,
    PATCH,
    Context,
    Phase,
    Schedule,
    batches,
    build_tokenizer,
    distill_loss,
    optimise,
    save,
)
from models.families.registry import reducible
from models.plan import NO_REDUCTION
from models.preprocess import ImagePreprocessor

MAX_TEXT = 16
DISTILL_METHODS = ("pumer",)
SCHEDULES = {
    "vqa": Schedule(steps=2800, batch=64, lr=7e-4, distill_from=0.75),
    "retrieval": Schedule(steps=500, batch=24, lr=2e-4, distill_from=0.6),
}


def vilt_from_vit(cls, vit: torch.nn.Module, config: ViltConfig):
    """ViLT's patch embedding, image position embeddings and encoder layers from the ViT."""
    model = cls(config)
    vilt, v = model.vilt, vit.vit
    with torch.no_grad():
        vilt.embeddings.patch_embeddings.projection.load_state_dict(
            v.embeddings.patch_embeddings.projection.state_dict()
        )
        vilt.embeddings.position_embeddings.copy_(v.embeddings.position_embeddings)
        vilt.embeddings.cls_token.copy_(v.embeddings.cls_token)
        for dst, src in zip(vilt.encoder.layer, v.layers, strict=True):
            a, sa = dst.attention, src.attention
            for d, s in (
                (a.attention.query, sa.q_proj),
                (a.attention.key, sa.k_proj),
                (a.attention.value, sa.v_proj),
                (a.output.dense, sa.o_proj),
                (dst.intermediate.dense, src.mlp.fc1),
                (dst.output.dense, src.mlp.fc2),
            ):
                d.load_state_dict(s.state_dict())
            dst.layernorm_before.load_state_dict(src.layernorm_before.state_dict())
            dst.layernorm_after.load_state_dict(src.layernorm_after.state_dict())
    return model


def vilt_config(vocab_size: int, **extra) -> ViltConfig:
    return ViltConfig(
        **ARCH,
        **DROPOUT_FREE,
        image_size=data.IMAGE_SIZE,
        patch_size=PATCH,
        max_position_embeddings=MAX_TEXT,
        vocab_size=vocab_size,
        max_image_length=-1,
        **extra,
    )


def trim(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop padding columns no row of the batch uses (pad to the batch's longest question)."""
    length = int(mask.sum(1).max())
    return ids[:, :length], mask[:, :length]


def train_vqa(train: data.Split, vit, tokenizer, schedule: Schedule, seed: int) -> ViltForQuestionAnswering:
    answers = data.answers()
    config = vilt_config(
        len(tokenizer),
        num_labels=len(answers),
        id2label=dict(enumerate(answers)),
        label2id={a: i for i, a in enumerate(answers)},
        problem_type="single_label_classification",
    )
    model = vilt_from_vit(ViltForQuestionAnswering, vit, config)
    rm = reducible(model)
    enc = tokenizer(list(train.questions), padding="max_length", max_length=MAX_TEXT, return_tensors="pt")
    y = torch.tensor([answers.index(a) for a in train.answers])
    preprocess = ImagePreprocessor(data.IMAGE_SIZE)
    rng, prng = np.random.default_rng(seed), random.Random(seed)
    stream = batches(len(y), schedule.batch, rng)
    distill_step = int(schedule.distill_from * schedule.steps)

    def loss_fn(step: int) -> torch.Tensor:
        idx = torch.from_numpy(next(stream))
        ids, mask = trim(enc["input_ids"][idx], enc["attention_mask"][idx])
        pixels = preprocess.from_uint8(train.images[train.question_image[idx.numpy()]])

        def run(plan):
            return rm(ids, pixels, attention_mask=mask, plan=plan).logits

        logits = run(NO_REDUCTION)
        loss = F.cross_entropy(logits, y[idx])
        if step >= distill_step:
            loss = loss + distill_loss(rm, DISTILL_METHODS, logits, run, prng)
        return loss

    optimise(model, schedule, loss_fn, "vqa")
    return model


def negative_facts(shape: str, color: str, rng: random.Random) -> list[tuple[str, str]]:
    """A hard negative per fact (same shape other colour, same colour other shape) and a random one."""
    other_color = rng.choice([c for c in data.COLORS if c != color])
    other_shape = rng.choice([s for s in data.SHAPES if s != shape])
    random_pair = rng.choice([(s, c) for s in data.SHAPES for c in data.COLORS if (s, c) != (shape, color)])
    return [(shape, other_color), (other_shape, color), random_pair]


def matching_pairs(
    train: data.Split, ids: np.ndarray, by_facts: dict[tuple[str, str], list[int]], prng: random.Random
) -> tuple[list[int], list[str], list[float]]:
    """(images, captions, targets) of one retrieval batch: per image its caption (1), its three
    negative captions (0) and, when the split has one, an image of a negative fact for its caption (0)."""
    images, texts, targets = [], [], []
    for i in ids:
        facts = train.facts[int(i)]
        images.append(int(i)), texts.append(data.caption(*facts)), targets.append(1.0)
        for neg in negative_facts(*facts, prng):  # wrong captions for this image
            images.append(int(i)), texts.append(data.caption(*neg)), targets.append(0.0)
        neg = negative_facts(*facts, prng)[prng.randrange(3)]  # a wrong image for this caption
        if neg in by_facts:
            images.append(prng.choice(by_facts[neg])), texts.append(data.caption(*facts)), targets.append(0.0)
    return images, texts, targets


def train_retrieval(train: data.Split, vqa, tokenizer, schedule: Schedule, seed: int):
    config = vilt_config(len(tokenizer))
    model = ViltForImageAndTextRetrieval(config)
    model.vilt.load_state_dict(vqa.vilt.state_dict())
    rm = reducible(model)
    ids = train.fact_ids()
    by_facts: dict[tuple[str, str], list[int]] = {}
    for i in ids:
        by_facts.setdefault(train.facts[i], []).append(int(i))
    preprocess = ImagePreprocessor(data.IMAGE_SIZE)
    rng, prng = np.random.default_rng(seed), random.Random(seed)
    stream = batches(len(ids), schedule.batch, rng)
    distill_step = int(schedule.distill_from * schedule.steps)

    def loss_fn(step: int) -> torch.Tensor:
        images, texts, targets = matching_pairs(train, ids[next(stream)], by_facts, prng)
        enc = tokenizer(texts, padding="longest", return_tensors="pt")
        pixels = preprocess.from_uint8(train.images[images])

        def run(plan):
            return rm(enc["input_ids"], pixels, attention_mask=enc["attention_mask"], plan=plan).logits

        logits = run(NO_REDUCTION)
        loss = F.binary_cross_entropy_with_logits(logits[:, 0], torch.tensor(targets))
        if step >= distill_step:
            loss = loss + distill_loss(rm, DISTILL_METHODS, logits, run, prng)
        return loss

    optimise(model, schedule, loss_fn, "retrieval")
    return model


def train_vilt(ctx: Context) -> dict[str, torch.nn.Module]:
    split, seed = ctx.split, ctx.seed
    tokenizer = build_tokenizer(ctx.out / VQA, data.vocabulary(split), MAX_TEXT)
    vit = ctx.models[CLASSIFY_PHASE1]
    vqa = ctx.timed("vqa", lambda schedule: train_vqa(split, vit, tokenizer, schedule, seed))
    save(vqa, ctx.out / VQA, tokenizer, meta={**ctx.report, "task": "vqa"})
    retrieval = ctx.timed(
        "retrieval", lambda schedule: train_retrieval(split, vqa, tokenizer, schedule, seed)
    )
    save(retrieval, ctx.out / RETRIEVAL, tokenizer, meta={**ctx.report, "task": "retrieval"})
    return {VQA: vqa, RETRIEVAL: retrieval}


PHASES = (Phase(requires=(CLASSIFY_PHASE1,), produces=(VQA, RETRIEVAL), schedules=SCHEDULES, run=train_vilt),)
