"""tlkit/data/pipeline.py and augment.py: decode-and-crop of real JPEGs, caches, vectorised crop/flip, determinism."""
from __future__ import annotations

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import write_image_folder
from tlkit.core.config import DataConfig
from tlkit.data import load_sources, make_dataset
from tlkit.data.augment import PRESETS, Preset, _sample_box, batch_geometric, decode_random_crop, resize_uint8


def _jpeg(path, w=120, h=90) -> str:
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1).astype(np.uint8)
    Image.fromarray(arr).save(path, quality=95)
    return str(path)


def test_decode_and_crop_jpeg_decodes_only_the_crop_and_matches_a_full_decode(tmp_path):
    data = tf.io.read_file(_jpeg(tmp_path / "a.jpg"))
    seed = tf.constant([3, 7], tf.int64)
    out = decode_random_crop(data, 32, (0.3, 0.6), seed)
    assert out.shape == (32, 32, 3) and out.dtype == tf.uint8
    # The same box cut from a full decode gives the same picture.
    full = tf.io.decode_jpeg(data, channels=3)
    begin, extent = _sample_box(tf.shape(full), (0.3, 0.6), seed)
    assert 0.25 <= float(extent[0] * extent[1]) / (90 * 120) <= 0.65
    ref = resize_uint8(tf.slice(full, begin, extent), 32)
    assert np.abs(out.numpy().astype(int) - ref.numpy().astype(int)).max() <= 3
    # The JPEG branch is tf.io.decode_and_crop_jpeg, not a full decode.
    fn = tf.function(lambda d: decode_random_crop(d, 32, (0.3, 0.6), seed))
    graph = fn.get_concrete_function(tf.TensorSpec([], tf.string)).graph.as_graph_def()
    ops = {n.op for f in graph.library.function for n in f.node_def} | {n.op for n in graph.node}
    assert "DecodeAndCropJpeg" in ops and "ExtractJpegShape" in ops


def test_cache_none_training_reads_jpeg_png_gray_rgba_and_skips_a_corrupt_file(tmp_path):
    root = write_image_folder(tmp_path / "img", per_class=4, size=(48, 40))
    with open(os.path.join(root, "cat", "broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff not really a jpeg")
    data = load_sources(DataConfig(image_dir=root, val_split=0.0), 32)
    ds = make_dataset(data.train, 32, 4, 2, training=True, augment="light", cache="none", seed=1)
    xs = np.concatenate([x.numpy() for x, _ in ds])
    assert xs.shape == (8, 32, 32, 3) and xs.dtype == np.float32  # 9 files, the corrupt one skipped
    assert 0.0 <= xs.min() and xs.max() <= 255.0


def test_batch_geometric_is_identity_or_mirror_for_flip_only_and_transforms_with_the_full_preset():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (16, 20, 20, 3)).astype(np.float32)
    out = batch_geometric(tf.constant(x), Preset(flip=True), tf.constant([1, 2])).numpy()
    same = [np.allclose(o, i, atol=1e-3) for o, i in zip(out, x)]
    mirror = [np.allclose(o, i[:, ::-1], atol=1e-3) for o, i in zip(out, x)]
    assert all(s or m for s, m in zip(same, mirror)) and any(same) and any(mirror)
    # A constant image stays constant under crop, rotation and zoom (reflect fill): no black corners.
    flat = np.full((4, 20, 20, 3), 100.0, np.float32)
    moved = batch_geometric(tf.constant(flat), PRESETS["standard"], tf.constant([3, 4])).numpy()
    assert np.allclose(moved, 100.0, atol=1e-3)
    std = batch_geometric(tf.constant(x), PRESETS["standard"], tf.constant([1, 2])).numpy()
    assert std.shape == x.shape and not np.allclose(std, x) and 0 <= std.min() and std.max() <= 255


