"""Tests of tlkit/engine/tta.py and `--tta N` of evaluate and predict: the views, TTA equal to the mean of the
per-view predictions (the Python API and the CLI), metrics.json, bad values."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

import keras
import tensorflow as tf

from conftest import write_image_folder
from tlkit import cli
from tlkit.core.config import DataConfig, FinetuneConfig
from tlkit.core.config_io import config_to_dict, dump_yaml
from tlkit.engine import tta


def test_crop_side_follows_the_training_crop_scale():
    assert tta.crop_side("standard") == pytest.approx(math.sqrt((0.35 + 1.0) / 2))
    assert tta.crop_side("light") == pytest.approx(math.sqrt(0.8))
    assert tta.crop_side("none") == tta.crop_side(None) == tta.DEFAULT_CROP_SIDE


def test_views_are_the_flip_and_crops_at_the_given_scale():
    ramp = np.tile(np.arange(16, dtype=np.float32)[None, :, None], (16, 1, 3))[None]  # value = column
    x = np.concatenate([ramp, ramp[:, :, ::-1]])  # two images
    v = tta.views(x, 3, crop_side=0.5).numpy()
    assert v.shape == (4 * 2, 16, 16, 3)
    np.testing.assert_array_equal(v[:2], x)  # view 0: the images
    np.testing.assert_array_equal(v[2:4], x[:, :, ::-1])  # view 1: flipped
    # view 2: the centre half, resized back: columns 3.75 .. 11.25 of a linear ramp (bilinear is exact on it)
    np.testing.assert_allclose(v[4, 0, :, 0], np.linspace(3.75, 11.25, 16), atol=1e-4)
    np.testing.assert_allclose(v[6, 0, :, 0], np.linspace(11.25, 3.75, 16), atol=1e-4)  # view 3: its flip
    with pytest.raises(Exception, match="tta must be a whole number"):
        tta.check_n(12)


def _run_folder(tmp_path, images, augment="light", flip=None):
    """A run folder with a tiny position-sensitive model (Flatten -> Dense): every view changes its output."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inp)
    x = keras.layers.Flatten()(x)
    out = keras.layers.Dense(2, activation="softmax", kernel_initializer=keras.initializers.RandomNormal(0, 0.01))(x)
    run = tmp_path / "run"
    run.mkdir()
    keras.Model(inp, out).save(run / "model.keras")
    (run / "labels.txt").write_text("cat\ndog\n")
    cfg = FinetuneConfig(data=DataConfig(image_dir=images, image_size=32, augment=augment, val_split=0.5, flip=flip))
    (run / "config.yaml").write_text(dump_yaml(config_to_dict(cfg)))
    return str(run)


def _manual_mean(model, x, n, side):
    """The mean of the per-view predictions, each view made here by hand."""
    m = (1 - side) / 2
    boxes = {"center": [m, m, m + side, m + side], "tl": [0, 0, side, side], "tr": [0, 1 - side, side, 1]}

    def crop(b):
        return tf.image.crop_and_resize(x, [b] * len(x), list(range(len(x))), (32, 32)).numpy()

    flip = lambda a: a[:, :, ::-1]  # noqa: E731
    all_views = [x, flip(x), crop(boxes["center"]), flip(crop(boxes["center"])), crop(boxes["tl"]), crop(boxes["tr"])]
    preds = [model.predict(v, verbose=0) for v in all_views[:n + 1]]
    return np.mean(preds, axis=0)


