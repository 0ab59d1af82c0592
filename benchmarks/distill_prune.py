"""Distillation and pruning on `shapes` (CPU-sized): teacher vs distilled student vs student without a teacher,
and accuracy against sparsity. Prints the tables and writes benchmarks/results/distill_prune.json.

Usage: python benchmarks/distill_prune.py [--per-class 100] [--epochs 10] [--out runs/bench-distill]
(uses tiny .keras backbones so that it runs without downloads; pass --teacher-base/--student-base for real ones,
e.g. --teacher-base resnet50 --student-base mobilenetv2 --image-size 64 on a GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--teacher-base", default=None)
    ap.add_argument("--student-base", default=None)
    ap.add_argument("--out", default="runs/bench-distill")
    a = ap.parse_args()
    import tlkit
    from tlkit.testing import make_tiny_backbone
    from tlkit.core.config import DataConfig, FinetuneConfig, ModelConfig, RuntimeConfig, TrainConfig
    from tlkit.core.verb_configs import DistillConfig, PruneConfig
    from tlkit.verbs.distill import comparison_table
    from tlkit.verbs.prune import sparsity_table

    os.makedirs(a.out, exist_ok=True)
    teacher_base = a.teacher_base or make_tiny_backbone(os.path.join(a.out, "tiny32.keras"), a.image_size, width=32)
    student_base = a.student_base or make_tiny_backbone(os.path.join(a.out, "tiny8.keras"), a.image_size, width=8)
    data = DataConfig(dataset="shapes", shapes_per_class=a.per_class, image_size=a.image_size, augment="none",
                      batch_size=32)
    train = TrainConfig(strategy="full", epochs=a.epochs, lr=3e-3)
    rt = RuntimeConfig(precision="float32", xla="off")
    t0 = time.time()
    teacher = tlkit.finetune(FinetuneConfig(data=data, model=ModelConfig(base=teacher_base, weights="none"), train=train,
                                            runtime=rt, output_dir=os.path.join(a.out, "teacher"), overwrite=True))
    student_cfg = FinetuneConfig(data=data, model=ModelConfig(base=student_base, weights="none"), train=train, runtime=rt,
                                 overwrite=True)
    alone = tlkit.finetune(tlkit.config_from_dict({"output_dir": os.path.join(a.out, "student-alone")}, student_cfg))
    dist = tlkit.distill(tlkit.config_from_dict({"output_dir": os.path.join(a.out, "student-distilled")}, student_cfg),
                         DistillConfig(teacher=teacher.run_dir, temperature=4.0, alpha=0.5, latency_runs=50))
    d = dist.metrics["distillation"]
    alone_row = dict(d["student"], model="student, no teacher",
                     val_accuracy=alone.metrics["val"]["accuracy"], test_accuracy=alone.metrics["test"]["accuracy"])
    rows = [d["teacher"], dict(d["student"], model="student, distilled"), alone_row]
    pruned = {}
    for s in (0.5, 0.8):
        pruned[s] = tlkit.prune(PruneConfig(run_dir=teacher.run_dir, sparsity=s, epochs=2, sweep="0.25,0.5,0.75,0.9",
                                            output_dir=os.path.join(a.out, f"teacher-pruned{int(s * 100)}"),
                                            overwrite=True)).metrics["pruning"]
    print("\n== distillation (T=4, alpha=0.5) ==")
    print(comparison_table(rows))
    for s, p in pruned.items():
        print(f"\n== pruning the teacher to {s:g} ==")
        print(sparsity_table(p["table"]))
    result = {"seconds": round(time.time() - t0, 1), "distillation": rows,
              "pruning": {str(s): p["table"] for s, p in pruned.items()}, "args": vars(a)}
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "results", "distill_prune.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
