"""What every demo recipe shares: the model shape, the optimiser loop, batching, augmentation,
self-distillation, saving, and the phase/context contract between the recipes and
`models.demo.train.train_demo`.

A recipe module (one per model family, named by the family's `demo_recipe`) declares `PHASES`, a
tuple of Phase. A phase names the models it starts from (`requires`) and the ones it trains
(`produces`): checkpoint folder names (`classify`, `vqa`, ...) or names of unsaved intermediate
models (`classify-phase1`). train_demo runs the phases of every recipe in an order that satisfies
those requirements and hands each one a Context.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import BertTokenizerFast, ViTImageProcessor

from models.demo import data
from models.families.base import ReducibleModel
from models.levels import named_plan

# One shape for every demo model, so ViT weights can initialise ViLT and LookupViT.
ARCH = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512)
DROPOUT_FREE = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
PATCH = 8  # 64 px images -> 8 x 8 = 64 patches
DISTILL_LEVELS = ("low", "medium", "high")

T = TypeVar("T")


@dataclass(frozen=True)
class Schedule:
    steps: int
    batch: int
    lr: float
    distill_from: float = 1.0  # fraction of steps after which self-distillation starts

    def scaled(self, scale: float) -> Schedule:
        """The same schedule with `scale` times the steps (at least one): smoke runs."""
        return Schedule(max(1, int(self.steps * scale)), self.batch, self.lr, self.distill_from)


@dataclass
class Context:
    """What a phase gets: where checkpoints go, the train split, the seed, its scaled schedules,
    the run's report (seconds per schedule are recorded in it) and every model trained (or loaded)
    so far, by name."""

    out: Path
    split: data.Split
    seed: int
    scale: float
    report: dict
    schedules: dict[str, Schedule]
    models: dict[str, torch.nn.Module] = field(default_factory=dict)
    scenes: Path | None = None  # a folder `tokenlean data scenes` wrote, for phases on that set
    distill: bool = False  # PuMer's distillation in the recipes that offer it as an option

    def timed(self, name: str, train: Callable[[Schedule], T]) -> T:
        """train(schedule `name`), after reseeding everything; its seconds go to report["seconds"]."""
        seed_everything(self.seed)
        start = time.perf_counter()
        result = train(self.schedules[name])
        self.report["seconds"][name] = round(time.perf_counter() - start, 1)
        return result


@dataclass(frozen=True)
class Phase:
    """One step of the demo training. `schedules`: the unscaled schedules it trains with, by name
    (the names are also the report's timing keys). `run(ctx)` trains, saves what is a checkpoint,
    and returns every model named in `produces`."""

    requires: tuple[str, ...]
    produces: tuple[str, ...]
    schedules: dict[str, Schedule]
    run: Callable[[Context], dict[str, torch.nn.Module]]
    data: str = "easy-vqa"  # what it trains on: "easy-vqa", or "scenes" (Context.scenes)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_mode(model: torch.nn.Module) -> None:
    """model.train(), except for its frozen parts (pretrained towers): those stay in eval mode,
    without dropout (all-MiniLM-L6-v2 has 0.1), as they run when served."""
    model.train()
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()


def optimise(
    model: torch.nn.Module,
    schedule: Schedule,
    loss_fn: Callable[[int], torch.Tensor],
    desc: str,
    lr_scales: Sequence[tuple[torch.nn.Module, float]] = (),
) -> list[float]:
    """AdamW with linear warm-up and cosine decay; loss_fn(step) returns the loss of one batch.
    lr_scales: (part of the model, factor) pairs, whose parameters learn at factor x the rate."""
    scaled = {id(p): factor for part, factor in lr_scales for p in part.parameters()}
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault(scaled.get(id(p), 1.0), []).append(p)
    opt = torch.optim.AdamW(
        [{"params": ps, "lr": schedule.lr * factor} for factor, ps in groups.items()],
        lr=schedule.lr,
        weight_decay=0.01,
    )
    warmup = max(1, schedule.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, schedule.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    train_mode(model)
    losses = []
    bar = tqdm(range(schedule.steps), desc=desc)
    for step in bar:
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
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


def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random flips and quarter turns: neither the shape nor the colour changes under them."""
    turns, flips = rng.integers(0, 4, len(images)), rng.random(len(images)) < 0.5
    return np.stack(
        [np.rot90(im[:, ::-1] if f else im, k) for im, k, f in zip(images, turns, flips, strict=True)]
    )


def class_targets(split: data.Split, ids: np.ndarray) -> torch.Tensor:
    """Index in data.class_labels() of each image's shape x colour class."""
    labels = data.class_labels()
    return torch.tensor([labels.index(data.class_label(*split.facts[int(i)])) for i in ids])


def distill_loss(
    rm: ReducibleModel,
    methods: tuple[str, ...],
    logits_full: torch.Tensor,
    run_reduced: Callable,
    rng: random.Random,
) -> torch.Tensor:
    """KL(unreduced || reduced) at a random level of a random one of `methods`; the unreduced
    logits are the teacher (a matching score: binary cross-entropy to its sigmoid)."""
    # One method draws no random number, so the level sequence does not depend on the method list.
    method = methods[0] if len(methods) == 1 else rng.choice(methods)
    plan = named_plan(rm, rng.choice(DISTILL_LEVELS), method)
    reduced = run_reduced(plan)
    teacher = logits_full.detach()
    if teacher.shape[-1] == 1:  # binary matching score
        return F.binary_cross_entropy_with_logits(reduced, teacher.sigmoid())
    return F.kl_div(reduced.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="batchmean")


def build_tokenizer(out: Path, words: list[str], max_length: int) -> BertTokenizerFast:
    """A WordPiece tokenizer whose vocabulary is the special tokens and `words`, saved to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tokenizer = BertTokenizerFast(
        vocab={word: i for i, word in enumerate(vocab)}, do_lower_case=True, model_max_length=max_length
    )
    tokenizer.save_pretrained(out)
    return tokenizer


def save(model: torch.nn.Module, out: Path, tokenizer=None, meta: dict | None = None) -> None:
    """safetensors weights, config, the 64 px image processor, the tokenizer and training.json."""
    model.save_pretrained(out, safe_serialization=True)
    ViTImageProcessor(
        size={"height": data.IMAGE_SIZE, "width": data.IMAGE_SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if meta:
        (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
