"""tlkit/engine/gradcam.py: Grad-CAM heat maps (keras.io's recipe), `evaluate`'s worst errors drawn with them,
`predict --explain DIR`, and the refusal for exports without gradients."""
from __future__ import annotations

import csv
import os

import numpy as np
import pytest

import tlkit
from tlkit import cli
from tlkit.engine.gradcam import GradCam, GradCamError, overlay


def _two_colour_classifier():
    """A tlkit-shaped classifier whose answer is known: class 0 = red evidence, class 1 = green, GAP + Dense."""
    import keras

    inp = keras.Input((16, 16, 3), name="image")
    b_in = keras.Input((16, 16, 3))
    b_out = keras.layers.AveragePooling2D(2, name="pool")(b_in)  # [8, 8, 3]: the channels are the colours
    base = keras.Model(b_in, b_out, name="backbone")
    x = base(inp, training=False)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    logits = keras.layers.Dense(2, name="logits")
    y = keras.layers.Activation("softmax", name="probs")(logits(x))
    model = keras.Model(inp, y)
    logits.set_weights([np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], np.float32), np.zeros(2, np.float32)])
    return model


def test_heatmap_is_the_class_activation_map_of_the_explained_class():
    model = _two_colour_classifier()
    img = np.zeros((1, 16, 16, 3), np.float32)
    img[0, :, :8, 0] = 200.0  # left half red
    img[0, :, 8:, 1] = 100.0  # right half green
    cam = GradCam(model)
    assert cam.layer == "backbone"
    heat, cls = cam.heatmaps(img)
    assert cls.tolist() == [0] and heat.shape == (1, 8, 8)  # red wins (more evidence); the map's resolution
    np.testing.assert_allclose(heat[0, :, :4], 1.0, atol=1e-6)
    np.testing.assert_allclose(heat[0, :, 4:], 0.0, atol=1e-6)
    heat1, cls1 = cam.heatmaps(img, classes=[1])  # the other class looks at the other half
    assert cls1.tolist() == [1]
    np.testing.assert_allclose(heat1[0, :, :4], 0.0, atol=1e-6)
    np.testing.assert_allclose(heat1[0, :, 4:], 1.0, atol=1e-6)
    over = overlay(np.zeros((30, 40, 3), np.uint8), heat[0])
    assert over.shape == (30, 40, 3) and over.dtype == np.uint8
    assert over[:, :10, 0].mean() > over[:, 30:, 0].mean()  # jet: hot (red) where the map is 1, blue where 0
    assert over[:, 30:, 2].mean() > over[:, 30:, 0].mean()


def test_a_backbone_that_pools_itself_is_explained_at_its_last_map():
    """A user's .keras backbone ending in its own global pooling (like the benchmarks' glyph CNN)."""
    import keras

    b_in = keras.Input((16, 16, 3))
    fmap = keras.layers.AveragePooling2D(2, name="last_map")(b_in)
    base = keras.Model(b_in, keras.layers.GlobalAveragePooling2D(name="own_pool")(fmap), name="backbone")
    inp = keras.Input((16, 16, 3))
    logits = keras.layers.Dense(2, name="logits")
    model = keras.Model(inp, keras.layers.Activation("softmax")(logits(base(inp, training=False))))
    logits.set_weights([np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], np.float32), np.zeros(2, np.float32)])
    img = np.zeros((1, 16, 16, 3), np.float32)
    img[0, :8, :, 1] = 90.0  # top half green: class 1
    cam = GradCam(model)
    heat, cls = cam.heatmaps(img)
    assert cam.layer == "last_map" and cls.tolist() == [1] and heat.shape == (1, 8, 8)
    np.testing.assert_allclose(heat[0, :4], 1.0, atol=1e-6)
    np.testing.assert_allclose(heat[0, 4:], 0.0, atol=1e-6)


def test_a_model_without_a_feature_map_is_refused():
    import keras

    inp = keras.Input((8,))
    base = keras.Sequential([keras.layers.Dense(4)], name="backbone")
    y = keras.layers.Activation("softmax")(keras.layers.Dense(2, name="logits")(base(inp)))
    with pytest.raises(GradCamError, match="spatial feature map"):
        GradCam(keras.Model(inp, y))


@pytest.fixture(scope="module")
def run(tiny_backbone, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("gradcam") / "run")
    assert cli.main(["finetune", "--base", tiny_backbone, "--weights", "none", "--dataset", "shapes", "--image-size",
                     "32", "--epochs", "1", "--head-steps", "0", "--shapes-per-class", "8", "--augment", "none",
                     "--output-dir", out]) == 0
    return out


def test_evaluate_draws_the_worst_errors_with_heat_maps(run):
    import json

    from PIL import Image

    m = tlkit.evaluate(run, tlkit.DataConfig(dataset="shapes", shapes_per_class=8), split="val", num_misclassified=4)
    assert m["gradcam"]["layer"] == "backbone" and m["gradcam"]["file"] == "misclassified_gradcam.png"
    path = os.path.join(m["output_dir"], "misclassified_gradcam.png")
    plain = np.asarray(Image.open(os.path.join(m["output_dir"], "misclassified.png")).convert("RGB"), np.int32)
    drawn = np.asarray(Image.open(path).convert("RGB"), np.int32)
    assert drawn.shape == plain.shape and m["misclassified"]  # the same grid, the images under heat maps
    assert np.abs(drawn - plain).mean() > 1.0
    with open(os.path.join(m["output_dir"], "metrics.json"), encoding="utf-8") as f:
        assert json.load(f)["gradcam"]["layer"] == "backbone"


def test_predict_explain_writes_overlays_at_each_images_size(run, tmp_path, capsys):
    from PIL import Image

    from conftest import write_image_folder

    photos = write_image_folder(tmp_path / "photos", classes=("a",), per_class=3, size=(40, 30))
    out = tmp_path / "cams"
    assert cli.main(["predict", run, photos, "--explain", str(out)]) == 0
    assert "3 Grad-CAM overlays" in capsys.readouterr().out
    with open(out / "gradcam.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and {r["class"] for r in rows} <= {"circle", "square", "triangle", "cross"}
    r = tlkit.predict(run, photos)
    assert [row["class"] for row in rows] == [p.top[0][0] for p in r.predictions]
    for row in rows:
        img = Image.open(out / row["overlay"])
        assert img.size == (40, 30) and img.format == "PNG"


@pytest.mark.parametrize("name", ["m.tflite", "m.onnx"])
def test_explain_with_an_export_is_one_line_exit_2(run, tmp_path, capsys, name):
    model = tmp_path / name
    model.write_bytes(b"not loaded: refused before")
    img = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    capsys.readouterr()
    assert cli.main(["predict", str(model), str(img), "--explain", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--explain needs a Keras model" in err, err
    assert not (tmp_path / "o").exists()
