"""`load`: one way to run any tlkit model or export on images, whatever its format (`tlkit predict` and the
parity checks of `tlkit export` both use it).

`load(path)` opens a run folder, a `.keras` file, a SavedModel folder written by `tlkit export`, a
`.tflite` file or an `.onnx` file (or an export folder holding one of them) and returns a `Predictor`
with `.predict(images)` and `.class_names`. Every format sees the same input: images are decoded as the
training pipeline decodes them (grayscale and RGBA become RGB) and resized with the pipeline's own resize
(`tlkit.data.augment.resize_uint8`), so a prediction here is the prediction the model was trained for.
The SavedModel does that resize itself, inside its serving signature.

Example:
    clf = tlkit.load("runs/resnet50-shapes-1/export/tflite-int8")
    probs = clf.predict(["cat.jpg", "dog.png"])
    clf.class_names[probs[0].argmax()]
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, Sequence

import numpy as np

from tlkit.core.errors import ConfigError, DataError, first_line
from tlkit.models.classifier import is_multi_label, load_model_and_labels, read_labels

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
FORMAT_FILES = {"keras": "model.keras", "tflite": "model.tflite", "onnx": "model.onnx"}
ONNX_EXTRA_HINT = "pip install 'tlkit[onnx]' (tf2onnx, onnx, onnxruntime)"


# ---------------------------------------------------------------- images

def read_image(path: str) -> np.ndarray:
    """Decodes an image file into uint8 RGB [H, W, 3] exactly as the training pipeline does.

    Args:
        path: A JPEG, PNG, BMP or GIF file (first frame).

    Returns:
        A uint8 array [H, W, 3].

    Raises:
        DataError: the file is missing or cannot be decoded (the message names the file).

    Example:
        read_image("cat.jpg").shape
        # -> (375, 500, 3)
    """
    import tensorflow as tf

    from tlkit.data.pipeline import decode

    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file.")
    try:
        return decode(tf.constant(path), "path").numpy()
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, tf.errors.UnknownError) as e:
        text = (e.message or str(e)).strip()
        msg = re.sub(r"\{\{.*?\}\}\s*", "", text.splitlines()[0] if text else type(e).__name__)
        raise DataError(f"{path}: cannot decode image ({msg.split('. ')[0].rstrip('.')[:160]}).") from None


def resize_batch(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Resizes uint8 RGB images of any sizes to float32 [N, size, size, 3] in 0..255 (the pipeline's resize)."""
    from tlkit.data.augment import resize_uint8

    out = np.zeros((len(images), size, size, 3), np.float32)
    for i, img in enumerate(images):
        out[i] = resize_uint8(img, size).numpy()
    return out


def as_uint8_images(images: Any) -> list[np.ndarray]:
    """Normalises the inputs of `Predictor.predict` to a list of uint8 RGB [H, W, 3] arrays.

    Accepts a path, a list of paths, one array [H, W, 3], a batch [N, H, W, 3], or a list of arrays of
    any sizes; float arrays are taken as 0..255 and rounded like the pipeline; grayscale [H, W] or
    [H, W, 1] and RGBA become RGB.
    """
    if isinstance(images, (str, os.PathLike)):
        return [read_image(os.fspath(images))]
    if isinstance(images, np.ndarray) or hasattr(images, "numpy"):
        arr = np.asarray(images)
        if arr.ndim == 4:
            return [_to_uint8(a) for a in arr]
        if arr.ndim in (2, 3):
            return [_to_uint8(arr)]
        raise ConfigError(f"Images must be [H, W, 3] or [N, H, W, 3], got an array of shape {arr.shape}.")
    out = []
    for item in images:
        if isinstance(item, (str, os.PathLike)):
            out.append(read_image(os.fspath(item)))
        else:
            out.append(_to_uint8(np.asarray(item)))
    return out


def _to_uint8(a: np.ndarray) -> np.ndarray:
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ConfigError(f"An image must be [H, W, 3] (or grayscale/RGBA), got shape {a.shape}.")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    a = a[..., :3]
    if a.dtype != np.uint8:
        a = np.clip(np.round(a.astype(np.float32)), 0, 255).astype(np.uint8)
    return a


# ---------------------------------------------------------------- predictors

