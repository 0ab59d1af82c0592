"""`tlkit evaluate`: metrics of a trained classifier on a split (loss, top-1, top-5, mean per-class accuracy,
per-class report, confusion matrix, worst errors), written next to the run (`engine/metrics.py`); for a multi-label
model mAP, micro/macro F1 at its thresholds, per-class precision-recall curves and the worst examples
(`engine/metrics_multilabel.py`)."""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import keras
import numpy as np

from tlkit.core import rundir
from tlkit.core.config import DataConfig
from tlkit.core.verb_configs import EvaluateConfig as E
from tlkit.core.errors import ConfigError, DataError
from tlkit.data import load_sources, make_dataset
from tlkit.engine import gradcam
from tlkit.engine import ood as ood_scores
from tlkit.engine import plots
from tlkit.engine import tta as tta_views
from tlkit.engine.metrics import compute_metrics, confusion_csv_rows, most_confused, predict_with_errors
from tlkit.models.classifier import is_multi_label, load_model_and_labels


def evaluate(model: str | keras.Model, data: DataConfig, split: str = E.split, batch_size: int | None = None,
             output_dir: str | None = None, class_names: list[str] | None = None, seed: int = 42,
             num_misclassified: int = E.num_misclassified, tta: int = E.tta, ood: str | None = None,
             reject_below: float | None = None) -> dict[str, Any]:
    """Evaluates a model (run folder, `.keras` file or a model object) on a split of a dataset.

    Args:
        model: A run folder, a `.keras` path, or a `keras.Model`.
        data: A `DataConfig` naming the data (`dataset` or `image_dir`).
        split: `train`, `val` or `test`. Defaults to `"test"` (falls back to `val` when there is no test split).
        batch_size: Defaults to `None` (`data.batch_size`).
        output_dir: Where to write `metrics.json`, `confusion_matrix.png`, `confusion_matrix.csv`,
            `misclassified.png` and `misclassified_gradcam.png` (the same errors under their Grad-CAM heat maps).
            Defaults to `None`: the run folder's `eval-<split>/` for a run folder, nothing written for a `.keras`
            file or a model object.
        class_names: Overrides the labels stored with the model. Defaults to `None`.
        seed: Seed of the train/val split (use the run's seed). Defaults to `42`.
        num_misclassified: How many of the worst errors to draw in `misclassified.png` and list in the metrics.
            Defaults to `16`.
        tta: Test-time augmentation: average the probabilities of each image and its first `tta` deterministic
            views (flip, centre crop, its flip, corner crops, ...; crops at the scale the run was trained on,
            `engine.tta`); `metrics["tta"]` records it. Defaults to `0` (off).
        ood: A folder of images of none of the classes: `metrics["ood"]` gets the AUROC and FPR@95%TPR of the
            scores `msp`, `energy`, `mahalanobis` and `knn` (`engine.ood`), and a run folder stores the rejection
            threshold (`ood.json`) that `predict` then applies. Defaults to `None`.
        reject_below: The threshold on the top probability below which `predict` answers `unknown`, in (0, 1).
            Defaults to `None` (with `ood`: the probability that accepts 95% of the validation images).

    Returns:
        The metrics dict (as in `metrics.json`), with `split`, `class_names`, `most_confused` (the most frequent
        true/predicted pairs) and `misclassified` (the worst errors: index, file when known, true, predicted,
        probabilities), and `output_dir` when files were written.

    Example:
        m = evaluate("runs/resnet50-shapes-1", DataConfig(dataset="shapes"), split="val")
    """
    if not isinstance(num_misclassified, int) or num_misclassified < 0:
        raise ConfigError(f"num_misclassified must be an integer >= 0, got {num_misclassified!r}.")
    side, flip = tta_views.run_views(None if isinstance(model, keras.Model) else model)
    tta = tta_views.check_n(tta, flip)
    reject_below = ood_scores.check_reject_below(reject_below)
    ood = ood_scores.check_ood_dir(ood)
    run_dir, model_path = None, None
    if isinstance(model, keras.Model):
        labels = None
    else:
        model_path = os.fspath(model)
        model, labels, run_dir = load_model_and_labels(model)
    labels = class_names or labels
    size = int(model.input_shape[1])
    multi = is_multi_label(model)
    if multi and (ood is not None or reject_below is not None):
        raise ConfigError("--ood and --reject-below apply to single-label models; this model is multi-label (a "
                          "sigmoid per class, each with its own threshold in thresholds.json).")
    data = dataclasses.replace(data, image_size=size, multi_label=True if multi else data.multi_label)
    sources = load_sources(data, size, seed)
    if sources.multi_label and not multi:
        raise DataError("The data is multi-label (several labels an image) but the model is single-label (softmax).")
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
    names = list(sources.class_names)
    forward = tta_views.averaged(lambda x: model(x, training=False), tta, side, flip) if tta else None
    if output_dir is None and run_dir is not None:
        output_dir = os.path.join(run_dir, f"eval-{split}")
    if multi:
        extra = {"tta": tta_views.describe(tta, side, flip)} if tta else {}
        return _evaluate_multi_label(model, model_path, ds, s, split, names, num_misclassified, forward, output_dir,
                                     extra)
    y, p, worst = predict_with_errors(model, ds, keep=num_misclassified, forward=forward)
    metrics = compute_metrics(y, p, names)
    if tta:
        metrics["tta"] = tta_views.describe(tta, side, flip)
    metrics["split"] = split
    metrics["class_names"] = names
    if "confusion_matrix" in metrics:
        metrics["most_confused"] = most_confused(metrics["confusion_matrix"], names)
    # File names are reported only when no unreadable file was skipped (then positions match the split's list).
    files = s.files if s.files is not None and len(s.files) == len(y) else None
    metrics["misclassified"] = [
        {"index": e["index"], **({"file": files[e["index"]]} if files else {}), "true": names[e["true"]],
         "predicted": names[e["pred"]], "prob": round(e["prob"], 4), "prob_true": round(e["prob_true"], 4)}
        for e in worst]
    if ood is not None or reject_below is not None:
        metrics["ood"] = ood_scores.evaluate_ood(model, sources, s, ood, size, batch_size or data.batch_size,
                                                 reject_below)
        if run_dir is not None:
            metrics["ood"]["stored"] = ood_scores.write_rejection(
                run_dir, metrics["ood"]["reject_below"], metrics["ood"]["rule"],
                **{k: metrics["ood"][k] for k in ("known_accepted", "unknown_rejected", "ood_dir") if k in metrics["ood"]})
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        if "confusion_matrix" in metrics:
            cm = metrics["confusion_matrix"]
            rundir.write_csv(os.path.join(output_dir, "confusion_matrix.csv"), confusion_csv_rows(cm, names))
            plots.plot_confusion_matrix(cm, names, os.path.join(output_dir, "confusion_matrix.png"),
                                        title=f"Confusion matrix ({split})")
            plots.plot_misclassified(worst, names, os.path.join(output_dir, "misclassified.png"),
                                     title=f"Worst errors ({split})")
            metrics["gradcam"] = gradcam.draw_worst(model, worst, names, os.path.join(output_dir,
                                                                                    "misclassified_gradcam.png"),
                                                    title=f"Worst errors ({split}), Grad-CAM of the prediction")
        rundir.write_json(os.path.join(output_dir, "metrics.json"), metrics)
        metrics["output_dir"] = output_dir
    return metrics


