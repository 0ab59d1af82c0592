"""Augmentation presets, applied in the tf.data pipeline (never inside the model, which stays XLA-clean).

Per image: random resized crop and horizontal flip. Per batch (vectorised `keras.layers` random layers):
rotation, zoom, contrast, RandAugment, then mixup / cutmix on one-hot labels.
"""
from __future__ import annotations

import dataclasses

import keras
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
        >>> img = decode_random_crop(tf.io.read_file("a.jpg"), 224, (0.35, 1.0), tf.constant([1, 2]))
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


def batch_crop_flip(images: tf.Tensor, scale: tuple[float, float] | None, flip: bool, seed: tf.Tensor) -> tf.Tensor:
    """Vectorised random resized crop and horizontal flip of a batch of equal-sized images (one op).

    Each image gets its own box (area fraction uniform in `scale`, log-aspect uniform in log(3/4)..log(4/3))
    and its own coin for the flip; `tf.image.crop_and_resize` does all crops at once, and a flip is the same box
    with its x coordinates swapped.

    Args:
        images: [B, S, S, 3] (any numeric dtype).
        scale: Area range of the crop, or `None` for no crop.
        flip: Random horizontal flip.
        seed: Stateless seed, int shape [2].

    Returns:
        float32 [B, S, S, 3].

    Example:
        >>> out = batch_crop_flip(tf.zeros([8, 64, 64, 3]), (0.35, 1.0), True, tf.constant([0, 1]))
    """
    shape = tf.shape(images)
    n, h, w = shape[0], shape[1], shape[2]
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 5)
    if scale:
        area = tf.random.stateless_uniform([n], seeds[0], scale[0], scale[1])
        log_r = tf.random.stateless_uniform([n], seeds[1], tf.math.log(3 / 4), tf.math.log(4 / 3))
        ratio = tf.exp(log_r)
        bw = tf.minimum(tf.sqrt(area * ratio), 1.0)
        bh = tf.minimum(tf.sqrt(area / ratio), 1.0)
        y0 = tf.random.stateless_uniform([n], seeds[2]) * (1.0 - bh)
        x0 = tf.random.stateless_uniform([n], seeds[3]) * (1.0 - bw)
    else:
        bw = bh = tf.ones([n])
        y0 = x0 = tf.zeros([n])
    x1 = x0 + bw
    if flip:
        coin = tf.random.stateless_uniform([n], seeds[4]) < 0.5
        x0, x1 = tf.where(coin, x1, x0), tf.where(coin, x0, x1)
    # crop_and_resize samples pixel centres at y0 * (h - 1) .. y1 * (h - 1) (normalised by h - 1).
    boxes = tf.stack([y0, x0, y0 + bh, x1], axis=1)
    out = tf.image.crop_and_resize(tf.cast(images, tf.float32), boxes, tf.range(n), tf.stack([h, w]))
    return tf.clip_by_value(out, 0.0, 255.0)


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
