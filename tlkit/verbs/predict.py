"""`tlkit predict`: the top classes of image files, through any tlkit model or export (`engine/predictors.py`); for a
multi-label model, every class at or above its threshold (`thresholds.json`).

Example:
    result = tlkit.predict("runs/resnet50-shapes-1", ["cat.jpg", "photos/"], top_k=3)
    print(result.table())
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Sequence

import numpy as np

from tlkit.core.errors import ConfigError, DataError
from tlkit.core.verb_configs import PredictConfig as P
from tlkit.engine import tta as tta_views
from tlkit.engine.predictors import IMAGE_EXTENSIONS, Predictor, list_images, load, read_image

__all__ = ["Prediction", "PredictResult", "Predictor", "load", "predict"]


@dataclasses.dataclass
class Prediction:
    """The top classes of one image.

    Attributes:
        file: The image file.
        top: `(class name, probability)` pairs, most probable first.
        unknown: The top probability is below the rejection threshold (`PredictResult.reject_below`).
    """

    file: str
    top: list[tuple[str, float]]
    unknown: bool = False
    multi_label: bool = False

    @property
    def label(self) -> str:
        """The answer: the top class, or `"unknown"` when its probability is below the model's threshold; for a
        multi-label model the labels at or above their thresholds, space-separated (`""`: none)."""
        if self.multi_label:
            return " ".join(self.labels)
        return "unknown" if self.unknown else self.top[0][0]

    @property
    def labels(self) -> list[str]:
        """Multi-label: every class at or above its threshold, most probable first (`top` holds them all)."""
        return [c for c, _ in self.top]


@dataclasses.dataclass
class PredictResult:
    """What `predict` returns.

    Attributes:
        predictions: One `Prediction` per readable image, in input order.
        skipped: `(file, reason)` of every input that could not be read.
        model: The model path.
        format: The model's format.
        tta: The test-time augmentation used (`engine.tta.describe`: n, views, crop_side), or `None`.
        reject_below: The top probability below which an image is `unknown` (the run's `ood.json`, from
            `tlkit evaluate --ood`, or `predict(reject_below=...)`), or `None` (never).
        explained: The Grad-CAM overlays written (`predict(explain=DIR)`), or `None`.
    """

    predictions: list[Prediction]
    skipped: list[tuple[str, str]]
    model: str
    format: str
    tta: dict[str, Any] | None = None
    reject_below: float | None = None
    explained: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"model": self.model, "format": self.format,
               "predictions": [{"file": p.file, "label": p.label, **({"labels": p.labels} if p.multi_label else {}),
                                "top": [{"class": c, "probability": pr} for c, pr in p.top]}
                               for p in self.predictions],
               "skipped": [{"file": f, "error": e} for f, e in self.skipped]}
        if self.tta:
            out["tta"] = self.tta
        if self.reject_below is not None:
            out["reject_below"] = self.reject_below
        if self.explained is not None:
            out["explained"] = self.explained
        return out

    def table(self) -> str:
        """A plain-text table: file, class, probability (top-k rows per file; an `unknown` row first when the
        image is rejected)."""
        rows = [("file", "class", "probability")]
        for p in self.predictions:
            if p.multi_label and not p.top:  # no class reached its threshold
                rows.append((p.file, "(no label above its threshold)", ""))
            if p.unknown:
                rows.append((p.file, "unknown", f"<{self.reject_below:.4f}"))
            for i, (c, pr) in enumerate(p.top):
                rows.append((p.file if i == 0 and not p.unknown else "", c, f"{pr:.4f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        return "\n".join(f"{r[0]:{widths[0]}s}  {r[1]:{widths[1]}s}  {r[2]:>{widths[2]}s}".rstrip() for r in rows)


def predict(model: str | Predictor, inputs: str | Sequence[str], top_k: int = P.top_k, batch_size: int = P.batch_size,
            progress: bool = False, tta: int = P.tta, reject_below: float | None = None,
            explain: str | None = None) -> PredictResult:
    """Predicts the top classes of image files and folders; unreadable files are skipped and reported.

    Args:
        model: A path `load` understands, or a loaded `Predictor`.
        inputs: Image files and/or folders (searched recursively for .jpg .jpeg .png .bmp .gif).
        top_k: Classes per image (capped at the number of classes). Defaults to `5`.
        batch_size: Images per model call. Defaults to `32`.
        progress: Show a progress bar on stderr. Defaults to `False`.
        tta: Test-time augmentation: average the probabilities of each image and its first `tta` deterministic
            views (flip, centre crop, its flip, corner crops, ...; crops at the scale the run was trained on,
            `engine.tta`); `PredictResult.tta` records it. Defaults to `0` (off).
        reject_below: Answer `unknown` for an image whose top probability is below this, in (0, 1). Defaults to
            `None` (the threshold `tlkit evaluate --ood` stored with the run, if any; else never).
        explain: A folder to write Grad-CAM overlays into (`<image>_gradcam.png`, the heat map of the predicted
            class over the image, and `gradcam.csv`; `engine.gradcam`); a Keras model only (run folder or `.keras`).
            Defaults to `None`.

    Returns:
        A `PredictResult` (`.table()`, `.to_dict()`).

    Raises:
        DataError: no input image could be read.

    Example:
        print(tlkit.predict("runs/x", ["photos/"], top_k=3).table())
    """
    if top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}.")
    tta = tta_views.check_n(tta)
    from tlkit.core.rejection import check_reject_below

    reject_below = check_reject_below(reject_below)
    if explain is not None and isinstance(model, (str, os.PathLike)):  # before loading: no gradients in these
        low = os.fspath(model).lower().rstrip("/")
        if low.endswith((".tflite", ".onnx")) or (os.path.isdir(model) and not os.path.isfile(
                os.path.join(model, "model.keras"))):
            raise ConfigError(f"--explain needs a Keras model (a run folder or .keras file) to take gradients of; "
                              f"{os.fspath(model)} is a TFLite, ONNX or SavedModel export.")
    clf = model if isinstance(model, Predictor) else load(model)
    tta_views.check_n(tta, clf.tta_flip)  # a model trained without flips has fewer views
    if clf.multi_label and reject_below is not None:
        raise ConfigError("--reject-below applies to single-label models; this model is multi-label: each class has "
                          "its own threshold (thresholds.json).")
    threshold = reject_below if reject_below is not None else clf.reject_below
    if explain is not None and not hasattr(clf, "model"):
        raise ConfigError(f"--explain needs a Keras model (a run folder or .keras file) to take gradients of; "
                          f"{clf.path} is {clf.format}.")
    explained: tuple[list[str], list[np.ndarray]] = ([], [])
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [os.fspath(inputs)]
    files, skipped = list_images(list(inputs))
    k = min(top_k, clf.num_classes)
    preds: list[Prediction] = []
    bar = None
    if progress and len(files) > batch_size:
        import keras

        bar = keras.utils.Progbar(len(files), unit_name="image")
    done = 0
    for start in range(0, len(files), batch_size):
        chunk, imgs = [], []
        for f in files[start:start + batch_size]:
            try:
                imgs.append(read_image(f))
                chunk.append(f)
            except DataError as e:
                skipped.append((f, str(e).split(": ", 1)[-1]))
        if imgs:
            if explain is not None:
                explained[0].extend(chunk)
                explained[1].extend(imgs)
            probs = clf.predict_uint8(imgs, tta)
            if clf.multi_label:  # every label at or above its threshold (top_k does not cut them)
                from tlkit.engine.metrics_multilabel import labels_above

                preds += [Prediction(f, found, multi_label=True)
                          for f, found in zip(chunk, labels_above(probs, clf.thresholds, clf.class_names))]
                probs = []
            for f, p in zip(chunk, probs):
                order = np.argsort(-p)[:k]
                preds.append(Prediction(f, [(clf.class_names[i], float(p[i])) for i in order],
                                        unknown=threshold is not None and float(p.max()) < threshold))
        done += len(files[start:start + batch_size])
        if bar is not None:
            _stdout, sys.stdout = sys.stdout, sys.stderr
            try:
                bar.update(done)
            finally:
                sys.stdout = _stdout
    if not preds:
        names = ", ".join(f for f, _ in skipped[:3]) or ", ".join(inputs)
        raise DataError(f"No readable image among the inputs ({names}); "
                        f"expected image files ({', '.join(IMAGE_EXTENSIONS)}) or folders of them.")
    result = PredictResult(preds, skipped, clf.path, clf.format, reject_below=threshold)
    if explain is not None:
        from tlkit.engine.gradcam import explain_files

        result.explained = explain_files(clf.model, explained[0], explained[1], explain, clf.class_names)
    if tta:
        result.tta = tta_views.describe(tta, clf.tta_crop_side or tta_views.DEFAULT_CROP_SIDE, clf.tta_flip)
    return result