def _evaluate_multi_label(model: keras.Model, model_path: str | None, ds, split_data, split: str, names: list[str],
                          num_misclassified: int, forward, output_dir: str | None,
                          extra: dict[str, Any]) -> dict[str, Any]:
    """`evaluate` of a multi-label model: mAP, micro/macro F1 and the per-class table at the model's stored thresholds
    (`thresholds.json`, else 0.5), the worst examples (missed and spurious labels) and, with `output_dir`,
    `metrics.json`, `pr_curves.png` and `worst_examples.png`; `extra` (the TTA record) goes into the metrics."""
    from tlkit.engine import metrics_multilabel as ML

    stored = ML.thresholds_path(model_path) if model_path else None
    thresholds = ML.thresholds_or_default(model_path, names)
    y, p, worst = ML.predict_with_label_errors(model, ds, thresholds, keep=num_misclassified, forward=forward)
    metrics = ML.compute_multilabel_metrics(y, p, thresholds, names)
    metrics.update(extra)  # tta
    metrics["split"] = split
    metrics["class_names"] = names
    metrics["thresholds_from"] = stored or f"{ML.DEFAULT_THRESHOLD} for every class (no thresholds.json)"
    files = split_data.files if split_data.files is not None and len(split_data.files) == len(y) else None
    metrics["worst_examples"] = [
        {"index": e["index"], **({"file": files[e["index"]]} if files else {}),
         "true": [names[i] for i in np.flatnonzero(y[e["index"]] > 0.5)],
         "missed": [names[i] for i in e["missed"]], "spurious": [names[i] for i in e["spurious"]],
         "loss": round(e["loss"], 4)} for e in worst]
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        plots.plot_pr_curves(y, p, names, os.path.join(output_dir, "pr_curves.png"), thresholds,
                             title=f"Precision-recall ({split})")
        captions = [dict(e, caption="missed: " + (", ".join(names[i] for i in e["missed"]) or "-") + "\nspurious: "
                         + (", ".join(names[i] for i in e["spurious"]) or "-")) for e in worst]
        plots.plot_misclassified(captions, names, os.path.join(output_dir, "worst_examples.png"),
                                 title=f"Worst examples ({split}): missed and spurious labels")
        rundir.write_json(os.path.join(output_dir, "metrics.json"), metrics)
        metrics["output_dir"] = output_dir
    return metrics
