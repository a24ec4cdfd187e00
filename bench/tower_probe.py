"""Linear probes on the frozen vision tower: how well an object's colour, shape and size can be
read from the DINOv2-S/14 patch token at the object's centre, at several tower layers, on the
scenes set (and, as a floor, from the patch's mean RGB).

It separates two reasons a two-stream model may fail on the scenes: a tower whose tokens do not
carry what the questions ask (low probe accuracy), or fusion layers that do not learn to look at
the right tokens (high probe accuracy, low VQA accuracy). Objects of the first `--train` scenes of
the training split fit a logistic regression per layer; the next `--test` scenes' objects score it.

    tokenlean data scenes --out /tmp/scenes
    python -m bench.tower_probe --scenes /tmp/scenes     # needs `make bench-setup` (scikit-learn)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

LAYERS = (2, 4, 6, 8, 10, 12)
ATTRIBUTES = ("color", "shape", "size")


def patch_features(images: np.ndarray, layers, batch: int = 50) -> dict[int, np.ndarray]:
    """The tower's patch tokens (its [CLS] left out) at `layers`: (N, patches, D) per layer."""
    from models.demo.two_stream import load_towers, preprocessor

    _, _, probe = load_towers()
    pre, parts = preprocessor(), {layer: [] for layer in layers}
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            pixels = pre.from_uint8(images[start : start + batch])
            states = probe.base.vision(pixel_values=pixels, output_hidden_states=True).hidden_states
            for layer in layers:
                parts[layer].append(states[layer][:, 1:].numpy())
    return {layer: np.concatenate(p) for layer, p in parts.items()}


def object_rows(scenes, size: int, grid: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Per object: its scene, the patch under its centre, and its attributes."""
    cell = size / grid
    scene, patch, attrs = [], [], {a: [] for a in ATTRIBUTES}
    for s, graph in enumerate(scenes):
        for obj in graph.objects:
            col, row = min(grid - 1, int(obj.x / cell)), min(grid - 1, int(obj.y / cell))
            scene.append(s)
            patch.append(row * grid + col)
            for a in ATTRIBUTES:
                attrs[a].append(getattr(obj, a))
    return np.array(scene), np.array(patch), {a: np.array(v) for a, v in attrs.items()}


def probe(x: np.ndarray, y: np.ndarray, train: np.ndarray, by_size: np.ndarray) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
    model.fit(x[train], y[train])
    right = model.predict(x[~train]) == y[~train]
    sizes = by_size[~train]
    return {
        "accuracy": round(100 * float(right.mean()), 1),
        **{s: round(100 * float(right[sizes == s].mean()), 1) for s in np.unique(sizes)},
    }


def main(argv: list[str] | None = None) -> None:
    from models.demo.scenes import load_split

    parser = argparse.ArgumentParser(prog="python -m bench.tower_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=Path, required=True, help="written by `tokenlean data scenes`")
    parser.add_argument("--train", type=int, default=1000, help="scenes whose objects fit the probes")
    parser.add_argument("--test", type=int, default=200, help="the next scenes, whose objects score them")
    parser.add_argument("--out", type=Path, default=Path("bench/results/tower_probe.json"))
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)

    split = load_split(args.scenes, "train")
    n = args.train + args.test
    images = split.images[:n]
    features = patch_features(images, LAYERS)
    grid = int(round(features[LAYERS[0]].shape[1] ** 0.5))
    scene, patch, attrs = object_rows(split.scenes[:n], images.shape[1], grid)
    train = scene < args.train
    cell = images.shape[1] // grid
    rgb = images[:, : grid * cell, : grid * cell].reshape(n, grid, cell, grid, cell, 3).mean(axis=(2, 4))
    inputs = {"patch mean RGB": rgb.reshape(n, grid * grid, 3)}
    inputs |= {f"layer {layer}": features[layer] for layer in LAYERS}
    results = {
        attr: {name: probe(x[scene, patch], attrs[attr], train, attrs["size"]) for name, x in inputs.items()}
        for attr in ATTRIBUTES
    }
    print(f"objects: {int(train.sum())} fit, {int((~train).sum())} scored; accuracy % (by object size)")
    for attr, rows in results.items():
        for name, r in rows.items():
            sizes = ", ".join(f"{k} {v}" for k, v in r.items() if k != "accuracy")
            print(f"{attr:>6} {name:>15}: {r['accuracy']:5.1f}  ({sizes})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.tower_probe " + " ".join(argv)
    record = {"command": command, "args": vars(args), "results": results}
    args.out.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
