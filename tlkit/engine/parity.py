"""The parity check of an export: sample images through the exported artifact (loaded as `tlkit.load` loads it)
and through the Keras model; top-1 agreement and the largest difference of probabilities against thresholds.
Also the images of the check and of int8 calibration.

Example:
    samples = samples_from_files(["photos/"], 32)
    check = check_export(keras_model, tlkit.load("export/model.tflite"), samples, min_agreement=1.0)
"""
from __future__ import annotations

from tlkit.core.verb_configs import ExportConfig

import dataclasses
import os
import sys
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from tlkit.core.errors import ConfigError, DataError, TlkitError
from tlkit.engine.predictors import call_model

# Minimum top-1 agreement with the Keras model. Float exports must agree everywhere; quantized ones
# change probabilities by up to a few percent, which flips near-ties of an uncertain model.
MIN_AGREEMENT = {"none": 1.0, "float16": 1.0, "dynamic": 0.95, "int8": 0.90}
# Largest allowed |p_export - p_keras| (None: not bounded). A float export computes the same function, so a
# larger difference means a broken export even when the top-1 happens to agree (an uncertain model).
MAX_ABS_DIFF: dict[str, float | None] = {"none": 1e-3, "float16": 2e-2, "dynamic": None, "int8": None}
# Two classes whose Keras probabilities differ by less than this are a tie: either is an agreeing top-1. For
# int8 the tolerance is one step of the quantized output (1/256): a smaller difference cannot be represented.
TIE_TOLERANCE = 1e-5
# A mixed-precision model is exported in float32: its float16 reference answers differ by ~1e-3.
MIXED_TIE_TOLERANCE = 2e-3
DEFAULT_CHECK_IMAGES = ExportConfig.num_check
DEFAULT_CALIBRATION_STEPS = ExportConfig.calibration_steps


class ParityError(TlkitError, RuntimeError):
    """The export was written but does not give the Keras model's answers (see its export.json)."""



@dataclasses.dataclass
class Samples:
    """Images for the parity check: uint8 RGB of their original sizes, labels when known."""

    images: list[np.ndarray]
    labels: list[int] | None
    source: str


def split_images(split, n: int) -> tuple[list[np.ndarray], list[int]]:
    """Up to `n` decoded uint8 images (original sizes) and labels of a `Split`; undecodable files are skipped."""
    import tensorflow as tf

    from tlkit.data.pipeline import decode

    imgs, labels = [], []
    if split is None or n <= 0:
        return imgs, labels
    for x, y in split.ds.take(n + 16):
        try:
            imgs.append(decode(x, split.kind).numpy())
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError):
            continue
        labels.append(np.asarray(y).tolist() if np.ndim(y) else int(y))  # multi-hot for multi-label data
        if len(imgs) >= n:
            break
    return imgs, labels


def samples_from_files(paths: Sequence[str], n: int) -> Samples:
    """Up to `n` images from files and folders (unreadable ones skipped with a note)."""
    from tlkit.engine.predictors import list_images, read_image

    files, missing = list_images(list(paths))
    if missing:
        raise DataError(f"--check-images: {missing[0][0]!r} does not exist.")
    imgs = []
    for f in files:
        try:
            imgs.append(read_image(f))
        except DataError as e:
            print(f"[tlkit] check: skipped {e}", file=sys.stderr, flush=True)
        if len(imgs) >= n:
            break
    if not imgs:
        raise DataError(f"--check-images {', '.join(paths)}: no readable image.")
    return Samples(imgs, None, "--check-images")


def representative_fn(datasets, steps: int, size: int) -> Callable[[], Iterator[list[np.ndarray]]]:
    """A representative-dataset generator of `steps` training images (then validation), resized like the pipeline."""
    from tlkit.engine.predictors import resize_batch

    imgs, _ = split_images(datasets.train, steps)
    if len(imgs) < steps and datasets.val is not None:
        more, _ = split_images(datasets.val, steps - len(imgs))
        imgs += more
    if not imgs:
        raise DataError("No readable calibration image in the data.")
    batch = resize_batch(imgs, size)

    def gen():
        for i in range(len(batch)):
            yield [batch[i:i + 1]]

    return gen


# ---------------------------------------------------------------- the check