def test_tta_equals_the_mean_of_the_per_view_predictions(tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=4, size=(40, 30))
    run = _run_folder(tmp_path, images)
    model = keras.models.load_model(os.path.join(run, "model.keras"))
    side = math.sqrt(0.8)  # the run trained with augment light: crops of area 0.6-1.0

    # predict: the mean of the N + 1 views' probabilities
    import tlkit
    from tlkit.engine.predictors import list_images, read_image, resize_batch

    files, _ = list_images([images])
    x = resize_batch([read_image(f) for f in files], 32)
    want = _manual_mean(model, x, 5, side)
    result = tlkit.predict(run, [images], top_k=2, tta=5)
    got = np.array([[dict(p.top)[c] for c in ("cat", "dog")] for p in result.predictions])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert result.tta == {"n": 5, "views": ["image", "flip", "center_crop", "center_crop_flip", "top_left_crop",
                                             "top_right_crop"], "crop_side": round(side, 4)}
    assert not np.allclose(want, model.predict(x, verbose=0), atol=1e-3)  # TTA did change the probabilities
    loaded = tlkit.load(run)
    np.testing.assert_allclose(loaded.predict(files, tta=5), want, rtol=1e-4, atol=1e-6)

    # evaluate: its loss is that of the mean of the views' probabilities, and metrics.json says TTA was used
    m = tlkit.evaluate(run, DataConfig(image_dir=images, val_split=0.5), split="val", tta=2)
    from tlkit.data import load_sources, make_dataset

    data = load_sources(DataConfig(image_dir=images, val_split=0.5, image_size=32), 32, 42)
    xs, ys = zip(*[(a.numpy(), b.numpy()) for a, b in make_dataset(data.val, 32, 32, 2)])
    xv, yv = np.concatenate(xs), np.concatenate(ys).argmax(-1)
    p = _manual_mean(model, xv, 2, side)
    assert m["loss"] == pytest.approx(float(-np.mean(np.log(p[np.arange(len(yv)), yv]))), rel=1e-4)
    assert m["tta"]["n"] == 2 and m["tta"]["views"] == ["image", "flip", "center_crop"]
    with open(os.path.join(run, "eval-val", "metrics.json")) as f:
        assert json.load(f)["tta"]["n"] == 2


def test_cli_tta_flags(tmp_path, capsys):
    images = write_image_folder(tmp_path / "images", per_class=4)
    run = _run_folder(tmp_path, images, augment="standard")
    assert cli.main(["evaluate", run, "--split", "val", "--tta", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tta"] == {"n": 1, "views": ["image", "flip"], "crop_side": round(tta.crop_side("standard"), 4)}
    assert cli.main(["predict", run, images, "--tta", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tta"]["n"] == 3
    for verb in (["evaluate", run], ["predict", run, images]):
        assert cli.main(verb + ["--tta", "12"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("tlkit: error: tta must be a whole number of extra views from 0 to 11") and "\n" not in err


def test_a_model_trained_without_flips_gets_no_flipped_view(tmp_path, capsys):
    """A run with `flip: false` (glyphs a flip turns into other glyphs): TTA's views are the crops only, in the
    API, `tlkit.load` and the CLI; more views than the 5 crops is refused in one line."""
    assert tta.run_views(None) == (tta.DEFAULT_CROP_SIDE, True)
    images = write_image_folder(tmp_path / "images", per_class=4, size=(40, 30))
    run = _run_folder(tmp_path, images, augment="light", flip=False)
    assert tta.run_views(run) == (pytest.approx(math.sqrt(0.8)), False)
    import tlkit
    from tlkit.engine.predictors import list_images, read_image, resize_batch

    files, _ = list_images([images])
    x = resize_batch([read_image(f) for f in files], 32)
    model = keras.models.load_model(os.path.join(run, "model.keras"))
    side = math.sqrt(0.8)
    m = (1 - side) / 2
    centre = tf.image.crop_and_resize(x.astype(np.float32), [[m, m, m + side, m + side]] * len(x),
                                      list(range(len(x))), (32, 32)).numpy()
    want = np.mean([model.predict(x, verbose=0), model.predict(centre, verbose=0)], axis=0)
    np.testing.assert_allclose(tlkit.load(run).predict(files, tta=1), want, rtol=1e-4, atol=1e-6)
    assert cli.main(["predict", run, images, "--tta", "5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tta"]["views"] == ["image", *tta.view_names(False)]
    assert "flip" not in "".join(tta.view_names(False))
    assert cli.main(["evaluate", run, "--split", "val", "--tta", "6"]) == 2
    err = capsys.readouterr().err.strip()
    assert "from 0 to 5" in err and "without horizontal flips" in err and "\n" not in err
