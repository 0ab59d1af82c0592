"""tlkit/export.py: every format round-trips, the parity check catches a broken export, signatures work."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys

import numpy as np
import pytest

import tlkit
from tlkit import cli
from tlkit.engine.predictors import call_model, read_image, resize_batch

from tlkit.engine import export_formats, parity


@pytest.fixture(scope="module")
def keras_model(run_dir):
    import keras

    return keras.models.load_model(os.path.join(run_dir, "model.keras"), compile=False)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> str:
    """Real JPEG/PNG files of other sizes than the model's (40x30), including grayscale and RGBA."""
    from conftest import write_image_folder

    return write_image_folder(tmp_path_factory.mktemp("photos") / "imgs", classes=("a", "b"), per_class=4)


def _files(folder: str) -> list[str]:
    return sorted(os.path.join(d, n) for d, _, names in os.walk(folder) for n in names)


def _keras_probs(model, images) -> np.ndarray:
    return np.asarray(call_model(model, resize_batch(images, 32)))


def _info(path: str) -> dict:
    """export.json of an export folder, or the sidecar of an artifact (`m.tflite` -> `m.export.json`)."""
    from tlkit.core.sidecars import sidecar

    with open(sidecar(path, "export.json") if os.path.isfile(path) else os.path.join(path, "export.json"),
              encoding="utf-8") as f:
        return json.load(f)


