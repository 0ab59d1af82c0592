"""Multi-label transfer on real images: do tlkit's defaults beat the plain-Keras multi-label recipe?

The task (`build`, offline, from files that installed packages ship, as `make-transfer-tasks` does):
patches of 15 real photos (scikit-image, scikit-learn and matplotlib sample photos) with zero to three of the
letters A-F drawn on them, each in a font, size, place, angle and colour of its own. An image's labels are its
photo and the letters on it: 21 labels, 1 to 4 an image, as a CSV (`file,label,split`, labels separated by a
space, as in Kaggle's Planet CSV). Each photo is cut into a 6x6 grid of tiles: train and val patches come from one
half (a checkerboard), test patches from the other half; the letters of the test split are drawn in fonts never
used in train or val. 20 train, 10 val and 20 test images a photo (300 / 150 / 300).

Recipes, on the same CSV, for each backbone and seed:
- `keras_frozen`: what a user writes from the keras.io guide made multi-label: base frozen in inference mode, GAP,
  Dropout 0.2, `Dense(sigmoid)`, binary cross-entropy, Adam 1e-3, 30 epochs, batch 16, the epoch with the best
  validation PR-AUC (`keras.metrics.AUC(multi_label=True, curve="PR")`) kept.
- `keras_guide`: that, then the whole base at 1e-5 for 10 epochs (the guide's second part), an epoch kept only if it
  beats the frozen part's best.
- `tlkit`: `tlkit.finetune` on the CSV (`--labels labels.csv --label-delimiter " "`) with every other setting at its
  default.

Every recipe is scored the same way on the test split: mAP (the macro average precision over the 21 labels),
micro-F1 at 0.5, and micro-F1 at per-class thresholds chosen on the validation split (the F1-best threshold of
each class: the rule tlkit applies; a user could apply it to any model, so every recipe gets it).

Backbones: the ImageNet EfficientNet-Lite0 of `make-imagenet-backbone` at 96 px (`imagenet`), and the letters
backbone of `make-transfer-tasks` at 32 px (`own`: its features know letters, not photos).

Usage:
    python benchmarks/multilabel.py --seeds 0,1,2 --out benchmarks/results/multilabel.json
    python benchmarks/multilabel.py --build-only DIR
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras  # noqa: E402

CACHE = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
TASK_DIR = os.path.join(CACHE, "tlkit-multilabel-task")
BACKBONES = {
    "imagenet": (os.path.join(CACHE, "imagenet-backbone", "efficientnet_lite0_backbone.keras"), 96),
    "own": (os.path.join(CACHE, "tlkit-transfer-tasks", "letters_backbone.keras"), 32),
}
LETTERS = "ABCDEF"
PER_PHOTO = {"train": 20, "val": 10, "test": 20}
SIZE = 96


# ----------------------------------------------------------------------------------------------- the task
def _photos() -> dict:
    import matplotlib.cbook
    import skimage.data as sk
    from PIL import Image
    from sklearn.datasets import load_sample_image

    out = {}
    for name in ("brick", "grass", "gravel", "coffee", "chelsea", "astronaut", "rocket", "hubble_deep_field",
                 "moon", "retina", "immunohistochemistry", "coins"):
        out[name] = Image.fromarray(getattr(sk, name)()).convert("RGB")
    for name in ("china", "flower"):
        out[name] = Image.fromarray(load_sample_image(name + ".jpg")).convert("RGB")
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        out["grace_hopper"] = Image.open(f).convert("RGB")
    return out


def _fonts() -> list[Path]:
    import matplotlib

    skip = ("STIXSiz", "STIXNonUni", "LastResort", "cmex", "cmsy", "DejaVuSansDisplay", "DejaVuSerifDisplay")
    ttf = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return [p for p in sorted(ttf.glob("*.ttf")) if not p.name.startswith(skip)]


def _patch(img, half: list, tile: tuple, rng):
    """A random square patch of the photo inside one tile of `half`, at SIZE px; None when it is flat."""
    from PIL import Image

    tw, th = tile
    x0, y0 = half[rng.integers(len(half))]
    side = int(min(tw, th) * rng.uniform(0.6, 1.0))
    x, y = x0 + rng.integers(0, tw - side + 1), y0 + rng.integers(0, th - side + 1)
    patch = img.crop((x, y, x + side, y + side)).resize((SIZE, SIZE), Image.BICUBIC)
    return None if np.asarray(patch, np.float32).std() < 6 else patch


def _draw_letter(patch, letter: str, font: Path, rng) -> None:
    """Draws `letter` on the patch in place: 30-50% of its height, anywhere it fits, rotated up to 15 degrees, in a
    colour far from the patch's mean (so it is visible), with a thin outline of the opposite shade."""
    from PIL import Image, ImageDraw, ImageFont

    big = SIZE * 2
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    font_obj = ImageFont.truetype(str(font), int(big * rng.uniform(0.3, 0.5)))
    l, t, r, b = draw.textbbox((0, 0), letter, font=font_obj)
    draw.text(((big - (r - l)) / 2 - l, (big - (b - t)) / 2 - t), letter, fill=255, font=font_obj,
              stroke_width=int(rng.integers(1, 4)), stroke_fill=255)
    mask = mask.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR).resize((SIZE, SIZE), Image.BILINEAR)
    box = mask.getbbox() or (0, 0, SIZE, SIZE)
    w, h = box[2] - box[0], box[3] - box[1]
    dx = int(rng.integers(-box[0], SIZE - box[2] + 1)) if SIZE - w > 0 else 0
    dy = int(rng.integers(-box[1], SIZE - box[3] + 1)) if SIZE - h > 0 else 0
    mask = mask.transform(mask.size, Image.AFFINE, (1, 0, -dx, 0, 1, -dy))
    mean = np.asarray(patch, np.float32).mean()
    shade = int(rng.integers(0, 60)) if mean > 127 else int(rng.integers(195, 256))
    tint = rng.integers(-40, 41, 3)
    colour = tuple(int(np.clip(shade + c, 0, 255)) for c in tint)
    patch.paste(Image.new("RGB", patch.size, colour), (0, 0), mask)


