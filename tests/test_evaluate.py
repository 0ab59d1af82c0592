"""tlkit/evaluate.py: metrics against hand-computed values, the overfitting note, `tlkit evaluate`'s files."""
from __future__ import annotations

import csv
import json
import math
import os
import shutil

import numpy as np
import pytest

from tlkit.engine import plots
from tlkit.cli import main
from tlkit.engine.metrics import compute_metrics, confusion_csv_rows, detect_overfitting, most_confused
from test_plots import png_size, px

# Seven examples, three classes; "fox" (2) is never predicted.
Y_TRUE = np.array([0, 0, 0, 1, 1, 2, 2])
PROBS = np.array([
    [0.70, 0.20, 0.10],  # cat -> cat
    [0.60, 0.30, 0.10],  # cat -> cat
    [0.30, 0.50, 0.20],  # cat -> dog
    [0.20, 0.70, 0.10],  # dog -> dog
    [0.50, 0.40, 0.10],  # dog -> cat
    [0.50, 0.20, 0.30],  # fox -> cat
    [0.15, 0.60, 0.25],  # fox -> dog
])
NAMES = ["cat", "dog", "fox"]


def test_metrics_against_hand_computed_confusion_matrix():
    m = compute_metrics(Y_TRUE, PROBS, NAMES)
    assert m["confusion_matrix"] == [[2, 1, 0], [1, 1, 0], [1, 1, 0]]
    assert m["num_examples"] == 7
    assert m["accuracy"] == pytest.approx(3 / 7)
    assert m["mean_per_class_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert m["top5_accuracy"] == 1.0  # 3 classes: every class is in the top 5
    p_true = [0.7, 0.6, 0.3, 0.7, 0.4, 0.3, 0.25]
    assert m["loss"] == pytest.approx(-sum(math.log(p) for p in p_true) / 7)
    pc = {r["class"]: r for r in m["per_class"]}
    assert pc["cat"]["precision"] == pytest.approx(2 / 4) and pc["cat"]["recall"] == pytest.approx(2 / 3)
    assert pc["cat"]["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert pc["dog"]["precision"] == pytest.approx(1 / 3) and pc["dog"]["recall"] == pytest.approx(1 / 2)
    assert pc["dog"]["f1"] == pytest.approx(0.4)
    # Never predicted: precision, recall and F1 are 0, not NaN.
    assert (pc["fox"]["precision"], pc["fox"]["recall"], pc["fox"]["f1"], pc["fox"]["support"]) == (0.0, 0.0, 0.0, 2)
    assert [r["support"] for r in m["per_class"]] == [3, 2, 2]


def test_top5_and_absent_class():
    probs = np.full((2, 6), 0.1)
    probs[0, [0, 1, 2, 3, 4, 5]] = [0.5, 0.2, 0.1, 0.1, 0.06, 0.04]  # true 5 is ranked last: a top-5 miss
    probs[1, [3, 1]] = [0.45, 0.15]  # true 1 ranked second: a top-5 hit, a top-1 miss
    m = compute_metrics(np.array([5, 1]), probs)
    assert m["top5_accuracy"] == 0.5 and m["accuracy"] == 0.0
    # Classes with no examples are left out of the mean per-class accuracy.
    assert m["mean_per_class_accuracy"] == 0.0 and len(m["per_class"]) == 6


def test_most_confused_and_csv_rows():
    cm = compute_metrics(Y_TRUE, PROBS, NAMES)["confusion_matrix"]
    assert most_confused(cm, NAMES, k=2) == [
        {"true": "cat", "predicted": "dog", "count": 1, "fraction_of_true": round(1 / 3, 4)},
        {"true": "dog", "predicted": "cat", "count": 1, "fraction_of_true": 0.5}]
    rows = confusion_csv_rows(cm, NAMES)
    assert rows[2] == {"true \\ predicted": "fox", "cat": 1, "dog": 1, "fox": 0, "support": 2}


def history(train, val, stages=None):
    return [{"epoch": i + 1, "stage": (stages or ["full"] * len(train))[i], "loss": t, "val_loss": v,
             "accuracy": 1 - t / 2, "val_accuracy": 1 - v / 2} for i, (t, v) in enumerate(zip(train, val))]


def test_overfitting_note_on_synthetic_histories():
    overfit = history([1.0, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05], [1.0, 0.8, 0.7, 0.72, 0.8, 0.9, 1.0])
    note = detect_overfitting(overfit)
    assert note is not None
    assert note["began_epoch"] == 4 and note["best_val_loss_epoch"] == 3 and note["last_epoch"] == 7
    assert note["loss_gap"] == {"at_best": pytest.approx(0.2), "last": pytest.approx(0.95)}
    assert "Overfitting from epoch 4" in note["message"] and "--augment strong" in note["message"]
    assert "early-stopping" in note["advice"] and "dropout" in note["advice"]
    # Healthy: both losses fall (with noise); a late plateau; a one-epoch blip; too short; no validation.
    healthy = [
        history([1.0, 0.7, 0.5, 0.4, 0.35, 0.3], [1.0, 0.75, 0.6, 0.55, 0.5, 0.48]),
        history([1.0, 0.7, 0.5, 0.4, 0.35, 0.3], [1.0, 0.8, 0.7, 0.71, 0.705, 0.71]),
        history([1.0, 0.7, 0.5, 0.4, 0.35, 0.3], [1.0, 0.8, 0.7, 0.65, 0.9, 0.6]),
        history([1.0, 0.5, 0.2], [1.0, 1.2, 1.5]),
        [{"epoch": e, "loss": 1 / e} for e in range(1, 8)],
    ]
    for h in healthy:
        assert detect_overfitting(h) is None, h
    # Validation loss rising while the training loss rises too is not overfitting (a too-high LR).
    assert detect_overfitting(history([1.0, 0.8, 0.9, 1.1, 1.3], [1.0, 0.8, 0.95, 1.2, 1.5])) is None


def write_memorisation_folder(root, classes=("a", "b", "c"), per_class=4, seed=0) -> str:
    """train/ and val/ hold the same noise images, val/ with the labels shifted by one class.

    Nothing generalises from noise, so the better the model memorises train/, the more confidently wrong it is on
    val/: the training loss falls while the validation loss rises from the first epochs on, whatever the seed —
    a run made to overfit, deterministically.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    for ci, c in enumerate(classes):
        for i in range(per_class):
            img = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
            for split, label in (("train", c), ("val", classes[(ci + 1) % len(classes)])):
                os.makedirs(os.path.join(root, split, label), exist_ok=True)
                img.save(os.path.join(root, split, label, f"{c}{i}.png"))
    return str(root)


@pytest.fixture(scope="module")
def overfit_run(tiny_backbone, tmp_path_factory):
    """A real run made to overfit: memorisable noise, no augmentation, no dropout, no label smoothing, 6 epochs."""
    root = tmp_path_factory.mktemp("overfit")
    data = write_memorisation_folder(root / "noise")
    out = str(root / "run")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["finetune", "--base", tiny_backbone, "--weights", "none", "--image-dir", data, "--image-size", "32",
                   "--strategy", "full", "--epochs", "6", "--lr", "3e-3", "--schedule", "constant", "--augment", "none",
                   "--dropout", "0", "--label-smoothing", "0", "--batch-size", "4", "--output-dir", out])
    assert rc == 0, buf.getvalue()[-2000:]
    return out, data, buf.getvalue()


def test_overfitting_note_on_a_real_run(overfit_run):
    out, _, stdout = overfit_run
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    note = metrics["overfitting"]
    assert 2 <= note["began_epoch"] <= 5
    assert note["val_loss"]["last"] > note["val_loss"]["best"]
    assert note["loss_gap"]["last"] > note["loss_gap"]["at_best"]
    assert f"Overfitting from epoch {note['began_epoch']}" in stdout
    with open(os.path.join(out, "history.csv")) as f:
        rows = list(csv.DictReader(f))
    assert detect_overfitting(rows) == note  # the same pure function of history.csv
    assert png_size(os.path.join(out, "curves.png")) == px(plots.CURVES_SIZE)
    assert png_size(os.path.join(out, "confusion_matrix.png")) == px(plots.confusion_figure_size(3))


def test_evaluate_run_folder_writes_all_files(overfit_run, capsys):
    out, _, _ = overfit_run
    dest = os.path.join(os.path.dirname(out), "eval")
    assert main(["evaluate", out, "--split", "val", "--output-dir", dest, "--num-misclassified", "4"]) == 0
    printed = capsys.readouterr().out
    assert "confusion_matrix.png" in printed and "precision" in printed
    assert sorted(os.listdir(dest)) == ["confusion_matrix.csv", "confusion_matrix.png", "metrics.json",
                                        "misclassified.png", "misclassified_gradcam.png"]
    m = json.load(open(os.path.join(dest, "metrics.json")))
    assert m["split"] == "val" and m["num_examples"] == 12 and m["class_names"] == ["a", "b", "c"]
    cm = np.array(m["confusion_matrix"])
    assert cm.sum() == 12 and m["accuracy"] == pytest.approx(np.trace(cm) / 12)
    with open(os.path.join(dest, "confusion_matrix.csv")) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["true \\ predicted", "a", "b", "c", "support"]
    assert np.array([[int(v) for v in r[1:4]] for r in rows[1:]]).tolist() == cm.tolist()
    errors = int(12 - np.trace(cm))
    assert errors >= 4  # the model memorised train/, so val/ (shifted labels) is mostly wrong
    mis = m["misclassified"]
    assert len(mis) == min(errors, 4)
    assert [e["prob_true"] for e in mis] == sorted(e["prob_true"] for e in mis)  # worst (least true prob) first
    for e in mis:
        assert e["true"] != e["predicted"] and os.path.basename(os.path.dirname(e["file"])) == e["true"]
    assert png_size(os.path.join(dest, "misclassified.png")) == px(plots.misclassified_figure_size(len(mis)))
    assert png_size(os.path.join(dest, "confusion_matrix.png")) == px(plots.confusion_figure_size(3))


def test_evaluate_a_keras_file_with_labels(overfit_run, tmp_path, capsys):
    out, data, _ = overfit_run
    model = tmp_path / "elsewhere" / "clf.keras"
    model.parent.mkdir()
    shutil.copy(os.path.join(out, "model.keras"), model)
    dest = tmp_path / "ev"
    rc = main(["evaluate", str(model), "--image-dir", data, "--split", "train", "--labels",
               os.path.join(out, "labels.txt"), "--output-dir", str(dest), "--json"])
    assert rc == 0
    printed = capsys.readouterr().out
    shown = json.loads(printed[printed.index("{"):])  # --json prints the metrics
    m = json.load(open(dest / "metrics.json"))
    assert shown["accuracy"] == m["accuracy"] == pytest.approx(1 - len(m["misclassified"]) / 12)
    assert m["split"] == "train" and m["num_examples"] == 12 and m["class_names"] == ["a", "b", "c"]
    assert (dest / "misclassified.png").is_file() and (dest / "confusion_matrix.csv").is_file()
    # Labels that do not fit the model: one line, exit code 2.
    bad = tmp_path / "bad.txt"
    bad.write_text("x\ny\n")
    assert main(["evaluate", str(model), "--image-dir", data, "--labels", str(bad), "--output-dir", str(dest)]) == 2
    assert "classes" in capsys.readouterr().err
    assert main(["evaluate", str(model), "--image-dir", data, "--num-misclassified", "-1"]) == 2
    assert "num_misclassified must be an integer >= 0, got -1" in capsys.readouterr().err