def test_keras_export_round_trip_and_overwrite(run_dir, keras_model, photos, tmp_path, capsys):
    out = str(tmp_path / "k")
    assert cli.main(["export", run_dir, "--format", "keras", "--output", out]) == 0
    assert sorted(os.listdir(out)) == ["export.json", "labels.txt", "model.keras", "model_card.md"]
    info = _info(out)
    assert info["check"]["passed"] and info["check"]["top1_agreement"] == 1.0
    assert info["check"]["num_images"] == 32 and info["size_bytes"] == os.path.getsize(os.path.join(out, "model.keras"))
    clf = tlkit.load(out)
    assert clf.format == "keras" and clf.class_names == ["circle", "square", "triangle", "cross"]
    imgs = [read_image(f) for f in _files(photos)]
    np.testing.assert_allclose(clf.predict(imgs), _keras_probs(keras_model, imgs), atol=1e-6)
    card = open(os.path.join(out, "model_card.md"), encoding="utf-8").read()
    for needle in ("| base |", "| weights | `none` |", "| data | `shapes` |", "| strategy | `auto`",
                   "| input size | 32x32 RGB |", "| preprocessing |", "| export format | keras |", "| size on disk |",
                   "| val | 4 |"):
        assert needle in card, needle
    capsys.readouterr()
    assert cli.main(["export", run_dir, "--format", "keras", "--output", out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err
    assert cli.main(["export", run_dir, "--format", "keras", "--output", out, "--overwrite"]) == 0


def test_savedmodel_signatures_take_uint8_of_any_size_and_bytes(run_dir, keras_model, photos, tmp_path):
    import tensorflow as tf

    out = str(tmp_path / "sm")
    r = tlkit.export(run_dir, format="savedmodel", output=out, verbose=False)
    assert r.passed and r.check["bytes_signature"]["top1_agreement"] == 1.0 and r.check["max_abs_diff"] < 1e-5
    loaded = tf.saved_model.load(out)  # plain TensorFlow, no tlkit, no Keras objects
    serve, serve_bytes = loaded.signatures["serving_default"], loaded.signatures["serve_bytes"]
    rng = np.random.default_rng(0)
    for shape in ((2, 30, 40, 3), (1, 64, 48, 3)):
        x = rng.integers(0, 256, shape, dtype=np.uint8)
        out_d = serve(images=tf.constant(x))
        probs = out_d["probabilities"].numpy()
        assert probs.shape == (shape[0], 4)
        np.testing.assert_allclose(probs, _keras_probs(keras_model, list(x)), atol=1e-5)
        top = [c.decode() for c in out_d["top_classes"].numpy()[:, 0]]
        assert top == [r.class_names[i] for i in probs.argmax(-1)]
        assert out_d["top_classes"].shape == (shape[0], 4) and np.allclose(out_d["top_scores"][:, 0], probs.max(-1))
    files = [f for f in _files(photos) if f.endswith((".jpg", ".png"))]
    encoded = [open(f, "rb").read() for f in files]  # JPEG and PNG, RGB, grayscale and RGBA
    b = serve_bytes(image_bytes=tf.constant(encoded))["probabilities"].numpy()
    np.testing.assert_allclose(b, _keras_probs(keras_model, [read_image(f) for f in files]), atol=1e-5)
    assert tlkit.load(out).format == "savedmodel" and tlkit.load(out).class_names == r.class_names


def test_tflite_int8_round_trip(run_dir, keras_model, photos, tmp_path, capsys):
    # (float TFLite round-trips in test_predict.py::test_predict_with_exports_matches_the_run)
    out_q = str(tmp_path / "int8" / "m.tflite")
    assert cli.main(["export", run_dir, "--format", "tflite", "--quantize", "int8", "--calibration-steps", "16",
                     "--output", out_q]) == 0
    printed = capsys.readouterr().out
    assert "top-1 agreement" in printed and "max |Δp|" in printed
    info = _info(out_q)
    assert os.path.isfile(os.path.join(os.path.dirname(out_q), "m.export.json"))  # named after m.tflite
    assert info["quantize"] == "int8" and info["int8_input"] == "uint8" and info["calibration_images"] == 16
    assert info["check"]["min_agreement"] == 0.9 and info["check"]["top1_agreement"] >= 0.9
    clf = tlkit.load(out_q)
    assert clf.format == "tflite" and clf.input_dtype == "uint8" and clf.class_names == info["class_names"]
    assert clf.interpreter.get_output_details()[0]["dtype"] == np.uint8  # full integer in and out
    assert info["check"]["tie_tolerance"] == pytest.approx(1 / 256) and info["input"]["quantization"] == (
        "scale 1, zero point 0")  # raw pixels in
    assert os.path.getsize(out_q) < 0.35 * os.path.getsize(os.path.join(run_dir, "model.keras"))
    imgs = [read_image(f) for f in _files(photos)]
    p_q, p_k = clf.predict(imgs), _keras_probs(keras_model, imgs)
    assert np.abs(p_q - p_k).max() < 0.05 and np.allclose(p_q.sum(-1), 1.0, atol=0.05)


def test_parity_check_catches_wrong_preprocessing(run_dir, tmp_path, monkeypatch, capsys):
    import tensorflow as tf

    from tlkit.data.augment import resize_uint8

    def scaled_to_unit(images, size):  # the classic bug: preprocessing applied twice ([0, 1] into a 0..255 model)
        return tf.cast(resize_uint8(images, size), tf.float32) / 255.0

    monkeypatch.setattr(export_formats, "serving_transform", scaled_to_unit)
    out = str(tmp_path / "broken")
    capsys.readouterr()
    assert cli.main(["export", run_dir, "--format", "savedmodel", "--output", out]) == 1
    err = capsys.readouterr().err.strip()
    assert "disagrees with the Keras model" in err and len(err.splitlines()) == 1
    check = _info(out)["check"]
    assert check["passed"] is False and check["max_abs_diff"] > 1e-3


def test_compare_counts_ties_and_flips():
    ref = np.array([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.3, 0.4, 0.3]])
    exp = np.array([[0.6, 0.3, 0.1], [0.49, 0.51, 0.0], [0.5, 0.3, 0.2], [0.35, 0.35, 0.3]])
    c = parity.compare(ref, exp)  # agree; a Keras tie; flipped; a quantized tie read as argmax (class 0): flipped
    assert c["top1_agreement"] == pytest.approx(2 / 4) and c["strict_top1_agreement"] == pytest.approx(1 / 4)
    assert c["max_abs_diff"] == pytest.approx(0.3)


def test_onnx_round_trip_or_missing_extra_message(run_dir, keras_model, photos, tmp_path, capsys):
    try:
        for mod in ("tf2onnx", "onnx", "onnxruntime"):
            importlib.import_module(mod)
    except ImportError:
        assert cli.main(["export", run_dir, "--format", "onnx", "--output", str(tmp_path / "o")]) == 2
        assert "pip install 'tlkit[onnx]'" in capsys.readouterr().err
        return
    out = str(tmp_path / "o")
    r = tlkit.export(run_dir, format="onnx", output=out, verbose=False)
    assert r.passed and r.check["top1_agreement"] == 1.0 and r.check["max_abs_diff"] < 1e-4
    clf = tlkit.load(os.path.join(out, "model.onnx"))
    imgs = [read_image(f) for f in _files(photos)]
    np.testing.assert_allclose(clf.predict(imgs), _keras_probs(keras_model, imgs), atol=1e-4)


def test_onnx_without_the_extra_says_what_to_install(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # makes `import tf2onnx` raise ImportError
    out = str(tmp_path / "o")
    assert cli.main(["export", run_dir, "--format", "onnx", "--output", out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'tlkit[onnx]'" in err and "tf2onnx" in err
    assert not os.path.exists(out)


def test_user_errors_are_one_line_exit_2(run_dir, tmp_path, capsys):
    from conftest import write_image_folder

    two = write_image_folder(tmp_path / "two", classes=("a", "b"), per_class=3)
    cases = [
        (["--format", "tflite", "--quantize", "int8", "--image-dir", two], "4 classes"),
        (["--format", "onnx", "--quantize", "int8"], "tflite only"),
        (["--format", "tflite", "--output", str(tmp_path / "m.onnx")], "--format is tflite"),
        (["--format", "keras", "--check-images", str(tmp_path / "nope")], "does not exist"),
    ]
    for extra, needle in cases:
        capsys.readouterr()
        assert cli.main(["export", run_dir, "--output", str(tmp_path / "e")] + extra if "--output" not in extra
                        else ["export", run_dir] + extra) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
    # labels.txt that does not match the model's outputs
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.keras").write_bytes(open(os.path.join(run_dir, "model.keras"), "rb").read())
    (bad / "labels.txt").write_text("a\nb\nc\n")
    capsys.readouterr()
    assert cli.main(["export", str(bad / "model.keras"), "--format", "keras"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "3 classes" in err and "4" in err


def test_mixed_precision_model_is_exported_in_float32(tiny_backbone, tmp_path):
    import keras

    from tlkit.models.backbones import get_backbone
    from tlkit.core.config import ModelConfig
    from tlkit.models.classifier import build_classifier
    from tlkit.engine.predictors import TFLitePredictor

    keras.mixed_precision.set_global_policy("mixed_float16")  # as `--precision auto` trains on a GPU
    try:
        mixed = build_classifier(get_backbone(tiny_backbone), 3, ModelConfig(weights="none"), 32)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert export_formats.is_mixed_precision(mixed)
    plain = export_formats.as_float32(mixed)
    assert not export_formats.is_mixed_precision(plain) and plain.get_layer("logits").compute_dtype == "float32"
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(call_model(plain, x)), np.asarray(call_model(mixed, x)), atol=5e-3)
    path = tmp_path / "m.tflite"
    path.write_bytes(export_formats.tflite_bytes(plain, 32))  # float16 MatMuls are no TFLite built-ins: needs float32
    np.testing.assert_allclose(TFLitePredictor(str(path), None).predict_resized(x), np.asarray(call_model(plain, x)),
                               atol=1e-5)


def test_tflite_runs_on_litert_where_installed_else_tf_lite(run_dir, keras_model, photos, tmp_path, monkeypatch):
    import warnings

    from tlkit.engine.predictors import tflite_interpreter

    out = str(tmp_path / "f" / "m.tflite")
    assert cli.main(["export", run_dir, "--format", "tflite", "--output", out]) == 0
    imgs = [read_image(f) for f in _files(photos)]
    litert = importlib.util.find_spec("ai_edge_litert") is not None
    clf = tlkit.load(out)
    assert clf.runtime.startswith("LiteRT" if litert else "tf.lite")
    assert _info(out)["check"]["runtime"] == clf.runtime  # export.json says which ran
    if litert:
        from ai_edge_litert.interpreter import Interpreter

        assert isinstance(clf.interpreter, Interpreter)
    p_first = clf.predict(imgs)
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)  # without the extra: tf.lite, same answers
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    assert tflite_interpreter()[1].startswith("tf.lite")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback's deprecation warning is silenced
        fallback = tlkit.load(out)
    assert fallback.runtime.startswith("tf.lite")
    np.testing.assert_allclose(fallback.predict(imgs), p_first, atol=1e-6)
    np.testing.assert_allclose(p_first, _keras_probs(keras_model, imgs), atol=1e-4)
