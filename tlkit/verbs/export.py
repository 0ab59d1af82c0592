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
import os
import sys
import tempfile
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from tlkit.core import rundir
from tlkit.core.errors import ConfigError, DataError, TlkitError
from tlkit.core.sidecars import sidecar
from tlkit.engine import tflite_metadata
from tlkit.engine.predictors import call_model

FORMATS = ("keras", "savedmodel", "tflite", "onnx")
QUANTIZATIONS = ("none", "float16", "dynamic", "int8")
INT8_INPUTS = ("uint8", "int8", "float32")
EXTENSIONS = {"keras": ".keras", "tflite": ".tflite", "onnx": ".onnx"}
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
DEFAULT_CHECK_IMAGES = 32
DEFAULT_CALIBRATION_STEPS = 100


class ParityError(TlkitError, RuntimeError):
    """The export was written but does not give the Keras model's answers (see its export.json)."""


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


# ---------------------------------------------------------------- in-graph preprocessing

def serving_transform(images, size: int):
    """uint8 RGB [B, H, W, 3] of any size -> float32 [B, size, size, 3] in 0..255, with the pipeline's resize.

    This is what the SavedModel's signatures run before the model; `tlkit.load` does the same outside the
    graph for the other formats.
    """
    import tensorflow as tf

    from tlkit.data.augment import resize_uint8

    return tf.cast(resize_uint8(images, size), tf.float32)


def decode_encoded(data, size: int):
    """Encoded JPEG/PNG/BMP/GIF strings [B] -> uint8 RGB [B, size, size, 3] (the pipeline's decode and resize)."""
    import tensorflow as tf

    from tlkit.data.augment import resize_uint8
    from tlkit.data.pipeline import decode

    return tf.map_fn(lambda b: resize_uint8(decode(b, "encoded"), size), data,
                     fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8))


# ---------------------------------------------------------------- writers

def is_mixed_precision(model) -> bool:
    """Whether any layer of the model computes in float16/bfloat16 (a mixed-precision policy)."""
    return any(layer.dtype_policy.name.startswith("mixed") for layer in model._flatten_layers())


def as_float32(model):
    """The same model with every layer computing in float32 (weights copied); the model itself when it is.

    A mixed-precision model (tlkit's default on a GPU) keeps float32 variables but computes in float16,
    which TFLite's built-in ops cannot convert and CPUs run slowly: exports are made in float32.
    """
    import keras

    if not is_mixed_precision(model):
        return model

    def fix(node):
        if isinstance(node, dict):
            if node.get("class_name") in ("DTypePolicy", "FloatDTypePolicy") and isinstance(node.get("config"), dict) \
                    and str(node["config"].get("name", "")).startswith("mixed"):
                return {**node, "config": {**node["config"], "name": "float32"}}
            return {k: fix(v) for k, v in node.items()}
        if isinstance(node, list):
            return [fix(v) for v in node]
        if isinstance(node, str) and node.startswith("mixed_"):
            return "float32"
        return node

    clone = model.__class__.from_config(fix(model.get_config()))
    clone.set_weights(model.get_weights())
    return clone


def write_keras(model, path: str) -> None:
    """Saves the classifier as a plain `.keras` file (no optimizer state), atomically."""
    from tlkit.models.classifier import save_model

    save_model(model, path)


