"""Class weights for imbalanced training data: `--class-weight none|balanced|W1,W2,...`.

`balanced` gives class c the weight `n / (C * n_c)` (n training images, C classes, n_c of them in class c; scikit-learn's
and Keras's "balanced"): rare classes count more, and the mean weight over the training images is 1, so the loss keeps
its scale and the learning rate its meaning. `resolve` turns `balanced` into these numbers (rounded to 4 decimals) once
the training split is known, so that `config.yaml` holds the weights the run trained with.

The weights enter as per-example sample weights of the training batches, `w_i = sum_c y_ic * w_c` (the one-hot or
mixed label times the weight vector: exact for one-hot labels, the mixture's weight under mixup/cutmix). Keras then
computes the batch loss as `sum_i w_i * loss_i / B`, as `fit(class_weight=...)` does; the same holds for the head
trained on cached features. Validation batches carry no weights: `val_loss`, `val_accuracy` and `metrics.json` stay
comparable with and without class weights (the training `loss`/`accuracy` of history.csv are the weighted ones).

Multi-label data (a sigmoid per class) weights each class's positive examples instead, inside the loss
(`PositiveWeightedBCE`, as `tf.nn.weighted_cross_entropy_with_logits`'s `pos_weight`); `balanced` is then
`(n - n_c) / n_c`, a label's negatives over its positives (`positive_weights`).

Example:
    counts = class_counts(data.train, data.num_classes)
    balanced_weights(counts)            # [10, 10, 2] images
    # -> [0.7333, 0.7333, 3.6667]
    train_ds = weighted_dataset(train_ds, [0.7333, 0.7333, 3.6667])   # (x, y) -> (x, y, w)
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import keras
import numpy as np

from tlkit.core.config import parse_class_weight
from tlkit.core.errors import ConfigError

IMBALANCE_WARN_RATIO = 5.0  # warn when the largest class has more than this many times the images of the smallest


def class_counts(split, num_classes: int) -> np.ndarray:
    """Images per class of a `data.Split` (its labels only: no image is decoded)."""
    import tensorflow as tf

    labels = split.ds.map(lambda x, y: y, num_parallel_calls=tf.data.AUTOTUNE)
    counts = np.zeros(num_classes, np.int64)
    for batch in labels.batch(4096):
        batch = np.asarray(batch)
        if batch.ndim == 2:  # multi-hot labels (multi-label data): the images holding each label
            counts += np.rint(batch.sum(0)).astype(np.int64)[:num_classes]
        else:
            counts += np.bincount(batch.astype(np.int64).reshape(-1), minlength=num_classes)[:num_classes]
    return counts


def positive_weights(counts: Sequence[int], num_images: int, decimals: int = 4) -> list[float]:
    """Multi-label `balanced`: each class's positive examples weighted `(n - n_c) / n_c` (its negatives over its
    positives, as `tf.nn.weighted_cross_entropy_with_logits`'s `pos_weight`), so a rare label's few positives count
    as much as its many negatives; a label present in every image gets 1.

    Example:
        >>> positive_weights([10, 2], 20)
        [1.0, 9.0]
    """
    counts = np.asarray(counts, np.float64)
    return [round(float(max(num_images - k, k) / k), decimals) if k > 0 else 1.0 for k in counts]


def balanced_weights(counts: Sequence[int], decimals: int = 4) -> list[float]:
    """`n / (C * n_c)` per class, rounded; a class without training images gets weight 0 (it never occurs).

    Example:
        >>> balanced_weights([10, 10, 2])
        [0.7333, 0.7333, 3.6667]
    """
    counts = np.asarray(counts, np.float64)
    n, c = counts.sum(), len(counts)
    return [round(float(n / (c * k)), decimals) if k > 0 else 0.0 for k in counts]


def imbalance_warning(counts: Sequence[int], class_names: Sequence[str],
                      ratio: float = IMBALANCE_WARN_RATIO) -> str | None:
    """The one-line warning when the largest class has more than `ratio` times the images of the smallest, else None.

    Example:
        >>> imbalance_warning([40, 5, 12], ["cat", "dog", "fox"])
        'imbalanced training split: cat has 40 images, dog 5 (8.0x); mean per-class accuracy is the fairer metric, ...'
    """
    counts = np.asarray(counts)
    if len(counts) < 2:
        return None
    big, small = int(np.argmax(counts)), int(np.argmin(counts))
    if counts[big] <= ratio * counts[small]:
        return None
    times = f"{counts[big] / counts[small]:.1f}x" if counts[small] else "no images"
    return (f"imbalanced training split: {class_names[big]} has {counts[big]} images, {class_names[small]} "
            f"{counts[small]} ({times}); mean per-class accuracy is the fairer metric, and --class-weight balanced "
            "may help the rare classes")


def resolve(cfg, data, log: bool = True):
    """`cfg` with `train.class_weight` as numbers (`balanced` computed from `data.train`), checked against the classes.

    Prints the imbalance warning (`imbalance_warning`) whatever the setting.

    Returns:
        `(cfg, warning)`: `cfg` unchanged for `none`; `warning` the imbalance warning, or `None` for a split that
        is not that imbalanced.

    Raises:
        ConfigError: explicit weights whose count differs from the number of classes.
    """
    value = parse_class_weight(cfg.train.class_weight)
    counts = class_counts(data.train, data.num_classes)
    warning = imbalance_warning(counts, data.class_names)
    if warning and log:
        print(f"[tlkit] warning: {warning}", flush=True)
    if value == "none":
        return cfg, warning
    if value == "balanced":
        weights = positive_weights(counts, data.train.count) if data.multi_label else balanced_weights(counts)
    else:
        weights = value
    if len(weights) != data.num_classes:
        raise ConfigError(f"class_weight gives {len(weights)} weights but the data has {data.num_classes} classes "
                          f"({', '.join(data.class_names[:6])}{', ...' if data.num_classes > 6 else ''}).")
    if log:
        shown = ", ".join(f"{n} {w:g}" for n, w in list(zip(data.class_names, weights))[:8])
        kind = "positive weights per class" if data.multi_label else "class weights"
        print(f"[tlkit] {kind} ({value if isinstance(value, str) else 'given'}): {shown}"
              + (" ..." if data.num_classes > 8 else ""), flush=True)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, class_weight=list(weights))), warning


def weight_vector(cfg, num_classes: int | None = None) -> np.ndarray | None:
    """The resolved per-class weights of `cfg.train.class_weight` as float32, or `None` for `none`.

    Raises:
        ValueError: `balanced` was not resolved (`resolve`) before training.
    """
    value = parse_class_weight(cfg.train.class_weight)
    if value == "none":
        return None
    if isinstance(value, str):
        raise ValueError("class_weight 'balanced' must be resolved from the training split first "
                         "(tlkit.engine.class_weights.resolve).")
    w = np.asarray(value, np.float32)
    if num_classes is not None and len(w) != num_classes:
        raise ConfigError(f"class_weight gives {len(w)} weights but the model has {num_classes} classes.")
    return w


def example_weights(cfg, num_classes: int | None, multi_label: bool) -> np.ndarray | None:
    """The per-class weights that weight the training examples (`weighted_dataset`): `weight_vector`, or `None` for
    a multi-label classifier, whose loss weights each class's positives instead (`PositiveWeightedBCE`)."""
    return None if multi_label else weight_vector(cfg, num_classes)


