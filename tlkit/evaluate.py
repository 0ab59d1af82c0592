"""Metrics of a classifier on a split: loss, top-1, top-5, mean per-class accuracy, per-class report."""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import keras
import tensorflow as tf

from tlkit.errors import ConfigError, DataError


def predict_split(model: keras.Model, ds: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Runs `model` over a batched dataset of `(images, one-hot labels)`.

    Returns:
        `(y_true int [N], probs float [N, C])`.
    """
    ys, ps = [], []
    predict = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    for x, y in ds:
        ps.append(np.asarray(predict(x), np.float32))
        ys.append(np.argmax(np.asarray(y), axis=-1))
    if not ys:
        return np.zeros((0,), np.int64), np.zeros((0, model.output_shape[-1]), np.float32)
    return np.concatenate(ys), np.concatenate(ps)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts [true, predicted]."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return cm


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: list[str] | None = None) -> dict[str, Any]:
    """Loss, top-1, top-5, mean per-class accuracy and a per-class report from predictions.

    Classes absent from `y_true` are left out of the mean per-class accuracy; a class never predicted has
    precision 0.

    Example:
        >>> compute_metrics(np.array([0, 1]), np.array([[0.9, 0.1], [0.2, 0.8]]))["accuracy"]
        1.0
    """
    y_true = np.asarray(y_true, np.int64)
    probs = np.asarray(probs, np.float64)
    n, c = probs.shape
    if n == 0:
        return {"num_examples": 0}
    y_pred = probs.argmax(-1)
    k = min(5, c)
    topk = np.argsort(-probs, axis=-1)[:, :k]
    cm = confusion_matrix(y_true, y_pred, c)
    support = cm.sum(1)
    predicted = cm.sum(0)
    tp = np.diag(cm)
    recall = np.divide(tp, support, out=np.zeros(c), where=support > 0)
    precision = np.divide(tp, predicted, out=np.zeros(c), where=predicted > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(c), where=(precision + recall) > 0)
    names = class_names or [str(i) for i in range(c)]
    per_class = [{"class": names[i], "precision": float(precision[i]), "recall": float(recall[i]),
                  "f1": float(f1[i]), "support": int(support[i])} for i in range(c)]
    loss = float(-np.mean(np.log(np.clip(probs[np.arange(n), y_true], 1e-12, 1.0))))
    return {
        "num_examples": int(n),
        "loss": loss,
        "accuracy": float(np.mean(y_pred == y_true)),
        f"top{k}_accuracy" if k != 5 else "top5_accuracy": float(np.mean((topk == y_true[:, None]).any(-1))),
        "mean_per_class_accuracy": float(recall[support > 0].mean()),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


SUMMARY_KEYS = ("num_examples", "loss", "accuracy", "top5_accuracy", "mean_per_class_accuracy")


def summary_table(metrics_by_split: dict[str, dict[str, Any]]) -> str:
    """A plain-text table of the headline metrics, one row per split."""
    keys = [k for k in SUMMARY_KEYS if any(k in m for m in metrics_by_split.values())]
    header = ["split"] + keys
    rows = [header]
    for split, m in metrics_by_split.items():
        row = [split]
        for k in keys:
            v = m.get(k)
            row.append("-" if v is None else (str(v) if isinstance(v, int) else f"{v:.4f}"))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows)


def per_class_table(metrics: dict[str, Any], limit: int = 30) -> str:
    """A plain-text per-class precision/recall/F1 table (the `limit` worst classes by F1 when there are more)."""
    rows = sorted(metrics.get("per_class", []), key=lambda r: r["f1"])
    if len(rows) > limit:
        rows = rows[:limit]
    out = [f"{'class':24s} {'precision':>9s} {'recall':>7s} {'f1':>6s} {'support':>8s}"]
    for r in rows:
        out.append(f"{r['class'][:24]:24s} {r['precision']:9.3f} {r['recall']:7.3f} {r['f1']:6.3f} {r['support']:8d}")
    return "\n".join(out)


def read_labels(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def load_model_and_labels(path: str) -> tuple[keras.Model, list[str] | None, str | None]:
    """Loads a run folder (its model.keras, labels.txt) or a .keras file (labels.txt beside it, if any).

    Returns:
        `(model, class_names or None, run_dir or None)`.
    """
    run_dir = None
    if os.path.isdir(path):
        run_dir = path
        model_path = os.path.join(path, "model.keras")
    else:
        model_path = path
    if not os.path.isfile(model_path):
        raise ConfigError(f"No model found at {path!r} (expected a run folder with model.keras or a .keras file).")
    import tlkit.schedules  # noqa: F401  registers tlkit's serializable objects
    try:
        model = keras.models.load_model(model_path, compile=False, safe_mode=True)
    except Exception as e:
        raise ConfigError(f"Could not load model {model_path!r}: {str(e).splitlines()[0][:300]}") from None
    labels_path = os.path.join(os.path.dirname(os.path.abspath(model_path)), "labels.txt")
    labels = read_labels(labels_path) if os.path.isfile(labels_path) else None
    if labels is not None and len(labels) != model.output_shape[-1]:
        raise DataError(f"{labels_path} lists {len(labels)} classes but the model predicts {model.output_shape[-1]}.")
    return model, labels, run_dir


def evaluate(model: str | keras.Model, data: "DataConfig", split: str = "test", batch_size: int | None = None,
             output_dir: str | None = None, class_names: list[str] | None = None, seed: int = 42) -> dict[str, Any]:
    """Evaluates a model (run folder, `.keras` file or a model object) on a split of a dataset.

    Args:
        model: A run folder, a `.keras` path, or a `keras.Model`.
        data: A `DataConfig` naming the data (`dataset` or `image_dir`).
        split: `train`, `val` or `test`. Defaults to `"test"` (falls back to `val` when there is no test split).
        batch_size: Defaults to `None` (`data.batch_size`).
        output_dir: Where to write `metrics.json` (the run folder's `eval-<split>/` by default for a run folder).
        class_names: Overrides the labels stored with the model. Defaults to `None`.
        seed: Seed of the train/val split (use the run's seed). Defaults to `42`.

    Returns:
        The metrics dict (as in `metrics.json`), with `split` and `class_names`.

    Example:
        >>> m = evaluate("runs/resnet50-shapes-1", DataConfig(dataset="shapes"), split="val")
    """
    from tlkit import rundir
    from tlkit.config import DataConfig
    from tlkit.data import load_sources, make_dataset

    run_dir = None
    if isinstance(model, keras.Model):
        labels = None
    else:
        model, labels, run_dir = load_model_and_labels(model)
    labels = class_names or labels
    size = int(model.input_shape[1])
    data = dataclasses.replace(data, image_size=size)
    sources = load_sources(data, size, seed)
    if labels is not None and len(labels) != sources.num_classes:
        raise DataError(f"The model was trained on {len(labels)} classes but the data has {sources.num_classes}.")
    if model.output_shape[-1] != sources.num_classes:
        raise DataError(f"The model predicts {model.output_shape[-1]} classes but the data has {sources.num_classes}.")
    if labels is not None and list(labels) != list(sources.class_names):
        raise DataError("The data's class names differ from the model's labels.txt: "
                        f"{sources.class_names[:5]}... vs {list(labels)[:5]}...")
    chosen = {"train": sources.train, "val": sources.val, "validation": sources.val, "test": sources.test}
    if split not in chosen:
        raise ConfigError(f"Unknown split {split!r}. Choose one of: train, val, test.")
    s = chosen[split]
    if s is None and split == "test" and sources.val is not None:
        split, s = "val", sources.val
    if s is None:
        raise DataError(f"The data has no {split!r} split.")
    ds = make_dataset(s, size, batch_size or data.batch_size, sources.num_classes, cache="none")
    y, p = predict_split(model, ds)
    metrics = compute_metrics(y, p, sources.class_names)
    metrics["split"] = split
    metrics["class_names"] = sources.class_names
    if output_dir is None and run_dir is not None:
        output_dir = os.path.join(run_dir, f"eval-{split}")
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        rundir.write_json(os.path.join(output_dir, "metrics.json"), metrics)
        metrics["output_dir"] = output_dir
    return metrics
