"""The files of a run folder that `finetune`, `distill` and `prune` all write, written one way: `config.yaml`,
`labels.txt`, the per-split metrics and the common fields of `metrics.json`. The folder rules themselves are
`core.rundir`'s; what a verb adds to `metrics.json` (`pruning`, `distillation`, `recipe`) is the verb's.

Example:
    write_config(out_dir, resolved)
    write_labels(out_dir, data.class_names)
    metrics = split_metrics(model, {"val": val_ds, "test": test_ds}, data.class_names)
    write_metrics(out_dir, run_metrics(metrics, train_seconds=12.3, epochs=4, skipped_files=[]))
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Sequence

from tlkit.core import rundir
from tlkit.core.config_io import config_to_dict, dump_yaml
from tlkit.engine.metrics import compute_metrics, predict_split

CONFIG_FILE = "config.yaml"
LABELS_FILE = "labels.txt"
METRICS_FILE = "metrics.json"


def write_config(out_dir: str, cfg) -> None:
    """Writes the resolved configuration as `config.yaml` (`tlkit finetune --config` repeats the run); a labels table
    given in memory is written beside it as `data.csv`, which config.yaml names."""
    from tlkit.data.table import recorded

    cfg = recorded(cfg, out_dir)
    rundir.write_text(os.path.join(out_dir, CONFIG_FILE), dump_yaml(config_to_dict(cfg)))


def write_labels(out_dir: str, class_names: Sequence[str]) -> None:
    """Writes `labels.txt`: one class name a line, line i = output column i."""
    rundir.write_text(os.path.join(out_dir, LABELS_FILE), "\n".join(class_names) + "\n")


def split_metrics(model, splits: Mapping[str, Any], class_names: Sequence[str],
                  predict: Callable[[Any], tuple] | None = None,
                  thresholds_dir: str | None = None) -> dict[str, dict[str, Any]]:
    """`{split: compute_metrics(...)}` of `model` on every dataset in `splits` that is not `None`.

    A multi-label model (`is_multi_label`) gets `compute_multilabel_metrics` at per-class thresholds chosen on the
    `val` split (the best F1 of each class; 0.5 without it), written to `thresholds_dir/thresholds.json` when given.

    Args:
        model: The classifier.
        splits: `{name: batched (images, one-hot labels) dataset or None}`, e.g. `{"val": ..., "test": ...}`.
        class_names: Names of the output columns.
        predict: `predict(ds) -> (y_true, probs)`, a prediction loop to reuse. Defaults to `predict_split`.
        thresholds_dir: Where a multi-label model's `thresholds.json` goes. Defaults to `None` (not written).
    """
    from tlkit.models.classifier import is_multi_label

    multi = is_multi_label(model)
    predict = predict or (lambda ds: predict_split(model, ds, multi_label=multi))
    outputs = {name: predict(ds) for name, ds in splits.items() if ds is not None}
    if not multi:
        return {name: compute_metrics(y, p, class_names) for name, (y, p) in outputs.items()}
    from tlkit.engine import metrics_multilabel as ML

    val = outputs.get("val")
    chosen = [ML.best_threshold(val[0][:, c], val[1][:, c]) for c in range(len(class_names))] if val else None
    thresholds = [t for t, _ in chosen] if chosen else [ML.DEFAULT_THRESHOLD] * len(class_names)
    if thresholds_dir is not None:
        ML.write_thresholds(os.path.join(thresholds_dir, ML.THRESHOLDS_FILE), class_names, thresholds,
                            "val" if chosen else None, [f for _, f in chosen] if chosen else None)
    return {name: ML.compute_multilabel_metrics(y, p, thresholds, class_names) for name, (y, p) in outputs.items()}


def stage_records(stages: Sequence) -> list[dict[str, Any]]:
    """The stages as `metrics.json` lists them (`trainable` as a sorted list, `None` for the whole model)."""
    return [dataclasses.asdict(s) | {"trainable": None if s.trainable is None else sorted(s.trainable)}
            for s in stages]


def run_metrics(metrics: Mapping[str, Any], *, train_seconds: float, epochs: int, stages: Sequence | None = None,
                **extra: Any) -> dict[str, Any]:
    """The content of `metrics.json`: the per-split metrics, `train_seconds`, `epochs`, the `stages` (when given),
    then the verb's own fields (`extra`, in the order given: `skipped_files`, `pruning`, `distillation`, ...)."""
    out: dict[str, Any] = dict(metrics)
    out["train_seconds"] = round(train_seconds, 2)
    out["epochs"] = epochs
    if stages is not None:
        out["stages"] = stage_records(stages)
    out.update(extra)
    return out


def write_metrics(out_dir: str, metrics: Mapping[str, Any]) -> None:
    """Writes `metrics.json` atomically."""
    rundir.write_json(os.path.join(out_dir, METRICS_FILE), metrics)


IMAGE_CACHES = ("train", "eval")  # the names of the decoded-image disk caches in RUN/cache (`make_dataset`)


def remove_image_cache(out_dir: str) -> int:
    """Removes the decoded-image disk caches of a finished run from `out_dir/cache` (`--cache disk`, or `auto` on
    images too large for memory: 15 GB for 100,000 images at 224 px), and the folder when nothing else is in it;
    returns the bytes freed. An interrupted run keeps them for `--resume`."""
    folder = os.path.join(out_dir, "cache")
    if not os.path.isdir(folder):
        return 0
    freed = 0
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.split(".", 1)[0] in IMAGE_CACHES and os.path.isfile(path):
            freed += os.path.getsize(path)
            os.remove(path)
    if not os.listdir(folder):
        os.rmdir(folder)
    return freed
