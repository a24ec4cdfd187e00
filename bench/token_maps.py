"""Which image patches each token stands for, as maps and pictures: the merge maps of the fidelity
benchmark (photos) and the token maps of the scenes subject (which regions each method keeps at
each level, for a few test scenes and their questions)."""

from __future__ import annotations

import textwrap

import numpy as np
import torch

from models.token_map import PRUNED

MAP_SCENES = 3  # test scenes shown (their first question each)
MAP_METHODS = ("pumer", "tome", "evit", "text-evit")


def token_of_patch(sources: torch.Tensor, protected: int, grid: int, complete: bool = True) -> np.ndarray:
    """(N, N0) sources of one image -> (grid, grid) index of the token covering each patch, PRUNED
    where no token does. complete: every patch must be covered exactly once (merging only)."""
    patches = sources[:, protected:].float()
    covered = patches.sum(dim=0)
    if complete and not torch.all(covered == 1):
        raise AssertionError("every patch must be covered by exactly one token")
    if torch.any(covered > 1):
        raise AssertionError("no patch may be covered by two tokens")
    tokens = patches.argmax(dim=0).numpy()
    tokens[covered.numpy() == 0] = PRUNED
    return tokens.reshape(grid, grid)


def merge_picture(image: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Each token's patches filled with their mean colour, token boundaries in white, pruned
    patches a dark grey."""
    patch = image.shape[0] // tokens.shape[0]
    labels = np.kron(tokens, np.ones((patch, patch), dtype=tokens.dtype))
    out = np.zeros_like(image, dtype=np.float64)
    for t in np.unique(labels):
        mask = labels == t
        out[mask] = (70, 70, 70) if t == PRUNED else image[mask].reshape(-1, 3).mean(axis=0)
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    out[edge & (labels != PRUNED)] = 255
    return out.astype(np.uint8)


@torch.inference_mode()
def scene_maps(subject) -> list[dict]:
    """For the first question of each of the first MAP_SCENES test scenes: the answer and the token
    map after the last layer under each method of MAP_METHODS the model has, at every level."""
    from models.levels import named_plan
    from models.plan import LEVELS

    bundle, rm, split = subject.bundles["main"], subject.main, subject.split
    first = np.unique(split.question_image, return_index=True)[1][:MAP_SCENES]
    methods = [m for m in MAP_METHODS if m in rm.methods]
    labels = bundle.labels()
    entries = []
    for q in first:
        image = split.images[split.question_image[q]]
        pixels = bundle.preprocess.from_uint8(image[None])
        entry = {
            "scene": split.scene_ids[split.question_image[q]],
            "question": split.questions[q],
            "answer": split.answers[q],
            "maps": {},
        }
        for method in methods:
            for level in LEVELS[1:]:
                plan = named_plan(rm, level, method)
                out = rm(**bundle.inputs(pixels, [split.questions[q]]), plan=plan, track_source=True)
                [after_last] = rm.token_maps(out, len(out.patch_sources) - 1)
                entry["maps"][f"{method}/{level}"] = {
                    "token_of_patch": after_last.token_of_patch.reshape(after_last.grid).tolist(),
                    "predicted": labels[int(out.logits[0].argmax())],
                }
        entries.append(entry)
    return entries


def plot_scene_maps(plt, report: dict, path) -> bool:
    """One row per (scene, method): the scene, then its token map at low, medium and high."""
    from models.demo.scenes import load_split
    from models.demo.scenes.dataset import cached_test_split

    subjects = [s for s in report["subjects"] if s.get("token_maps")]
    if not subjects:
        return False
    subject = subjects[0]
    split = load_split(cached_test_split(), "test")
    index = {sid: i for i, sid in enumerate(split.scene_ids)}
    rows = [
        (e, key.split("/")[0]) for e in subject["token_maps"] for key in e["maps"] if key.endswith("/low")
    ]
    fig, axes = plt.subplots(len(rows), 4, figsize=(9, 2.4 * len(rows)), squeeze=False, layout="constrained")
    for (entry, method), ax_row in zip(rows, axes, strict=True):
        image = split.images[index[entry["scene"]]]
        ax_row[0].imshow(image)
        question = textwrap.fill(entry["question"], 36)
        ax_row[0].set_title(f"{question}\n(answer: {entry['answer']})", fontsize=7)
        for ax, level in zip(ax_row[1:], ("low", "medium", "high"), strict=True):
            m = entry["maps"][f"{method}/{level}"]
            tokens = np.asarray(m["token_of_patch"])
            ax.imshow(merge_picture(image, tokens))
            kept = len(set(tokens.flatten().tolist()) - {PRUNED})
            ax.set_title(f"{method} {level}: {kept} tokens, says {m['predicted']}", fontsize=7)
        for ax in ax_row:
            ax.axis("off")
    fig.suptitle(
        f"{subject['name']}: image tokens after the last layer (merged patches share a colour, pruned "
        "patches dark grey)",
        fontsize=9,
    )
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
