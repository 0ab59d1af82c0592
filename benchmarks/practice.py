"""Do class weights, weight averaging and test-time augmentation help on real data? (issue #14)

Real images through a real ImageNet-pretrained backbone, offline, as in `benchmarks/transfer.py` (whose task folders
and backbone this reads: `../shared/tools/make-transfer-tasks`, `../shared/tools/make-imagenet-backbone`):

- balanced tasks: `textures-5`, `letters-5` (5 labelled images a class);
- imbalanced variants that this script builds from the 20-a-class tasks: the first half of the classes (sorted by
  name, rounded up) keep their 20 training images, the other half only their first 5 (4x fewer); validation and
  test splits stay as they are (balanced), so the test accuracy is also the mean per-class accuracy of a balanced
  population: `textures-imb` (from `textures-20`) and `letters-imb` (from `letters-20`).

Variants, each `tlkit finetune --base PATH.keras --image-dir TASK --image-size 96` with every other flag at its
default plus:

- `default`: nothing (the reference);
- `ema`: `--ema` (default `--ema-steps`);
- `class_weight`: `--class-weight balanced` (imbalanced tasks only: on a balanced split every weight is 1);
- `tta2`, `tta6`: no training, `tlkit evaluate RUN --tta N` of the `default` run's model (N = 2: flip and centre
  crop; N = 6: flip, centre crop and its flip, three corner crops);
- not run unless asked (`--variants constant,constant_ema`): `--schedule constant` without and with `--ema`, where
  the last weights are not already an average of a decaying learning rate.

Prints test accuracy, mean per-class accuracy and, for the imbalanced tasks, the mean accuracy (recall) of the rare
classes (mean ± standard deviation over the seeds, and the mean change against `default` of the same seeds), and
writes JSON after every run. A benchmark, not a test: about 50 minutes on a 2-core CPU for the default
variants, 10 more for the constant-schedule ones on the two balanced tasks.

Usage:
    python benchmarks/practice.py
    python benchmarks/practice.py --tasks textures-imb --seeds 0 --variants default,class_weight
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras  # noqa: E402

CACHE = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
TASKS_DIR = os.path.join(CACHE, "tlkit-transfer-tasks")
IMAGENET = os.path.join(CACHE, "imagenet-backbone", "efficientnet_lite0_backbone.keras")
SIZE = 96

# name -> (source task folder, imbalanced: (images kept in the first half, in the second half) or None)
TASKS = {
    "textures-5": ("textures-5", None),
    "letters-5": ("letters-5", None),
    "textures-imb": ("textures-20", (20, 5)),
    "letters-imb": ("letters-20", (20, 5)),
}
VARIANTS = ("default", "ema", "class_weight", "tta2", "tta6", "constant", "constant_ema")
DEFAULT_VARIANTS = VARIANTS[:5]
TRAIN_FLAGS = {"default": {}, "ema": {"ema": True}, "class_weight": {"class_weight": "balanced"},
               "constant": {"schedule": "constant"}, "constant_ema": {"schedule": "constant", "ema": True}}
TTA = {"tta2": 2, "tta6": 6}
BASELINE = {"constant_ema": "constant"}  # what a variant's change is measured against (else `default`)


def imbalanced_copy(src: str, dst: str, keep: tuple[int, int]) -> str:
    """`src` (train/ val/ test/ of class folders) copied to `dst` with the training split made imbalanced."""
    if os.path.isdir(dst):
        return dst
    tmp = dst + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for split in ("val", "test"):
        shutil.copytree(os.path.join(src, split), os.path.join(tmp, split))
    classes = sorted(os.listdir(os.path.join(src, "train")))
    half = (len(classes) + 1) // 2
    for i, name in enumerate(classes):
        files = sorted(os.listdir(os.path.join(src, "train", name)))[:keep[0] if i < half else keep[1]]
        os.makedirs(os.path.join(tmp, "train", name))
        for f in files:
            shutil.copy2(os.path.join(src, "train", name, f), os.path.join(tmp, "train", name, f))
    os.replace(tmp, dst)
    return dst


def task_folder(task: str, tasks_dir: str, work_dir: str) -> str:
    folder, keep = TASKS[task]
    src = os.path.join(tasks_dir, folder)
    return src if keep is None else imbalanced_copy(src, os.path.join(work_dir, task), keep)


def finetune(task_dir: str, backbone: str, seed: int, out_dir: str, **train) -> dict:
    import tlkit

    cfg = tlkit.FinetuneConfig(
        data=tlkit.DataConfig(image_dir=task_dir, image_size=SIZE),
        model=tlkit.ModelConfig(base=backbone), train=tlkit.TrainConfig(**train), seed=seed,
        output_dir=out_dir, overwrite=True)
    with contextlib.redirect_stdout(io.StringIO()):
        result = tlkit.finetune(cfg)
    return result.metrics["test"]


def evaluate_tta(run_dir: str, task_dir: str, n: int) -> dict:
    import tlkit

    with contextlib.redirect_stdout(io.StringIO()):
        m = tlkit.evaluate(run_dir, tlkit.DataConfig(image_dir=task_dir), split="test", tta=n,
                           output_dir=os.path.join(run_dir, f"eval-tta{n}"))
    assert m["tta"]["n"] == n
    return m


def rare_class_accuracy(task: str, metrics: dict) -> float | None:
    """Mean recall of the classes an imbalanced task left with few training images (the second half by name)."""
    if TASKS[task][1] is None:
        return None
    names = sorted(r["class"] for r in metrics["per_class"])
    rare = set(names[(len(names) + 1) // 2:])
    return float(np.mean([r["recall"] for r in metrics["per_class"] if r["class"] in rare]))


def summary(results, task, variant, key):
    vals = [r[key] for r in results if r["task"] == task and r["variant"] == variant and r.get(key) is not None]
    return (float(np.mean(vals)), float(np.std(vals)), len(vals)) if vals else None


def delta(results, task, variant, key):
    """Mean over the seeds of (variant - its baseline), on the seeds that have both."""
    base = BASELINE.get(variant, "default")
    by = {(r["variant"], r["seed"]): r.get(key) for r in results if r["task"] == task}
    d = [by[(variant, s)] - by[(base, s)] for (v, s) in by if v == variant and (base, s) in by
         and by[(variant, s)] is not None and by[(base, s)] is not None]
    return float(np.mean(d)) if d else None


def table(results, tasks) -> str:
    lines = ["| task | variant | test accuracy | mean per-class accuracy | rare classes | Δ accuracy | Δ per-class | "
             "Δ rare | seeds |", "|---|---|---|---|---|---|---|---|---|"]
    for task in tasks:
        for variant in VARIANTS:
            acc = summary(results, task, variant, "accuracy")
            if acc is None:
                continue
            pc = summary(results, task, variant, "mean_per_class_accuracy")
            rare = summary(results, task, variant, "rare_class_accuracy")
            da, dp = delta(results, task, variant, "accuracy"), delta(results, task, variant, "mean_per_class_accuracy")
            dr = delta(results, task, variant, "rare_class_accuracy")
            fmt = lambda d: "" if d is None or variant in ("default", "constant") else f"{d:+.3f}"  # noqa: E731
            rare_cell = "" if rare is None else f"{rare[0]:.3f} ± {rare[1]:.3f}"
            lines.append(f"| {task} | {variant} | {acc[0]:.3f} ± {acc[1]:.3f} | {pc[0]:.3f} ± {pc[1]:.3f} | "
                         f"{rare_cell} | {fmt(da)} | {fmt(dp)} | {fmt(dr)} | {acc[2]} |")
    return "\n".join(lines)


def _write(path, args, results, tasks):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    out = {"args": vars(args), "results": results, "table": table(results, tasks)}
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=2)
    os.replace(path + ".tmp", path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks-dir", default=TASKS_DIR, help=f"Output of make-transfer-tasks. Default: {TASKS_DIR}.")
    p.add_argument("--imagenet-backbone", default=IMAGENET, help=f"Default: {IMAGENET}.")
    p.add_argument("--work-dir", default=os.path.join(CACHE, "tlkit-practice"),
                   help="Where the imbalanced task folders and the runs go. Default: ~/.cache/tlkit-practice.")
    p.add_argument("--tasks", default=",".join(TASKS), help="Comma-separated tasks. Default: all.")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"Comma-separated variants of {', '.join(VARIANTS)}. Default: {', '.join(DEFAULT_VARIANTS)}.")
    p.add_argument("--seeds", default="0,1,2", help="Comma-separated seeds. Default: 0,1,2.")
    p.add_argument("--out", default="benchmarks/results/practice.json", help="JSON output.")
    p.add_argument("--keep", action="store_true", help="Keep the results already in --out; run the missing rows.")
    args = p.parse_args()
    tasks = [t for t in args.tasks.split(",") if t]
    variants = [v for v in args.variants.split(",") if v]
    seeds = [int(s) for s in args.seeds.split(",")]
    if not os.path.exists(args.imagenet_backbone):
        sys.exit(f"missing {args.imagenet_backbone}: run ../shared/tools/make-imagenet-backbone first")
    results = []
    if args.keep and os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)["results"]
    done = {(r["task"], r["variant"], r["seed"]) for r in results}
    os.makedirs(args.work_dir, exist_ok=True)
    for task in tasks:
        folder = task_folder(task, args.tasks_dir, args.work_dir)
        for seed in seeds:
            plain_run = os.path.join(args.work_dir, "runs", f"{task}-default-{seed}")
            for variant in variants:
                if (task, variant, seed) in done or (variant == "class_weight" and TASKS[task][1] is None):
                    continue
                t0 = time.time()
                if variant in TRAIN_FLAGS:
                    run = os.path.join(args.work_dir, "runs", f"{task}-{variant}-{seed}")
                    m = finetune(folder, args.imagenet_backbone, seed, run, **TRAIN_FLAGS[variant])
                else:
                    if not os.path.isfile(os.path.join(plain_run, "model.keras")):
                        finetune(folder, args.imagenet_backbone, seed, plain_run)
                    m = evaluate_tta(plain_run, folder, TTA[variant])
                results.append({"task": task, "variant": variant, "seed": seed, "accuracy": m["accuracy"],
                                "mean_per_class_accuracy": m["mean_per_class_accuracy"],
                                "rare_class_accuracy": rare_class_accuracy(task, m),
                                "seconds": round(time.time() - t0, 1)})
                print(f"{task:13s} {variant:13s} seed {seed}: test acc {m['accuracy']:.3f}, mean per-class "
                      f"{m['mean_per_class_accuracy']:.3f} ({results[-1]['seconds']:.0f} s)", flush=True)
                keras.backend.clear_session()
                _write(args.out, args, results, tasks)
    print()
    print(table(results, tasks))
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
