"""tlkit/verbs/predict.py and tlkit/engine/predictors.py: `tlkit predict` and `tlkit.load` on every kind of model, with unreadable files skipped."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import tlkit
from tlkit import cli
from tlkit.core.errors import ConfigError, DataError
from tlkit.engine.predictors import call_model, read_image, resize_batch


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    """JPEG/PNG/grayscale/RGBA images in class sub-folders, one corrupt .jpg, one non-image file."""
    from conftest import write_image_folder

    root = write_image_folder(tmp_path_factory.mktemp("photos") / "imgs", classes=("a", "b"), per_class=4)
    with open(os.path.join(root, "a", "corrupt.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with open(os.path.join(root, "notes.txt"), "w") as f:
        f.write("not an image, ignored in a folder")
    return root


def _good_files(root: str) -> list[str]:
    return sorted(os.path.join(d, n) for d, _, names in os.walk(root) for n in names
                  if n.endswith((".jpg", ".png")) and n != "corrupt.jpg")


def test_predict_folder_with_a_corrupt_file_table_and_json(run_dir, folder, capsys):
    good = _good_files(folder)
    assert cli.main(["predict", run_dir, folder, "--top-k", "2"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[0].split() == ["file", "class", "probability"]
    assert len(lines) == 1 + 2 * len(good)
    assert all(f in captured.out for f in good) and "corrupt.jpg" not in captured.out
    assert "corrupt.jpg" in captured.err and "cannot decode" in captured.err and "notes.txt" not in captured.err

    assert cli.main(["predict", run_dir, folder, os.path.join(folder, "missing.png"), "--json", "--top-k", "9"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert [p["file"] for p in data["predictions"]] == good
    for p in data["predictions"]:
        probs = [t["probability"] for t in p["top"]]
        assert len(p["top"]) == 4 and probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-4
        assert {t["class"] for t in p["top"]} == {"circle", "square", "triangle", "cross"}
    skipped = {os.path.basename(s["file"]): s["error"] for s in data["skipped"]}
    assert set(skipped) == {"corrupt.jpg", "missing.png"} and "no such file" in skipped["missing.png"]


def test_load_accepts_paths_arrays_of_any_size_and_lists(run_dir, folder):
    import keras

    clf = tlkit.load(run_dir)
    assert clf.format == "keras" and clf.image_size == 32 and clf.class_names == ["circle", "square", "triangle",
                                                                                  "cross"]
    files = _good_files(folder)
    imgs = [read_image(f) for f in files]
    assert {im.shape for im in imgs} == {(30, 40, 3)}
    model = keras.models.load_model(os.path.join(run_dir, "model.keras"), compile=False)
    expected = np.asarray(call_model(model, resize_batch(imgs, 32)))
    np.testing.assert_allclose(clf.predict(files), expected, atol=1e-6)
    np.testing.assert_allclose(clf.predict(imgs), expected, atol=1e-6)
    np.testing.assert_allclose(clf.predict(np.stack(imgs).astype(np.float32)), expected, atol=1e-6)
    np.testing.assert_allclose(clf.predict(imgs[0]), expected[:1], atol=1e-6)
    mixed = clf.predict([imgs[0], np.zeros((50, 20, 3), np.uint8), np.full((8, 8), 200, np.uint8)])
    assert mixed.shape == (3, 4) and np.allclose(mixed.sum(-1), 1, atol=1e-5)
    assert tlkit.load(os.path.join(run_dir, "model.keras")).class_names == clf.class_names


def test_predict_with_exports_matches_the_run(run_dir, folder, tmp_path):
    tfl = tlkit.export(run_dir, format="tflite", output=str(tmp_path / "t"), num_check=8, verbose=False)
    by_run = tlkit.predict(run_dir, [folder], top_k=1)
    by_tflite = tlkit.predict(tmp_path / "t", [folder], top_k=1)
    assert by_tflite.format == "tflite" and [p.file for p in by_tflite.predictions] == [p.file for p in by_run.predictions]
    assert tfl.passed and tfl.check["top1_agreement"] == 1.0 and tfl.check["max_abs_diff"] < 1e-4
    for a, b in zip(by_run.predictions, by_tflite.predictions):
        assert a.top[0][0] == b.top[0][0] and abs(a.top[0][1] - b.top[0][1]) < 1e-4
    assert [os.path.basename(f) for f, _ in by_tflite.skipped] == ["corrupt.jpg"]
    assert tlkit.load(tfl.path).class_names == ["circle", "square", "triangle", "cross"]


def test_unusable_inputs_are_one_line_errors(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    assert cli.main(["predict", run_dir, str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No readable image" in err and "bad.png" in err
    assert cli.main(["predict", str(tmp_path / "nothing"), str(bad)]) == 2
    assert "No model at" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        tlkit.predict(run_dir, [str(bad)], top_k=0)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.keras").write_bytes(open(os.path.join(run_dir, "model.keras"), "rb").read())
    (tmp_path / "m" / "labels.txt").write_text("only\ntwo\n")
    with pytest.raises(DataError, match="2 classes"):
        tlkit.load(str(tmp_path / "m"))
