"""tlkit/data/sources.py: image folders, the built-in shapes set, TensorFlow Datasets (mock_data)."""
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import write_image_folder
from tlkit.core.config import DataConfig
from tlkit.data import load_sources, make_dataset
from tlkit.core.errors import DataError


def test_image_folder_reads_jpeg_png_gray_rgba_and_ignores_the_rest(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=("a", "b", "c"), per_class=8)
    (tmp_path / "imgs" / "a" / ".hidden.jpg").write_bytes(b"not an image")
    (tmp_path / "imgs" / "a" / "notes.txt").write_text("ignore me")
    d = load_sources(DataConfig(image_dir=root, val_split=0.25), 32, seed=1)
    assert d.class_names == ["a", "b", "c"]
    assert d.train.count + d.val.count == 24
    assert d.val.count == 6  # 2 per class, stratified
    assert not any(os.path.basename(f).startswith(".") or f.endswith(".txt") for f in d.train.files + d.val.files)
    ds = make_dataset(d.train, 32, 4, 3, training=False)
    x, y = next(iter(ds))
    assert x.shape == (4, 32, 32, 3) and x.dtype == tf.float32 and y.shape == (4, 3)
    # every file decodes to RGB (grayscale and RGBA included)
    total = sum(int(b[0].shape[0]) for b in make_dataset(d.train, 32, 5, 3))
    assert total == d.train.count


def test_seeded_split_is_reproducible(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=10)
    a = load_sources(DataConfig(image_dir=root), 32, seed=3)
    b = load_sources(DataConfig(image_dir=root), 32, seed=3)
    c = load_sources(DataConfig(image_dir=root), 32, seed=4)
    assert a.val.files == b.val.files
    assert a.val.files != c.val.files


def test_folder_with_its_own_splits(tmp_path):
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        write_image_folder(tmp_path / "ds" / split, per_class=n)
    d = load_sources(DataConfig(image_dir=str(tmp_path / "ds")), 32)
    assert (d.train.count, d.val.count, d.test.count) == (8, 4, 6)
    assert d.class_names == ["cat", "dog"]


def test_missing_folder_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_sources(DataConfig(image_dir=str(tmp_path / "nope")), 32)


def test_shapes_is_balanced_and_deterministic():
    d = load_sources(DataConfig(dataset="shapes", shapes_per_class=5), 32, seed=0)
    assert d.num_classes == 4 and d.train.count == 20
    x1 = np.stack([x for x, _ in d.train.ds.as_numpy_iterator()])
    x2 = np.stack([x for x, _ in load_sources(DataConfig(dataset="shapes", shapes_per_class=5), 32, seed=0)
                   .train.ds.as_numpy_iterator()])
    np.testing.assert_array_equal(x1, x2)
    labels = [int(y) for _, y in d.train.ds.as_numpy_iterator()]
    assert np.bincount(labels).tolist() == [5, 5, 5, 5]


def test_tfds_oxford_flowers_alias_with_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=6):
        d = load_sources(DataConfig(dataset="oxford_flowers"), 32)
        assert d.name == "oxford_flowers102" and d.num_classes == 102
        assert d.train.kind == "encoded" and d.val is not None and d.test is not None
        x, y = next(iter(make_dataset(d.val, 32, 3, d.num_classes)))
        assert x.shape == (3, 32, 32, 3) and y.shape == (3, 102)


def test_unknown_tfds_name_suggests():
    with pytest.raises(DataError, match=r"Unknown dataset 'oxford_flower102'.*'oxford_flowers102'"):
        load_sources(DataConfig(dataset="oxford_flower102"), 32)


def test_the_scan_reads_headers_and_ends_and_decodes_only_a_file_without_an_end_marker(tmp_path, monkeypatch):
    from PIL import Image

    from tlkit.data import sources

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    paths = {}
    for name, fmt in (("a.jpg", "JPEG"), ("b.png", "PNG"), ("c.gif", "GIF"), ("d.bmp", "BMP")):
        paths[name] = str(tmp_path / name)
        Image.fromarray(arr).save(paths[name], fmt)
    for name in list(paths):  # the same files cut in half
        data = open(paths[name], "rb").read()
        cut = str(tmp_path / ("cut-" + name))
        with open(cut, "wb") as f:
            f.write(data[: len(data) // 2])
        paths["cut-" + name] = cut
    padded = str(tmp_path / "padded.jpg")  # a camera's extra data after the end marker: usable
    with open(padded, "wb") as f:
        f.write(open(paths["a.jpg"], "rb").read() + bytes(rng.integers(0, 255, 10_000, dtype=np.uint8)))

    decoded = []
    real_jpeg, real_image = tf.io.decode_jpeg, tf.io.decode_image
    monkeypatch.setattr(tf.io, "decode_jpeg", lambda *a, **k: decoded.append("jpeg") or real_jpeg(*a, **k))
    monkeypatch.setattr(tf.io, "decode_image", lambda *a, **k: decoded.append("image") or real_image(*a, **k))
    for name in ("a.jpg", "b.png", "c.gif", "d.bmp"):
        assert sources.image_problem(paths[name]) is None, name
    assert decoded == []  # complete files: headers and ends only, no pixel decoded
    for name in ("a.jpg", "b.png", "c.gif", "d.bmp"):
        problem = sources.image_problem(paths["cut-" + name])
        assert problem and problem.startswith("truncated or corrupt"), (name, problem)
    assert sources.image_problem(padded) is None
    assert decoded[-1] == "jpeg"  # the padded file had no marker in its last bytes: TensorFlow decoded it
    ok, bad = sources.check_images([paths["a.jpg"], paths["cut-b.png"], padded])
    assert ok == [True, False, True] and list(bad) == [paths["cut-b.png"]]
