"""Test-time augmentation (`--tta N`): average the probabilities of the image and N deterministic views of it.

The views, in order (N takes the first N): the horizontal flip; the centre crop; its flip; the four corner crops;
their flips (at most `MAX_VIEWS` = 11). A model trained without the horizontal flip (`flip: false` in its run's
`config.yaml`, e.g. glyphs that a flip turns into other glyphs) gets no flipped view: the centre crop and the four
corner crops (at most 5). A crop is a square of side `crop_side` of the image, resized back to the
model's input size, where `crop_side` is the scale the model was trained on: the square root of the mean area of
the training preset's random resized crop (`standard`, area 0.35-1.0: side 0.82; `light`, 0.6-1.0: 0.89), or 0.875
(the 224/256 of ImageNet evaluation) for a model trained without crops or of unknown training. Views are made from
the resized image, as the training pipeline crops its cached, resized images.

All views of a batch go through the model in one call (`B * (N + 1)` images), so TTA costs N + 1 forward passes
per image and nothing else. Exports stay single-view models: TTA is a way of calling a model, not part of it.

Example:
    fn = averaged(lambda x: model(x, training=False), n=2, crop_side=0.82)
    probs = fn(images)          # mean over [images, flipped images, centre crops]
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable

import numpy as np

VIEW_NAMES = ("flip", "center_crop", "center_crop_flip", "top_left_crop", "top_right_crop", "bottom_left_crop",
              "bottom_right_crop", "top_left_crop_flip", "top_right_crop_flip", "bottom_left_crop_flip",
              "bottom_right_crop_flip")
MAX_VIEWS = len(VIEW_NAMES)
DEFAULT_CROP_SIDE = 0.875


def view_names(flip: bool = True) -> tuple[str, ...]:
    """The views in order; without the flipped ones when the model was trained without flips.

    Example:
        >>> view_names(flip=False)
        ('center_crop', 'top_left_crop', 'top_right_crop', 'bottom_left_crop', 'bottom_right_crop')
    """
    return VIEW_NAMES if flip else tuple(v for v in VIEW_NAMES if "flip" not in v)


def check_n(n: Any, flip: bool = True) -> int:
    """`n` as an int in 0..the number of views (`MAX_VIEWS`, or 5 without flips); raises `ConfigError` naming the
    bad value."""
    from tlkit.core.errors import ConfigError

    names = view_names(flip)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 0 <= int(n) <= len(names):
        why = "" if flip else " (the model was trained without horizontal flips, so it has no flipped views)"
        raise ConfigError(f"tta must be a whole number of extra views from 0 to {len(names)} "
                          f"({', '.join(names[:3])}, ...){why}, got {n!r}.")
    return int(n)


def crop_side(augment: str | None) -> float:
    """Side (fraction of the image) of the TTA crops for a model trained with the augmentation preset `augment`.

    Example:
        >>> round(crop_side("standard"), 3)
        0.822
    """
    from tlkit.data.augment import PRESETS

    preset = PRESETS.get(str(augment)) if augment else None
    if preset is None or not preset.crop_scale:
        return DEFAULT_CROP_SIDE
    lo, hi = preset.crop_scale
    return math.sqrt((lo + hi) / 2.0)


def run_views(model_path: str | None) -> tuple[float, bool]:
    """`(crop_side, flip)` of the TTA views of a model: the crop of its run's augmentation preset, and whether it was
    trained with horizontal flips (the run's `flip`, else the preset's). `(DEFAULT_CROP_SIDE, True)` for a model
    outside a run folder."""
    from tlkit.data.augment import PRESETS

    data = _run_data(model_path)
    augment = data.get("augment")
    augment = str(augment) if augment else None
    flip = data.get("flip")
    if flip is None:
        preset = PRESETS.get(str(augment)) if augment else None
        flip = True if preset is None else bool(preset.flip)
    return crop_side(augment), bool(flip)


def _run_data(model_path: str | None) -> dict:
    """The `data` section of the `config.yaml` of the run a model belongs to (the folder, or the model file's
    folder), or `{}` when there is none."""
    if not model_path:
        return {}
    path = os.fspath(model_path)
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    cfg_path = os.path.join(folder, "config.yaml")
    if not os.path.isfile(cfg_path):
        return {}
    try:
        from tlkit.core.config_io import load_yaml

        values = load_yaml(cfg_path)
    except Exception:  # not a tlkit config: the default views
        return {}
    data = values.get("data") if isinstance(values.get("data"), dict) else values
    return data if isinstance(data, dict) else {}


def _boxes(side: float) -> dict[str, list[float]]:
    """Normalised `[y1, x1, y2, x2]` of the centre and corner crops of side `side`."""
    s, m = float(side), (1.0 - float(side)) / 2.0
    return {"center": [m, m, m + s, m + s], "top_left": [0.0, 0.0, s, s], "top_right": [0.0, 1.0 - s, s, 1.0],
            "bottom_left": [1.0 - s, 0.0, 1.0, s], "bottom_right": [1.0 - s, 1.0 - s, 1.0, 1.0]}


def views(images, n: int, crop_side: float = DEFAULT_CROP_SIDE, flip: bool = True):
    """The image batch and its first `n` views (of `view_names(flip)`), stacked: `[(n + 1) * B, S, S, 3]` float32,
    view-major (`out[v * B + i]` is view v of image i; view 0 is the image itself)."""
    import tensorflow as tf

    x = tf.cast(tf.convert_to_tensor(images), tf.float32)
    out = [x]
    if n <= 0:
        return x
    size = tf.shape(x)[1:3]
    batch = tf.shape(x)[0]
    boxes = _boxes(crop_side)
    for name in view_names(flip)[:n]:
        flipped = name.endswith("_flip") or name == "flip"
        if name == "flip":
            v = x
        else:
            where = name.replace("_crop", "").replace("_flip", "")
            box = tf.tile(tf.constant([boxes[where]], tf.float32), [batch, 1])
            v = tf.image.crop_and_resize(x, box, tf.range(batch), size, method="bilinear")
        out.append(tf.reverse(v, axis=[2]) if flipped else v)
    return tf.concat(out, axis=0)


def average_views(probs, n: int):
    """Mean over the `n + 1` view-major blocks of `probs` [(n + 1) * B, C] -> [B, C]."""
    import tensorflow as tf

    probs = tf.convert_to_tensor(probs)
    if n <= 0:
        return probs
    c = tf.shape(probs)[-1]
    return tf.reduce_mean(tf.reshape(probs, [n + 1, -1, c]), axis=0)


def averaged(forward: Callable, n: int, crop_side: float = DEFAULT_CROP_SIDE, flip: bool = True) -> Callable:
    """`forward` (images [B, S, S, 3] -> probabilities [B, C]) averaged over the image and its first `n` views
    (without flipped views when `flip` is False).

    Example:
        predict = tf.function(averaged(lambda x: model(x, training=False), 4, 0.82))
    """
    n = check_n(n, flip)
    if n == 0:
        return forward

    def tta_forward(x):
        import tensorflow as tf

        p = tf.cast(forward(views(x, n, crop_side, flip)), tf.float32)
        return average_views(p, n)

    return tta_forward


def describe(n: int, crop_side: float, flip: bool = True) -> dict[str, Any]:
    """What `metrics.json` records of a TTA evaluation."""
    return {"n": int(n), "views": ["image", *view_names(flip)[:n]], "crop_side": round(float(crop_side), 4)}
