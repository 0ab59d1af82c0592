"""Do tlkit's defaults help with real pretrained features? Strategies and BatchNorm handling compared.

Uses a genuine ImageNet-pretrained backbone (EfficientNet-Lite0 rebuilt by
`../shared/tools/make-imagenet-backbone python`, passed as --backbone PATH.keras) on the built-in `shapes`
dataset, and compares, at the same number of epochs: feature extraction, two-stage (the default), top-k,
full fine-tuning, and two-stage with BatchNorm training (--train-bn). Prints a table and writes JSON.
A benchmark, not a test: it takes minutes on a CPU.

Usage:
    python benchmarks/strategies.py --backbone ~/.cache/imagenet-backbone/efficientnet_lite0_backbone.keras
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time

import tlkit
from tlkit import DataConfig, FinetuneConfig, ModelConfig, TrainConfig

RUNS = {
    "feature_extraction": dict(strategy="feature_extraction"),
    "two_stage (default)": dict(strategy="two_stage"),
    "top_k": dict(strategy="top_k"),
    "full": dict(strategy="full"),
    "two_stage + train_bn": dict(strategy="two_stage", train_bn=True),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", required=True, help="A .keras backbone (raw 0-255 RGB in, features out).")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--per-class", type=int, default=60, help="Training images per class of shapes.")
    p.add_argument("--head-epochs", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3, help="Epochs after the warm-up (two_stage); the other "
                   "strategies get head_epochs + epochs in total so that all train equally long.")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", default="benchmarks/results/strategies.json")
    args = p.parse_args()
    results = []
    for name, opts in RUNS.items():
        two = opts["strategy"] == "two_stage"
        train = TrainConfig(strategy=opts["strategy"], epochs=args.epochs if two else args.epochs + args.head_epochs,
                            head_epochs=args.head_epochs, lr=args.lr)
        cfg = FinetuneConfig(
            data=DataConfig(dataset="shapes", image_size=args.image_size, shapes_per_class=args.per_class,
                            batch_size=32, augment="light", val_split=0.5),  # val, test: per_class / 2 each
            model=ModelConfig(base=args.backbone, weights="imagenet", train_bn=opts.get("train_bn")),
            train=train, output_dir=tempfile.mkdtemp(prefix="tlkit-bench-"), overwrite=True)
        t0 = time.time()
        r = tlkit.finetune(cfg)
        results.append({"run": name, "val_accuracy": r.metrics["val"]["accuracy"],
                        "test_accuracy": r.metrics["test"]["accuracy"], "test_loss": r.metrics["test"]["loss"],
                        "epochs": len(r.history), "seconds": round(time.time() - t0, 1)})
    print(f"\n{'run':24s} {'val acc':>8s} {'test acc':>9s} {'test loss':>10s} {'epochs':>7s} {'seconds':>8s}")
    for r in results:
        print(f"{r['run']:24s} {r['val_accuracy']:8.3f} {r['test_accuracy']:9.3f} {r['test_loss']:10.3f} "
              f"{r['epochs']:7d} {r['seconds']:8.1f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "results": results}, f, indent=2)
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