def build(out: str, seed: int = 2028) -> str:
    """Writes the task under `out` (images and labels.csv) unless it is there; returns the CSV's path."""
    root = Path(out)
    csv_path = root / "labels.csv"
    if csv_path.exists():
        return str(csv_path)
    rng = np.random.default_rng(seed)
    fonts = _fonts()
    order = rng.permutation(len(fonts))
    n_test = max(2, round(len(fonts) * 0.35))
    font_pool = {"test": [fonts[i] for i in order[:n_test]], "train": [fonts[i] for i in order[n_test:]]}
    rows = []
    for name, img in _photos().items():
        tw, th = img.size[0] // 6, img.size[1] // 6
        halves = {"a": [], "b": []}
        for i in range(6):
            for j in range(6):
                halves["a" if (i + j) % 2 == 0 else "b"].append((i * tw, j * th))
        for split, n in PER_PHOTO.items():
            folder = root / "images" / split
            folder.mkdir(parents=True, exist_ok=True)
            k = 0
            while k < n:
                patch = _patch(img, halves["b" if split == "test" else "a"], (tw, th), rng)
                if patch is None:
                    continue
                count = int(rng.choice(4, p=[0.25, 0.35, 0.25, 0.15]))
                letters = sorted(rng.choice(list(LETTERS), count, replace=False)) if count else []
                pool = font_pool["test" if split == "test" else "train"]
                for letter in letters:
                    _draw_letter(patch, letter, pool[rng.integers(len(pool))], rng)
                rel = f"images/{split}/{name}_{k:03d}.png"
                patch.save(root / rel)
                rows.append((rel, " ".join([name, *letters]), split))
                k += 1
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("file", "label", "split"))
        w.writerows(rows)
    return str(csv_path)


