"""Does tlkit's default recipe get more out of a pretrained backbone than what a user would otherwise write?

Real images through real pretrained features, offline:

- `../shared/tools/make-imagenet-backbone python` writes a genuine ImageNet-pretrained EfficientNet-Lite0 as a
  `.keras` backbone (raw 0-255 RGB in, 1280-d pooled features out);
- `../shared/tools/make-transfer-tasks python` writes the tasks as image folders with `train/ val/ test/`:
  `textures-5`, `textures-20` (15 classes of real-photo patches; test patches from unseen tiles), `letters-5`,
  `letters-20` (A-J in the fonts matplotlib ships; unseen test fonts), and `letters_backbone.keras` (a small ReLU
  CNN without normalisation, pretrained on the letters K-T: a user's own backbone). N = labelled images a class.

Recipes, each run in this process on the same folders, for every task and seed:

- `keras_frozen`: the keras.io transfer-learning guide's first part, as a user writes it:
  `image_dataset_from_directory`, base frozen in inference mode, Dropout 0.2, Dense, Adam 1e-3, 30 epochs,
  batch 16, the best validation epoch kept.
- `keras_guide`: that, then the whole base unfrozen at 1e-5 for 10 epochs (the guide's second part).
- `keras_whole`: the whole net trains from the start, as a user fine-tunes a small CNN by hand: base unfrozen
  (BatchNorm in inference mode), Dropout 0.2, Dense, Adam 1e-3, 30 epochs, batch 16, the best validation epoch;
  `keras_whole_1e-4` the same at 1e-4 (for the ImageNet backbone, where 1e-3 is a user's second guess).
- `fastai_fine_tune`: fastai's `Learner.fine_tune(10)` written in Keras: head one cycle (1 epoch, lr 2e-3, base
  frozen), then everything unfrozen for 10 epochs, one cycle, discriminative rates `slice(1e-5, 1e-3)` over
  three parameter groups (lower body, upper body, head), AdamW (betas 0.9/0.99, wd 0.01), batch 16, flip
  augmentation; the last epoch is the model (as fastai's `fine_tune`), so no validation-based selection.
- `tlkit`: `tlkit finetune --base PATH.keras --image-dir TASK --image-size S` with every other flag at its
  default; `tlkit_trial_warmup` the same with `--trial-warmup 0.3` explicitly (the default since session 7: on a
  checkout before it, the way to measure it).

Prints a table of test accuracy (mean and spread over the seeds) and writes JSON. A benchmark, not a test: the
whole run takes about an hour on a 2-core CPU (`--tasks`, `--seeds`, `--recipes` make it shorter).

Usage:
    python benchmarks/transfer.py
    python benchmarks/transfer.py --tasks letters-5,textures-5 --seeds 0 --recipes keras_frozen,tlkit
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

CACHE = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
TASKS_DIR = os.path.join(CACHE, "tlkit-transfer-tasks")
IMAGENET = os.path.join(CACHE, "imagenet-backbone", "efficientnet_lite0_backbone.keras")

# name -> (task folder, backbone, image size): {ImageNet EfficientNet-Lite0 at 96 px, the letters backbone ("/own") at
# 32 px} x {textures, letters} x {5, 20, 100 labels a class}
TASKS = {
    "textures-5": ("textures-5", "imagenet", 96),
    "letters-5": ("letters-5", "imagenet", 96),
    "textures-20": ("textures-20", "imagenet", 96),
    "letters-20": ("letters-20", "imagenet", 96),
    "textures-100": ("textures-100", "imagenet", 96),
    "letters-100": ("letters-100", "imagenet", 96),
    "textures-5/own": ("textures-5", "letters", 32),
    "letters-5/own": ("letters-5", "letters", 32),
    "textures-20/own": ("textures-20", "letters", 32),
    "letters-20/own": ("letters-20", "letters", 32),
    "textures-100/own": ("textures-100", "letters", 32),
    "letters-100/own": ("letters-100", "letters", 32),
}


def _folders(task_dir: str, size: int, batch: int, seed: int):
    def load(split, shuffle):
        return keras.utils.image_dataset_from_directory(
            os.path.join(task_dir, split), image_size=(size, size), batch_size=batch, label_mode="categorical",
            shuffle=shuffle, seed=seed, verbose=False)
    train = load("train", True)
    return train, load("val", False), load("test", False), len(train.class_names)


def _head_model(backbone_path: str, size: int, num_classes: int, seed: int):
    keras.utils.set_random_seed(seed)
    base = keras.models.load_model(backbone_path, compile=False)
    base.trainable = False
    inputs = keras.Input((size, size, 3))
    x = base(inputs, training=False)
    if len(x.shape) == 4:
        x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs), base


class _Best(keras.callbacks.Callback):
    """Keeps the weights of the best validation-accuracy epoch (ModelCheckpoint(save_best_only) in memory)."""

    def __init__(self):
        super().__init__()
        self.best, self.weights = -1.0, None

    def on_epoch_end(self, epoch, logs=None):
        acc = float(logs["val_accuracy"])
        if acc > self.best:
            self.best, self.weights = acc, self.model.get_weights()


def _test_acc(model, test) -> float:
    y_true, y_pred = [], []
    for x, y in test:
        y_pred.append(np.argmax(model.predict_on_batch(x), -1))
        y_true.append(np.argmax(y, -1))
    return float(np.mean(np.concatenate(y_true) == np.concatenate(y_pred)))


_FEATURES: dict = {}


def _features(task_dir, backbone, size):
    """Base features of every split, computed once per task: the frozen part of the keras recipes trains
    Dropout + Dense on them, which is the same computation as training the model with the base frozen in inference
    mode on un-augmented images (the base's output does not change), only without recomputing it each epoch."""
    key = (task_dir, backbone, size)
    if key not in _FEATURES:
        base = keras.models.load_model(backbone, compile=False)
        out = {}
        for split in ("train", "val", "test"):
            ds = keras.utils.image_dataset_from_directory(os.path.join(task_dir, split), image_size=(size, size),
                                                          batch_size=64, label_mode="categorical", shuffle=False,
                                                          verbose=False)
            xs, ys = [], []
            for x, y in ds:
                f = base(x, training=False)
                if len(f.shape) == 4:
                    f = tf.reduce_mean(f, axis=[1, 2])
                xs.append(f.numpy())
                ys.append(y.numpy())
            out[split] = (np.concatenate(xs), np.concatenate(ys))
        _FEATURES[key] = out
    return _FEATURES[key]


def keras_recipe(task_dir, backbone, size, seed, guide: bool) -> float:
    feats = _features(task_dir, backbone, size)
    (x, y), (xv, yv) = feats["train"], feats["val"]
    n = y.shape[1]
    keras.utils.set_random_seed(seed)
    inputs = keras.Input(x.shape[1:])
    head = keras.Sequential([keras.layers.Dropout(0.2), keras.layers.Dense(n, activation="softmax")])
    probe = keras.Model(inputs, head(inputs))
    probe.compile(keras.optimizers.Adam(1e-3), "categorical_crossentropy", metrics=["accuracy"])
    best = _Best()
    probe.fit(x, y, batch_size=16, shuffle=True, validation_data=(xv, yv), epochs=30, callbacks=[best], verbose=0)
    if not guide:
        probe.set_weights(best.weights)
        xt, yt = feats["test"]
        return float(np.mean(probe.predict(xt, verbose=0).argmax(-1) == yt.argmax(-1)))
    # The guide's second part: the whole base unfrozen at 1e-5 for 10 epochs, from the last frozen epoch.
    train, val, test, _ = _folders(task_dir, size, 16, seed)
    base = keras.models.load_model(backbone, compile=False)
    image = keras.Input((size, size, 3))
    f = base(image, training=False)
    if len(f.shape) == 4:
        f = keras.layers.GlobalAveragePooling2D()(f)
    model = keras.Model(image, head(f))
    frozen_best = best.weights  # the best frozen epoch's head, as keras weights of the head alone
    base.trainable = True
    model.compile(keras.optimizers.Adam(1e-5), "categorical_crossentropy", metrics=["accuracy"])
    best_ft = _Best()
    best_ft.best = best.best  # an epoch of the second part is kept only if it beats the frozen part's best
    model.fit(train, validation_data=val, epochs=10, callbacks=[best_ft], verbose=0)
    if best_ft.weights is not None:
        model.set_weights(best_ft.weights)
    else:
        head.set_weights(frozen_best)
        base.set_weights(keras.models.load_model(backbone, compile=False).get_weights())
    return _test_acc(model, test)


def keras_whole_recipe(task_dir, backbone, size, seed, lr=1e-3) -> float:
    """The whole net trains from the start (the hand fine-tune of a user's small CNN): base unfrozen (BatchNorm in
    inference mode), GAP, Dropout 0.2, Dense, Adam `lr`, 30 epochs, batch 16, the best validation epoch kept."""
    train, val, test, n = _folders(task_dir, size, 16, seed)
    model, base = _head_model(backbone, size, n, seed)
    base.trainable = True
    model.compile(keras.optimizers.Adam(lr), "categorical_crossentropy", metrics=["accuracy"])
    best = _Best()
    model.fit(train, validation_data=val, epochs=30, callbacks=[best], verbose=0)
    model.set_weights(best.weights)
    return _test_acc(model, test)


def _one_cycle(step, total, peak, pct=0.25, div=25.0, final_div=1e5):
    """fastai's fit_one_cycle learning rate: cosine from peak/div up to peak, then cosine down to peak/final_div."""
    up = max(1, int(total * pct))
    if step < up:
        lo, hi, t = peak / div, peak, step / up
    else:
        lo, hi, t = peak, peak / final_div, (step - up) / max(1, total - up)
    return hi + (lo - hi) * (1 + math.cos(math.pi * t)) / 2


def fastai_recipe(task_dir, backbone, size, seed, freeze_epochs=1, epochs=10, base_lr=2e-3) -> float:
    train, val, test, n = _folders(task_dir, size, 16, seed)
    model, base = _head_model(backbone, size, n, seed)
    # fastai's aug_transforms flips; letters are not mirror-invariant, so they get no flip.
    flip = keras.layers.RandomFlip("horizontal", seed=seed) if "letters" not in task_dir else (lambda x, training: x)
    loss_fn = keras.losses.CategoricalCrossentropy()
    head_vars = list(model.trainable_variables)
    steps_per_epoch = int(train.cardinality())

    def fit(groups, epochs_, peaks):
        opts = [keras.optimizers.AdamW(peak, weight_decay=0.01, beta_1=0.9, beta_2=0.99) for peak in peaks]
        total = epochs_ * steps_per_epoch
        all_vars = [v for g in groups for v in g]

        @tf.function
        def step(x, y, lrs):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(flip(x, training=True), training=True))
            grads = tape.gradient(loss, all_vars)
            i = 0
            for g, opt, lr in zip(groups, opts, tf.unstack(lrs)):
                opt.learning_rate.assign(lr)
                opt.apply_gradients(zip(grads[i:i + len(g)], g))
                i += len(g)
            return loss

        k = 0
        for _ in range(epochs_):
            for x, y in train:
                lrs = tf.constant([_one_cycle(k, total, p) for p in peaks], tf.float32)
                step(x, y, lrs)
                k += 1

    fit([head_vars], freeze_epochs, [base_lr])
    base.trainable = True  # inference-mode BatchNorm (training=False in the call), all weights train
    base_vars = list(base.trainable_variables)
    half = len(base_vars) // 2
    lr = base_lr / 2
    lo, hi = lr / 100, lr  # fastai: slice(base_lr/100, base_lr) over the groups, geometrically spaced
    mid = math.sqrt(lo * hi)
    fit([base_vars[:half], base_vars[half:], head_vars], epochs, [lo, mid, hi])
    return _test_acc(model, test)


