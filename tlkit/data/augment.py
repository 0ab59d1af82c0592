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


def random_resized_crop(image: tf.Tensor, size: int, scale: tuple[float, float], seed: tf.Tensor) -> tf.Tensor:
    """Crops a random box of `scale` of the area (aspect 3/4..4/3) and resizes it to `size` (uint8 in and out)."""
    begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.zeros([1, 0, 4]), seed=seed, min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=scale, max_attempts=10, use_image_if_no_bounding_boxes=True)
    crop = tf.slice(image, begin, extent)
    return resize_uint8(crop, size)


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
