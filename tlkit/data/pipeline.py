"""The tf.data pipeline: decode -> resize -> cache -> shuffle -> batch -> augment -> one-hot -> prefetch.

Without a cache, training decodes only the random crop of each JPEG (`decode_and_crop_jpeg`).

Images leave the pipeline as float32 in 0..255 (the model does its own preprocessing), labels one-hot
float32, or multi-hot for multi-label data (so label smoothing, mixup and cutmix all work: they mix the vectors).
"""
from __future__ import annotations

import dataclasses
import os

import tensorflow as tf

from tlkit.data import cache_policy
from tlkit.data.augment import PRESETS, BatchAugmenter, batch_geometric, decode_random_crop, resize_uint8
from tlkit.data.sources import Split

AUTOTUNE = tf.data.AUTOTUNE


def decode(image: tf.Tensor, kind: str) -> tf.Tensor:
    """Decodes encoded bytes or a file into uint8 RGB [H, W, 3] (grayscale and RGBA become RGB)."""
    if kind == "decoded":
        img = tf.convert_to_tensor(image)
        if img.shape.rank == 2:
            img = img[..., None]
        return tf.image.grayscale_to_rgb(img) if img.shape[-1] == 1 else img[..., :3]
    data = tf.io.read_file(image) if kind == "path" else image
    img = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
    img.set_shape([None, None, 3])
    return img


SHUFFLE_BYTES = 256 * 2**20  # the training shuffle buffer of decoded images: 1,783 images at 224 px, 9,709 at 96 px
SHUFFLE_MIN = 1000  # images, however large


def _parallel(parallel: bool, deterministic: bool | None) -> dict:
    return dict(num_parallel_calls=AUTOTUNE, deterministic=deterministic) if parallel else {}


def _cached(ds: tf.data.Dataset, cache: str, cache_dir: str | None, name: str) -> tf.data.Dataset:
    """`ds` cached in memory, on disk (`cache_dir/name`) or not at all (`none`)."""
    if cache == "memory":
        return ds.cache()
    if cache == "disk":
        if not cache_dir:
            raise ValueError("cache='disk' needs a cache_dir")
        os.makedirs(cache_dir, exist_ok=True)
        return ds.cache(os.path.join(cache_dir, name))
    return ds


