"""Metrics of a multi-label classifier (a sigmoid per class): average precision per class and its mean (mAP), micro and
macro F1 at per-class thresholds, the per-class table; the thresholds themselves (chosen on the validation split, the
one that maximises each class's F1) and their file, `thresholds.json`, kept with the run and beside every export.

Average precision is scikit-learn's definition (`average_precision_score`, no interpolation): with the images sorted
by a class's score, `AP = sum_k (R_k - R_{k-1}) P_k` over the distinct scores, `P_k`/`R_k` the precision and recall
of "positive when the score is at least the k-th". A class without positive images has no AP (`None`) and is left
out of the mean; the tests compare these functions with scikit-learn's.

Example:
    thresholds = choose_thresholds(y_val, p_val)
    m = compute_multilabel_metrics(y_test, p_test, thresholds, class_names)
    m["mean_average_precision"], m["micro_f1"], m["macro_f1"]
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from tlkit.core import rundir
from tlkit.core.sidecars import find_sidecar

THRESHOLDS_FILE = "thresholds.json"
DEFAULT_THRESHOLD = 0.5  # a class that the validation split cannot decide (no positive image), or no validation
SUMMARY_KEYS = ("mean_average_precision", "micro_f1", "macro_f1", "exact_match")


def _ranked(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(distinct scores high to low, true positives, false positives)` of "positive when score >= that"."""
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last image of each run of equal scores
    tp = np.cumsum(y)[last]
    return s[last], tp, (last + 1) - tp


