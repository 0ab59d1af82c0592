"""tlkit/plots.py: every picture is a valid PNG of the documented pixel size, and shows what it should."""
from __future__ import annotations

import struct

import numpy as np
import pytest
from PIL import Image

from tlkit.engine import plots


def png_size(path) -> tuple[int, int]:
    """Width and height from the PNG header; fails unless the file is a PNG that PIL can decode."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    w, h = struct.unpack(">II", head[16:24])
    with Image.open(path) as img:
        img.load()  # decodes every pixel: a truncated file fails here
        assert img.size == (w, h)
    return w, h


def px(inches: tuple[float, float]) -> tuple[int, int]:
    return round(inches[0] * plots.DPI), round(inches[1] * plots.DPI)


def two_stage_history() -> list[dict]:
    rows = []
    for e in range(1, 7):
        rows.append({"epoch": e, "stage": "head" if e <= 2 else "finetune", "loss": 1.0 / e, "accuracy": 0.5 + e / 20,
                     "val_loss": 1.1 / e + 0.05 * max(0, e - 4), "val_accuracy": 0.45 + e / 25, "lr": 1e-3})
    return rows


def test_confusion_matrix_png_small(tmp_path):
    cm = [[5, 1, 0], [0, 4, 2], [1, 0, 3]]
    path = tmp_path / "cm.png"
    fig = plots.plot_confusion_matrix(cm, ["cat", "dog", "fox"], str(path))
    assert png_size(path) == px(plots.confusion_figure_size(3)) == (700, 600)
    ax = fig.axes[0]
    shown = ax.images[0].get_array()
    np.testing.assert_allclose(np.asarray(shown).sum(1), 1.0)  # row-normalised
    assert abs(shown[1, 2] - 2 / 6) < 1e-9
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cat", "dog", "fox"]
    assert ax.get_yticklabels()[1].get_text() == "dog (6)"  # class name with its number of images
    assert "0.33" in {t.get_text() for t in ax.texts}  # values printed in the cells


def test_confusion_matrix_many_classes_shows_most_confused_sorted_by_error(tmp_path):
    rng = np.random.default_rng(0)
    c = 102
    cm = np.diag(rng.integers(8, 12, c))
    # Ten classes with growing confusion; everything else is perfect.
    for k, i in enumerate(range(40, 50)):
        cm[i, (i + 1) % c] = k + 1
    names = [f"flower_{i:03d}" for i in range(c)]
    order, subtitle = plots.confusion_order(cm, max_classes=30)
    assert len(order) == 30 and "30 most confused of 102" in subtitle
    assert set(range(40, 51)) <= set(order)  # every class involved in an error is shown
    rates = [(cm[i].sum() - cm[i, i]) / cm[i].sum() for i in order]
    assert rates == sorted(rates, reverse=True) and order[0] == 49  # worst recall first
    path = tmp_path / "cm102.png"
    fig = plots.plot_confusion_matrix(cm, names, str(path))
    assert png_size(path) == px(plots.confusion_figure_size(30))
    assert len(fig.axes[0].get_xticklabels()) == 30
    assert not fig.axes[0].texts  # no cell values at this size: unreadable


def test_misclassified_grid(tmp_path):
    rng = np.random.default_rng(1)
    examples = [{"image": rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), "true": i % 3, "pred": (i + 1) % 3,
                 "prob": 0.9 - i / 10, "prob_true": 0.05} for i in range(5)]
    path = tmp_path / "mis.png"
    fig = plots.plot_misclassified(examples, ["cat", "dog", "fox"], str(path))
    assert png_size(path) == px(plots.misclassified_figure_size(5)) == (880, 550)
    titles = [ax.get_title() for ax in fig.axes]
    assert len(titles) == 5 and titles[0] == "true: cat (0.05)\npred: dog (0.90)"
    empty = tmp_path / "none.png"
    fig = plots.plot_misclassified([], ["cat"], str(empty))
    assert png_size(empty) == px(plots.misclassified_figure_size(0))
    assert fig.axes[0].texts[0].get_text() == "no misclassified images"


def test_curves_mark_stage_changes(tmp_path):
    path = tmp_path / "curves.png"
    history = two_stage_history()
    fig = plots.plot_curves(history, str(path), overfitting={"began_epoch": 5})
    assert png_size(path) == px(plots.CURVES_SIZE) == (1200, 450)
    loss_ax, acc_ax = fig.axes
    for ax in (loss_ax, acc_ax):
        labels = {line.get_label() for line in ax.lines}
        assert {"train", "validation"} <= labels
        boundaries = [line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == ":"]
        assert boundaries == [2.5]  # head (1-2) -> finetune (3-6)
        assert {t.get_text() for t in ax.texts} == {"head", "finetune"}
    train = [line for line in loss_ax.lines if line.get_label() == "train"][0]
    np.testing.assert_allclose(train.get_ydata(), [r["loss"] for r in history])


def test_curves_without_validation_and_from_csv_strings(tmp_path):
    rows = [{"epoch": str(e), "stage": "full", "loss": str(1 / e), "accuracy": "0.5"} for e in range(1, 4)]
    fig = plots.plot_curves(rows, str(tmp_path / "c.png"))
    assert {line.get_label() for line in fig.axes[0].lines} == {"train"}
    assert png_size(tmp_path / "c.png") == (1200, 450)


def test_lr_find_plot(tmp_path):
    lrs = np.logspace(-6, 0, 40)
    losses = 2.0 - np.tanh(np.log10(lrs) + 3) + np.where(lrs > 0.3, 5.0, 0.0)
    path = tmp_path / "lr.png"
    fig = plots.plot_lr_find(lrs, losses, losses, {"valley": 1e-3, "steepest": 1e-4}, str(path))
    assert png_size(path) == px(plots.LR_FIND_SIZE) == (700, 450)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    labels = [line.get_label() for line in ax.lines]
    assert "valley: 1.00e-03 (suggested)" in labels and "steepest: 1.00e-04" in labels


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    plots.plot_curves(two_stage_history(), str(tmp_path / "curves.png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png"]


@pytest.mark.parametrize("n", [1, 12, 31])
def test_confusion_order_shapes(n):
    cm = np.eye(n, dtype=int) * 3
    order, _ = plots.confusion_order(cm)
    assert len(order) == min(n, plots.CONFUSION_MAX_CLASSES)
    assert len(set(order)) == len(order)