@keras.saving.register_keras_serializable("tlkit")
class PositiveWeightedBCE(keras.losses.Loss):
    """Binary cross-entropy on probabilities with a weight per class on its positive examples:
    `-mean_c(w_c * y_c * log p_c + (1 - y_c) * log(1 - p_c))`, labels smoothed towards 1/2 first, as
    `keras.losses.BinaryCrossentropy(label_smoothing=...)` does. With every weight 1 it is that loss.

    Example:
        loss = PositiveWeightedBCE([1.0, 9.0], label_smoothing=0.1)
    """

    def __init__(self, pos_weight, label_smoothing: float = 0.0, name: str = "binary_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.pos_weight = [float(w) for w in pos_weight]
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        ops = keras.ops
        y_pred = ops.cast(y_pred, "float32")
        y_true = ops.cast(y_true, "float32") * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
        eps = keras.backend.epsilon()
        p = ops.clip(y_pred, eps, 1.0 - eps)
        w = ops.convert_to_tensor(np.asarray(self.pos_weight, np.float32))
        return -ops.mean(w * y_true * ops.log(p) + (1.0 - y_true) * ops.log(1.0 - p), axis=-1)

    def get_config(self):
        return {**super().get_config(), "pos_weight": self.pos_weight, "label_smoothing": self.label_smoothing}


def sample_weights(labels, weights):
    """Per-example weights `labels @ weights` of one-hot (or mixed) labels [B, C]: a [B] tensor."""
    import tensorflow as tf

    labels = tf.convert_to_tensor(labels)
    return tf.linalg.matvec(tf.cast(labels, tf.float32), tf.constant(weights, tf.float32))


def weighted_dataset(ds, weights):
    """`(x, y)` batches -> `(x, y, sample_weights(y))`; `ds` unchanged when `weights` is `None`."""
    if weights is None:
        return ds
    import tensorflow as tf

    w = np.asarray(weights, np.float32)
    out = ds.map(lambda x, y: (x, y, sample_weights(y, w)), num_parallel_calls=tf.data.AUTOTUNE)
    return out.prefetch(tf.data.AUTOTUNE)