@pytest.mark.parametrize("cache", ["memory", "none"])
def test_same_seed_same_batches_new_epoch_new_batches(tmp_path, cache):
    root = write_image_folder(tmp_path / "img", per_class=5, size=(40, 30))
    data = load_sources(DataConfig(image_dir=root, val_split=0.0), 32)

    def two_epochs(seed):
        ds = make_dataset(data.train, 32, 4, 2, training=True, augment="standard", cache=cache, seed=seed,
                          deterministic=True)
        return [np.concatenate([x.numpy() for x, _ in ds]) for _ in range(2)]

    a, b, c = two_epochs(5), two_epochs(5), two_epochs(6)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], a[1])  # reshuffled and re-augmented every epoch
    assert not np.array_equal(a[0], c[0])


def test_eval_batches_do_not_depend_on_the_cache(tmp_path):
    root = write_image_folder(tmp_path / "img", per_class=3, size=(40, 30))
    data = load_sources(DataConfig(image_dir=root, val_split=0.0), 32)
    outs = {}
    for cache in ("memory", "disk", "none"):
        ds = make_dataset(data.train, 32, 4, 2, cache=cache, cache_dir=str(tmp_path / "cache"))
        outs[cache] = np.concatenate([x.numpy() for x, _ in ds])
    np.testing.assert_array_equal(outs["memory"], outs["none"])
    np.testing.assert_array_equal(outs["disk"], outs["none"])
    assert any(name.startswith("eval") for name in os.listdir(tmp_path / "cache"))


def test_public_affine_transform_equals_the_raw_op_it_replaced():
    # batch_geometric resamples with keras.ops.image.affine_transform (reflect fill, bilinear); it replaced a
    # direct tf.raw_ops.ImageProjectiveTransformV3 call and must give the same pixels, inside tf.data too.
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 255, (4, 24, 24, 3)).astype("float32"))
    t = np.tile(np.array([[0.9, -0.2, 3.0, 0.15, 1.1, -2.0, 0.0, 0.0]], np.float32), (4, 1))
    t[:, 2] += np.arange(4)
    ours = keras.ops.image.affine_transform(images, t, interpolation="bilinear", fill_mode="reflect",
                                            fill_value=0.0, data_format="channels_last")
    raw = tf.raw_ops.ImageProjectiveTransformV3(images=images, transforms=t, output_shape=[24, 24], fill_value=0.0,
                                                interpolation="BILINEAR", fill_mode="REFLECT")
    np.testing.assert_array_equal(np.asarray(ours), raw.numpy())
    ds = tf.data.Dataset.from_tensors(images).map(lambda x: batch_geometric(x, PRESETS["standard"], tf.constant([5, 6])))
    eager = batch_geometric(images, PRESETS["standard"], tf.constant([5, 6])).numpy()
    np.testing.assert_allclose(next(iter(ds)).numpy(), eager, atol=1e-2)  # graph vs eager float rounding, 0..255


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_a_bounded_shuffle_buffer_still_mixes_the_classes_of_a_folder(tmp_path, monkeypatch, cache):
    # A folder lists its files class by class. With a buffer of decoded images much smaller than the folder (as
    # for 100,000 images at 224 px), the first batches must still hold every class: the names are shuffled first.
    from tlkit.data import pipeline

    monkeypatch.setattr(pipeline, "SHUFFLE_MIN", 2)
    monkeypatch.setattr(pipeline, "SHUFFLE_BYTES", 2 * 32 * 32 * 3)  # a buffer of 2 images
    root = write_image_folder(tmp_path / "img", classes=("a", "b", "c"), per_class=20, size=(40, 30))
    data = load_sources(DataConfig(image_dir=root, val_split=0.0), 32)
    assert [int(y) for _, y in data.train.ds.as_numpy_iterator()][:20] == [0] * 20  # listed class by class
    ds = make_dataset(data.train, 32, 12, 3, training=True, cache=cache, cache_dir=str(tmp_path / "cache"), seed=3)
    first = np.argmax(next(iter(ds))[1].numpy(), -1)
    assert len(set(first.tolist())) == 3, first
