"""Metrics of a classifier on a split: loss, top-1, top-5, mean per-class accuracy, per-class report, the
overfitting note and the pictures `finetune` and `evaluate` add to a run folder."""
from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import keras
import tensorflow as tf

def predict_split(model: keras.Model, ds: tf.data.Dataset, forward=None,
                  multi_label: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Runs `model` over a batched dataset of `(images, one-hot labels)`: THE prediction loop of the engine.

    Args:
        model: The model (its outputs: probabilities, or logits for a logits model).
        ds: Batches of `(images, one-hot labels)` (multi-hot for multi-label data).
        forward: A traced forward pass to reuse across calls (`forward_fn(model)`). Defaults to `None` (traced here).
        multi_label: Return the label vectors as they are instead of their argmax. Defaults to `False`.

    Returns:
        `(y_true int [N], outputs float32 [N, C])`; with `multi_label`, `y_true` float32 [N, C].
    """
    ys, ps = [], []
    predict = forward or forward_fn(model)
    for x, y in ds:
        ps.append(np.asarray(predict(x), np.float32))
        ys.append(np.asarray(y, np.float32) if multi_label else np.argmax(np.asarray(y), axis=-1))
    if not ys:
        c = model.output_shape[-1]
        return np.zeros((0, c) if multi_label else (0,), np.float32 if multi_label else np.int64), \
            np.zeros((0, c), np.float32)
    return np.concatenate(ys), np.concatenate(ps)


def forward_fn(model: keras.Model):
    """`model(x, training=False)` as one traced function, reused for every batch (and every call given it)."""
    return tf.function(lambda x: model(x, training=False), reduce_retracing=True)


def predict_with_errors(model: keras.Model, ds: tf.data.Dataset, keep: int = 16,
                        forward=None) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """`predict_split` that also keeps the images of the `keep` worst errors (highest loss among the misclassified).

    Args:
        model: The classifier.
        ds: A batched dataset of `(images float32 0..255, one-hot labels)`, in a fixed order.
        keep: How many errors to keep. Defaults to `16`.
        forward: Images -> probabilities in place of `model(x, training=False)` (test-time augmentation,
            `engine.tta.averaged`). Defaults to `None`.

    Returns:
        `(y_true [N], probs [N, C], worst)`; `worst` is sorted worst first, each a dict with `index` (position in
        the split), `image` (uint8 [H, W, 3]), `true`, `pred`, `prob` (of the prediction), `prob_true`, `loss`.

    Example:
        y, p, worst = predict_with_errors(model, make_dataset(split, 224, 32, n))
    """
    ys, ps = [], []
    worst: list[dict[str, Any]] = []
    predict = tf.function(forward or (lambda x: model(x, training=False)), reduce_retracing=True)
    offset = 0
    for x, y in ds:
        p = np.asarray(predict(x), np.float32)
        t = np.argmax(np.asarray(y), axis=-1)
        ps.append(p)
        ys.append(t)
        if keep > 0:
            pred = p.argmax(-1)
            p_true = p[np.arange(len(t)), t]
            loss = -np.log(np.clip(p_true, 1e-12, 1.0))
            wrong = np.flatnonzero(pred != t)
            threshold = worst[-1]["loss"] if len(worst) >= keep else -np.inf
            wrong = [i for i in wrong[np.argsort(-loss[wrong])][:keep] if loss[i] > threshold]
            if wrong:
                images = np.asarray(x)
                for i in wrong:
                    worst.append({"index": offset + int(i), "image": np.clip(images[i], 0, 255).astype(np.uint8),
                                  "true": int(t[i]), "pred": int(pred[i]), "prob": float(p[i, pred[i]]),
                                  "prob_true": float(p_true[i]), "loss": float(loss[i])})
                worst.sort(key=lambda e: (-e["loss"], e["index"]))
                del worst[keep:]
        offset += len(t)
    if not ys:
        return np.zeros((0,), np.int64), np.zeros((0, model.output_shape[-1]), np.float32), []
    return np.concatenate(ys), np.concatenate(ps), worst


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts [true, predicted] over all `num_classes` classes (`sklearn.metrics.confusion_matrix`)."""
    from sklearn import metrics as skm

    return skm.confusion_matrix(np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64),
                                labels=np.arange(num_classes)).astype(np.int64)


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
    labels = np.arange(c)
    # Per-class precision, recall and F1, and the mean per-class accuracy, by scikit-learn: a class never
    # predicted has precision 0 (zero_division=0); balanced_accuracy_score averages the recall of the classes
    # present in y_true (it warns about predicted classes absent from y_true, which it leaves out, as we want).
    from sklearn import metrics as skm

    precision, recall, f1, support = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels,
                                                                         zero_division=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*y_pred contains classes not in y_true.*")
        balanced = float(skm.balanced_accuracy_score(y_true, y_pred))
    names = class_names or [str(i) for i in range(c)]
    per_class = [{"class": names[i], "precision": float(precision[i]), "recall": float(recall[i]),
                  "f1": float(f1[i]), "support": int(support[i])} for i in range(c)]
    # Kept by hand, with no library equivalent that gives the same numbers: the loss (sklearn's log_loss
    # renormalises each row and clips at the float eps, so a probability that underflowed to 0 costs 36 there
    # and 27.6 here, as in Keras's crossentropy on float32 outputs), and top-k (sklearn's top_k_accuracy_score
    # breaks exact ties the other way and rejects 2-class scores of shape [N, 2] with k >= 2).
    loss = float(-np.mean(np.log(np.clip(probs[np.arange(n), y_true], 1e-12, 1.0))))
    return {
        "num_examples": int(n),
        "loss": loss,
        "accuracy": float(np.mean(y_pred == y_true)),
        "top5_accuracy": float(np.mean((topk == y_true[:, None]).any(-1))),  # 1.0 with <= 5 classes
        "mean_per_class_accuracy": balanced,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


SUMMARY_KEYS = ("num_examples", "loss", "accuracy", "top5_accuracy", "mean_per_class_accuracy",
                "mean_average_precision", "micro_f1", "macro_f1", "exact_match")  # the last four: multi-label


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
    """A plain-text per-class precision/recall/F1 table (the `limit` worst classes by F1 when there are more); for
    multi-label metrics `metrics_multilabel.per_class_table` (AP, F1, threshold)."""
    if "mean_average_precision" in metrics:
        from tlkit.engine import metrics_multilabel

        return metrics_multilabel.per_class_table(metrics, limit)
    rows = sorted(metrics.get("per_class", []), key=lambda r: r["f1"])
    if len(rows) > limit:
        rows = rows[:limit]
    out = [f"{'class':24s} {'precision':>9s} {'recall':>7s} {'f1':>6s} {'support':>8s}"]
    for r in rows:
        out.append(f"{r['class'][:24]:24s} {r['precision']:9.3f} {r['recall']:7.3f} {r['f1']:6.3f} {r['support']:8d}")
    return "\n".join(out)


def most_confused(cm: np.ndarray | list, class_names: list[str], k: int = 10) -> list[dict[str, Any]]:
    """The `k` most frequent (true, predicted) confusions, as fastai's `most_confused`.

    Example:
        most_confused([[3, 1], [0, 2]], ["cat", "dog"])
        # -> [{'true': 'cat', 'predicted': 'dog', 'count': 1, 'fraction_of_true': 0.25}]
    """
    cm = np.asarray(cm, np.int64)
    off = cm - np.diag(np.diag(cm))
    support = cm.sum(1)
    pairs = [(int(off[i, j]), i, j) for i, j in zip(*np.nonzero(off))]
    pairs.sort(key=lambda t: (-t[0], t[1], t[2]))
    return [{"true": class_names[i], "predicted": class_names[j], "count": n,
             "fraction_of_true": round(n / support[i], 4) if support[i] else 0.0} for n, i, j in pairs[:k]]


def confusion_csv_rows(cm: np.ndarray | list, class_names: list[str]) -> list[dict[str, Any]]:
    """The rows of `confusion_matrix.csv`: one per true class, one column per predicted class (counts)."""
    cm = np.asarray(cm, np.int64)
    rows = []
    for i, name in enumerate(class_names):
        row: dict[str, Any] = {"true \\ predicted": name}
        row.update({class_names[j]: int(cm[i, j]) for j in range(len(class_names))})
        row["support"] = int(cm[i].sum())
        rows.append(row)
    return rows


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


OVERFITTING_ADVICE = ("more augmentation (--augment strong), stronger regularisation (--dropout 0.5, --l2 1e-4, "
                      "--optimizer adamw --weight-decay 1e-4, --label-smoothing 0.1), more data, or an earlier stop "
                      "(--early-stopping 3)")


def detect_overfitting(history: list[dict[str, Any]], min_rise: float = 0.05,
                       patience: int = 2) -> dict[str, Any] | None:
    """Finds overfitting in a training history: the validation loss rises while the train/val gap grows.

    The run overfits when, after the epoch of lowest validation loss, at least `patience` epochs follow, the
    validation loss of the last `patience` epochs is on average at least `min_rise` (relative) above its lowest
    value, the training loss kept falling, and the gap `val_loss - loss` grew by more than `min_rise` times the
    lowest validation loss. A pure function of the history rows (as `RunResult.history` or `history.csv`).

    Args:
        history: Rows with `epoch`, `loss`, `val_loss` (and optionally `stage`, `accuracy`, `val_accuracy`).
        min_rise: Relative rise of the validation loss that counts. Defaults to `0.05`.
        patience: Epochs after the lowest validation loss needed to call it. Defaults to `2`.

    Returns:
        `None` for a healthy run (or without validation), else a dict with `began_epoch` (the first epoch whose
        validation loss was above the lowest), `best_val_loss_epoch`, the losses and gaps at both ends,
        `best_val_accuracy_epoch` (the checkpoint kept in `model.keras`), `message` and `advice`.

    Example:
        >>> rows = [{"epoch": e + 1, "loss": l, "val_loss": v} for e, (l, v) in
        ...         enumerate([(1.0, 1.0), (0.6, 0.8), (0.3, 0.9), (0.1, 1.2)])]
        >>> detect_overfitting(rows)["began_epoch"]
        3
    """
    rows = [r for r in history if _finite(r.get("loss")) is not None and _finite(r.get("val_loss")) is not None]
    if len(rows) < patience + 2:
        return None
    tl = np.array([_finite(r["loss"]) for r in rows])
    vl = np.array([_finite(r["val_loss"]) for r in rows])
    best = int(np.argmin(vl))
    if len(vl) - 1 - best < patience:
        return None
    scale = max(abs(vl[best]), 1e-8)
    rise = (float(np.mean(vl[-patience:])) - vl[best]) / scale
    gap = vl - tl
    growth = (gap[-1] - gap[best]) / scale
    if rise < min_rise or growth <= min_rise or not tl[-1] < tl[best] or not vl[-1] > vl[best]:
        return None
    epoch = lambda i: int(rows[i].get("epoch", i + 1))
    began, best_epoch, last = epoch(best + 1), epoch(best), epoch(len(rows) - 1)
    note: dict[str, Any] = {
        "began_epoch": began, "best_val_loss_epoch": best_epoch, "last_epoch": last,
        "stage": rows[best + 1].get("stage"),
        "val_loss": {"best": float(vl[best]), "last": float(vl[-1])},
        "train_loss": {"at_best": float(tl[best]), "last": float(tl[-1])},
        "loss_gap": {"at_best": float(gap[best]), "last": float(gap[-1])},
    }
    ta = [_finite(r.get("accuracy")) for r in rows]
    va = [_finite(r.get("val_accuracy")) for r in rows]
    if ta[best] is not None and va[best] is not None and ta[-1] is not None and va[-1] is not None:
        note["accuracy_gap"] = {"at_best": ta[best] - va[best], "last": ta[-1] - va[-1]}
    kept = ""
    if any(v is not None for v in va):
        i = int(np.nanargmax([np.nan if v is None else v for v in va]))
        note["best_val_accuracy_epoch"] = epoch(i)
        kept = f" model.keras holds the best checkpoint by validation accuracy (epoch {epoch(i)})."
    note["advice"] = f"Try {OVERFITTING_ADVICE}, or train for {best_epoch} epoch(s)."
    note["message"] = (
        f"Overfitting from epoch {began}: the validation loss rose from {vl[best]:.4f} (epoch {best_epoch}) to "
        f"{vl[-1]:.4f} (epoch {last}) while the training loss fell from {tl[best]:.4f} to {tl[-1]:.4f}; the "
        f"train/val loss gap grew from {gap[best]:.4f} to {gap[-1]:.4f}.{kept} {note['advice']}")
    return note


def _head_passes(history: list[dict[str, Any]], out_dir: str) -> list[dict[str, Any]]:
    """The rows of `head_passes.csv` when the run's history is one head stage on cached features, else `[]`."""
    import csv

    from tlkit.engine.loop import PASSES_FILE

    path = os.path.join(out_dir, PASSES_FILE)
    if len(history) != 1 or not history[0].get("head_passes") or not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        rows = [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]
    return [r for r in rows if "pass" in r]


def training_report(history: list[dict[str, Any]], metrics: dict[str, Any], class_names: list[str],
                    out_dir: str) -> dict[str, Any] | None:
    """What `finetune` adds to a run folder after training: `curves.png`, `confusion_matrix.png`, the overfitting note.

    Args:
        history: The run's history rows (with the `stage` column).
        metrics: Metrics per split (`{"val": ..., "test": ...}` as `compute_metrics` returns them); the confusion
            matrix of `test` (else `val`) is drawn.
        class_names: Class names, index = label.
        out_dir: The run folder.

    Returns:
        The overfitting note of `detect_overfitting`, or `None`.

    Example:
        note = training_report(result.history, result.metrics, result.class_names, result.run_dir)
    """
    note = detect_overfitting(history)
    try:  # the pictures must never cost a finished run its model and metrics
        from tlkit.engine import plots

        title = os.path.basename(os.path.normpath(out_dir))
        passes = _head_passes(history, out_dir)
        if passes:  # the run is its head stage alone: one row; its passes are the curve
            plots.plot_curves([dict(r, epoch=r["pass"], stage="head on cached features") for r in passes],
                              os.path.join(out_dir, "curves.png"), title=title, xlabel="head pass",
                              kept=int(history[0].get("kept_pass") or 0) or None)
        else:
            plots.plot_curves(history, os.path.join(out_dir, "curves.png"), overfitting=note, title=title)
        for split in ("test", "val"):
            m = metrics.get(split) or {}
            if m.get("confusion_matrix"):
                plots.plot_confusion_matrix(m["confusion_matrix"], class_names,
                                            os.path.join(out_dir, "confusion_matrix.png"),
                                            title=f"Confusion matrix ({split})")
                break
    except Exception as e:  # noqa: BLE001  (matplotlib, fonts, disk): report and go on
        print(f"[tlkit] warning: could not draw curves.png/confusion_matrix.png: {type(e).__name__}: {e}", flush=True)
    return note