def write_savedmodel(model, folder: str, class_names: Sequence[str], image_size: int) -> None:
    """Writes a SavedModel with two signatures, atomically (the folder appears complete or not at all).

    - `serving_default(images: uint8 [B, H, W, 3], any H and W)`
    - `serve_bytes(image_bytes: string [B], encoded JPEG/PNG/BMP/GIF)`

    Both return `probabilities` float32 [B, C], `top_classes` string [B, k] and `top_scores` float32
    [B, k] with k = min(5, C). The folder also holds labels.txt (and assets/labels.txt).
    """
    import keras
    import tensorflow as tf

    labels = tf.constant(list(class_names), tf.string)
    k = min(5, len(class_names))

    def outputs(x):
        probs = tf.cast(call_model(model, x), tf.float32)
        top = tf.math.top_k(probs, k=k)
        return {"probabilities": probs, "top_classes": tf.gather(labels, top.indices), "top_scores": top.values}

    def serve_images(images):
        return outputs(serving_transform(images, image_size))

    def serve_bytes(image_bytes):
        return outputs(serving_transform(decode_encoded(image_bytes, image_size), image_size))

    # No archive.track(model): the endpoints' own variables are saved anyway, and with Keras 3.15 tracking the
    # model as well stores every variable twice (a SavedModel twice the size; model.export does the same).
    archive = keras.export.ExportArchive()
    archive.add_endpoint("serving_default", serve_images,
                         input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    archive.add_endpoint("serve_bytes", serve_bytes,
                         input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    text = "\n".join(class_names) + "\n"
    with rundir.atomic_path(folder) as tmp:
        archive.write_out(tmp, verbose=False)
        os.makedirs(os.path.join(tmp, "assets"), exist_ok=True)
        for p in (os.path.join(tmp, "labels.txt"), os.path.join(tmp, "assets", "labels.txt")):
            with open(p, "w", encoding="utf-8") as f:
                f.write(text)


def tflite_bytes(model, image_size: int, quantize: str = "none", int8_input: str = "uint8",
                 representative: Callable[[], Iterator[list[np.ndarray]]] | None = None) -> bytes:
    """Converts the classifier to TFLite (built-in ops only), input float32 [1, S, S, 3] 0..255 unless int8.

    Args:
        model: The classifier.
        image_size: Its input side.
        quantize: `none`, `float16` (weights), `dynamic` (int8 weights, float activations) or `int8`
            (full integer: weights and activations, with `representative`). Defaults to `"none"`.
        int8_input: For `int8`: the input and output type, `uint8` (raw pixels, scale 1), `int8` or
            `float32` (quantize/dequantize ops inside). Defaults to `"uint8"`.
        representative: For `int8`: a generator function of `[float32 [1, S, S, 3]]` calibration inputs.

    Returns:
        The `.tflite` flatbuffer.
    """
    import keras
    import tensorflow as tf

    from tlkit.models.classifier import fold_feature_norm

    model = fold_feature_norm(model)  # the head's standardisation inside the Dense: no int8 layer amplifies noise
    with tempfile.TemporaryDirectory() as d:
        archive = keras.export.ExportArchive()  # not tracked: see write_savedmodel
        archive.add_endpoint("serving_default", lambda image: call_model(model, image),
                             input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.float32,
                                                            name="image")])
        archive.write_out(d, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(d)
        if quantize == "float16":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        elif quantize == "dynamic":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        elif quantize == "int8":
            if representative is None:
                raise ConfigError("int8 quantization needs a representative dataset.")
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = representative
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            io_type = {"uint8": tf.uint8, "int8": tf.int8, "float32": tf.float32}[int8_input]
            converter.inference_input_type = io_type
            converter.inference_output_type = io_type
        try:
            return converter.convert()
        except Exception as e:
            raise ConfigError(f"TFLite conversion ({quantize}) failed: {str(e).strip().splitlines()[0][:300]}") from None


def write_onnx(model, path: str) -> None:
    """Writes ONNX through Keras's own `model.export(format="onnx")` (tf2onnx), atomically."""
    from tlkit.engine.predictors import require_onnx

    require_onnx()
    if not getattr(model, "_called", True):  # a freshly loaded model must have run once for Keras's exporter
        size = int(model.input_shape[1])
        call_model(model, np.zeros((1, size, size, 3), np.float32))
    with rundir.atomic_path(path, suffix=".onnx") as tmp:
        model.export(tmp, format="onnx", verbose=False)


# ---------------------------------------------------------------- data for the check and calibration

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
        labels.append(int(y))
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

def compare(reference: np.ndarray, exported: np.ndarray, tie_tolerance: float = TIE_TOLERANCE) -> dict[str, Any]:
    """Top-1 agreement and probability differences between the Keras model and an export.

    The export's top-1 (its argmax, as a user reads it) agrees when the Keras model gives that class its
    highest probability, within `tie_tolerance` (a tie in the Keras model may go either way). A tie in a
    quantized output is not excused: argmax then picks the first tied class, which is what the user gets.

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
    return {"num_images": int(n), "top1_agreement": float(agree.mean()) if n else 0.0,
            "strict_top1_agreement": float((ref_top == top).mean()) if n else 0.0,
            "max_abs_diff": float(diff.max()) if n else 0.0, "mean_abs_diff": float(diff.mean()) if n else 0.0}


def check_export(model, predictor, samples: Samples, min_agreement: float, max_abs_diff: float | None = None,
                 tie_tolerance: float = TIE_TOLERANCE) -> dict[str, Any]:
    """Runs the samples through the Keras model and the loaded export; returns the figures and `passed`.

    It passes when the top-1 agreement is at least `min_agreement` and (when given) no probability differs
    by more than `max_abs_diff`.

    For a SavedModel both signatures are checked: raw uint8 images (original sizes) and PNG bytes.
    """
    import tensorflow as tf

    from tlkit.engine.predictors import SavedModelPredictor, resize_batch

    size = int(model.input_shape[1])
    ref = np.concatenate([np.asarray(call_model(model, resize_batch(samples.images[i:i + 32], size)))
                          for i in range(0, len(samples.images), 32)])
    got = predictor.predict(samples.images)
    result = compare(ref, got, tie_tolerance)
    result["source"] = samples.source
    agreement = result["top1_agreement"]
    if isinstance(predictor, SavedModelPredictor):
        encoded = [tf.io.encode_png(img).numpy() for img in samples.images]
        b = np.concatenate([predictor.predict_bytes(encoded[i:i + 32]) for i in range(0, len(encoded), 32)])
        result["bytes_signature"] = compare(ref, b, tie_tolerance)
        agreement = min(agreement, result["bytes_signature"]["top1_agreement"])
        result["max_abs_diff"] = max(result["max_abs_diff"], result["bytes_signature"]["max_abs_diff"])
    if samples.labels is not None and samples.labels:
        y = np.asarray(samples.labels)
        result["keras_accuracy"] = float((ref.argmax(-1) == y).mean())
        result["export_accuracy"] = float((got.argmax(-1) == y).mean())
    result["tie_tolerance"] = float(tie_tolerance)
    result["min_agreement"] = float(min_agreement)
    result["max_abs_diff_allowed"] = max_abs_diff
    result["agreement_ok"] = bool(agreement >= min_agreement)
    result["diff_ok"] = bool(max_abs_diff is None or result["max_abs_diff"] <= max_abs_diff)
    result["passed"] = result["agreement_ok"] and result["diff_ok"]
    return result


# ---------------------------------------------------------------- output paths and the model card

def resolve_output(fmt: str, quantize: str, output: str | None, default_root: str) -> tuple[str, str]:
    """Returns `(export_dir, artifact)` for `--output` (a folder, or a file with the format's extension)."""
    if output is None:
        output = os.path.join(default_root, "export", fmt if quantize == "none" else f"{fmt}-{quantize}")
    output = os.fspath(output)
    if fmt == "savedmodel":
        if os.path.splitext(output)[1].lower() in (".keras", ".tflite", ".onnx"):
            raise ConfigError(f"--output {output!r}: a SavedModel is a folder; give a folder path.")
        return output, output
    ext = EXTENSIONS[fmt]
    low = output.lower()
    if low.endswith(ext):
        return os.path.dirname(os.path.abspath(output)), output
    other = [e for f, e in EXTENSIONS.items() if f != fmt and low.endswith(e)]
    if other:
        raise ConfigError(f"--output {output!r} ends with {other[0]} but --format is {fmt} (expected {ext} or a folder).")
    return output, os.path.join(output, "model" + ext)


def disk_size(path: str) -> int:
    """Bytes of a file, or of all files under a folder."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for dirpath, _, names in os.walk(path):
        total += sum(os.path.getsize(os.path.join(dirpath, n)) for n in names)
    return total


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def describe_preprocessing(model) -> str:
    """What the model's own preprocessing layer does, read from the model."""
    import keras

    try:
        layer = model.get_layer("preprocess")
    except ValueError:
        return "none in the classifier (the backbone takes raw 0..255 RGB and scales it itself)"
    if isinstance(layer, keras.layers.Rescaling):
        if isinstance(layer.scale, (list, tuple)) or isinstance(layer.offset, (list, tuple)):
            fmt = lambda v: "(" + ", ".join(f"{float(x):.4g}" for x in v) + ")" if isinstance(v, (list, tuple)) \
                else f"{float(v):.4g}"
            return (f"inside the model: x * {fmt(layer.scale)} + {fmt(layer.offset)} per channel (the keras-hub "
                    "preset's image converter)")
        return f"inside the model: x * {layer.scale:g} + {layer.offset:g} (mode `tf`, to [-1, 1])"
    if isinstance(layer, keras.layers.Normalization):
        return "inside the model: (x - ImageNet mean) / ImageNet std on the 0..255 scale (mode `torch`)"
    if isinstance(layer, keras.layers.Conv2D):
        return "inside the model: RGB -> BGR and ImageNet mean subtraction (mode `caffe`)"
    return f"inside the model: layer {layer.__class__.__name__}"


def input_description(fmt: str, quantize: str, int8_input: str, size: int) -> dict[str, Any]:
    """The artifact's input, as written to export.json and the model card."""
    if fmt == "savedmodel":
        return {"serving_default": "images: uint8 RGB [batch, height, width, 3], any height and width "
                                   f"(resized inside to {size}x{size})",
                "serve_bytes": "image_bytes: string [batch], encoded JPEG/PNG/BMP/GIF (decoded and resized inside)",
                "outputs": "probabilities float32 [batch, classes], top_classes string [batch, k], "
                           "top_scores float32 [batch, k]"}
    if fmt == "tflite" and quantize == "int8":
        return {"shape": [1, size, size, 3], "dtype": int8_input,
                "values": "RGB pixels quantized with the input tensor's scale and zero point (uint8: scale ~1, "
                          "the raw 0..255 pixels)" if int8_input != "float32" else "RGB 0..255 float32",
                "output": f"{int8_input} class probabilities (dequantize with the output scale/zero point)"}
    return {"shape": [None if fmt != "tflite" else 1, size, size, 3], "dtype": "float32",
            "values": f"RGB 0..255, resized to {size}x{size} by the caller (tlkit.load does it)",
            "output": "float32 class probabilities"}


def model_card(info: dict[str, Any], run_cfg: Any, metrics: dict[str, Any] | None, preprocessing: str) -> str:
    """The model_card.md text of an export."""
    def cfg(section: str, key: str, default: str = "unknown") -> Any:
        if run_cfg is None:
            return default
        return getattr(getattr(run_cfg, section), key)

    data = "unknown"
    if run_cfg is not None:
        d = run_cfg.data
        data = f"`{d.dataset}`" if d.dataset else f"image folder `{d.image_dir}`"
    lines = [f"# Model card: {os.path.basename(info['source'].rstrip('/')) or info['source']} "
             f"({info['format']}{'' if info['quantize'] == 'none' else ', ' + info['quantize']})", "",
             "| | |", "|---|---|",
             f"| base | `{cfg('model', 'base')}` |", f"| weights | `{cfg('model', 'weights')}` |",
             f"| data | {data} |",
             f"| classes | {len(info['class_names'])}: {', '.join(info['class_names'][:10])}"
             f"{' ...' if len(info['class_names']) > 10 else ''} |",
             f"| strategy | `{cfg('train', 'strategy')}` (epochs {cfg('train', 'epochs')}, "
             f"{cfg('train', 'head_steps')} head steps, lr {cfg('train', 'lr')}) |",
             f"| input size | {info['image_size']}x{info['image_size']} RGB |",
             f"| preprocessing | {preprocessing} |",
             f"| export format | {info['format']}{'' if info['quantize'] == 'none' else ' (' + info['quantize'] + ')'}"
             f"{' input ' + info['int8_input'] if info['quantize'] == 'int8' else ''} |",
             f"| compute precision | {info['export_precision']} (source model: {info['source_precision']}) |",
             f"| artifact | `{info['artifact']}` |",
             f"| size on disk | {human_size(info['size_bytes'])} ({info['size_bytes']} bytes) |",
             f"| source model | `{info['source']}` |", f"| exported | {info['created']} (tlkit {info['versions']['tlkit']}, "
             f"TensorFlow {info['versions']['tensorflow']}, Keras {info['versions']['keras']}) |", "",
             "## Input", ""]
    for k, v in info["input"].items():
        lines.append(f"- {k}: {v}")
    lines += ["", "## Metrics of the Keras model (from the run's metrics.json)", ""]
    if metrics:
        lines += ["| split | examples | accuracy | top-5 | mean per-class accuracy | loss |", "|---|---|---|---|---|---|"]
        for split in ("val", "test"):
            m = metrics.get(split)
            if isinstance(m, dict) and m.get("num_examples"):
                top5 = next((v for k, v in m.items() if k.startswith("top") and k.endswith("_accuracy")), None)
                lines.append(f"| {split} | {m['num_examples']} | {m.get('accuracy', float('nan')):.4f} | "
                             f"{'-' if top5 is None else f'{top5:.4f}'} | "
                             f"{m.get('mean_per_class_accuracy', float('nan')):.4f} | {m.get('loss', float('nan')):.4f} |")
    else:
        lines.append("No metrics.json (the export was made from a bare .keras file).")
    c = info["check"]
    lines += ["", "## Parity with the Keras model", "",
              f"{c['num_images']} images ({c['source']}): top-1 agreement {c['top1_agreement']:.2%} "
              f"(threshold {c['min_agreement']:.0%}), max |Δp| {c['max_abs_diff']:.2e}"
              f"{'' if c['max_abs_diff_allowed'] is None else ' (bound %g)' % c['max_abs_diff_allowed']}, mean |Δp| "
              f"{c['mean_abs_diff']:.2e}: **{'passed' if c['passed'] else 'FAILED'}**."]
    if "bytes_signature" in c:
        b = c["bytes_signature"]
        lines.append(f"Bytes signature (PNG): agreement {b['top1_agreement']:.2%}, max |Δp| {b['max_abs_diff']:.2e}.")
    if "runtime" in c:
        lines.append(f"Run with {c['runtime']}.")
    if "export_accuracy" in c:
        lines.append(f"Accuracy on these images: Keras {c['keras_accuracy']:.2%}, export {c['export_accuracy']:.2%}.")
    lines += ["", "## Use", "", "```python", "import tlkit", f"clf = tlkit.load({info['load_path']!r})",
              "probs = clf.predict(['image.jpg'])  # [N, classes]; clf.class_names", "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- export

def export(model: str, format: str = "savedmodel", output: str | None = None, *, quantize: str = "none",
           int8_input: str = "uint8", dataset: str | None = None, image_dir: str | None = None,
           data_dir: str | None = None, calibration_steps: int = DEFAULT_CALIBRATION_STEPS,
           check_images: Sequence[str] | None = None, num_check: int = DEFAULT_CHECK_IMAGES,
           min_agreement: float | None = None, max_diff: float | None = None, overwrite: bool = False,
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
    import keras
    import tensorflow as tf

    from tlkit.core import VERSION
    from tlkit.core import config as C
    from tlkit.data import load_sources
    from tlkit.models.classifier import load_model_and_labels
    from tlkit.engine.predictors import load

    say = (lambda *a: print(*a, flush=True)) if verbose else (lambda *a: None)
    if format not in FORMATS:
        from tlkit.core.errors import suggest
        raise ConfigError(f"Unknown export format {format!r}. Choose one of: {', '.join(FORMATS)}."
                          f"{suggest(str(format), FORMATS)}")
    if quantize not in QUANTIZATIONS:
        raise ConfigError(f"Unknown quantization {quantize!r}. Choose one of: {', '.join(QUANTIZATIONS)}.")
    if quantize != "none" and format != "tflite":
        raise ConfigError(f"--quantize {quantize} applies to --format tflite only, not {format}.")
    if int8_input not in INT8_INPUTS:
        raise ConfigError(f"Unknown int8 input type {int8_input!r}. Choose one of: {', '.join(INT8_INPUTS)}.")
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

    model_path = os.fspath(model)
    keras_model, labels, run_dir = load_model_and_labels(model_path)
    mixed = is_mixed_precision(keras_model)
    size = int(keras_model.input_shape[1])
    num_classes = int(keras_model.output_shape[-1])
    run_cfg, metrics = None, None
    if run_dir is not None and os.path.isfile(os.path.join(run_dir, "config.yaml")):
        run_cfg = C.load_config(os.path.join(run_dir, "config.yaml"))
    if run_dir is not None and os.path.isfile(os.path.join(run_dir, "metrics.json")):
        import json
        with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as f:
            metrics = json.load(f)
    export_dir, artifact = resolve_output(format, quantize, output,
                                          run_dir or os.path.dirname(os.path.abspath(model_path)))
    rundir.refuse_existing([export_dir] if format == "savedmodel" else
                           [artifact, sidecar(artifact, "export.json"), sidecar(artifact, "model_card.md")], overwrite)

    # The data: given flags, else the run's own (for the check and int8 calibration).
    data_cfg, seed = None, 42
    if dataset or image_dir:
        base = run_cfg.data if run_cfg is not None else C.DataConfig()
        data_cfg = dataclasses.replace(base, dataset=dataset, image_dir=image_dir, data_dir=data_dir or base.data_dir)
    elif run_cfg is not None and (run_cfg.data.dataset or run_cfg.data.image_dir):
        data_cfg = run_cfg.data
    if run_cfg is not None:
        seed = run_cfg.seed
    datasets = None
    need_data = quantize == "int8" or not check_images
    if data_cfg is not None and need_data:
        datasets = load_sources(dataclasses.replace(data_cfg, image_size=size), size, seed)
        if datasets.num_classes != num_classes:
            raise DataError(f"The model predicts {num_classes} classes but the data "
                            f"({datasets.name}) has {datasets.num_classes}.")
    if labels is None:
        labels = list(datasets.class_names) if datasets is not None else [str(i) for i in range(num_classes)]
    elif datasets is not None and list(datasets.class_names) != list(labels):
        say("[tlkit] note: the data's class names differ from the model's labels.txt; labels.txt is used.")
    if quantize == "int8" and datasets is None:
        raise ConfigError("--quantize int8 needs calibration data: pass --dataset NAME or --image-dir DIR "
                          "(a run folder uses its own data).")

    if check_images:
        samples = samples_from_files(check_images, num_check)
    elif datasets is not None:
        imgs, ys = [], []
        for name in ("val", "test", "train"):
            more, more_y = split_images(getattr(datasets, name), num_check - len(imgs))
            imgs, ys = imgs + more, ys + more_y
        if not imgs:
            raise DataError(f"No readable image in the data ({datasets.name}) for the parity check.")
        samples = Samples(imgs, ys, f"{datasets.name}: validation split first, then test and train")
    else:
        from tlkit.data.shapes import make_shapes
        x, _ = make_shapes(max(1, -(-num_check // 4)), size, seed=seed)
        samples = Samples(list(x[:num_check]), None, "synthetic shapes images (no data given: pass "
                          "--check-images or --dataset for images of your domain)")

    say(f"[tlkit] exporting {model_path} as {format}{'' if quantize == 'none' else ' (' + quantize + ')'} "
        f"-> {artifact}")
    if format != "savedmodel":
        os.makedirs(export_dir, exist_ok=True)
    labels_text = "\n".join(labels) + "\n"
    plain = keras_model if format == "keras" else as_float32(keras_model)
    if format == "keras":
        write_keras(keras_model, artifact)
    elif format == "savedmodel":
        write_savedmodel(plain, artifact, labels, size)
    elif format == "tflite":
        rep = representative_fn(datasets, calibration_steps, size) if quantize == "int8" else None
        flat = tflite_bytes(plain, size, quantize, int8_input, rep)
        flat, tflite_md = tflite_metadata.write_for_export(flat, labels, model_path, run_cfg, quantize, int8_input,
                                                           say)
        with rundir.atomic_path(artifact, suffix=".tflite") as tmp:
            with open(tmp, "wb") as f:
                f.write(flat)
    else:
        write_onnx(plain, artifact)
    if format != "savedmodel":
        rundir.write_text(sidecar(artifact, "labels.txt"), labels_text)
    if run_dir is not None and os.path.isfile(os.path.join(run_dir, "ood.json")):  # the run's "unknown" threshold
        with open(os.path.join(run_dir, "ood.json"), encoding="utf-8") as f:
            rundir.write_text(sidecar(artifact, "ood.json"), f.read())

    predictor = load(artifact)
    threshold = MIN_AGREEMENT[quantize] if min_agreement is None else float(min_agreement)
    diff_bound = MAX_ABS_DIFF[quantize] if max_diff is None else (None if max_diff == float("inf") else max_diff)
    tie = TIE_TOLERANCE
    if format == "tflite" and quantize == "int8":  # a difference below one output step cannot be represented
        out_scale = float(predictor.out["quantization"][0] or 0.0)
        tie = max(tie, out_scale)
    if mixed and format != "keras":  # the reference computes in float16, the export in float32
        tie = max(tie, MIXED_TIE_TOLERANCE)
        if max_diff is None and diff_bound is not None:
            diff_bound = max(diff_bound, MAX_ABS_DIFF["float16"])
    check = check_export(keras_model, predictor, samples, threshold, diff_bound, tie)
    if format == "tflite":  # which interpreter produced the parity figures
        check["runtime"] = predictor.runtime
    size_bytes = disk_size(artifact)
    info = {
        "format": format, "quantize": quantize, "int8_input": int8_input if quantize == "int8" else None,
        "artifact": os.path.basename(os.path.normpath(artifact)) if format != "savedmodel" else ".",
        "size_bytes": size_bytes, "image_size": size, "num_classes": num_classes, "class_names": list(labels),
        "input": input_description(format, quantize, int8_input, size),
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
    rundir.write_json(sidecar(artifact, "export.json"), info)
    rundir.write_text(sidecar(artifact, "model_card.md"),
                      model_card(info, run_cfg, metrics, describe_preprocessing(keras_model)))
    line = (f"[tlkit] check: {check['num_images']} images, top-1 agreement {check['top1_agreement']:.2%} "
            f"(threshold {threshold:.0%}), max |Δp| {check['max_abs_diff']:.2e}"
            f"{'' if diff_bound is None else f' (bound {diff_bound:g})'}: {'passed' if check['passed'] else 'FAILED'}")
    if "bytes_signature" in check:
        line += f"; bytes signature agreement {check['bytes_signature']['top1_agreement']:.2%}"
    say(line)
    say(f"[tlkit] {format} export: {artifact} ({human_size(size_bytes)}); "
        f"{os.path.basename(sidecar(artifact, 'export.json'))} and {os.path.basename(sidecar(artifact, 'model_card.md'))} "
        f"in {export_dir}")
    result = ExportResult(artifact, export_dir, format, quantize, size_bytes, check, check["passed"], list(labels))
    if not check["passed"]:
        agreement = min(check["top1_agreement"], check.get("bytes_signature", check)["top1_agreement"])
        why = (f"top-1 agreement {agreement:.2%} < {threshold:.0%}" if not check["agreement_ok"] else
               f"max |Δp| {check['max_abs_diff']:.3g} > {diff_bound:g}")
        raise ParityError(f"The {format} export at {artifact} disagrees with the Keras model: {why} (agreement "
                          f"{agreement:.2%}, max |Δp| {check['max_abs_diff']:.3g}); see "
                          f"{sidecar(artifact, 'export.json')}.")
    return result


__all__ = ["export", "ExportResult", "ParityError", "FORMATS", "QUANTIZATIONS", "INT8_INPUTS", "MIN_AGREEMENT",
           "compare", "check_export", "serving_transform"]
