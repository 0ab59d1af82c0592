"""Augmentation presets, applied in the tf.data pipeline (never inside the model, which stays XLA-clean).

Per image: random resized crop and horizontal flip. Per batch (vectorised `keras.layers` random layers):
rotation, zoom, contrast, RandAugment, then mixup / cutmix on one-hot labels.
"""
from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Preset:
    """One augmentation preset.

    Attributes:
        crop_scale: Area range of the random resized crop, or `None` for no crop.
        flip: Random horizontal flip.
        rotation: `RandomRotation` factor (fraction of a full turn), 0 for none.
        zoom: `RandomZoom` factor, 0 for none.
        contrast: `RandomContrast` factor, 0 for none.
        randaugment: Apply `RandAugment` (2 ops).
        mixup: MixUp alpha, 0 for none.
        cutmix: CutMix alpha, 0 for none (with both, each batch uses one of them at random).
    """

    crop_scale: tuple[float, float] | None = None
    flip: bool = False
    rotation: float = 0.0
    zoom: float = 0.0
    contrast: float = 0.0
    randaugment: bool = False
    mixup: float = 0.0
    cutmix: float = 0.0


PRESETS = {
    "none": Preset(),
    "light": Preset(crop_scale=(0.6, 1.0), flip=True),
    "standard": Preset(crop_scale=(0.35, 1.0), flip=True, rotation=0.05, zoom=0.1, contrast=0.2),
    "strong": Preset(crop_scale=(0.25, 1.0), flip=True, rotation=0.1, zoom=0.2, contrast=0.3, randaugment=True,
                     mixup=0.2, cutmix=1.0),
}


def _sample_box(shape: tf.Tensor, scale: tuple[float, float], seed: tf.Tensor):
    """A random box of `scale` of the area, aspect 3/4..4/3 (`tf.image.stateless_sample_distorted_bounding_box`)."""
    begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.zeros([1, 0, 4]), seed=seed, min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=scale, max_attempts=10, use_image_if_no_bounding_boxes=True)
    return begin, extent


def random_resized_crop(image: tf.Tensor, size: int, scale: tuple[float, float], seed: tf.Tensor) -> tf.Tensor:
    """Crops a random box of `scale` of the area (aspect 3/4..4/3) and resizes it to `size` (uint8 in and out)."""
    begin, extent = _sample_box(tf.shape(image), scale, seed)
    crop = tf.slice(image, begin, extent)
    return resize_uint8(crop, size)


def decode_random_crop(data: tf.Tensor, size: int, scale: tuple[float, float], seed: tf.Tensor) -> tf.Tensor:
    """Random resized crop straight from encoded bytes, decoding only the crop of a JPEG.

    For a JPEG the box is drawn on the header's shape (`tf.image.extract_jpeg_shape`) and
    `tf.io.decode_and_crop_jpeg` decodes only that window; other formats (PNG, BMP, GIF) are decoded whole and
    then cropped. Grayscale and RGBA become RGB.

    Args:
        data: Encoded image bytes (scalar string).
        size: Output side in pixels.
        scale: Area range of the crop, as fractions of the image.
        seed: Stateless seed, int shape [2].

    Returns:
        uint8 [size, size, 3].

    Example:
        img = decode_random_crop(tf.io.read_file("a.jpg"), 224, (0.35, 1.0), tf.constant([1, 2]))
    """
    def jpeg():
        begin, extent = _sample_box(tf.image.extract_jpeg_shape(data), scale, seed)
        window = tf.stack([begin[0], begin[1], extent[0], extent[1]])
        return tf.io.decode_and_crop_jpeg(data, window, channels=3)

    def other():
        img = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
        img.set_shape([None, None, 3])
        begin, extent = _sample_box(tf.shape(img), scale, seed)
        return tf.slice(img, begin, extent)

    img = tf.cond(tf.io.is_jpeg(data), jpeg, other)
    img.set_shape([None, None, 3])
    return resize_uint8(img, size)