class Predictor:
    """A loaded model of any format: `.predict(images)` -> probabilities, `.class_names`.

    Attributes:
        path: What was loaded.
        format: `keras`, `savedmodel`, `tflite` or `onnx`.
        class_names: Class names, index = column of the probabilities.
        image_size: The model's square input side in pixels (`None` when unknown).
    """

    format = "?"

    def __init__(self, path: str, class_names: list[str] | None, image_size: int | None, num_classes: int):
        if class_names is not None and len(class_names) != num_classes:
            raise DataError(f"{path}: labels list {len(class_names)} classes but the model predicts {num_classes}.")
        self.path = path
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.image_size = image_size
        self.num_classes = num_classes

    tta_crop_side: float | None = None  # side of the TTA crops: `load` reads the run's augmentation
    tta_flip: bool = True  # flipped TTA views; `load` turns them off for a run trained without flips
    # Top probability below which `predict_classes` answers "unknown" (`engine.ood`; `load` reads the run's ood.json).
    reject_below: float | None = None
    # A multi-label model's per-class thresholds (`load` reads its thresholds.json); `None` for a single-label one.
    thresholds: np.ndarray | None = None

    @property
    def multi_label(self) -> bool:
        """Whether the model is multi-label (a sigmoid per class, a threshold per class)."""
        return self.thresholds is not None

    def predict_classes(self, images: Any, batch_size: int = 32, tta: int = 0) -> list:
        """The predicted class name of each image, or `"unknown"` where its top probability is below
        `reject_below` (stored by `tlkit evaluate --ood`; `None`: never unknown). For a multi-label model, the
        list of the classes at or above their thresholds, most probable first.

        Example:
            tlkit.load("runs/x").predict_classes(["cat.jpg", "noise.png"])
            # -> ['cat', 'unknown']
        """
        probs = self.predict(images, batch_size, tta)
        if self.multi_label:
            from tlkit.engine.metrics_multilabel import labels_above

            return [[c for c, _ in found] for found in labels_above(probs, self.thresholds, self.class_names)]
        from tlkit.core.rejection import label_of

        return label_of(probs, self.class_names, self.reject_below)

    def predict(self, images: Any, batch_size: int = 32, tta: int = 0) -> np.ndarray:
        """Class probabilities of images.

        Args:
            images: A path, a list of paths, a uint8/float array [H, W, 3] or [N, H, W, 3] in 0..255, or a
                list of arrays of any sizes.
            batch_size: Images per call of the model. Defaults to `32`.
            tta: Average over each image and its first `tta` deterministic views (`engine.tta`). Defaults to `0`.

        Returns:
            float32 [N, num_classes].

        Example:
            tlkit.load("runs/x").predict(np.zeros((2, 64, 48, 3), np.uint8)).shape
            # -> (2, 4)
        """
        imgs = as_uint8_images(images)
        if not imgs:
            return np.zeros((0, self.num_classes), np.float32)
        parts = [self.predict_uint8(imgs[i:i + batch_size], tta) for i in range(0, len(imgs), batch_size)]
        return np.concatenate(parts).astype(np.float32)

    def predict_uint8(self, images: list[np.ndarray], tta: int = 0) -> np.ndarray:
        """Probabilities of a list of uint8 RGB images of any sizes (one batch), averaged over `tta` extra views."""
        x = resize_batch(images, self.image_size)
        if not tta:
            return self.predict_resized(x)
        from tlkit.engine import tta as tta_views

        side = self.tta_crop_side or tta_views.DEFAULT_CROP_SIDE
        forward = tta_views.averaged(lambda v: self.predict_resized(np.asarray(v)), tta, side, self.tta_flip)
        return np.asarray(forward(x))

    def predict_resized(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"<tlkit {self.format} predictor {self.path!r}: {self.num_classes} classes, "
                f"{self.image_size}px>")


def call_model(model, x):
    """`model(x, training=False)`, passing `x` in the structure the model was built with (a one-input list for
    models saved by `models.classifier.save_model`), so Keras does not warn about the structure on every call."""
    struct = getattr(model, "_inputs_struct", None)
    return model([x] if isinstance(struct, list) and len(struct) == 1 else x, training=False)


class KerasPredictor(Predictor):
    """A `.keras` model or run folder."""

    format = "keras"

    def __init__(self, path: str, model, class_names: list[str] | None):
        import tensorflow as tf

        super().__init__(path, class_names, int(model.input_shape[1]), int(model.output_shape[-1]))
        self.model = model
        self._fn = tf.function(lambda x: call_model(model, x), reduce_retracing=True)

    def predict_resized(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self._fn(x))


