"""The tf.data pipeline: decode -> resize -> cache -> shuffle -> augment -> batch -> one-hot -> prefetch.

Images leave the pipeline as float32 in 0..255 (the model does its own preprocessing), labels one-hot
float32 (so label smoothing, mixup and cutmix all work).
"""
from __future__ import annotations

import os

import tensorflow as tf

from tlkit.data.augment import PRESETS, BatchAugmenter, random_resized_crop, resize_uint8
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


def make_dataset(split: Split, image_size: int, batch_size: int, num_classes: int, *, training: bool = False,
                 augment: str = "none", cache: str = "memory", cache_dir: str | None = None, seed: int = 42,
                 drop_remainder: bool = False, deterministic: bool | None = None) -> tf.data.Dataset:
    """Builds the batched, prefetched dataset of one split.

    Args:
        split: The `Split` from `load_sources`.
        image_size: Output side in pixels.
        batch_size: Batch size (global).
        num_classes: Number of classes (for one-hot labels).
        training: Shuffle and augment. Defaults to `False`.
        augment: Preset name (training only). Defaults to `"none"`.
        cache: `memory`, `disk` (in `cache_dir`) or `none`. Defaults to `"memory"`.
        cache_dir: Folder of the disk cache. Defaults to `None`.
        seed: Seed of shuffling and augmentation. Defaults to `42`.
        drop_remainder: Drop the last incomplete batch. Defaults to `False`.
        deterministic: Keep element order in parallel maps. Defaults to `None` (tf.data's default).

    Returns:
        A `tf.data.Dataset` of `(images float32 [B, S, S, 3] in 0..255, labels one-hot float32 [B, C])`.
    """
    kind = split.kind
    ds = split.ds.map(lambda x, y: (resize_uint8(decode(x, kind), image_size), y),
                      num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    if kind != "decoded":
        ds = ds.ignore_errors(log_warning=True)  # an unreadable file is skipped, not fatal
    if cache == "memory":
        ds = ds.cache()
    elif cache == "disk":
        if not cache_dir:
            raise ValueError("cache='disk' needs a cache_dir")
        os.makedirs(cache_dir, exist_ok=True)
        ds = ds.cache(os.path.join(cache_dir, "train" if training else "eval"))
    preset = PRESETS[augment] if training else PRESETS["none"]
    if training:
        ds = ds.shuffle(min(max(split.count, 1), 10_000), seed=seed, reshuffle_each_iteration=True)
        if preset.crop_scale or preset.flip:
            counter = tf.data.Dataset.counter(start=0)
            ds = tf.data.Dataset.zip((ds, counter))

            def per_image(xy, i):
                x, y = xy
                s = tf.stack([tf.cast(seed, tf.int64), i])
                if preset.crop_scale:
                    x = random_resized_crop(x, image_size, preset.crop_scale, s)
                if preset.flip:
                    x = tf.image.stateless_random_flip_left_right(x, s + 1)
                return x, y

            ds = ds.map(per_image, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=AUTOTUNE,
                  deterministic=deterministic)
    aug = BatchAugmenter(preset, seed) if training else None

    def finish(x, y):
        x = tf.cast(x, tf.float32)
        if aug is not None and aug.layers:
            x = tf.clip_by_value(tf.cast(aug.images(x), tf.float32), 0.0, 255.0)
        y = tf.one_hot(y, num_classes, dtype=tf.float32)
        if aug is not None:
            x, y = aug.mix(x, y)
        return x, y

    ds = ds.map(finish, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    return ds.prefetch(AUTOTUNE)
