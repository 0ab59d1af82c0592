"""Pictures of a run: confusion matrix, worst errors, training curves, learning-rate finder.

Every function draws on a `matplotlib.figure.Figure` with the Agg canvas (no pyplot, no global backend
switch, safe in scripts, servers and threads), writes the PNG atomically when `path` is given, and returns
the figure (a notebook shows it by displaying the returned object). Image sizes are fixed by the
constants below (inches times `DPI`), so a picture's pixel size does not depend on its labels.

Example:
    from tlkit.engine import plots
    fig = plots.plot_curves(result.history, "runs/x/curves.png")
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tlkit.core import rundir

DPI = 100
CURVES_SIZE = (12.0, 4.5)  # inches: 1200 x 450 px
LR_FIND_SIZE = (7.0, 4.5)  # 700 x 450 px
MISCLASSIFIED_CELL = 2.2  # inches per image of the grid
CONFUSION_MAX_CLASSES = 30  # above this, only the most confused classes are drawn
CONFUSION_ANNOTATE_MAX = 15  # print the values in the cells up to this many classes


def confusion_figure_size(num_shown: int) -> tuple[float, float]:
    """Size in inches of `confusion_matrix.png` for `num_shown` classes drawn (grows with the classes)."""
    side = float(min(max(6.0, 2.5 + 0.3 * num_shown), 14.0))
    return side + 1.0, side


def misclassified_figure_size(count: int, cols: int = 4) -> tuple[float, float]:
    """Size in inches of `misclassified.png` for `count` images in `cols` columns."""
    cols = max(1, min(cols, count or 1))
    rows = max(1, math.ceil((count or 1) / cols))
    return cols * MISCLASSIFIED_CELL, rows * (MISCLASSIFIED_CELL + 0.35) + 0.4


def _figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | None) -> None:
    if path:
        with rundir.atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=DPI)


def _short(name: str, n: int = 18) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def confusion_order(cm: np.ndarray, max_classes: int = CONFUSION_MAX_CLASSES) -> tuple[list[int], str]:
    """Which classes `confusion_matrix.png` shows, in which order, and a subtitle saying so.

    Up to `max_classes` classes: all of them, in label order. More: the `max_classes` classes most involved in
    errors (wrong predictions of the class plus wrong predictions as the class), sorted by error rate (worst
    first).

    Example:
        >>> confusion_order(np.eye(3, dtype=int))
        ([0, 1, 2], 'all 3 classes')
    """
    cm = np.asarray(cm, np.int64)
    c = cm.shape[0]
    if c <= max_classes:
        return list(range(c)), f"all {c} classes"
    off = cm - np.diag(np.diag(cm))
    involvement = off.sum(1) + off.sum(0)
    support = cm.sum(1)
    err_rate = np.divide(off.sum(1), support, out=np.zeros(c), where=support > 0)
    chosen = sorted(range(c), key=lambda i: (-involvement[i], -err_rate[i], i))[:max_classes]
    chosen.sort(key=lambda i: (-err_rate[i], -involvement[i], i))
    return chosen, f"the {max_classes} most confused of {c} classes, worst recall first"


def plot_confusion_matrix(cm: Sequence[Sequence[int]] | np.ndarray, class_names: Sequence[str],
                          path: str | None = None, title: str = "Confusion matrix",
                          max_classes: int = CONFUSION_MAX_CLASSES) -> Figure:
    """Draws the row-normalised confusion matrix (each row: where the images of one true class went).

    Args:
        cm: Counts `[true, predicted]`, as `compute_metrics(...)["confusion_matrix"]`.
        class_names: Class names, index = label.
        path: Where to write the PNG. Defaults to `None` (not written).
        title: Figure title. Defaults to `"Confusion matrix"`.
        max_classes: Above this many classes, only the most confused ones are drawn, sorted by error rate
            (see `confusion_order`). Defaults to `30`.

    Returns:
        The figure.

    Example:
        plot_confusion_matrix(metrics["confusion_matrix"], metrics["class_names"], "cm.png")
    """
    cm = np.asarray(cm, np.int64)
    order, subtitle = confusion_order(cm, max_classes)
    support = cm.sum(1, keepdims=True)
    norm = np.divide(cm, support, out=np.zeros(cm.shape), where=support > 0)
    sub = norm[np.ix_(order, order)]
    n = len(order)
    fig = _figure(confusion_figure_size(n))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(sub, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    font = 10 if n <= 12 else (8 if n <= 20 else 6.5)
    labels = [f"{_short(class_names[i])} ({int(support[i, 0])})" for i in order]
    ax.set_xticks(range(n), [_short(class_names[i]) for i in order], rotation=90 if n > 6 else 45,
                  ha="center" if n > 6 else "right", fontsize=font)
    ax.set_yticks(range(n), labels, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (number of images)")
    acc = np.trace(cm) / max(cm.sum(), 1)
    ax.set_title(f"{title}: accuracy {acc:.1%}\n{subtitle}; rows sum to 1", fontsize=11)
    if n <= CONFUSION_ANNOTATE_MAX:
        for i in range(n):
            for j in range(n):
                v = sub[i, j]
                if v > 0 or i == j:
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=font - 1,
                            color="white" if v > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, label="fraction of the true class")
    _save(fig, path)
    return fig


def plot_misclassified(examples: Sequence[dict[str, Any]], class_names: Sequence[str], path: str | None = None,
                       cols: int = 4, title: str = "Worst errors") -> Figure:
    """Draws a grid of misclassified images, the most confidently wrong first.

    Args:
        examples: Dicts with `image` (uint8 [H, W, 3]), `true`, `pred` (label indices), `prob` (probability of the
            prediction) and `prob_true` (probability of the true class), as `evaluate` collects them; or, for
            multi-label errors, `image` and `caption` (the text above the image).
        class_names: Class names, index = label.
        path: Where to write the PNG. Defaults to `None` (not written).
        cols: Images per row. Defaults to `4`.
        title: Figure title. Defaults to `"Worst errors"`.

    Returns:
        The figure (with a single "no errors" message when `examples` is empty).

    Example:
        plot_misclassified(worst, class_names, "misclassified.png")
    """
    count = len(examples)
    cols = max(1, min(cols, count or 1))
    fig = _figure(misclassified_figure_size(count, cols))
    if not count:
        ax = fig.add_subplot(1, 1, 1)
        ax.axis("off")
        ax.text(0.5, 0.5, "no misclassified images", ha="center", va="center", fontsize=12)
        _save(fig, path)
        return fig
    rows = math.ceil(count / cols)
    captions = all("caption" in ex for ex in examples)  # multi-label: missed and spurious labels
    fig.suptitle(title if captions else f"{title}: true / predicted (probability)", fontsize=11)
    for k, ex in enumerate(examples):
        ax = fig.add_subplot(rows, cols, k + 1)
        img = np.asarray(ex["image"])
        if img.dtype != np.uint8:
            img = np.clip(img, 0, 255).astype(np.uint8)
        ax.imshow(img, interpolation="nearest" if img.shape[0] < 96 else "antialiased")
        ax.set_xticks([])
        ax.set_yticks([])
        if captions:
            ax.set_title(ex["caption"], fontsize=8, color="#b00000")
            continue
        t, p = class_names[int(ex["true"])], class_names[int(ex["pred"])]
        ax.set_title(f"true: {_short(t, 16)} ({ex.get('prob_true', 0.0):.2f})\npred: {_short(p, 16)} "
                     f"({ex['prob']:.2f})", fontsize=8, color="#b00000")
    _save(fig, path)
    return fig


def plot_pr_curves(y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str], path: str | None = None,
                   thresholds: Sequence[float] | None = None, title: str = "Precision-recall",
                   max_classes: int = 20) -> Figure:
    """Draws each class's precision-recall curve (multi-label), its AP in the legend and its threshold marked.

    Args:
        y_true: Multi-hot labels [N, C].
        probs: Sigmoid outputs [N, C].
        class_names: Class names, index = column.
        path: Where to write the PNG. Defaults to `None` (not written).
        thresholds: Per-class thresholds, marked on each curve. Defaults to `None`.
        title: Figure title. Defaults to `"Precision-recall"`.
        max_classes: Draw at most this many classes, the lowest AP first. Defaults to `20`.

    Example:
        plot_pr_curves(y, p, class_names, "pr_curves.png", thresholds)
    """
    from tlkit.engine.metrics_multilabel import average_precision, pr_curve

    y_true, probs = np.asarray(y_true), np.asarray(probs)
    aps = [average_precision(y_true[:, c], probs[:, c]) for c in range(probs.shape[1])]
    order = sorted((c for c in range(len(aps)) if aps[c] is not None), key=lambda c: aps[c])[:max_classes]
    fig = _figure((7.5, 6.0))
    ax = fig.add_subplot(1, 1, 1)
    for c in order:
        recall, precision = pr_curve(y_true[:, c], probs[:, c])
        line, = ax.step(np.r_[0.0, recall], np.r_[precision[:1], precision], where="post",
                        label=f"{_short(class_names[c])} (AP {aps[c]:.2f})")
        if thresholds is not None:
            pred = probs[:, c] >= thresholds[c]
            tp = float((pred & (y_true[:, c] > 0.5)).sum())
            r, p = tp / max(float((y_true[:, c] > 0.5).sum()), 1.0), tp / max(float(pred.sum()), 1.0)
            ax.plot([r], [p], "o", color=line.get_color(), markersize=6)
    if not order:
        ax.text(0.5, 0.5, "no class with a positive image", ha="center", va="center", fontsize=12)
    ax.set_xlim(0.0, 1.02)
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.grid(True, alpha=0.3)
    ax.set_title(f"{title} (dots: the thresholds)" if thresholds is not None else title, fontsize=11)
    if order:
        ax.legend(loc="lower left", fontsize=7)
    _save(fig, path)
    return fig


def _stage_spans(history: Sequence[dict[str, Any]]) -> list[tuple[str, int, int]]:
    """(stage, first epoch, last epoch) runs of the history, in order."""
    spans: list[tuple[str, int, int]] = []
    for row in history:
        stage, epoch = str(row.get("stage", "")), int(row["epoch"])
        if spans and spans[-1][0] == stage:
            spans[-1] = (stage, spans[-1][1], epoch)
        else:
            spans.append((stage, epoch, epoch))
    return spans


def _series(history: Sequence[dict[str, Any]], key: str) -> np.ndarray:
    out = []
    for row in history:
        v = row.get(key)
        try:
            out.append(float(v) if v is not None and v != "" else np.nan)
        except (TypeError, ValueError):
            out.append(np.nan)
    return np.asarray(out, np.float64)


def plot_curves(history: Sequence[dict[str, Any]], path: str | None = None,
                overfitting: dict[str, Any] | None = None, title: str | None = None, xlabel: str = "epoch",
                kept: int | None = None) -> Figure:
    """Draws loss and accuracy per epoch, train against validation, with the stage changes marked.

    Args:
        history: Rows with `epoch`, `stage`, `loss`, `accuracy`, `val_loss`, `val_accuracy` (as `RunResult.history`
            or the rows of `history.csv`); missing validation columns are simply not drawn.
        path: Where to write the PNG. Defaults to `None` (not written).
        overfitting: The note of `detect_overfitting`, to shade the epochs after it began. Defaults to `None`.
        title: Figure title. Defaults to `None`.
        xlabel: What a row is (`epoch`, or `head pass` for the passes of `head_passes.csv`). Defaults to `epoch`.
        kept: The row whose weights were kept, marked with a vertical line. Defaults to `None` (none marked).

    Returns:
        The figure.

    Example:
        plot_curves(result.history, "curves.png")
    """
    fig = _figure(CURVES_SIZE)
    axes = fig.subplots(1, 2)
    epochs = _series(history, "epoch")
    spans = _stage_spans(history) if history else []
    score = "map" if any("map" in r or "val_map" in r for r in history) else "accuracy"  # multi-label: mAP
    for ax, key, label in ((axes[0], "loss", "loss"), (axes[1], score, score)):
        for prefix, style, name in (("", "-", "train"), ("val_", "--", "validation")):
            y = _series(history, prefix + key)
            if np.isfinite(y).any():
                ax.plot(epochs, y, style, marker="o", markersize=3, label=name)
        if overfitting and overfitting.get("began_epoch"):
            ax.axvspan(overfitting["began_epoch"] - 0.5, epochs.max() + 0.5 if len(epochs) else 1, color="#d62728",
                       alpha=0.08, label="overfitting")
        for i, (stage, first, _last) in enumerate(spans):
            if i > 0:
                ax.axvline(first - 0.5, color="gray", linestyle=":", linewidth=1)
            if len(spans) > 1 or stage:
                ax.annotate(stage, xy=(first - 0.4, 1.0), xycoords=("data", "axes fraction"), xytext=(0, -12),
                            textcoords="offset points", fontsize=8, color="dimgray")
        if kept:
            ax.axvline(kept, color="green", linestyle="-.", linewidth=1, label=f"kept ({xlabel} {kept})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if len(epochs):
            ax.set_xlim(0.5, max(epochs.max(), 1) + 0.5)
            if epochs.max() <= 20:
                ax.set_xticks(range(1, int(epochs.max()) + 1))
        ax.legend(loc="best", fontsize=8)
    axes[0].set_title("loss (lower is better)", fontsize=10)
    axes[1].set_title("mean average precision (PR AUC)" if score == "map" else "accuracy", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    _save(fig, path)
    return fig


def plot_lr_find(lrs: Sequence[float], losses: Sequence[float], smoothed: Sequence[float],
                 suggestions: dict[str, float], path: str | None = None, chosen: str = "valley") -> Figure:
    """Draws the learning-rate finder's loss against the learning rate (log scale), suggestions marked.

    Args:
        lrs: The learning rate of each step.
        losses: The raw loss of each step.
        smoothed: The smoothed loss of each step.
        suggestions: `{"valley": lr, "steepest": lr}` (either may be missing).
        path: Where to write the PNG. Defaults to `None` (not written).
        chosen: The suggestion used (drawn larger). Defaults to `"valley"`.

    Returns:
        The figure.

    Example:
        plot_lr_find(r.lrs, r.losses, r.smoothed, r.suggestions, "lr_find.png")
    """
    lrs = np.asarray(lrs, np.float64)
    losses = np.asarray(losses, np.float64)
    smoothed = np.asarray(smoothed, np.float64)
    fig = _figure(LR_FIND_SIZE)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(lrs, losses, color="#1f77b4", alpha=0.25, linewidth=1, label="loss")
    ax.plot(lrs, smoothed, color="#1f77b4", linewidth=2, label="smoothed loss")
    colors = {"valley": "#d62728", "steepest": "#ff7f0e"}
    for name, lr in suggestions.items():
        if lr is None or not len(lrs):
            continue
        i = int(np.argmin(np.abs(np.log(lrs) - math.log(lr))))
        ax.plot([lr], [smoothed[i]], "o", color=colors.get(name, "k"), markersize=10 if name == chosen else 7,
                label=f"{name}: {lr:.2e}" + (" (suggested)" if name == chosen else ""), zorder=5)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    finite = smoothed[np.isfinite(smoothed)]
    if finite.size:
        lo, hi = finite.min(), min(finite.max(), finite[0] * 2 if finite[0] > 0 else finite.max())
        pad = 0.05 * max(hi - lo, 1e-6)
        ax.set_ylim(lo - pad, max(hi, lo + 1e-6) + pad)
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title("Learning-rate finder", fontsize=11)
    ax.legend(loc="best", fontsize=8)
    _save(fig, path)
    return fig


def plot_objective_vs_lr(rows: list[dict[str, Any]], objective: str, lr_name: str, path: str) -> None:
    """Writes a PNG of the objective against the learning rate (log scale), one colour per batch size,
    failed trials as red crosses at the bottom."""
    fig = Figure(figsize=(7.0, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    done = [r for r in rows if r["status"] == "COMPLETED" and r.get(lr_name) and r.get(objective) is not None]
    for bs in sorted({r["batch_size"] for r in done}):
        pts = sorted((float(r[lr_name]), float(r[objective])) for r in done if r["batch_size"] == bs)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", label=f"batch size {bs}", alpha=0.8)
    failed = [float(r[lr_name]) for r in rows if r["status"] != "COMPLETED" and r.get(lr_name)]
    if failed:
        ys = [float(r[objective]) for r in done] or [0.0]
        ax.plot(failed, [min(ys)] * len(failed), "x", color="red", markersize=9, label="failed trial")
    if done:
        from tlkit.core.verb_configs import maximised

        best = (max if maximised(objective) else min)(done, key=lambda r: r[objective])
        ax.plot([float(best[lr_name])], [float(best[objective])], "*", color="black", markersize=14,
                label=f"best (trial {best['trial']})")
    ax.set_xscale("log")
    label = {"lr": "learning rate", "finetune_lr": "fine-tuning stage learning rate"}.get(lr_name, lr_name)
    ax.set_xlabel(f"{label} (log scale)")
    ax.set_ylabel(objective)
    ax.set_title(f"{objective} against {label}: {len(done)} completed, {len(failed)} failed trial(s)")
    ax.grid(True, which="both", alpha=0.3)
    if done or failed:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    with rundir.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