def batch_geometric(images: tf.Tensor, preset: "Preset", seed: tf.Tensor, crop: bool = True) -> tf.Tensor:
    """The whole geometric part of a preset as ONE vectorised resampling of the batch, then contrast.

    Random resized crop (when `crop`), horizontal flip (when `crop`), rotation and zoom are all affine maps, so
    they compose into one 3x3 matrix per image and a single `ImageProjectiveTransformV3` (bilinear, reflect
    fill, through `keras.ops.image.affine_transform`) resamples the batch once, instead of one pass per `keras.layers.Random*` layer. Contrast follows as
    Keras's `RandomContrast` does it (per image and channel, around the mean, clipped to 0..255). Every draw is
    stateless from `seed`, so the result is reproducible and needs no ordering of the map.

    Args:
        images: [B, S, S, 3], values 0..255 (any numeric dtype).
        preset: The `Preset` (crop_scale, flip, rotation, zoom, contrast).
        seed: Stateless seed, int shape [2].
        crop: Apply the preset's crop and flip here (False when they were done per image on decode).
            Defaults to `True`.

    Returns:
        float32 [B, S, S, 3] in 0..255.

    Example:
        out = batch_geometric(tf.zeros([8, 64, 64, 3]), PRESETS["standard"], tf.constant([0, 1]))
    """
    images = tf.cast(images, tf.float32)
    shape = tf.shape(images)
    n = shape[0]
    size_h, size_w = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 8)
    ones, zeros = tf.ones([n]), tf.zeros([n])

    def uniform(i, lo, hi):
        return tf.random.stateless_uniform([n], seeds[i], lo, hi)

    bw = bh = ones
    left = top = zeros
    if crop and preset.crop_scale:
        area = uniform(0, preset.crop_scale[0], preset.crop_scale[1])
        ratio = tf.exp(uniform(1, float(np.log(3 / 4)), float(np.log(4 / 3))))
        bw = tf.minimum(tf.sqrt(area * ratio), 1.0)
        bh = tf.minimum(tf.sqrt(area / ratio), 1.0)
        left = uniform(2, 0.0, 1.0) * (1.0 - bw) * size_w
        top = uniform(3, 0.0, 1.0) * (1.0 - bh) * size_h
    sign = tf.where(uniform(4, 0.0, 1.0) < 0.5, -1.0, 1.0) if (crop and preset.flip) else ones
    theta = uniform(5, -preset.rotation, preset.rotation) * 2.0 * np.pi if preset.rotation else zeros
    zoom = 1.0 + uniform(6, -preset.zoom, preset.zoom) if preset.zoom else ones
    cx, cy = (size_w - 1.0) / 2.0, (size_h - 1.0) / 2.0
    cos, sin = tf.cos(theta) * zoom, tf.sin(theta) * zoom
    # output (x, y) -> rotate/zoom about the centre -> mirror -> into the crop box of the input.
    x_const = cx - cos * cx + sin * cy
    y_const = cy - sin * cx - cos * cy
    flip_const = (size_w - 1.0) * (1.0 - sign) / 2.0
    a0, a1 = bw * sign * cos, -bw * sign * sin
    a2 = left + bw * (sign * x_const + flip_const)
    b0, b1 = bh * sin, bh * cos
    b2 = top + bh * y_const
    transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
    identity = not (crop and (preset.crop_scale or preset.flip)) and not preset.rotation and not preset.zoom
    if not identity:
        # Keras's public op; on the TensorFlow backend it is this same ImageProjectiveTransformV3 kernel (same
        # output, checked in tests/test_data_pipeline.py), without tlkit reaching into tf.raw_ops.
        images = keras.ops.image.affine_transform(images, transforms, interpolation="bilinear", fill_mode="reflect",
                                                  fill_value=0.0, data_format="channels_last")
    if preset.contrast:
        factor = tf.reshape(uniform(7, 1.0 - preset.contrast, 1.0 + preset.contrast), [-1, 1, 1, 1])
        mean = tf.reduce_mean(images, axis=[1, 2], keepdims=True)
        images = (images - mean) * factor + mean
    return tf.clip_by_value(images, 0.0, 255.0)


def resize_uint8(image: tf.Tensor, size: int) -> tf.Tensor:
    out = tf.image.resize(image, (size, size), method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)


class BatchAugmenter:
    """The per-batch part of a preset: keras random layers and mixup/cutmix, seeded."""

    def __init__(self, preset: Preset, seed: int):
        self.preset = preset
        layers = []
        if preset.rotation:
            layers.append(keras.layers.RandomRotation(preset.rotation, fill_mode="reflect", seed=seed))
        if preset.zoom:
            layers.append(keras.layers.RandomZoom((-preset.zoom, preset.zoom), fill_mode="reflect", seed=seed + 1))
        if preset.contrast:
            layers.append(keras.layers.RandomContrast(preset.contrast, value_range=(0, 255), seed=seed + 2))
        if preset.randaugment:
            layers.append(keras.layers.RandAugment(value_range=(0, 255), num_ops=2, factor=0.5, seed=seed + 3))
        self.layers = layers
        self.mixup = keras.layers.MixUp(alpha=preset.mixup, seed=seed + 4) if preset.mixup else None
        self.cutmix = keras.layers.CutMix(factor=preset.cutmix, seed=seed + 5) if preset.cutmix else None
        self.seed = seed

    @property
    def active(self) -> bool:
        return bool(self.layers or self.mixup or self.cutmix)

    def images(self, x: tf.Tensor) -> tf.Tensor:
        for layer in self.layers:
            x = layer(x, training=True)
        return x

    def mix(self, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Mixup or cutmix of a batch of float images and one-hot labels."""
        if not (self.mixup or self.cutmix):
            return x, y
        outs = []
        for layer in (self.mixup, self.cutmix):
            if layer is not None:
                out = layer({"images": x, "labels": y}, training=True)
                outs.append((tf.cast(out["images"], tf.float32), tf.cast(out["labels"], tf.float32)))
        if len(outs) == 1:
            return outs[0]
        pick = tf.random.uniform([], seed=self.seed + 6) < 0.5
        return (tf.where(pick, outs[0][0], outs[1][0]), tf.where(pick, outs[0][1], outs[1][1]))