def compare(reference: np.ndarray, exported: np.ndarray, tie_tolerance: float = TIE_TOLERANCE,
            thresholds: Sequence[float] | None = None) -> dict[str, Any]:
    """Top-1 agreement and probability differences between the Keras model and an export.

    The export's top-1 (its argmax, as a user reads it) agrees when the Keras model gives that class its
    highest probability, within `tie_tolerance` (a tie in the Keras model may go either way). A tie in a
    quantized output is not excused: argmax then picks the first tied class, which is what the user gets.

    With `thresholds` (a multi-label model's sigmoid outputs), `label_agreement` is the fraction of images whose
    set of labels at the thresholds is the same, a Keras probability within `tie_tolerance` of its threshold going
    either way; it is then the agreement that the check requires.

    Example:
        >>> compare(np.array([[0.9, 0.1]]), np.array([[0.8, 0.2]]))["top1_agreement"]
        1.0
    """
    reference = np.asarray(reference, np.float64)
    exported = np.asarray(exported, np.float64)
    if reference.shape != exported.shape:
        raise ConfigError(f"The export's output has shape {exported.shape}, the Keras model's {reference.shape}.")
    n = len(reference)
    top, ref_top = exported.argmax(-1), reference.argmax(-1)
    agree = reference[np.arange(n), top] >= reference.max(-1) - tie_tolerance
    diff = np.abs(reference - exported)
    out = {"num_images": int(n), "top1_agreement": float(agree.mean()) if n else 0.0,
           "strict_top1_agreement": float((ref_top == top).mean()) if n else 0.0,
           "max_abs_diff": float(diff.max()) if n else 0.0, "mean_abs_diff": float(diff.mean()) if n else 0.0}
    if thresholds is not None:
        t = np.asarray(thresholds, np.float64)
        same = ((exported >= t) == (reference >= t)) | (np.abs(reference - t) <= tie_tolerance)
        out["label_agreement"] = float(same.all(1).mean()) if n else 0.0
    return out


def agreement_of(check: dict[str, Any]) -> float:
    """The agreement a check requires: the label-set agreement of a multi-label export, else the top-1 agreement;
    the lower of the SavedModel's two signatures."""
    key = "label_agreement" if "label_agreement" in check else "top1_agreement"
    return min(check[key], check.get("bytes_signature", check)[key])


def check_export(model, predictor, samples: Samples, min_agreement: float, max_abs_diff: float | None = None,
                 tie_tolerance: float = TIE_TOLERANCE, thresholds: Sequence[float] | None = None) -> dict[str, Any]:
    """Runs the samples through the Keras model and the loaded export; returns the figures and `passed`.

    It passes when the top-1 agreement (with `thresholds`, a multi-label model's: the agreement of the label
    sets, `compare`) is at least `min_agreement` and (when given) no probability differs by more than
    `max_abs_diff`.

    For a SavedModel both signatures are checked: raw uint8 images (original sizes) and PNG bytes.
    """
    import tensorflow as tf

    from tlkit.engine.predictors import SavedModelPredictor, resize_batch

    size = int(model.input_shape[1])
    ref = np.concatenate([np.asarray(call_model(model, resize_batch(samples.images[i:i + 32], size)))
                          for i in range(0, len(samples.images), 32)])
    got = predictor.predict(samples.images)
    result = compare(ref, got, tie_tolerance, thresholds)
    result["source"] = samples.source
    if isinstance(predictor, SavedModelPredictor):
        encoded = [tf.io.encode_png(img).numpy() for img in samples.images]
        b = np.concatenate([predictor.predict_bytes(encoded[i:i + 32]) for i in range(0, len(encoded), 32)])
        result["bytes_signature"] = compare(ref, b, tie_tolerance, thresholds)
        result["max_abs_diff"] = max(result["max_abs_diff"], result["bytes_signature"]["max_abs_diff"])
    agreement = agreement_of(result)
    if samples.labels is not None and samples.labels:
        y = np.asarray(samples.labels)
        if thresholds is not None and y.ndim == 2:  # multi-label: the whole label set right (exact match)
            t = np.asarray(thresholds)
            result["keras_exact_match"] = float(((ref >= t) == (y > 0.5)).all(1).mean())
            result["export_exact_match"] = float(((got >= t) == (y > 0.5)).all(1).mean())
        elif y.ndim == 1:
            result["keras_accuracy"] = float((ref.argmax(-1) == y).mean())
            result["export_accuracy"] = float((got.argmax(-1) == y).mean())
    result["tie_tolerance"] = float(tie_tolerance)
    result["min_agreement"] = float(min_agreement)
    result["max_abs_diff_allowed"] = max_abs_diff
    result["agreement_ok"] = bool(agreement >= min_agreement)
    result["diff_ok"] = bool(max_abs_diff is None or result["max_abs_diff"] <= max_abs_diff)
    result["passed"] = result["agreement_ok"] and result["diff_ok"]
    return result