class SavedModelPredictor(Predictor):
    """A SavedModel from `tlkit export --format savedmodel`: its `serving_default` signature resizes."""

    format = "savedmodel"

    def __init__(self, path: str, class_names: list[str] | None, image_size: int | None):
        import tensorflow as tf

        try:
            self.loaded = tf.saved_model.load(path)
        except Exception as e:
            raise ConfigError(f"Could not load SavedModel {path!r}: {first_line(e, 200)}") from None
        sigs = self.loaded.signatures
        if "serving_default" not in sigs:
            raise ConfigError(f"SavedModel {path!r} has no serving_default signature (signatures: {list(sigs)}).")
        self.serving = sigs["serving_default"]
        self.serve_bytes = sigs.get("serve_bytes")
        out = self.serving.structured_outputs
        num = int(out["probabilities"].shape[-1]) if "probabilities" in out else len(class_names or [])
        super().__init__(path, class_names, image_size, num)

    def predict_uint8(self, images: list[np.ndarray], tta: int = 0) -> np.ndarray:
        """Runs the serving signature on the raw images (grouped by size: a batch must share one)."""
        if tta:  # the views of the images resized to the model's input, as uint8 (what the signature takes)
            if not self.image_size:
                raise ConfigError(f"--tta needs the input size of {self.path!r}, which its export.json does not give.")
            return super().predict_uint8(images, tta)
        out = np.zeros((len(images), self.num_classes), np.float32)
        groups: dict[tuple, list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(img.shape, []).append(i)
        for idx in groups.values():
            batch = np.stack([images[i] for i in idx])
            out[idx] = self.serving(images=batch)["probabilities"].numpy()
        return out

    def predict_resized(self, x: np.ndarray) -> np.ndarray:
        """The serving signature on images already at the model's size (rounded to uint8, as it takes them)."""
        return self.serving(images=np.clip(np.round(x), 0, 255).astype(np.uint8))["probabilities"].numpy()

    def predict_bytes(self, encoded: Sequence[bytes]) -> np.ndarray:
        """Runs the `serve_bytes` signature on encoded JPEG/PNG files' contents."""
        import tensorflow as tf

        if self.serve_bytes is None:
            raise ConfigError(f"SavedModel {self.path!r} has no serve_bytes signature.")
        return self.serve_bytes(image_bytes=tf.constant(list(encoded), tf.string))["probabilities"].numpy()


def tflite_interpreter() -> tuple[Any, str]:
    """The TFLite interpreter class to run `.tflite` files with, and a description of that runtime.

    LiteRT (`ai_edge_litert`, the optional extra `litert`) where it is installed: TensorFlow deprecates
    `tf.lite.Interpreter` in its favour. Otherwise `tf.lite.Interpreter`, the fallback, with its deprecation
    warning silenced (the user has nothing to act on). The conversion stays `tf.lite.TFLiteConverter`.

    Example:
        cls, runtime = tflite_interpreter()
        runtime
        # -> 'LiteRT (ai-edge-litert 2.3.0)'
    """
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = None
    if Interpreter is not None:
        import importlib.metadata as md

        try:
            version = md.version("ai-edge-litert")
        except md.PackageNotFoundError:
            version = "?"
        return Interpreter, f"LiteRT (ai-edge-litert {version})"
    import warnings

    import tensorflow as tf

    def fallback(*args, **kwargs):
        with warnings.catch_warnings():  # TF's interpreter announces its move to ai_edge_litert
            warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
            return tf.lite.Interpreter(*args, **kwargs)

    return fallback, f"tf.lite (TensorFlow {tf.__version__}; pip install 'tlkit[litert]' for LiteRT)"


class TFLitePredictor(Predictor):
    """A `.tflite` file; quantized inputs and outputs are (de)quantized with the file's own parameters.

    Run with LiteRT where it is installed, else with `tf.lite` (`tflite_interpreter`); `runtime` says which.
    """

    format = "tflite"

    def __init__(self, path: str, class_names: list[str] | None):
        try:
            interpreter_cls, self.runtime = tflite_interpreter()
            self.interpreter = interpreter_cls(model_path=path)
            self.interpreter.allocate_tensors()
        except Exception as e:
            raise ConfigError(f"Could not load TFLite model {path!r}: {first_line(e, 200)}") from None
        self.inp = self.interpreter.get_input_details()[0]
        self.out = self.interpreter.get_output_details()[0]
        self._batch = int(self.inp["shape"][0])
        super().__init__(path, class_names, int(self.inp["shape"][1]), int(self.out["shape"][-1]))

    @property
    def input_dtype(self) -> str:
        return np.dtype(self.inp["dtype"]).name

    def predict_resized(self, x: np.ndarray) -> np.ndarray:
        it = self.interpreter
        if x.shape[0] != self._batch:
            it.resize_tensor_input(self.inp["index"], [x.shape[0], *self.inp["shape"][1:]])
            it.allocate_tensors()
            self.inp = it.get_input_details()[0]
            self.out = it.get_output_details()[0]
            self._batch = x.shape[0]
        dtype = self.inp["dtype"]
        if np.issubdtype(dtype, np.integer):
            scale, zero = self.inp["quantization"]
            info = np.iinfo(dtype)
            x = np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)
        it.set_tensor(self.inp["index"], x.astype(dtype, copy=False))
        it.invoke()
        y = it.get_tensor(self.out["index"])
        if np.issubdtype(y.dtype, np.integer):
            scale, zero = self.out["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return y.astype(np.float32)


class OnnxPredictor(Predictor):
    """An `.onnx` file, run with onnxruntime (the optional extra `onnx`)."""

    format = "onnx"

    def __init__(self, path: str, class_names: list[str] | None):
        ort = require_onnx(("onnxruntime",))["onnxruntime"]
        try:
            self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ConfigError(f"Could not load ONNX model {path!r}: {first_line(e, 200)}") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        out_shape = self.session.get_outputs()[0].shape
        super().__init__(path, class_names, int(inp.shape[1]), int(out_shape[-1]))

    def predict_resized(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input_name: x.astype(np.float32)})[0])