def read_task(csv_path: str):
    """`(files, multi-hot labels, split names, label names)` of the CSV."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    names = sorted({lab for r in rows for lab in r["label"].split()})
    y = np.zeros((len(rows), len(names)), np.float32)
    for i, r in enumerate(rows):
        for lab in r["label"].split():
            y[i, names.index(lab)] = 1.0
    files = [os.path.join(os.path.dirname(csv_path), r["file"]) for r in rows]
    return files, y, np.array([r["split"] for r in rows]), names


# ----------------------------------------------------------------------------------------------- scoring
def _best_f1_thresholds(y, p) -> np.ndarray:
    """Per class, the threshold (among the scores themselves) with the best F1 on (y, p); 0.5 for a class
    without positives."""
    out = np.full(y.shape[1], 0.5)
    for c in range(y.shape[1]):
        if y[:, c].sum() == 0:
            continue
        best = -1.0
        for t in np.unique(p[:, c]):
            pred = p[:, c] >= t
            tp = float((pred & (y[:, c] > 0)).sum())
            f1 = 2 * tp / (pred.sum() + y[:, c].sum())
            if f1 > best:
                best, out[c] = f1, t
    return out


def _micro_f1(y, p, thresholds) -> float:
    pred = p >= thresholds
    tp = float((pred & (y > 0)).sum())
    return 2 * tp / max(1.0, float(pred.sum() + y.sum()))


def score(y_val, p_val, y_test, p_test) -> dict:
    from sklearn.metrics import average_precision_score

    present = y_test.sum(0) > 0
    thresholds = _best_f1_thresholds(y_val, p_val)
    return {"map": float(average_precision_score(y_test[:, present], p_test[:, present], average="macro")),
            "micro_f1_at_0.5": _micro_f1(y_test, p_test, 0.5),
            "micro_f1_at_val_thresholds": _micro_f1(y_test, p_test, thresholds)}


# ----------------------------------------------------------------------------------------------- recipes
def _images(files, size) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR), np.float32)
                     for f in files])


class _BestMap(keras.callbacks.Callback):
    """Keeps the weights of the epoch with the best validation PR-AUC (ModelCheckpoint(save_best_only) in memory)."""

    def __init__(self, best: float = -1.0):
        super().__init__()
        self.best, self.weights = best, None

    def on_epoch_end(self, epoch, logs=None):
        if float(logs["val_map"]) > self.best:
            self.best, self.weights = float(logs["val_map"]), self.model.get_weights()


def keras_recipe(task, backbone, size, seed, guide: bool) -> dict:
    files, y, split, names = task
    x = {s: _images([f for f, k in zip(files, split) if k == s], size) for s in ("train", "val", "test")}
    ys = {s: y[split == s] for s in ("train", "val", "test")}
    keras.utils.set_random_seed(seed)
    base = keras.models.load_model(backbone, compile=False)
    base.trainable = False
    feats = {}
    for s in x:  # the frozen base's features, once: the probe trains Dropout + Dense on them
        f = base.predict(x[s], batch_size=64, verbose=0)
        feats[s] = f.mean((1, 2)) if f.ndim == 4 else f
    head = keras.Sequential([keras.layers.Dropout(0.2), keras.layers.Dense(len(names), activation="sigmoid")])

    def compile_(model, lr):
        model.compile(keras.optimizers.Adam(lr), "binary_crossentropy",
                      metrics=[keras.metrics.AUC(multi_label=True, curve="PR", name="map")])

    inp = keras.Input(feats["train"].shape[1:])
    probe = keras.Model(inp, head(inp))
    compile_(probe, 1e-3)
    best = _BestMap()
    probe.fit(feats["train"], ys["train"], batch_size=16, epochs=30, validation_data=(feats["val"], ys["val"]),
              callbacks=[best], verbose=0)
    probe.set_weights(best.weights)
    if not guide:
        return score(ys["val"], probe.predict(feats["val"], verbose=0), ys["test"],
                     probe.predict(feats["test"], verbose=0))
    image = keras.Input((size, size, 3))
    f = base(image, training=False)
    if len(f.shape) == 4:
        f = keras.layers.GlobalAveragePooling2D()(f)
    model = keras.Model(image, head(f))
    base.trainable = True
    compile_(model, 1e-5)
    best_ft = _BestMap(best.best)
    model.fit(x["train"], ys["train"], batch_size=16, epochs=10, shuffle=True, validation_data=(x["val"], ys["val"]),
              callbacks=[best_ft], verbose=0)
    if best_ft.weights is not None:
        model.set_weights(best_ft.weights)
    else:  # no epoch beat the frozen part: the frozen base and its best head
        base.set_weights(keras.models.load_model(backbone, compile=False).get_weights())
    return score(ys["val"], model.predict(x["val"], verbose=0), ys["test"], model.predict(x["test"], verbose=0))


def tlkit_recipe(task, backbone, size, seed, csv_path) -> dict:
    import tlkit

    files, y, split, names = task
    cfg = tlkit.FinetuneConfig(
        data=tlkit.DataConfig(labels=csv_path, image_dir=os.path.dirname(csv_path), label_delimiter=" ",
                              image_size=size),
        model=tlkit.ModelConfig(base=backbone), seed=seed,
        output_dir=tempfile.mkdtemp(prefix="tlkit-multilabel-"), overwrite=True)
    with contextlib.redirect_stdout(io.StringIO()):
        result = tlkit.finetune(cfg)
    clf = tlkit.load(result.run_dir)
    order = [clf.class_names.index(n) for n in names]  # the run's label order -> the CSV's sorted names
    probs = {s: clf.predict([f for f, k in zip(files, split) if k == s])[:, order] for s in ("val", "test")}
    out = score(y[split == "val"], probs["val"], y[split == "test"], probs["test"])
    recipe = result.metrics.get("recipe", {})
    out.update({"tlkit_test_metrics": {k: result.metrics.get("test", {}).get(k) for k in
                                       ("mean_average_precision", "micro_f1", "macro_f1")},
                "decision": recipe.get("summary")})
    return out


RECIPES = {
    "keras_frozen": lambda task, b, s, seed, csv_path: keras_recipe(task, b, s, seed, guide=False),
    "keras_guide": lambda task, b, s, seed, csv_path: keras_recipe(task, b, s, seed, guide=True),
    "tlkit": tlkit_recipe,
}


def table(results: list[dict]) -> str:
    lines = ["| backbone | recipe | mAP | micro-F1 @0.5 | micro-F1 @val thresholds | seeds |", "|---|---|---|---|---|---|"]
    for bb in BACKBONES:
        for recipe in RECIPES:
            rows = [r for r in results if r["backbone"] == bb and r["recipe"] == recipe]
            if not rows:
                continue
            cell = lambda k: f"{np.mean([r[k] for r in rows]):.3f} ± {np.std([r[k] for r in rows]):.3f}"  # noqa: E731
            lines.append(f"| {bb} | {recipe} | {cell('map')} | {cell('micro_f1_at_0.5')} | "
                         f"{cell('micro_f1_at_val_thresholds')} | {len(rows)} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task-dir", default=TASK_DIR, help=f"Where the task is built (once). Default: {TASK_DIR}.")
    p.add_argument("--backbones", default=",".join(BACKBONES), help="Comma-separated: imagenet, own. Default: both.")
    p.add_argument("--recipes", default=",".join(RECIPES), help="Comma-separated recipes. Default: all.")
    p.add_argument("--seeds", default="0,1,2", help="Comma-separated seeds. Default: 0,1,2.")
    p.add_argument("--out", default="benchmarks/results/multilabel.json", help="JSON output (rows already in it "
                   "are kept and not rerun).")
    p.add_argument("--build-only", action="store_true", help="Build the task and stop.")
    args = p.parse_args()
    csv_path = build(args.task_dir)
    files, y, split, names = task = read_task(csv_path)
    print(f"task: {csv_path}: {len(files)} images, {len(names)} labels, "
          f"{y.sum(1).mean():.2f} labels an image; " + ", ".join(f"{s} {int((split == s).sum())}"
                                                               for s in ("train", "val", "test")), flush=True)
    if args.build_only:
        return
    results = json.load(open(args.out))["results"] if os.path.exists(args.out) else []
    done = {(r["backbone"], r["recipe"], r["seed"]) for r in results}
    for bb in [b for b in args.backbones.split(",") if b]:
        backbone, size = BACKBONES[bb]
        if not os.path.exists(backbone):
            sys.exit(f"missing {backbone}: run ../shared/tools/make-imagenet-backbone / make-transfer-tasks first")
        for recipe in [r for r in args.recipes.split(",") if r]:
            for seed in [int(s) for s in args.seeds.split(",")]:
                if (bb, recipe, seed) in done:
                    continue
                t0 = time.time()
                row = {"backbone": bb, "recipe": recipe, "seed": seed,
                       **RECIPES[recipe](task, backbone, size, seed, csv_path)}
                row["seconds"] = round(time.time() - t0, 1)
                results.append(row)
                print(f"{bb:9s} {recipe:13s} seed {seed}: mAP {row['map']:.3f}  micro-F1 "
                      f"{row['micro_f1_at_0.5']:.3f} / {row['micro_f1_at_val_thresholds']:.3f}  "
                      f"({row['seconds']:.0f} s)", flush=True)
                os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
                with open(args.out + ".tmp", "w") as f:
                    json.dump({"args": vars(args), "results": results}, f, indent=2)
                os.replace(args.out + ".tmp", args.out)
    print("\n" + table(results) + f"\n\nwritten: {args.out}")


if __name__ == "__main__":
    main()