def make_dataset(split: Split, image_size: int, batch_size: int, num_classes: int, *, training: bool = False,
                 augment: str = "none", cache: str = "memory", cache_dir: str | None = None, seed: int = 42,
                 drop_remainder: bool = False, deterministic: bool | None = None,
                 flip: bool | None = None) -> tf.data.Dataset:
    """Builds the batched, prefetched dataset of one split.

    Two paths, chosen by `cache`:

    - `memory`/`disk`: decode and resize every image once (parallel, AUTOTUNE), cache the uint8 images, then per
      epoch shuffle, batch, and crop + flip + rotate + zoom the whole batch in one vectorised resampling
      (`augment.batch_geometric`).
    - `none` (training from files or encoded bytes): shuffle the cheap file names/bytes, then decode only a
      random crop of each JPEG (`tf.image.stateless_sample_distorted_bounding_box` +
      `tf.io.decode_and_crop_jpeg`, in `augment.decode_random_crop`), in parallel.

    Either way the rest of the preset runs once per batch: rotation, zoom and contrast fused into the same single
    resampling (no crop there when it was done on decode), then RandAugment and mixup/cutmix (Keras layers), and
    the result is prefetched (AUTOTUNE). Every random draw
    comes from `seed` (stateless ops, `tf.data.Dataset.random`, seeded layers), so with `deterministic=True`
    two runs with the same seed give the same batches, epoch after epoch.

    Args:
        split: The `Split` from `load_sources`.
        image_size: Output side in pixels.
        batch_size: Batch size (global).
        num_classes: Number of classes (for one-hot labels).
        training: Shuffle and augment. Defaults to `False`.
        augment: Preset name (training only); `auto` not yet resolved from the data (`tlkit.engine.adapt` does
            that in `finetune`) is `light`. Defaults to `"none"`.
        cache: `memory`, `disk` (in `cache_dir`) or `none`; `auto` decides for this split alone from its decoded
            size (`cache_policy.decide`; a run decides once for its train and validation splits and says so).
            Defaults to `"memory"`.
        cache_dir: Folder of the disk cache. Defaults to `None`.
        seed: Seed of shuffling and augmentation. Defaults to `42`.
        drop_remainder: Drop the last incomplete batch. Defaults to `False`.
        deterministic: Keep element order in parallel maps and run the stateful augmentation layers in order,
            so that the same seed gives the same batches. Defaults to `None` (tf.data's default).
        flip: Override the preset's random horizontal flip. Defaults to `None` (the preset's).

    Returns:
        A `tf.data.Dataset` of `(images float32 [B, S, S, 3] in 0..255, labels one-hot float32 [B, C])` (multi-hot
        for multi-label splits).

    Example:
        ds = make_dataset(data.train, 224, 32, data.num_classes, training=True, augment="standard")
    """
    if augment == "auto":
        augment = "light"
    if augment not in PRESETS:
        raise ValueError(f"Unknown augmentation preset {augment!r}. Choose one of: {', '.join(PRESETS)}.")
    if cache == "auto":
        cache = cache_policy.decide("auto", [split.count], image_size, cache_dir).mode
    if cache not in ("memory", "disk", "none"):
        raise ValueError(f"Unknown cache {cache!r}. Choose one of: auto, memory, disk, none.")
    kind = split.kind
    preset = PRESETS[augment] if training else PRESETS["none"]
    if training and flip is not None:
        preset = dataclasses.replace(preset, flip=bool(flip))
    det = deterministic
    shuffle_n = min(max(split.count, 1), 10_000)
    # Per-element (or per-batch) random seeds: new each epoch, the same sequence for the same seed.
    def seeds(stream: int = 0):
        return tf.data.Dataset.random(seed=seed + 1000 * stream, rerandomize_each_iteration=True)

    crop_on_decode = training and cache == "none" and kind != "decoded"
    if crop_on_decode:
        ds = split.ds.shuffle(split.count if kind == "path" else shuffle_n, seed=seed, reshuffle_each_iteration=True)
        ds = tf.data.Dataset.zip((ds, seeds()))

        def load(xy, r):
            x, y = xy
            s = tf.stack([tf.cast(seed, tf.int64), r])
            data = tf.io.read_file(x) if kind == "path" else x
            if preset.crop_scale:
                img = decode_random_crop(data, image_size, preset.crop_scale, s)
            else:
                img = resize_uint8(decode(data, "encoded"), image_size)
            if preset.flip:
                img = tf.image.stateless_random_flip_left_right(img, s + 1)
            return img, y

        ds = ds.map(load, num_parallel_calls=AUTOTUNE, deterministic=det)
        ds = ds.ignore_errors(log_warning=True)  # an unreadable file is skipped, not fatal
        crop_in_batch = False
    else:
        src = split.ds
        if training:
            # A folder's files come class by class: one seeded shuffle of the cheap names (all of them) puts the
            # cache in random order, so the bounded buffer of decoded images below mixes classes on any folder.
            src = src.shuffle(split.count if kind == "path" else shuffle_n, seed=seed, reshuffle_each_iteration=False)
        ds = src.map(lambda x, y: (resize_uint8(decode(x, kind), image_size), y),
                     num_parallel_calls=AUTOTUNE, deterministic=det)
        if kind != "decoded":
            ds = ds.ignore_errors(log_warning=True)
        ds = _cached(ds, cache, cache_dir, "train" if training else "eval")
        if training:  # decoded images: the buffer holds at most SHUFFLE_BYTES of them
            decoded_n = max(1, min(shuffle_n, max(SHUFFLE_MIN, SHUFFLE_BYTES // (image_size * image_size * 3))))
            ds = ds.shuffle(decoded_n, seed=seed, reshuffle_each_iteration=True)
        crop_in_batch = bool(preset.crop_scale or preset.flip)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=AUTOTUNE, deterministic=det)
    if split.count > 0:
        # `ignore_errors` makes the length unknown, and on a dataset of unknown length Keras 3.15 counts one
        # optimizer step more per epoch than there are batches (the step that meets the end of the data still
        # advances `optimizer.iterations`, so every schedule ends early). The files were all decoded when the
        # folder was scanned, so the number of batches is known: say it.
        batches = split.count // batch_size if drop_remainder else -(-split.count // batch_size)
        ds = ds.apply(tf.data.experimental.assert_cardinality(batches))
    # Crop, flip, rotation, zoom and contrast are one fused, stateless, vectorised op (`batch_geometric`);
    # what is left for Keras's random layers is RandAugment and mixup/cutmix.
    geometric = training and bool(crop_in_batch or preset.rotation or preset.zoom or preset.contrast)
    aug = BatchAugmenter(dataclasses.replace(preset, rotation=0.0, zoom=0.0, contrast=0.0), seed) if training else None
    stateful = aug is not None and aug.active

    def finish(x, y, r=None):
        if geometric:
            x = batch_geometric(x, preset, tf.stack([tf.cast(seed, tf.int64) + 7, r]), crop=crop_in_batch)
        x = tf.cast(x, tf.float32)
        if aug is not None and aug.layers:
            x = tf.clip_by_value(tf.cast(aug.images(x), tf.float32), 0.0, 255.0)
        # Class indices become one-hot; multi-hot labels (multi-label data, float [B, C]) are already vectors.
        y = tf.one_hot(y, num_classes, dtype=tf.float32) if y.shape.rank == 1 else tf.cast(y, tf.float32)
        if aug is not None:
            x, y = aug.mix(x, y)
        return x, y

    if geometric:
        ds = tf.data.Dataset.zip((ds, seeds(1))).map(lambda xy, r: finish(xy[0], xy[1], r),
                                                      **_parallel(not (stateful and det), det))
    else:
        # Keras's random layers draw from a stateful seed generator: in order when determinism is asked.
        ds = ds.map(finish, **_parallel(not (stateful and det), det))
    if det:
        options = tf.data.Options()
        options.deterministic = True
        ds = ds.with_options(options)
    return ds.prefetch(AUTOTUNE)