def choose_samples(check_images: Sequence[str] | None, num_check: int, datasets, size: int, seed: int) -> Samples:
    """The images of the check: the given files, else the data's (validation first, then test and train), else
    synthetic shapes."""
    if check_images:
        return samples_from_files(check_images, num_check)
    if datasets is not None:
        imgs, ys = [], []
        for name in ("val", "test", "train"):
            more, more_y = split_images(getattr(datasets, name), num_check - len(imgs))
            imgs, ys = imgs + more, ys + more_y
        if not imgs:
            raise DataError(f"No readable image in the data ({datasets.name}) for the parity check.")
        return Samples(imgs, ys, f"{datasets.name}: validation split first, then test and train")
    from tlkit.data.shapes import make_shapes

    x, _ = make_shapes(max(1, -(-num_check // 4)), size, seed=seed)
    return Samples(list(x[:num_check]), None, "synthetic shapes images (no data given: pass "
                   "--check-images or --dataset for images of your domain)")


def tolerances(fmt: str, quantize: str, mixed: bool, min_agreement: float | None, max_diff: float | None,
               predictor) -> tuple[float, float | None, float]:
    """`(minimum top-1 agreement, bound of |Δp| or None, tie tolerance)` of an export's check."""
    threshold = MIN_AGREEMENT[quantize] if min_agreement is None else float(min_agreement)
    diff_bound = MAX_ABS_DIFF[quantize] if max_diff is None else (None if max_diff == float("inf") else max_diff)
    tie = TIE_TOLERANCE
    if fmt == "tflite" and quantize == "int8":  # a difference below one output step cannot be represented
        out_scale = float(predictor.out["quantization"][0] or 0.0)
        tie = max(tie, out_scale)
    if mixed and fmt != "keras":  # the reference computes in float16, the export in float32
        tie = max(tie, MIXED_TIE_TOLERANCE)
        if max_diff is None and diff_bound is not None:
            diff_bound = max(diff_bound, MAX_ABS_DIFF["float16"])
    return threshold, diff_bound, tie


def summary_line(check: dict[str, Any], threshold: float, diff_bound: float | None) -> str:
    """The one line that reports a check."""
    what = "label-set agreement" if "label_agreement" in check else "top-1 agreement"
    line = (f"[tlkit] check: {check['num_images']} images, {what} {agreement_of(check):.2%} "
            f"(threshold {threshold:.0%}), max |Δp| {check['max_abs_diff']:.2e}"
            f"{'' if diff_bound is None else f' (bound {diff_bound:g})'}: {'passed' if check['passed'] else 'FAILED'}")
    if "bytes_signature" in check:
        line += f"; bytes signature agreement {check['bytes_signature']['top1_agreement']:.2%}"
    return line


def failure_message(check: dict[str, Any], fmt: str, artifact: str, export_json: str, threshold: float,
                    diff_bound: float | None) -> str:
    """The message of the `ParityError` of a failed check (`export_json`: the export's export.json)."""
    agreement = agreement_of(check)
    what = "label-set agreement" if "label_agreement" in check else "top-1 agreement"
    why = (f"{what} {agreement:.2%} < {threshold:.0%}" if not check["agreement_ok"] else
           f"max |Δp| {check['max_abs_diff']:.3g} > {diff_bound:g}")
    return (f"The {fmt} export at {artifact} disagrees with the Keras model: {why} (agreement "
            f"{agreement:.2%}, max |Δp| {check['max_abs_diff']:.3g}); see {export_json}.")
