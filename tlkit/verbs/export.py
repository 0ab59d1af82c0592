"""`export`: a trained classifier as `.keras`, SavedModel, TFLite or ONNX, proven against the Keras model.

A tlkit model already holds its backbone's preprocessing (float32 RGB 0..255 in, probabilities out, at a
fixed square size), so an export adds only what the model lacks: the resize (and, for the SavedModel's
bytes signature, the decoding) and the class names. Every export is then checked before it is reported
done: sample images go through the exported artifact, loaded the way `tlkit.load` loads it, and through
the Keras model; the top-1 agreement and the largest difference of probabilities are printed, written
to `export.json`, and an agreement below the threshold raises `ParityError` (exit code 1).

Layout of an export folder (`--output DIR`; default `RUN/export/<format>[-<quantize>]`):

    model.keras | model.tflite | model.onnx     the artifact (a SavedModel is the folder itself)
    labels.txt                                   class names, index = output column
    export.json                                  format, input, class names, parity figures
    model_card.md                                base, weights, data, strategy, metrics, input, size

An artifact given another name (`--output DIR/int8.tflite`) has its own sidecars (`int8.labels.txt`,
`int8.export.json`, `int8.model_card.md`, `core/sidecars.py`), so several exports share a folder. A `.tflite`
also carries its labels, input normalisation, name and description as TFLite metadata (`engine/tflite_metadata.py`,
the optional extra `mediapipe`), which MediaPipe Tasks' ImageClassifier needs.

Example:
    r = export("runs/resnet50-shapes-1", format="tflite", quantize="int8")
    r.check["top1_agreement"], r.size_bytes
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
from typing import Any, Sequence

from tlkit.core import rundir
from tlkit.core.errors import ConfigError, DataError
from tlkit.core.sidecars import sidecar
from tlkit.engine import tflite_metadata
from tlkit.engine import export_formats as formats
from tlkit.engine import model_card, parity
from tlkit.engine.parity import ParityError
from tlkit.core.verb_configs import ExportConfig as E, run_data


@dataclasses.dataclass
class ExportResult:
    """What `export` returns.

    Attributes:
        path: The artifact (a file, or the SavedModel folder).
        export_dir: The folder holding the artifact, labels.txt, export.json and model_card.md.
        format: `keras`, `savedmodel`, `tflite` or `onnx`.
        quantize: TFLite quantization (`none` for other formats).
        size_bytes: Size of the artifact on disk.
        check: The parity figures (as in export.json's `check`).
        passed: Whether the agreement reached the threshold.
        class_names: Class names, index = output column.
    """

    path: str
    export_dir: str
    format: str
    quantize: str
    size_bytes: int
    check: dict[str, Any]
    passed: bool
    class_names: list[str]



def export(model: str, format: str = E.format, output: str | None = None, *, quantize: str = E.quantize,
           int8_input: str = E.int8_input, dataset: str | None = None, image_dir: str | None = None,
           data_dir: str | None = None, calibration_steps: int = E.calibration_steps,
           check_images: Sequence[str] | None = None, num_check: int = E.num_check,
           min_agreement: float | None = None, max_diff: float | None = None, overwrite: bool = E.overwrite,
           verbose: bool = True) -> ExportResult:
    """Exports a run folder or `.keras` model and checks the export against the Keras model.

    Args:
        model: A run folder (model.keras, labels.txt, config.yaml, metrics.json) or a `.keras` file.
        format: `keras`, `savedmodel`, `tflite` or `onnx`. Defaults to `"savedmodel"`.
        output: Export folder, or the artifact's path with the format's extension (`.keras`, `.tflite`,
            `.onnx`; a SavedModel is a folder). Defaults to `None` (`RUN/export/<format>[-<quantize>]`).
        quantize: TFLite only: `none`, `float16`, `dynamic` or `int8` (full integer). Defaults to `"none"`.
        int8_input: With `int8`: input/output type `uint8`, `int8` or `float32`. Defaults to `"uint8"`.
        dataset: Data for the check and int8 calibration (TFDS name or `shapes`). Defaults to `None` (the
            run's own data).
        image_dir: A folder of class sub-folders, instead of `dataset`. Defaults to `None`.
        data_dir: TensorFlow Datasets data folder. Defaults to `None`.
        calibration_steps: Calibration images for `int8`. Defaults to `100`.
        check_images: Image files/folders for the parity check. Defaults to `None` (validation data, then
            test and train data).
        num_check: Number of images of the parity check. Defaults to `32`.
        min_agreement: Required top-1 agreement in 0..1. Defaults to `None` (1.0 for float exports and
            `float16`, 0.95 for `dynamic`, 0.90 for `int8`).
        max_diff: Largest allowed absolute difference of probabilities (`math.inf`: no bound). Defaults to
            `None` (1e-3 for float exports, 2e-2 for `float16`, no bound for `dynamic` and `int8`).
        overwrite: Replace an existing export. Defaults to `False`.
        verbose: Print progress and the parity figures. Defaults to `True`.

    Returns:
        An `ExportResult`.

    Raises:
        ParityError: the export was written but its agreement is below `min_agreement` (export.json
            records the figures). ConfigError, DataError, OutputExistsError: bad input.

    Example:
        export("runs/resnet50-shapes-1", format="savedmodel")
        export("runs/resnet50-shapes-1", format="tflite", quantize="int8", calibration_steps=200)
    """
    from tlkit.engine.predictors import load
    from tlkit.models.classifier import load_model_and_labels

    say = (lambda *a: print(*a, flush=True)) if verbose else (lambda *a: None)
    _check_arguments(format, quantize, int8_input, calibration_steps, num_check, min_agreement, max_diff,
                     dataset, image_dir)
    model_path = os.fspath(model)
    keras_model, labels, run_dir = load_model_and_labels(model_path)
    mixed = formats.is_mixed_precision(keras_model)
    size = int(keras_model.input_shape[1])
    num_classes = int(keras_model.output_shape[-1])
    run_cfg, metrics = _run_record(run_dir)
    seed = run_cfg.seed if run_cfg is not None else 42
    export_dir, artifact = formats.resolve_output(format, quantize, output,
                                                  run_dir or os.path.dirname(os.path.abspath(model_path)))
    rundir.refuse_existing([export_dir] if format == "savedmodel" else
                           [artifact, sidecar(artifact, "export.json"), sidecar(artifact, "model_card.md")], overwrite)
    datasets = None
    if quantize == "int8" or not check_images:  # the data: given flags, else the run's own
        datasets = _load_data(run_dir, dataset, image_dir, data_dir, size, num_classes, seed)
    if labels is None:
        labels = list(datasets.class_names) if datasets is not None else [str(i) for i in range(num_classes)]
    elif datasets is not None and list(datasets.class_names) != list(labels):
        say("[tlkit] note: the data's class names differ from the model's labels.txt; labels.txt is used.")
    if quantize == "int8" and datasets is None:
        raise ConfigError("--quantize int8 needs calibration data: pass --dataset NAME or --image-dir DIR "
                          "(a run folder uses its own data).")
    samples = parity.choose_samples(check_images, num_check, datasets, size, seed)

    say(f"[tlkit] exporting {model_path} as {format}{'' if quantize == 'none' else ' (' + quantize + ')'} "
        f"-> {artifact}")
    if format != "savedmodel":
        os.makedirs(export_dir, exist_ok=True)
    rep = parity.representative_fn(datasets, calibration_steps, size) if quantize == "int8" else None
    tflite_md = formats.write_artifact(
        keras_model, format, artifact, labels, size, quantize, int8_input, rep,
        tflite_metadata=lambda flat: tflite_metadata.write_for_export(flat, labels, model_path, run_cfg, quantize,
                                                                      int8_input, say))
    if format != "savedmodel":
        rundir.write_text(sidecar(artifact, "labels.txt"), "\n".join(labels) + "\n")
    if run_dir is not None and os.path.isfile(os.path.join(run_dir, "ood.json")):  # the run's "unknown" threshold
        with open(os.path.join(run_dir, "ood.json"), encoding="utf-8") as f:
            rundir.write_text(sidecar(artifact, "ood.json"), f.read())
    thresholds = _write_thresholds(keras_model, model_path, artifact, labels)  # multi-label: thresholds.json

    predictor = load(artifact)
    threshold, diff_bound, tie = parity.tolerances(format, quantize, mixed, min_agreement, max_diff, predictor)
    check = parity.check_export(keras_model, predictor, samples, threshold, diff_bound, tie, thresholds)
    if format == "tflite":  # which interpreter produced the parity figures
        check["runtime"] = predictor.runtime
    size_bytes = formats.disk_size(artifact)
    info = _export_info(format, quantize, int8_input, artifact, export_dir, model_path, size_bytes, size,
                        num_classes, labels, mixed, check, predictor, calibration_steps, tflite_md)
    rundir.write_json(sidecar(artifact, "export.json"), info)
    rundir.write_text(sidecar(artifact, "model_card.md"),
                      model_card.model_card(info, run_cfg, metrics, model_card.describe_preprocessing(keras_model)))
    say(parity.summary_line(check, threshold, diff_bound))
    say(f"[tlkit] {format} export: {artifact} ({formats.human_size(size_bytes)}); "
        f"{os.path.basename(sidecar(artifact, 'export.json'))} and {os.path.basename(sidecar(artifact, 'model_card.md'))} "
        f"in {export_dir}")
    if not check["passed"]:
        raise ParityError(parity.failure_message(check, format, artifact, sidecar(artifact, "export.json"), threshold,
                                                 diff_bound))
    return ExportResult(artifact, export_dir, format, quantize, size_bytes, check, check["passed"], list(labels))


def _write_thresholds(keras_model, model_path: str, artifact: str, labels: Sequence[str]):
    """A multi-label model's per-class thresholds (its run's or its own `thresholds.json`, else 0.5 each), written
    beside the export as its `thresholds.json` sidecar, which tells every loader that the export is multi-label;
    `None` for a single-label model."""
    from tlkit.engine import metrics_multilabel as ML
    from tlkit.models.classifier import is_multi_label

    if not is_multi_label(keras_model):
        return None
    source = ML.thresholds_path(model_path)
    thresholds = ML.thresholds_or_default(model_path, labels)
    ML.write_thresholds(sidecar(artifact, ML.THRESHOLDS_FILE), labels, thresholds,
                        f"{source} (copied)" if source else None)
    return thresholds


def _export_info(format: str, quantize: str, int8_input: str, artifact: str, export_dir: str, model_path: str,
                 size_bytes: int, size: int, num_classes: int, labels: Sequence[str], mixed: bool, check: dict[str, Any], predictor,
                 calibration_steps: int, tflite_md: Any) -> dict[str, Any]:
    """The content of export.json."""
    import keras
    import tensorflow as tf

    from tlkit.core import VERSION

    info = {
        "format": format, "quantize": quantize, "int8_input": int8_input if quantize == "int8" else None,
        "artifact": os.path.basename(os.path.normpath(artifact)) if format != "savedmodel" else ".",
        "size_bytes": size_bytes, "image_size": size, "num_classes": num_classes, "class_names": list(labels),
        "multi_label": predictor.multi_label,
        "input": model_card.input_description(format, quantize, int8_input, size),
        "source": model_path, "source_precision": "mixed" if mixed else "float32",
        "export_precision": "mixed" if mixed and format == "keras" else "float32", "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "versions": {"tlkit": VERSION, "tensorflow": tf.__version__, "keras": keras.__version__},
        "load_path": export_dir if format == "savedmodel" or sidecar(artifact, "export.json") == os.path.join(
            os.path.abspath(export_dir), "export.json") else artifact, "check": check,
    }
    if format == "tflite" and quantize == "int8":
        q = predictor.inp["quantization"]
        info["input"]["quantization"] = f"scale {float(q[0]):.6g}, zero point {int(q[1])}"
        info["calibration_images"] = int(calibration_steps)
    if format == "tflite":
        info["metadata"] = tflite_md
    return info


def _check_arguments(format: str, quantize: str, int8_input: str, calibration_steps: int, num_check: int,
                     min_agreement: float | None, max_diff: float | None, dataset: str | None,
                     image_dir: str | None) -> None:
    """Refuses a bad combination of `export`'s arguments before any work."""
    if format not in formats.FORMATS:
        from tlkit.core.errors import suggest
        raise ConfigError(f"Unknown export format {format!r}. Choose one of: {', '.join(formats.FORMATS)}."
                          f"{suggest(str(format), formats.FORMATS)}")
    if quantize not in formats.QUANTIZATIONS:
        raise ConfigError(f"Unknown quantization {quantize!r}. Choose one of: {', '.join(formats.QUANTIZATIONS)}.")
    if quantize != "none" and format != "tflite":
        raise ConfigError(f"--quantize {quantize} applies to --format tflite only, not {format}.")
    if int8_input not in formats.INT8_INPUTS:
        raise ConfigError(f"Unknown int8 input type {int8_input!r}. Choose one of: {', '.join(formats.INT8_INPUTS)}.")
    if calibration_steps < 1:
        raise ConfigError(f"calibration_steps must be >= 1, got {calibration_steps}.")
    if num_check < 1:
        raise ConfigError(f"num_check must be >= 1, got {num_check}.")
    if min_agreement is not None and not 0.0 <= min_agreement <= 1.0:
        raise ConfigError(f"min_agreement must be between 0 and 1, got {min_agreement}.")
    if max_diff is not None and not max_diff >= 0.0:
        raise ConfigError(f"max_diff must be >= 0 (inf for no bound), got {max_diff}.")
    if dataset and image_dir:
        raise ConfigError("Give either --dataset or --image-dir, not both.")
    if format == "onnx":
        from tlkit.engine.predictors import require_onnx
        require_onnx()  # before any work: one line saying what to install


def _run_record(run_dir: str | None) -> tuple[Any, dict[str, Any] | None]:
    """`(config, metrics)` of the run folder the model came from (`None` for what it lacks)."""
    from tlkit.core import config_io

    run_cfg, metrics = None, None
    if run_dir is not None and os.path.isfile(os.path.join(run_dir, "config.yaml")):
        run_cfg = config_io.load_config(os.path.join(run_dir, "config.yaml"))
    if run_dir is not None and os.path.isfile(os.path.join(run_dir, "metrics.json")):
        with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as f:
            metrics = json.load(f)
    return run_cfg, metrics


def _load_data(run_dir: str | None, dataset: str | None, image_dir: str | None, data_dir: str | None, size: int,
               num_classes: int, seed: int):
    """The data of the check and of int8 calibration: the given flags, else the run's own; `None` without either."""
    from tlkit.data import load_sources

    data_cfg, _ = run_data(run_dir, dataset, image_dir, data_dir)
    if not (data_cfg.dataset or data_cfg.image_dir or data_cfg.labels):
        return None
    datasets = load_sources(dataclasses.replace(data_cfg, image_size=size), size, seed)
    if datasets.num_classes != num_classes:
        raise DataError(f"The model predicts {num_classes} classes but the data "
                        f"({datasets.name}) has {datasets.num_classes}.")
    return datasets


__all__ = ["export", "ExportResult", "ParityError"]
