"""The export formats: `.keras`, SavedModel (with in-graph resize and decode), TFLite and ONNX writers, and where
an export goes (`resolve_output`). The parity check is `engine.parity`'s, the model card `engine.model_card`'s;
`tlkit export` (`verbs/export.py`) calls them in order.

Example:
    export_dir, artifact = resolve_output("tflite", "none", None, "runs/try")
    write_artifact(model, "tflite", artifact, labels, size)
"""
from __future__ import annotations

from tlkit.core.verb_configs import EXPORT_FORMATS, INT8_INPUTS, QUANTIZATIONS

import os
import tempfile
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from tlkit.core import private, rundir
from tlkit.core.errors import ConfigError, first_line
from tlkit.engine.predictors import call_model

FORMATS, QUANTIZATIONS, INT8_INPUTS = EXPORT_FORMATS, QUANTIZATIONS, INT8_INPUTS  # the choices: tlkit.core.verb_configs
EXTENSIONS = {"keras": ".keras", "tflite": ".tflite", "onnx": ".onnx"}


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
    return any(layer.dtype_policy.name.startswith("mixed") for layer in private.all_layers(model, include_self=True))


def as_float32(model):
    """The same model with every layer computing in float32 (weights copied); the model itself when it is.

    A mixed-precision model (tlkit's default on a GPU) keeps float32 variables but computes in float16,
    which TFLite's built-in ops cannot convert and CPUs run slowly: exports are made in float32.
    """
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
            raise ConfigError(f"TFLite conversion ({quantize}) failed: {first_line(e)}") from None


def write_onnx(model, path: str) -> None:
    """Writes ONNX through Keras's own `model.export(format="onnx")` (tf2onnx), atomically.

    The head's standardisation is folded into its Dense layer first (`fold_feature_norm`, as for TFLite): tf2onnx
    turns the layer's constants into graph inputs otherwise, and onnxruntime refuses to run without them.
    """
    from tlkit.engine.predictors import require_onnx
    from tlkit.models.classifier import fold_feature_norm

    require_onnx()
    model = fold_feature_norm(model)
    if not getattr(model, "_called", True):  # a freshly loaded model must have run once for Keras's exporter
        size = int(model.input_shape[1])
        call_model(model, np.zeros((1, size, size, 3), np.float32))
    with rundir.atomic_path(path, suffix=".onnx") as tmp:
        model.export(tmp, format="onnx", verbose=False)


def write_artifact(model, fmt: str, artifact: str, labels: Sequence[str], size: int, quantize: str = "none",
                   int8_input: str = "uint8",
                   representative: Callable[[], Iterator[list[np.ndarray]]] | None = None,
                   tflite_metadata: Callable[[bytes], tuple[bytes, Any]] | None = None) -> Any:
    """Writes `model` (float32 unless `fmt` is `keras`: `as_float32`) as `fmt` to `artifact`, atomically.

    `tflite_metadata` (a `.tflite`'s flatbuffer -> `(flatbuffer with metadata, record)`) runs on a TFLite export
    before it is written; its record is returned (`None` otherwise)."""
    plain = model if fmt == "keras" else as_float32(model)
    record = None
    if fmt == "keras":
        write_keras(model, artifact)
    elif fmt == "savedmodel":
        write_savedmodel(plain, artifact, labels, size)
    elif fmt == "tflite":
        flat = tflite_bytes(plain, size, quantize, int8_input, representative)
        if tflite_metadata is not None:
            flat, record = tflite_metadata(flat)
        with rundir.atomic_path(artifact, suffix=".tflite") as tmp:
            with open(tmp, "wb") as f:
                f.write(flat)
    else:
        write_onnx(plain, artifact)
    return record


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

