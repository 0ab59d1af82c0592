"""How well can a fine-tuned classifier say "I don't know"? `tlkit evaluate --ood` on real images (issue #22).

Real images through real backbones, offline, as in `benchmarks/transfer.py` (whose task folders and backbones this
reads: `../shared/tools/make-transfer-tasks`, `../shared/tools/make-imagenet-backbone`):

- `textures-N` (15 texture classes, N labelled images a class) with the ImageNet EfficientNet-Lite0 backbone at
  96 px; the unknowns are the test images of `letters-20` (rendered glyphs: 400 images, none a texture);
- `letters-N` (10 letter classes) with the small glyph CNN (`letters_backbone.keras`) at 32 px; the unknowns are the
  test images of `textures-20` (600 photos of textures).

Each run is `tlkit finetune --base PATH.keras --image-dir TASK --image-size S --strategy feature_extraction` (the
head on the frozen backbone's cached features, to keep the benchmark short on a CPU; `--strategy two_stage` with
`--strategies two_stage`), then `tlkit evaluate RUN --ood UNKNOWN_DIR` on the test split. Prints, per task, the test
accuracy and for each score (`msp`, `energy`, `mahalanobis`) the AUROC and the FPR at 95% TPR, and the threshold's
share of known test images accepted and of unknown ones rejected; writes JSON after every run. It also keeps the
Grad-CAM picture of the worst errors (`misclassified_gradcam.png`) of each run under `--pictures`.

Usage:
    python benchmarks/ood.py                                   # textures-5,letters-5,textures-20,letters-20, seed 0
    python benchmarks/ood.py --tasks textures-20 --seeds 0,1 --strategies two_stage
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

CACHE = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
TASKS_DIR = os.path.join(CACHE, "tlkit-transfer-tasks")
BACKBONES = {"textures": (os.path.join(CACHE, "imagenet-backbone", "efficientnet_lite0_backbone.keras"), 96),
             "letters": (os.path.join(TASKS_DIR, "letters_backbone.keras"), 32)}
UNKNOWN = {"textures": os.path.join(TASKS_DIR, "letters-20", "test"),
           "letters": os.path.join(TASKS_DIR, "textures-20", "test")}
SCORES = ("msp", "energy", "mahalanobis", "knn")


def run_one(task: str, strategy: str, seed: int, work: str, pictures: str | None) -> dict:
    import tlkit

    kind = task.split("-")[0]
    backbone, size = BACKBONES[kind]
    task_dir = os.path.join(TASKS_DIR, task)
    out = os.path.join(work, f"{task}-{strategy}-s{seed}")
    cfg = tlkit.FinetuneConfig(data=tlkit.DataConfig(image_dir=task_dir, image_size=size),
                               model=tlkit.ModelConfig(base=backbone), train=tlkit.TrainConfig(strategy=strategy),
                               seed=seed, output_dir=out, overwrite=True)
    t0 = time.time()
    with contextlib.redirect_stdout(io.StringIO()):
        result = tlkit.finetune(cfg)
    t1 = time.time()
    with contextlib.redirect_stdout(io.StringIO()):
        m = tlkit.evaluate(out, tlkit.DataConfig(image_dir=task_dir), split="test", seed=seed, ood=UNKNOWN[kind])
    t2 = time.time()
    if pictures:
        os.makedirs(pictures, exist_ok=True)
        shutil.copy(os.path.join(m["output_dir"], "misclassified_gradcam.png"),
                    os.path.join(pictures, f"gradcam-{task}-{strategy}-s{seed}.png"))
    o = m["ood"]
    return {"task": task, "strategy": strategy, "seed": seed, "backbone": os.path.basename(backbone),
            "image_size": size, "unknown": UNKNOWN[kind], "test_accuracy": m["accuracy"],
            "num_known": o["num_known"], "num_unknown": o["num_unknown"], "scores": o["scores"],
            "reject_below": o["reject_below"], "known_accepted": o["known_accepted"],
            "unknown_rejected": o["unknown_rejected"], "finetune_s": round(t1 - t0, 1),
            "evaluate_s": round(t2 - t1, 1), "run_dir": out, "val_accuracy": result.metrics.get("val", {}).get(
                "accuracy")}


def table(rows: list[dict]) -> str:
    head = (f"{'task':12s} {'strategy':18s} {'seed':>4s} {'test acc':>8s} "
            + " ".join(f"{s + ' AUROC':>17s} {'FPR95':>6s}" for s in SCORES)
            + f" {'thr':>6s} {'known ok':>8s} {'unk. rej':>8s}")
    lines = [head]
    for r in rows:
        cells = " ".join(f"{r['scores'][s]['auroc']:17.3f} {r['scores'][s]['fpr_at_95_tpr']:6.3f}"
                         if s in r["scores"] else f"{'-':>17s} {'-':>6s}" for s in SCORES)
        lines.append(f"{r['task']:12s} {r['strategy']:18s} {r['seed']:4d} {r['test_accuracy']:8.3f} {cells} "
                     f"{r['reject_below']:6.3f} {r['known_accepted']:8.3f} {r['unknown_rejected']:8.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="textures-5,letters-5,textures-20,letters-20")
    parser.add_argument("--strategies", default="feature_extraction")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--work", default="/tmp/tlkit-ood-bench")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "ood.json"))
    parser.add_argument("--pictures", default=None, help="Folder to copy each run's misclassified_gradcam.png into.")
    args = parser.parse_args(argv)
    for kind in BACKBONES:
        for path in (BACKBONES[kind][0], UNKNOWN[kind]):
            if not os.path.exists(path):
                print(f"missing {path}: run ../shared/tools/make-transfer-tasks and make-imagenet-backbone",
                      file=sys.stderr)
                return 2
    rows = []
    for task in args.tasks.split(","):
        for strategy in args.strategies.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                rows.append(run_one(task, strategy, seed, args.work, args.pictures))
                print(table(rows[-1:]).splitlines()[1], flush=True)
                os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                import tensorflow as tf

                with open(args.out, "w", encoding="utf-8") as f:
                    json.dump({"rows": rows, "versions": {"tensorflow": tf.__version__},
                               "mean_auroc": {s: float(np.mean([r["scores"][s]["auroc"] for r in rows
                                                                if s in r["scores"]])) for s in SCORES}},
                              f, indent=2)
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
