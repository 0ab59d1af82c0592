"""Frozen-feature caching: the head stage trains on base features computed once.

When a stage trains no backbone weight, every epoch would push the same images through the same frozen base to
get the same features; only the head (feature_norm -> dropout -> Dense -> softmax) learns. The engine
(`engine.loop.HeadFeatures`) computes the pooled features of the un-augmented training and validation images once
(`extract_splits`, with a progress bar), and trains the head on them (`engine.loop.fit_head_on_features`): a
`keras.Model` made of the classifier's own head layers (`split_model`: the same layer objects, so the weights land
in the full model) with the full model's optimizer, loss and metrics. A pass then costs a few matrix products
instead of a forward pass through the backbone, so the head can be trained to convergence (`head_steps`) in
seconds, on 50 images or 50,000. Features are computed in inference mode (`training=False`), as the frozen base
runs anyway. `cache_features: false` (`head_on_features`) trains the head stage on the images instead.

Example:
    extractor, head = split_model(model)
    x_train, y_train, x_val, y_val = extract_splits(extractor, plain_train_ds, val_ds)
"""
from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tlkit.models.classifier import get_base, split_model  # noqa: F401  (split_model: public here too)


def head_on_features(cfg: Any) -> bool:
    """Whether head stages train on cached features (`RuntimeConfig.cache_features` not `False`).

    Example:
        >>> from tlkit.core.config import FinetuneConfig, RuntimeConfig
        >>> head_on_features(FinetuneConfig(runtime=RuntimeConfig(cache_features=False)))
        False
    """
    return getattr(cfg.runtime, "cache_features", None) is not False


def _base_index(model: keras.Model) -> int:
    base = get_base(model)
    return [layer.name for layer in model.layers].index(base.name)


def compiled_forward(extractor: keras.Model, jit_compile: bool):
    """`extractor(x, training=False)` in float32 as one traced function of any batch size."""
    # One trace for every batch (the last, partial one and the validation batches included): tracing a large
    # backbone costs seconds each time.
    spec = tf.TensorSpec([None, *extractor.input_shape[1:]], tf.float32)
    return tf.function(lambda x: tf.cast(extractor(x, training=False), tf.float32), jit_compile=jit_compile,
                       input_signature=[spec])


def extract_features(extractor: keras.Model, ds: tf.data.Dataset, jit_compile: bool = False,
                     what: str = "train", forward=None) -> tuple[np.ndarray, np.ndarray]:
    """Runs `extractor` over a batched `(images, labels)` dataset once, with a progress bar.

    Args:
        extractor: Images -> features.
        ds: Batches of `(images, one-hot labels)`.
        jit_compile: Compile the forward pass with XLA. Defaults to `False`.
        what: Name of the split, for the progress line. Defaults to `"train"`.
        forward: An already compiled forward pass to reuse. Defaults to `None` (compiled here).

    Returns:
        `(features float32 [N, ...], labels float32 [N, C])`.

    Example:
        f, y = extract_features(extractor, val_ds, what="val")
    """
    forward = forward or compiled_forward(extractor, jit_compile)
    steps = int(ds.cardinality())
    bar = keras.utils.Progbar(steps if steps > 0 else None, unit_name="batch")
    print(f"[tlkit] computing base features of the {what} split (once)", flush=True)
    feats, labels = [], []
    for x, y in ds:
        feats.append(forward(x).numpy())
        labels.append(np.asarray(y, np.float32))
        bar.add(1)
    if not feats:
        raise ValueError(f"The {what} split gave no batches to compute features from.")
    return np.concatenate(feats), np.concatenate(labels)


def extract_splits(extractor: keras.Model, train_ds: tf.data.Dataset, val_ds: tf.data.Dataset | None,
                   jit_compile: bool = False):
    """Features of the training and (optional) validation batches with one compiled forward pass.

    Returns:
        `(x_train, y_train, x_val, y_val)`, the last two `None` without `val_ds`.
    """
    forward = compiled_forward(extractor, jit_compile)
    x_train, y_train = extract_features(extractor, train_ds, jit_compile, "train", forward)
    if val_ds is None:
        return x_train, y_train, None, None
    x_val, y_val = extract_features(extractor, val_ds, jit_compile, "validation", forward)
    return x_train, y_train, x_val, y_val


def fresh_metrics(model: keras.Model) -> list:
    """New, unbuilt copies of the compiled `model`'s metrics (for a model that shares its layers)."""
    config = model.get_compile_config() or {}
    metrics = config.get("metrics") or []
    return [keras.metrics.deserialize(m) if isinstance(m, dict) else m for m in metrics]


def features_dataset(feats: np.ndarray, labels: np.ndarray, batch_size: int, *, training: bool,
                     seed: int = 42) -> tf.data.Dataset:
    """Batches of cached `(features, labels)`, reshuffled every epoch when `training`."""
    ds = tf.data.Dataset.from_tensor_slices((feats, labels))
    if training:
        ds = ds.shuffle(len(feats), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
