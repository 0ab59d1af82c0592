"""Multi-label fine-tuning from a CSV table through the Python API: train, evaluate, predict the labels of images.

Usage:
    python examples/multilabel_csv.py [TABLE.csv] [--image-dir DIR] [--label-column tags] [--delimiter " "]
                                      [--base efficientnetb0] [--output-dir runs/planet]

`TABLE.csv` names each image (`--file-column`, default `file`) and its labels in one cell, separated by
`--delimiter` (a space, as in Kaggle's Planet `train_v2.csv`: `train_0,haze primary`), and optionally its split
(`train`, `val`, `test`). Without TABLE.csv the example writes a small one itself from real image files: each image
is noise with its labels as bright colour channels (`red`, `green`, `blue`: an image may be red and blue).

The run is multi-label because some rows have several labels: a sigmoid per class, binary cross-entropy, per-class
thresholds chosen on the validation split (thresholds.json), mAP and micro/macro F1 in metrics.json.

Smoke mode (`TLKIT_SMOKE=1`): a tiny `.keras` backbone with random weights at 32 px, so it runs in seconds on a CPU
with nothing downloaded.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile

import tlkit
from tlkit import DataConfig, FinetuneConfig, ModelConfig, TrainConfig
from tlkit.testing import is_smoke, write_multilabel_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", nargs="?", help="CSV of images and labels (default: a demo table written here).")
    parser.add_argument("--image-dir", default=None, help="Folder that the table's file names are relative to.")
    parser.add_argument("--file-column", default="file", help="Column of the image files. Default: file.")
    parser.add_argument("--label-column", default="label", help="Column of the labels. Default: label.")
    parser.add_argument("--delimiter", default=" ", help="Separator of the labels in a cell. Default: a space.")
    parser.add_argument("--base", default="efficientnetb0", help="Backbone name or PATH.keras.")
    parser.add_argument("--output-dir", default=None, help="Run folder. Default: runs/<base>-<table>-<time>.")
    args = parser.parse_args(argv)

    work = tempfile.mkdtemp(prefix="tlkit-multilabel-")
    table = args.table or write_multilabel_table(os.path.join(work, "images"), n=42 if is_smoke() else 210)
    data = DataConfig(labels=table, image_dir=args.image_dir, file_column=args.file_column,
                      label_column=args.label_column, label_delimiter=args.delimiter)
    if is_smoke():
        from tlkit.testing import make_tiny_backbone

        data = dataclasses.replace(data, image_size=32, batch_size=8, augment="none")
        model = ModelConfig(base=make_tiny_backbone(os.path.join(work, "tiny.keras")), weights="none")
        train = TrainConfig(strategy="auto", head_steps=100, epochs=1)  # auto: its trials compared by val mAP
        output_dir = args.output_dir or os.path.join(work, "run")
    else:
        model = ModelConfig(base=args.base, weights="imagenet")
        train = TrainConfig()  # the auto recipe
        output_dir = args.output_dir

    # 1. Train: the same call as `tlkit finetune --labels TABLE.csv --label-delimiter " " ...`.
    result = tlkit.finetune(FinetuneConfig(data=data, model=model, train=train, output_dir=output_dir))
    print(f"labels: {result.class_names}")
    for split, m in result.metrics.items():
        if isinstance(m, dict) and "mean_average_precision" in m:
            print(f"{split}: mAP {m['mean_average_precision']:.3f}, micro F1 {m['micro_f1']:.3f}, "
                  f"macro F1 {m['macro_f1']:.3f} on {m['num_examples']} images")

    # 2. Evaluate on the test split (the validation split when the table has none), at the stored thresholds;
    #    writes eval-SPLIT/metrics.json, pr_curves.png and worst_examples.png in the run folder.
    metrics = tlkit.evaluate(result.run_dir, result.config.data, split="test", seed=result.config.seed)
    print(f"evaluate {metrics['split']}: mAP {metrics['mean_average_precision']:.3f}; worst: "
          + "; ".join(f"{os.path.basename(e.get('file', str(e['index'])))} missed {e['missed']} spurious "
                      f"{e['spurious']}" for e in metrics["worst_examples"][:3]))

    # 3. Predict: every label at or above its threshold (thresholds.json), for any format tlkit exports.
    clf = tlkit.load(result.run_dir)
    root = os.path.dirname(table) if args.image_dir is None else args.image_dir
    files = sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith((".jpg", ".png")))[:4]
    for f, labels in zip(files, clf.predict_classes(files)):
        print(f"{os.path.basename(f):20s} {' '.join(labels) or '(none above its threshold)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