def tlkit_recipe(task_dir, backbone, size, seed, **train) -> float:
    import tlkit

    cfg = tlkit.FinetuneConfig(
        data=tlkit.DataConfig(image_dir=task_dir, image_size=size),
        model=tlkit.ModelConfig(base=backbone), train=tlkit.TrainConfig(**train), seed=seed,
        output_dir=tempfile.mkdtemp(prefix="tlkit-transfer-"), overwrite=True)
    with contextlib.redirect_stdout(io.StringIO()):
        result = tlkit.finetune(cfg)
    recipe = result.metrics.get("recipe", {})
    extra = {"probe_val": recipe.get("probe_val_accuracy"), "decision": recipe.get("summary"),
             "augment": f"{result.config.data.augment}, flip {result.config.data.flip}",
             "kept_epoch_stage": _kept_stage(result)}
    return float(result.metrics["test"]["accuracy"]), extra


def _kept_stage(result) -> str | None:
    """The stage of the epoch whose weights are the model (the best checkpoint)."""
    import json as _json

    try:
        with open(os.path.join(result.run_dir, "checkpoints", "state.json")) as f:
            best = _json.load(f)["best_epoch"]
        return next(r["stage"] for r in result.history if r["epoch"] == best)
    except (OSError, KeyError, StopIteration):
        return None


