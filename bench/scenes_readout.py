"""Can the scenes be learnt from the frozen vision tower, and from how many questions a scene?

A minimal read-out, not a shipped model: the question's mean MiniLM state queries the frozen
DINOv2-S/14 last-layer tokens through `--hops` rounds of 4-head cross-attention (each round's query
also sees what the previous one read), and an MLP answers from the question and what it read. It
trains on the first `--images` training scenes minus the last `--held-out`, which score it, once
per `--questions-per-scene` value: the scenes stay the same, the generator asks each of them that
many questions (a scene's first n are the same whatever n). A read-out that memorises its training
scenes instead of learning to look shows as a low training loss beside a held-out accuracy that
stops rising.

    tokenlean data scenes --out /tmp/scenes
    python -m bench.scenes_readout --scenes /tmp/scenes --questions-per-scene 4 24
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.measure import environment, module_command

HEADS, WIDTH = 4, 256


class ReadOut(nn.Module):
    def __init__(self, text_width: int, image_width: int, answers: int, hops: int):
        super().__init__()
        self.norm = nn.LayerNorm(image_width)
        self.keys, self.values = nn.Linear(image_width, WIDTH), nn.Linear(image_width, WIDTH)
        self.queries = nn.ModuleList(nn.Linear(text_width + WIDTH, WIDTH) for _ in range(hops))
        self.answer = nn.Sequential(
            nn.Linear(text_width + WIDTH * hops, 512), nn.GELU(), nn.Linear(512, answers)
        )

    def forward(self, question: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        b = image.shape[0]
        image = self.norm(image)
        k = self.keys(image).view(b, -1, HEADS, WIDTH // HEADS).transpose(1, 2)
        v = self.values(image).view(b, -1, HEADS, WIDTH // HEADS).transpose(1, 2)
        read, reads = question.new_zeros(b, WIDTH), []
        for query in self.queries:
            q = query(torch.cat([question, read], dim=-1)).view(b, HEADS, 1, WIDTH // HEADS)
            read = F.scaled_dot_product_attention(q, k, v).reshape(b, WIDTH)
            reads.append(read)
        return self.answer(torch.cat([question, *reads], dim=-1))


def question_states(probe, tokenizer, texts: list[str]) -> torch.Tensor:
    """Mean MiniLM state of each text (padding left out)."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), 512):
            enc = tokenizer(texts[start : start + 512], padding="longest", return_tensors="pt")
            states = probe.base.text_tokens(enc["input_ids"], enc["attention_mask"])
            mask = enc["attention_mask"][..., None].to(states.dtype)
            out.append((states * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


@torch.inference_mode(False)
@torch.enable_grad()
def run(data_seed: int, towers, tokens: torch.Tensor, per_scene: int, args) -> dict:
    """Train and score the read-out on `per_scene` questions of each of the len(tokens) scenes."""
    from models.demo.scenes import ANSWERS
    from models.demo.scenes.dataset import make_scene, rng_for
    from models.demo.scenes.questions import questions_for

    n_images, held_out = len(tokens), args.held_out
    asked = [
        (i, q)
        for i in range(n_images)
        for q in questions_for(
            make_scene(data_seed, "train", i), rng_for(data_seed, "train", i, "questions"), per_scene
        )
    ]
    image = np.array([i for i, _ in asked])
    kinds = np.array([q.type for _, q in asked])
    answers = torch.tensor([ANSWERS.index(q.answer) for _, q in asked])
    texts = sorted({q.text for _, q in asked})
    where = {t: i for i, t in enumerate(texts)}
    question = question_states(*towers, texts)[torch.tensor([where[q.text] for _, q in asked])]
    train, test = np.flatnonzero(image < n_images - held_out), np.flatnonzero(image >= n_images - held_out)

    torch.manual_seed(args.seed)
    model = ReadOut(question.shape[1], tokens.shape[-1], len(ANSWERS), args.hops)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    rng = np.random.default_rng(args.seed)

    def forward(idx: np.ndarray) -> torch.Tensor:
        return model(question[idx], tokens[image[idx]].float())

    def score(idx: np.ndarray) -> tuple[float, dict[str, float]]:
        with torch.no_grad():
            right = torch.cat([forward(idx[s : s + 500]).argmax(-1) for s in range(0, len(idx), 500)])
        right = (right == answers[idx]).numpy()
        by_type = {
            str(k): round(100 * float(right[kinds[idx] == k].mean()), 1) for k in sorted(set(kinds[idx]))
        }
        return round(100 * float(right.mean()), 1), by_type

    curve, losses, start = [], [], time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = rng.choice(train, args.batch)
        loss = F.cross_entropy(forward(idx), answers[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % args.every == 0 or step == args.steps:
            held, by_type = score(test)
            curve.append(
                {
                    "step": step,
                    "train_loss": round(float(np.mean(losses[-args.every :])), 3),
                    "held_out": held,
                    "by_type": by_type,
                    "seconds": round(time.perf_counter() - start),
                }
            )
            print(f"{per_scene:>3} a scene, step {step}: {curve[-1]}", flush=True)
    return {
        "questions": len(asked),
        "train_questions": len(train),
        "held_out_questions": len(test),
        "curve": curve,
    }


def main(argv: list[str] | None = None) -> None:
    from models.demo.scenes import load_split
    from models.demo.two_stream import cache_tower, load_towers

    parser = argparse.ArgumentParser(
        prog="python -m bench.scenes_readout", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--scenes", type=Path, required=True, help="written by `tokenlean data scenes`")
    parser.add_argument("--images", type=int, default=3000, help="first training scenes used")
    parser.add_argument("--held-out", type=int, default=200, help="the last of them, which score it")
    parser.add_argument("--questions-per-scene", type=int, nargs="+", default=[4, 24])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--every", type=int, default=500, help="score the held-out scenes every N steps")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hops", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/scenes_readout.json"))
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if not 0 < args.held_out < args.images:
        parser.error("--held-out must be between 0 and --images")

    manifest = json.loads((args.scenes / "manifest.json").read_text())
    split = load_split(args.scenes, "train")
    _, tokenizer, probe = load_towers()
    tokens = cache_tower(probe, split.images[: args.images], settings=("none",)).x["none"]
    results = {
        str(n): run(manifest["seed"], (probe, tokenizer), tokens, n, args) for n in args.questions_per_scene
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        **environment(module_command("bench.scenes_readout", argv)),
        "args": vars(args),
        "results": results,
    }
    args.out.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
