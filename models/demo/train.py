"""`tokenlean train-demo`: the three embedded demo checkpoints, trained from scratch on easy-VQA.

Order, as ViLT itself was built: a ViT classifier first (shape x colour); its patch embedding
and encoder initialise ViLT, which learns VQA; the VQA model's encoder initialises the
image-text matching (retrieval) model; last, the classifier trains again at a low learning rate.
The last phases of VQA and retrieval, and the whole last classifier phase, add self-distillation:
each step also runs a reduced plan at a random level and pulls its logits towards the unreduced
ones (KL, as PuMer's distillation), so one set of weights holds accuracy when reduced.

Seeded, but not bitwise reproducible: CPU float reductions vary with thread timing, and these
small models' training is sensitive to it (the classifier most: see README).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import (
    BertTokenizerFast,
    ViltConfig,
    ViltForImageAndTextRetrieval,
    ViltForQuestionAnswering,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

from models import NO_REDUCTION, named_plan, reducible
from models.demo import data
from models.tasks.preprocess import ImagePreprocessor

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
# One shape for all three models, so ViT weights can initialise ViLT.
ARCH = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512)
DROPOUT_FREE = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
PATCH = 8  # 64 px images -> 8 x 8 = 64 patches
MAX_TEXT = 16
DISTILL_LEVELS = ("low", "medium", "high")


@dataclass(frozen=True)
class Schedule:
    steps: int
    batch: int
    lr: float
    distill_from: float = 1.0  # fraction of steps after which self-distillation starts


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def optimise(
    model: torch.nn.Module, schedule: Schedule, loss_fn: Callable[[int], torch.Tensor], desc: str
) -> list[float]:
    """AdamW with linear warm-up and cosine decay; loss_fn(step) returns the loss of one batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=schedule.lr, weight_decay=0.01)
    warmup = max(1, schedule.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, schedule.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses = []
    bar = tqdm(range(schedule.steps), desc=desc)
    for step in bar:
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    model.eval()
    return losses


def batches(n: int, batch: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless shuffled epochs of indices."""
    while True:
        order = rng.permutation(n)
        for i in range(0, n - batch + 1, batch):
            yield order[i : i + batch]


def distill_loss(rm, logits_full: torch.Tensor, run_reduced: Callable, rng: random.Random) -> torch.Tensor:
    """KL(unreduced || reduced) at a random level of a random method of the model (PuMer for
    ViLT only: its merge-only and prune-only variants are left to generalise); the unreduced
    logits are the teacher."""
    method = "pumer" if rm.family == "vilt" else rng.choice(rm.methods)
    plan = named_plan(rm, rng.choice(DISTILL_LEVELS), method)
    reduced = run_reduced(plan)
    teacher = logits_full.detach()
    if teacher.shape[-1] == 1:  # binary matching score
        return F.binary_cross_entropy_with_logits(reduced, teacher.sigmoid())
    return F.kl_div(reduced.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="batchmean")


def build_tokenizer(out: Path, words: list[str]) -> BertTokenizerFast:
    out.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tokenizer = BertTokenizerFast(
        vocab={word: i for i, word in enumerate(vocab)}, do_lower_case=True, model_max_length=MAX_TEXT
    )
    tokenizer.save_pretrained(out)
    return tokenizer


def save(model: torch.nn.Module, out: Path, tokenizer=None, meta: dict | None = None) -> None:
    model.save_pretrained(out, safe_serialization=True)
    ViTImageProcessor(
        size={"height": 64, "width": 64}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if meta:
        (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")


# ---------------------------------------------------------------- classification (ViT)


def train_classifier(
    train: data.Split, schedule: Schedule, seed: int, start: ViTForImageClassification | None = None
) -> ViTForImageClassification:
    """From scratch, or (start=...) a further phase on a trained classifier."""
    labels = data.class_labels()
    config = ViTConfig(
        **ARCH,
        **DROPOUT_FREE,
        image_size=64,
        patch_size=PATCH,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    model = ViTForImageClassification(config)
    if start is not None:
        model.load_state_dict(start.state_dict())
    ids = train.fact_ids()
    y = torch.tensor([labels.index(f"{train.facts[i][1]} {train.facts[i][0]}") for i in ids])
    preprocess = ImagePreprocessor(64)
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
            loss = loss + distill_loss(rm, logits, run, prng)
        return loss

    optimise(model, schedule, loss_fn, "classify")
    return model


def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random flips and quarter turns: neither the shape nor the colour changes under them."""
    turns, flips = rng.integers(0, 4, len(images)), rng.random(len(images)) < 0.5
    return np.stack(
        [np.rot90(im[:, ::-1] if f else im, k) for im, k, f in zip(images, turns, flips, strict=True)]
    )


# ---------------------------------------------------------------- ViLT from the ViT encoder


def vilt_from_vit(cls, vit: ViTForImageClassification, config: ViltConfig):
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
        image_size=64,
        patch_size=PATCH,
        max_position_embeddings=MAX_TEXT,
        vocab_size=vocab_size,
        max_image_length=-1,
        **extra,
    )


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
    preprocess = ImagePreprocessor(64)
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
            loss = loss + distill_loss(rm, logits, run, prng)
        return loss

    optimise(model, schedule, loss_fn, "vqa")
    return model


def trim(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop padding columns no row of the batch uses (pad to the batch's longest question)."""
    length = int(mask.sum(1).max())
    return ids[:, :length], mask[:, :length]


# ---------------------------------------------------------------- retrieval (image-text matching)


def negative_facts(shape: str, color: str, rng: random.Random) -> list[tuple[str, str]]:
    """A hard negative per fact (same shape other colour, same colour other shape) and a random one."""
    other_color = rng.choice([c for c in data.COLORS if c != color])
    other_shape = rng.choice([s for s in data.SHAPES if s != shape])
    random_pair = rng.choice([(s, c) for s in data.SHAPES for c in data.COLORS if (s, c) != (shape, color)])
    return [(shape, other_color), (other_shape, color), random_pair]


def train_retrieval(train: data.Split, vqa, tokenizer, schedule: Schedule, seed: int):
    config = vilt_config(len(tokenizer))
    model = ViltForImageAndTextRetrieval(config)
    model.vilt.load_state_dict(vqa.vilt.state_dict())
    rm = reducible(model)
    ids = train.fact_ids()
    by_facts: dict[tuple[str, str], list[int]] = {}
    for i in ids:
        by_facts.setdefault(train.facts[i], []).append(int(i))
    preprocess = ImagePreprocessor(64)
    rng, prng = np.random.default_rng(seed), random.Random(seed)
    stream = batches(len(ids), schedule.batch, rng)
    distill_step = int(schedule.distill_from * schedule.steps)

    def loss_fn(step: int) -> torch.Tensor:
        images, texts, targets = [], [], []
        for i in ids[next(stream)]:
            facts = train.facts[int(i)]
            images.append(int(i)), texts.append(data.caption(*facts)), targets.append(1.0)
            for neg in negative_facts(*facts, prng):  # wrong captions for this image
                images.append(int(i)), texts.append(data.caption(*neg)), targets.append(0.0)
            neg = negative_facts(*facts, prng)[prng.randrange(3)]  # a wrong image for this caption
            if neg in by_facts:
                (
                    images.append(prng.choice(by_facts[neg])),
                    texts.append(data.caption(*facts)),
                    targets.append(0.0),
                )
        enc = tokenizer(texts, padding="longest", return_tensors="pt")
        pixels = preprocess.from_uint8(train.images[images])

        def run(plan):
            return rm(enc["input_ids"], pixels, attention_mask=enc["attention_mask"], plan=plan).logits

        logits = run(NO_REDUCTION)
        loss = F.binary_cross_entropy_with_logits(logits[:, 0], torch.tensor(targets))
        if step >= distill_step:
            loss = loss + distill_loss(rm, logits, run, prng)
        return loss

    optimise(model, schedule, loss_fn, "retrieval")
    return model


# ---------------------------------------------------------------- all three


SCHEDULES = {
    "classify": Schedule(steps=2000, batch=64, lr=1e-3),
    "vqa": Schedule(steps=2800, batch=64, lr=7e-4, distill_from=0.75),
    "retrieval": Schedule(steps=500, batch=24, lr=2e-4, distill_from=0.6),
    # Last: the classifier again, at a low learning rate, with self-distillation at random
    # methods and levels, so one set of weights holds its accuracy under ToMe, TC-ViT and EViT.
    "classify_distill": Schedule(steps=500, batch=64, lr=3e-4, distill_from=0.0),
}


def train_demo(out: Path = CHECKPOINTS, seed: int = 0, scale: float = 1.0, only: str | None = None) -> dict:
    """Train and save all three checkpoints under `out`, then the LookupViT classifier.
    `scale` shrinks the schedules (smoke runs); `only="lookupvit"` trains the LookupViT classifier
    alone (from the ViT classifier already under out/classify)."""
    from models.demo.train_lookupvit import train_demo_lookupvit

    if only not in (None, "lookupvit"):
        raise ValueError(f"only: 'lookupvit' or None, got {only!r}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    schedules = {
        k: Schedule(max(1, int(s.steps * scale)), s.batch, s.lr, s.distill_from) for k, s in SCHEDULES.items()
    }
    train = data.load_split("train")
    report = {"seed": seed, "schedules": {k: vars(s) for k, s in schedules.items()}, "seconds": {}}
    if only == "lookupvit":
        train_demo_lookupvit(out, train, seed, scale, report)
        return report

    def timed(name, fn):
        seed_everything(seed)
        start = time.perf_counter()
        result = fn()
        report["seconds"][name] = round(time.perf_counter() - start, 1)
        return result

    vit = timed("classify", lambda: train_classifier(train, schedules["classify"], seed))
    tokenizer = build_tokenizer(out / "vqa", data.vocabulary(train))
    vqa = timed("vqa", lambda: train_vqa(train, vit, tokenizer, schedules["vqa"], seed))
    save(vqa, out / "vqa", tokenizer, meta={**report, "task": "vqa"})
    retrieval = timed(
        "retrieval", lambda: train_retrieval(train, vqa, tokenizer, schedules["retrieval"], seed)
    )
    save(retrieval, out / "retrieval", tokenizer, meta={**report, "task": "retrieval"})
    vit = timed("classify_distill", lambda: train_classifier(train, schedules["classify_distill"], seed, vit))
    save(vit, out / "classify", meta={**report, "task": "classify"})
    train_demo_lookupvit(out, train, seed, scale, report, vit)
    return report