def require_onnx(modules: Iterable[str] = ("tf2onnx", "onnx", "onnxruntime")) -> dict[str, Any]:
    """Imports the ONNX extra's modules, or raises one `ConfigError` line saying what to install."""
    import importlib

    out, missing = {}, []
    for name in modules:
        try:
            out[name] = importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(f"ONNX needs the optional extra 'onnx' ({', '.join(missing)} not installed): "
                          f"{ONNX_EXTRA_HINT}.")
    return out


def _read_labels(path: str) -> list[str] | None:
    return read_labels(path) if os.path.isfile(path) else None


def _read_export_info(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "export.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def load(path: str) -> Predictor:
    """Loads a run folder, `.keras`, SavedModel folder, `.tflite` or `.onnx` file (or an export folder).

    Class names come from the model's sidecar `NAME.labels.txt` or `labels.txt` beside it (inside a SavedModel or
    export folder), else, for a `.tflite`, from the labels packed in its metadata.

    Args:
        path: What to load.

    Returns:
        A `Predictor` with `.predict(images)` and `.class_names`.

    Raises:
        ConfigError: nothing loadable at `path`. DataError: labels and model disagree on the class count.

    Example:
        clf = tlkit.load("runs/resnet50-shapes-1")
        clf.class_names
        # -> ['circle', 'square', 'triangle', 'cross']
    """
    path = os.fspath(path)
    predictor = _load(path)
    from tlkit.engine import tta as tta_views

    predictor.tta_crop_side, predictor.tta_flip = tta_views.run_views(path)
    from tlkit.core.rejection import read_rejection

    predictor.reject_below = read_rejection(path)
    from tlkit.engine import metrics_multilabel as ML

    predictor.thresholds = ML.read_thresholds(path, predictor.class_names)  # thresholds.json: a multi-label model
    if predictor.thresholds is None and isinstance(predictor, KerasPredictor) and is_multi_label(predictor.model):
        predictor.thresholds = ML.thresholds_or_default(None, predictor.class_names)
    return predictor


def _load(path: str) -> Predictor:
    if not os.path.exists(path):
        raise ConfigError(f"No model at {path!r} (expected a run folder, .keras, SavedModel folder, .tflite or .onnx).")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "saved_model.pb")):
            info = _read_export_info(path)
            return SavedModelPredictor(path, _read_labels(os.path.join(path, "labels.txt")), info.get("image_size"))
        for name in ("model.keras", "model.tflite", "model.onnx"):
            if os.path.isfile(os.path.join(path, name)):
                return load(os.path.join(path, name))
        raise ConfigError(f"{path!r} holds no model.keras, model.tflite, model.onnx or saved_model.pb.")
    from tlkit.core.sidecars import find_sidecar

    labels_path = find_sidecar(path, "labels.txt")  # NAME.labels.txt beside NAME.tflite, else labels.txt
    labels = _read_labels(labels_path) if labels_path else None
    low = path.lower()
    if low.endswith(".keras"):
        model, labels, _ = load_model_and_labels(path)
        return KerasPredictor(path, model, labels)
    if low.endswith(".tflite"):
        if labels is None:  # a bare .tflite: the labels packed in its metadata (tlkit export writes them)
            from tlkit.engine.tflite_metadata import labels_from_tflite

            labels = labels_from_tflite(path)
        return TFLitePredictor(path, labels)
    if low.endswith(".onnx"):
        return OnnxPredictor(path, labels)
    raise ConfigError(f"Unknown model file {path!r}: expected .keras, .tflite, .onnx, a SavedModel or a run folder.")


def list_images(inputs: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Expands files and folders (recursively, image extensions only) into image files, in order.

    Returns:
        `(files, missing)` where `missing` lists `(path, "no such file or folder")`.
    """
    files, missing = [], []
    for item in inputs:
        if os.path.isdir(item):
            for dirpath, dirnames, names in os.walk(item):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                files += [os.path.join(dirpath, n) for n in sorted(names)
                          if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
        elif os.path.isfile(item):
            files.append(item)
        else:
            missing.append((item, "no such file or folder"))
    return files, missing