def average_precision(y: Sequence[float], scores: Sequence[float]) -> float | None:
    """Average precision of one class (`None` when no image is positive).

    Example:
        >>> average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1])
        0.8333333333333333
    """
    y = np.asarray(y, np.float64) > 0.5
    s = np.asarray(scores, np.float64)
    n_pos = int(y.sum())
    if n_pos == 0:
        return None
    _, tp, fp = _ranked(y.astype(np.float64), s)
    recall = tp / n_pos
    precision = tp / (tp + fp)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def pr_curve(y: Sequence[float], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """`(recall, precision)` of one class at each distinct score, high to low (for plots)."""
    y = np.asarray(y, np.float64) > 0.5
    n_pos = max(int(y.sum()), 1)
    _, tp, fp = _ranked(y.astype(np.float64), np.asarray(scores, np.float64))
    return tp / n_pos, tp / np.maximum(tp + fp, 1)


def best_threshold(y: Sequence[float], scores: Sequence[float]) -> tuple[float, float | None]:
    """`(threshold, F1 there)`: the threshold of one class that maximises its F1 on these images (ties: the higher
    threshold), halfway between the lowest score kept positive and the next lower score; `DEFAULT_THRESHOLD` and
    `None` when no image is positive.

    Example:
        >>> best_threshold([1, 1, 0, 0], [0.9, 0.6, 0.4, 0.1])
        (0.5, 1.0)
    """
    y = np.asarray(y, np.float64) > 0.5
    s = np.asarray(scores, np.float64)
    n_pos = int(y.sum())
    if n_pos == 0:
        return DEFAULT_THRESHOLD, None
    distinct, tp, fp = _ranked(y.astype(np.float64), s)
    f1 = 2 * tp / (2 * tp + fp + (n_pos - tp))
    k = int(np.argmax(f1))  # the first maximum: the highest threshold
    below = distinct[k + 1] if k + 1 < len(distinct) else 0.0
    return float((distinct[k] + below) / 2), float(f1[k])


def choose_thresholds(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per-class thresholds that maximise each class's F1 on (validation) images (`best_threshold`)."""
    y_true, probs = np.asarray(y_true), np.asarray(probs)
    return np.array([best_threshold(y_true[:, c], probs[:, c])[0] for c in range(probs.shape[1])], np.float64)


def _f1(tp: float, fp: float, fn: float) -> float | None:
    return None if tp + fp + fn == 0 else float(2 * tp / (2 * tp + fp + fn))


def compute_multilabel_metrics(y_true: np.ndarray, probs: np.ndarray, thresholds: Sequence[float] | None = None,
                               class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Loss, mAP, micro/macro F1, exact-match ratio and the per-class table at `thresholds`.

    `micro_f1` counts every (image, class) decision together; `macro_f1` averages the F1 of the classes that have a
    positive image or a positive prediction (F1 is undefined for the others); `exact_match` is the fraction of
    images whose whole set of labels is right.

    Args:
        y_true: Multi-hot labels [N, C].
        probs: Sigmoid outputs [N, C].
        thresholds: Per-class thresholds. Defaults to `None` (`DEFAULT_THRESHOLD` for every class).
        class_names: Defaults to `None` (`"0"`, `"1"`, ...).

    Example:
        >>> m = compute_multilabel_metrics(np.array([[1, 0], [0, 1]]), np.array([[0.9, 0.2], [0.3, 0.8]]))
        >>> m["mean_average_precision"], m["micro_f1"]
        (1.0, 1.0)
    """
    y = np.asarray(y_true, np.float64) > 0.5
    p = np.asarray(probs, np.float64)
    n, c = p.shape
    if n == 0:
        return {"num_examples": 0}
    t = np.full(c, DEFAULT_THRESHOLD) if thresholds is None else np.asarray(thresholds, np.float64)
    pred = p >= t
    names = list(class_names) if class_names is not None else [str(i) for i in range(c)]
    tp, fp, fn = (pred & y).sum(0), (pred & ~y).sum(0), (~pred & y).sum(0)
    per_class = []
    for i in range(c):
        ap = average_precision(y[:, i], p[:, i])
        per_class.append({"class": names[i], "ap": ap, "f1": _f1(tp[i], fp[i], fn[i]),
                          "precision": float(tp[i] / (tp[i] + fp[i])) if tp[i] + fp[i] else 0.0,
                          "recall": float(tp[i] / (tp[i] + fn[i])) if tp[i] + fn[i] else 0.0,
                          "threshold": round(float(t[i]), 6), "support": int(y[:, i].sum())})
    aps = [r["ap"] for r in per_class if r["ap"] is not None]
    f1s = [r["f1"] for r in per_class if r["f1"] is not None]
    eps = 1e-7
    loss = -np.mean(y * np.log(np.clip(p, eps, 1 - eps)) + ~y * np.log(np.clip(1 - p, eps, 1 - eps)))
    return {
        "num_examples": int(n),
        "loss": float(loss),
        "mean_average_precision": float(np.mean(aps)) if aps else None,
        "micro_f1": _f1(tp.sum(), fp.sum(), fn.sum()) or 0.0,
        "macro_f1": float(np.mean(f1s)) if f1s else 0.0,
        "exact_match": float(np.mean((pred == y).all(1))),
        "per_class": per_class,
    }


def per_class_table(metrics: dict[str, Any], limit: int = 30) -> str:
    """A plain-text per-class table (AP, F1, precision, recall, threshold, support), the `limit` worst by AP."""
    rows = sorted(metrics.get("per_class", []), key=lambda r: -1.0 if r["ap"] is None else r["ap"])[:limit]
    out = [f"{'class':24s} {'AP':>6s} {'F1':>6s} {'precision':>9s} {'recall':>7s} {'threshold':>9s} {'support':>8s}"]
    fmt = lambda v: "     -" if v is None else f"{v:6.3f}"  # noqa: E731
    for r in rows:
        out.append(f"{r['class'][:24]:24s} {fmt(r['ap'])} {fmt(r['f1'])} {r['precision']:9.3f} {r['recall']:7.3f} "
                   f"{r['threshold']:9.3f} {r['support']:8d}")
    return "\n".join(out)


def labels_above(probs: np.ndarray, thresholds: Sequence[float], class_names: Sequence[str]) -> list[list[tuple[str, float]]]:
    """Per image, `(class, probability)` of every class at or above its threshold, most probable first.

    Example:
        >>> labels_above(np.array([[0.9, 0.2, 0.6]]), [0.5, 0.5, 0.5], ["a", "b", "c"])
        [[('a', 0.9), ('c', 0.6)]]
    """
    probs = np.asarray(probs)
    t = np.asarray(thresholds)
    out = []
    for p in probs:
        idx = [i for i in np.argsort(-p, kind="mergesort") if p[i] >= t[i]]
        out.append([(class_names[i], float(p[i])) for i in idx])
    return out


# ---------------------------------------------------------------- thresholds.json

def write_thresholds(path: str, class_names: Sequence[str], thresholds: Sequence[float], chosen_on: str | None,
                     f1: Sequence[float | None] | None = None) -> str:
    """Writes `thresholds.json`: `{class: threshold}` in class order, and how they were chosen; returns `path`."""
    rule = (f"per class, the threshold of the best F1 on the {chosen_on} split" if chosen_on else
            f"{DEFAULT_THRESHOLD} for every class (no validation split to choose them on)")
    doc: dict[str, Any] = {"thresholds": {n: round(float(t), 6) for n, t in zip(class_names, thresholds)},
                           "chosen_on": chosen_on, "rule": rule, "default": DEFAULT_THRESHOLD}
    if f1 is not None:
        doc["f1_at_threshold"] = {n: (None if v is None else round(float(v), 4)) for n, v in zip(class_names, f1)}
    rundir.write_json(path, doc)
    return path


def thresholds_path(model_path: str) -> str | None:
    """The `thresholds.json` of a run folder, model file or export (its sidecar, `core.sidecars`), or `None`."""
    path = os.fspath(model_path)
    found = os.path.join(path, THRESHOLDS_FILE) if os.path.isdir(path) else find_sidecar(path, THRESHOLDS_FILE)
    return found if found and os.path.isfile(found) else None


def read_thresholds(model_path: str, class_names: Sequence[str]) -> np.ndarray | None:
    """The stored per-class thresholds of a model (in `class_names` order; a class missing from the file gets
    `DEFAULT_THRESHOLD`), or `None` when it has no `thresholds.json`."""
    found = thresholds_path(model_path)
    if found is None:
        return None
    try:
        with open(found, encoding="utf-8") as f:
            stored = json.load(f).get("thresholds", {})
    except (OSError, ValueError, AttributeError):
        return None
    return np.array([float(stored.get(n, DEFAULT_THRESHOLD)) for n in class_names], np.float64)


def thresholds_or_default(model_path: str | None, class_names: Sequence[str]) -> np.ndarray:
    """`read_thresholds`, else `DEFAULT_THRESHOLD` for every class."""
    found = read_thresholds(model_path, class_names) if model_path else None
    return found if found is not None else np.full(len(class_names), DEFAULT_THRESHOLD)


# ---------------------------------------------------------------- predictions with the worst examples

def predict_with_label_errors(model, ds, thresholds: Sequence[float], keep: int = 16,
                              forward=None) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Runs a multi-label `model` over batches of `(images, multi-hot labels)`; keeps the `keep` worst examples:
    those with a missed or a spurious label at `thresholds`, the highest binary cross-entropy first.

    Args:
        model: The classifier.
        ds: Batches of `(images float32 0..255, multi-hot labels)`, in a fixed order.
        thresholds: Per-class thresholds.
        keep: How many examples to keep. Defaults to `16`.
        forward: Images -> probabilities in place of `model(x, training=False)` (test-time augmentation). Defaults
            to `None`.

    Returns:
        `(y_true [N, C], probs [N, C], worst)`; each of `worst` a dict with `index`, `image` (uint8), `missed` and
        `spurious` (class indices), `probs` (float32 [C]) and `loss`.

    Example:
        y, p, worst = predict_with_label_errors(model, make_dataset(split, 224, 32, n), [0.5] * n)
    """
    import tensorflow as tf

    predict = tf.function(forward or (lambda x: model(x, training=False)), reduce_retracing=True)
    t = np.asarray(thresholds, np.float64)
    ys, ps, worst, offset = [], [], [], 0
    for x, y in ds:
        p, yb = np.asarray(predict(x), np.float32), np.asarray(y, np.float32) > 0.5
        ys.append(yb.astype(np.float32))
        ps.append(p)
        pred = p >= t
        wrong = np.flatnonzero((pred != yb).any(1))
        if keep > 0 and len(wrong):
            q = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
            loss = -np.mean(np.where(yb, np.log(q), np.log(1 - q)), 1)
            images = np.asarray(x)
            for i in wrong:
                worst.append({"index": offset + int(i), "image": np.clip(images[i], 0, 255).astype(np.uint8),
                              "missed": np.flatnonzero(yb[i] & ~pred[i]).tolist(),
                              "spurious": np.flatnonzero(pred[i] & ~yb[i]).tolist(), "probs": p[i],
                              "loss": float(loss[i])})
            worst.sort(key=lambda e: (-e["loss"], e["index"]))
            del worst[keep:]
        offset += len(p)
    if not ys:
        c = int(model.output_shape[-1])
        return np.zeros((0, c), np.float32), np.zeros((0, c), np.float32), []
    return np.concatenate(ys), np.concatenate(ps), worst
