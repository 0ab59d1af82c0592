"""TFLite metadata for on-device runtimes: labels, input normalisation, name and description.

MediaPipe Tasks' `ImageClassifier` (and the TFLite Task Library before it) reads what a `.tflite` needs from
the metadata inside the file: a float input must say how pixels are normalised (tlkit models take RGB 0..255,
so mean 0 and std 1), and the class names travel as a packed `labels.txt`. `add_metadata` writes both with the
metadata writers that the `mediapipe` wheel ships (`mediapipe.tasks.python.metadata.metadata_writers`, the
optional extra `mediapipe`); without that wheel the export stays as it was, and says so.

The `mediapipe` wheels 1.2.2 and 1.2.3 ship `metadata.py` but not the compiled module it imports for one number,
the minimum metadata parser version (`mediapipe.tasks.cc.metadata.python._pywrap_metadata_version`).
`_install_version_shim` provides it in Python, with the rules of `metadata_version.cc` for the fields a
writer can set; an image classifier's metadata needs parser 1.0.0.

`labels_from_tflite` reads the packed labels back without mediapipe (the associated files of a `.tflite` are a
zip archive appended to the flatbuffer), so `tlkit.load` names the classes of a bare `.tflite`.

Example:
    flat = add_metadata(flat, ["cat", "dog"], name="pets", description="tlkit fine-tuned EfficientNet")
"""
from __future__ import annotations

import io
import sys
import types
import zipfile
from typing import Any, Callable, Sequence

MEDIAPIPE_HINT = "pip install 'tlkit[mediapipe]'"
LABELS_FILE = "labels.txt"


def _version_of(metadata_buf: bytes) -> str:
    """The minimum metadata parser version able to read `metadata_buf` (rules of mediapipe's metadata_version.cc)."""
    from mediapipe.tasks.metadata import metadata_schema_py_generated as fb

    md = fb.ModelMetadataT.InitFromObj(fb.ModelMetadata.GetRootAsModelMetadata(bytearray(metadata_buf), 0))
    need = [(1, 0, 0)]

    def files(items):
        for f in items or []:
            if f.type == fb.AssociatedFileType.VOCABULARY:
                need.append((1, 0, 1))
            if f.type == getattr(fb.AssociatedFileType, "SCANN_INDEX_FILE", -1):
                need.append((1, 4, 0))
            if getattr(f, "version", None):
                need.append((1, 4, 1))

    def units(items):
        for u in items or []:
            t = u.optionsType
            if t in (fb.ProcessUnitOptions.BertTokenizerOptions, fb.ProcessUnitOptions.SentencePieceTokenizerOptions):
                need.append((1, 1, 0))
            if t == fb.ProcessUnitOptions.RegexTokenizerOptions:
                need.append((1, 2, 1))

    def tensors(items):
        for t in items or []:
            files(t.associatedFiles)
            units(t.processUnits)
            if t.content is not None and t.content.contentPropertiesType == getattr(
                    fb.ContentProperties, "AudioProperties", -1):
                need.append((1, 3, 0))

    files(md.associatedFiles)
    for sg in md.subgraphMetadata or []:
        tensors(sg.inputTensorMetadata)
        tensors(sg.outputTensorMetadata)
        files(sg.associatedFiles)
        if sg.inputProcessUnits or sg.outputProcessUnits:
            need.append((1, 1, 0))
            units(sg.inputProcessUnits)
            units(sg.outputProcessUnits)
        if sg.inputTensorGroups or sg.outputTensorGroups:
            need.append((1, 2, 0))
        if getattr(sg, "customMetadata", None):
            need.append((1, 5, 0))
    return ".".join(map(str, max(need)))


def _install_version_shim() -> None:
    """Provides `_pywrap_metadata_version` where the mediapipe wheel lacks it (1.2.2, 1.2.3)."""
    name = "mediapipe.tasks.cc.metadata.python._pywrap_metadata_version"
    try:
        __import__(name)
        return
    except ImportError:
        pass
    module = types.ModuleType(name)
    module.GetMinimumMetadataParserVersion = _version_of  # type: ignore[attr-defined]
    parts = name.split(".")
    for i in range(3, len(parts)):  # mediapipe.tasks.cc, ...cc.metadata, ...metadata.python: empty packages
        pkg = ".".join(parts[:i])
        if pkg not in sys.modules:
            sys.modules[pkg] = types.ModuleType(pkg)
            sys.modules[pkg].__path__ = []  # type: ignore[attr-defined]
    sys.modules[name] = module


def writers_available() -> bool:
    """Whether mediapipe's metadata writers can be imported (with the version shim where needed)."""
    try:
        import mediapipe  # noqa: F401
    except ImportError:
        return False
    _install_version_shim()
    try:
        from mediapipe.tasks.python.metadata.metadata_writers import image_classifier  # noqa: F401
    except ImportError:
        return False
    return True