RECIPES = {
    "keras_frozen": lambda t, b, s, seed: keras_recipe(t, b, s, seed, guide=False),
    "keras_guide": lambda t, b, s, seed: keras_recipe(t, b, s, seed, guide=True),
    "keras_whole": keras_whole_recipe,
    "keras_whole_1e-4": lambda t, b, s, seed: keras_whole_recipe(t, b, s, seed, lr=1e-4),
    "fastai_fine_tune": fastai_recipe,
    "tlkit": tlkit_recipe,
    "tlkit_trial_warmup": lambda t, b, s, seed: tlkit_recipe(t, b, s, seed, trial_warmup=0.3),
}
PLAIN = ("keras_frozen", "keras_guide", "keras_whole", "keras_whole_1e-4", "fastai_fine_tune")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks-dir", default=TASKS_DIR, help=f"Output of make-transfer-tasks. Default: {TASKS_DIR}.")
    p.add_argument("--imagenet-backbone", default=IMAGENET, help=f"Output of make-imagenet-backbone. Default: {IMAGENET}.")
    p.add_argument("--tasks", default=",".join(TASKS), help="Comma-separated tasks. Default: all.")
    p.add_argument("--recipes", default=",".join(RECIPES), help="Comma-separated recipes. Default: all.")
    p.add_argument("--seeds", default="0,1,2", help="Comma-separated seeds. Default: 0,1,2.")
    p.add_argument("--out", default="benchmarks/results/transfer.json", help="JSON output.")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="Print and write (--out) the table of these result "
                   "files (runs of this script on the same machine, e.g. the baselines and tlkit in two processes) "
                   "instead of running anything; a (task, recipe, seed) in several files is taken from the last.")
    p.add_argument("--keep", action="store_true", help="Keep the results already in --out and run only the missing "
                   "(task, recipe, seed) rows (to add a recipe, or to finish an interrupted run).")
    args = p.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    recipes = [r for r in args.recipes.split(",") if r]
    if args.merge:
        rows: dict = {}  # (task, recipe, seed) -> result; a later file's row replaces an earlier one's
        for path in args.merge:
            with open(path) as f:
                for r in json.load(f)["results"]:
                    r.setdefault("source", os.path.basename(path))
                    rows[(r["task"], r["recipe"], r["seed"])] = r
        results = list(rows.values())
        _write(args.out, args, results)
        names = [r for r in RECIPES if any(x["recipe"] == r for x in results)]
        names += sorted({x["recipe"] for x in results} - set(names))  # rows of earlier versions, e.g. tlkit_session3
        print(table(results, [t for t in TASKS if any(r["task"] == t for r in results)], names))
        print(f"\nwritten: {args.out}")
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    for path in (args.imagenet_backbone, os.path.join(args.tasks_dir, "letters_backbone.keras")):
        if not os.path.exists(path):
            sys.exit(f"missing {path}: run ../shared/tools/make-imagenet-backbone and make-transfer-tasks first")
    results = []
    if args.keep and os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)["results"]
    done = {(r["task"], r["recipe"], r["seed"]) for r in results}
    for task in tasks:
        folder, which, size = TASKS[task]
        backbone = args.imagenet_backbone if which == "imagenet" else os.path.join(args.tasks_dir, "letters_backbone.keras")
        for recipe in recipes:
            for seed in seeds:
                if (task, recipe, seed) in done:
                    continue
                t0 = time.time()
                out = RECIPES[recipe](os.path.join(args.tasks_dir, folder), backbone, size, seed)
                acc, extra = out if isinstance(out, tuple) else (out, {})
                results.append({"task": task, "recipe": recipe, "seed": seed, "test_accuracy": acc,
                                "seconds": round(time.time() - t0, 1), **extra})
                print(f"{task:16s} {recipe:18s} seed {seed}: test acc {acc:.3f} ({results[-1]['seconds']:.0f} s)"
                      + (f"  [{extra.get('decision')}; augment {extra.get('augment')}; kept {extra.get('kept_epoch_stage')}]"
                         if extra else ""), flush=True)
                keras.backend.clear_session()
                _write(args.out, args, results)
    print()
    print(table(results, tasks, sorted({r["recipe"] for r in results}, key=list(RECIPES).index)))
    print(f"\nwritten: {args.out}")


def summary(results, task, recipe):
    accs = [r["test_accuracy"] for r in results if r["task"] == task and r["recipe"] == recipe]
    return (float(np.mean(accs)), float(np.std(accs)), len(accs)) if accs else None


def table(results, tasks, recipes) -> str:
    lines = ["| task | " + " | ".join(recipes) + " |", "|---|" + "---|" * len(recipes)]
    for task in tasks:
        cells = []
        for recipe in recipes:
            s = summary(results, task, recipe)
            if s is None:
                cells.append("")
            else:  # mean ± sd over the seeds; fewer than three seeds are said
                cells.append(f"{s[0]:.3f}" + (" (1 seed)" if s[2] == 1 else f" ± {s[1]:.3f}" + (
                    f" ({s[2]} seeds)" if s[2] != 3 else "")))
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write(path, args, results):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tasks = sorted({r["task"] for r in results})
    recipes = sorted({r["recipe"] for r in results})
    out = {"args": vars(args), "results": results,
           "summary": {t: {r: summary(results, t, r) for r in recipes} for t in tasks}}
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=2)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
