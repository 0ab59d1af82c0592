"""Run setup shared by the verbs: the batch size a small dataset can take, the pipelines, the classifier whose head
starts from standardised features.

Example:
    >>> cfg = fit_batch_size(cfg, data.train.count)
    >>> train_ds, val_ds, test_ds, plain_ds = make_pipelines(cfg, data, size, out_dir)
    >>> model, feats = build_model(spec, base, data.num_classes, cfg, size, rt, plain_ds, val_ds)
"""
from __future__ import annotations

import dataclasses
import os

import keras
import numpy as np

from tlkit.data import Datasets, make_dataset
from tlkit.engine.loop import HeadFeatures
from tlkit.errors import DataError
from tlkit.model import build_classifier


def fit_batch_size(cfg, train_count: int, log: bool = True):
    """`cfg` with `data.batch_size` at most the number of training images (one line says so when it changes).

    A few-shot folder (5 images x 10 classes) then runs with the default batch of 32 instead of failing.

    Example:
        >>> fit_batch_size(FinetuneConfig(data=DataConfig(batch_size=32)), 20).data.batch_size
        20
    """
    if train_count < 1:
        raise DataError("The training split is empty.")
    if cfg.data.batch_size <= train_count:
        return cfg
    if log:
        print(f"[tlkit] batch size {cfg.data.batch_size} is larger than the training split ({train_count} images): "
              f"using {train_count}", flush=True)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=train_count))


def make_pipelines(cfg, data: Datasets, size: int, out_dir: str | None):
    """The train (augmented), val, test and un-augmented train `tf.data` pipelines of a run.

    The un-augmented training pipeline feeds the head's features (`HeadFeatures`): the statistics of the head's
    standardisation and the head stage itself.
    """
    d = cfg.data
    det = True if cfg.runtime.deterministic else None
    cache_dir = os.path.join(out_dir, "cache") if out_dir else None
    cache = d.cache if (d.cache != "disk" or cache_dir) else "memory"
    common = dict(image_size=size, batch_size=d.batch_size, num_classes=data.num_classes, seed=cfg.seed,
                  cache_dir=cache_dir, deterministic=det)
    train = make_dataset(data.train, training=True, augment=d.augment, cache=cache, **common)
    val = make_dataset(data.val, cache=cache, **common) if data.val else None
    test = make_dataset(data.test, cache="none", **common) if data.test else None
    plain = make_dataset(data.train, cache="none", **common)
    return train, val, test, plain


def feature_stats(feats: HeadFeatures) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and variance of the training features (float64 sums)."""
    x = np.asarray(feats.x_train, np.float64)
    return x.mean(axis=0), x.var(axis=0)


def build_model(spec, base: keras.Model, num_classes: int, cfg, size: int, rt, plain_ds, val_ds):
    """The classifier with its head standardising the backbone's features, and those features.

    The features of the un-augmented training images (and of the validation images) are computed once through
    the backbone; their per-feature mean and variance become the constants of the head's `feature_norm` layer, and
    the same features train the head stage (`HeadFeatures`, passed to `loop.run_stages`).

    Returns:
        `(model, features)`.
    """
    with rt.scope():
        probe = build_classifier(spec, num_classes, cfg.model, size, base=base)
    feats = HeadFeatures.lazy(plain_ds, val_ds).get(probe, rt.jit_compile)
    with rt.scope():
        model = build_classifier(spec, num_classes, cfg.model, size, base=base, feature_stats=feature_stats(feats))
    del probe
    return model, feats