def add_metadata(flat: bytes, class_names: Sequence[str], name: str, description: str,
                 float_input: bool = True) -> bytes:
    """Returns the `.tflite` flatbuffer with image-classifier metadata written in.

    Args:
        flat: The converted model (input [1, S, S, 3], output [1, C] probabilities).
        class_names: Class names, index = output column (packed as `labels.txt`).
        name: The model's name in the metadata.
        description: A sentence on what it is (base, data, quantization).
        float_input: Whether the input is float32 RGB 0..255: normalisation mean 0, std 1. A uint8 input needs
            none; the writer records the same (identity) normalisation. Defaults to `True`.

    Returns:
        The flatbuffer with metadata and the packed labels file.

    Raises:
        ImportError: mediapipe (the optional extra `mediapipe`) is not installed.
    """
    if not writers_available():
        raise ImportError(f"TFLite metadata needs mediapipe's metadata writers: {MEDIAPIPE_HINT}.")
    from mediapipe.tasks.python.metadata.metadata_writers import metadata_writer

    del float_input  # 0..255 in both cases: (x - 0) / 1, which a uint8 input also reads as its raw value
    writer = metadata_writer.MetadataWriter.create(bytearray(flat))
    writer.add_general_info(name, description)
    writer.add_image_input(norm_mean=[0.0], norm_std=[1.0],
                           description="RGB image, 0..255 (float32) or raw uint8 pixels, resized to the input size.")
    writer.add_classification_output(metadata_writer.Labels().add(list(class_names)),
                                     description="Probabilities of the classes (softmax).")
    try:
        out, _ = writer.populate()
    finally:  # now, not in the writer's __del__ (which fails at interpreter exit)
        writer._temp_folder.cleanup()
        writer.__class__ = _NoDel
    return bytes(out)


class _NoDel:
    """What a used `MetadataWriter` becomes: its temporary folder is gone, its `__del__` must not run."""


def write_for_export(flat: bytes, class_names: Sequence[str], source: str, run_cfg: Any, quantize: str,
                     int8_input: str, say: Callable[..., None] = print) -> tuple[bytes, dict[str, Any]]:
    """`tlkit export`'s hook: the flatbuffer with metadata where mediapipe is installed, and what was written.

    Args:
        flat: The converted `.tflite`.
        class_names: Class names, index = output column.
        source: The run folder or `.keras` file exported (names the model).
        run_cfg: The run's `FinetuneConfig`, or `None` (a bare `.keras`).
        quantize: `none`, `float16`, `dynamic` or `int8`.
        int8_input: The input type of an `int8` export.
        say: Prints a progress line. Defaults to `print`.

    Returns:
        `(flatbuffer, info)`; `info` goes into export.json's `metadata`.
    """
    import os

    name = os.path.splitext(os.path.basename(os.path.normpath(source)))[0] or "tlkit-classifier"
    base = getattr(getattr(run_cfg, "model", None), "base", None)
    base = os.path.basename(os.path.normpath(base)) if base else None  # a .keras path: its file name
    data = getattr(run_cfg, "data", None)
    data_name = getattr(data, "dataset", None) or getattr(data, "image_dir", None)
    kind = "Multi-label image classifier (a sigmoid per class)" if getattr(data, "multi_label", None) else \
        "Image classifier"
    description = (f"{kind} of {len(class_names)} classes trained with tlkit"
                   f"{f' from {base}' if base else ''}{f' on {data_name}' if data_name else ''}; "
                   f"TFLite {'float32' if quantize == 'none' else quantize}"
                   f"{f' ({int8_input} input)' if quantize == 'int8' else ''}. Input RGB 0..255.")
    float_input = not (quantize == "int8" and int8_input != "float32")
    info: dict[str, Any] = {"written": False, "name": name, "description": description}
    if not writers_available():
        say(f"[tlkit] note: no TFLite metadata written (labels, normalisation): mediapipe is not installed; "
            f"MediaPipe Tasks needs it: {MEDIAPIPE_HINT}.")
        info["why_not"] = f"mediapipe not installed ({MEDIAPIPE_HINT})"
        return flat, info
    if quantize == "int8" and int8_input == "int8":  # MediaPipe's image input is uint8 or float32
        info["note"] = "int8 input: MediaPipe Tasks take uint8 or float32 image inputs only"
    out = add_metadata(flat, class_names, name, description, float_input)
    info.update(written=True, labels_file=LABELS_FILE, norm_mean=[0.0], norm_std=[1.0])
    return out, info


def labels_from_tflite(path: str) -> list[str] | None:
    """The class names packed in a `.tflite`'s metadata (its appended zip of associated files), or `None`."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            if LABELS_FILE not in z.namelist():
                return None
            text = z.read(LABELS_FILE).decode("utf-8")
    except (OSError, zipfile.BadZipFile, UnicodeDecodeError):
        return None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    return names or None


def metadata_json(path: str) -> str | None:
    """The metadata of a `.tflite` as JSON text (mediapipe's displayer), or `None` without metadata/mediapipe."""
    if not writers_available():
        return None
    from mediapipe.tasks.python.metadata import metadata

    try:
        return metadata.MetadataDisplayer.with_model_file(path).get_metadata_json()
    except ValueError:
        return None


__all__ = ["add_metadata", "labels_from_tflite", "metadata_json", "writers_available", "MEDIAPIPE_HINT"]
