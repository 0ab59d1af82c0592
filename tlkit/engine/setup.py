"""Run setup shared by the verbs: one function from a configuration to a ready run (backbone spec, runtime, image
size, data, batch size), the pipelines, the classifier whose head starts from standardised features, and the
result a training verb returns.

Example:
    run = setup_run(cfg)
    train_ds, val_ds, test_ds, plain_ds = make_pipelines(run.cfg, run.data, run.size, out_dir)
    clf, feats = build_model(run.spec, run.base, run.data.num_classes, run.cfg, run.size, run.rt, plain_ds, val_ds)
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import keras
import numpy as np

from tlkit.core import runtime
from tlkit.core.errors import DataError
from tlkit.data import Datasets, cache_policy, load_sources, make_dataset
from tlkit.engine import features
from tlkit.engine.loop import HeadFeatures
from tlkit.models import backbones
from tlkit.models.classifier import Classifier, build_classifier


@dataclasses.dataclass
class RunResult:
    """What a training verb (`finetune`, `distill`, `prune`) returns.

    Attributes:
        model: The trained classifier (best validation checkpoint).
        history: Per-epoch metrics, one dict per epoch, with the stage name.
        metrics: Metrics per split (`val`, `test`), as in `metrics.json`.
        run_dir: The run folder.
        class_names: Class names, index = label.
        config: The resolved configuration.
    """

    model: keras.Model
    history: list[dict[str, Any]]
    metrics: dict[str, Any]
    run_dir: str
    class_names: list[str]
    config: Any


@dataclasses.dataclass
class Run:
    """A run set up by `setup_run`.

    Attributes:
        cfg: The configuration with the batch size capped to the training split (`fit_batch_size`).
        spec: The backbone's `BackboneSpec`.
        rt: The `Runtime` (precision, XLA, distribution strategy).
        base: The backbone, built in the runtime's scope.
        size: The input side in pixels (`backbones.resolve_image_size`).
        data: The `Datasets` (splits, class names).
    """

    cfg: Any
    spec: backbones.BackboneSpec
    rt: runtime.Runtime
    base: keras.Model | None
    size: int
    data: Datasets


def setup_run(cfg, *, default_size: int | None = None, cap_batch: bool = True, build_base: bool = True) -> Run:
    """Spec, seed, runtime, backbone, image size and data of a run, in the order that fails before anything is
    written: the backbone first (a user's `.keras` fixes its own input size, ImageNet weights may need a download),
    then the data.

    Args:
        cfg: A `FinetuneConfig` (validated by the caller).
        default_size: The size to use when the configuration names none and the backbone has no fixed size (the
            teacher's, for `distill`). Defaults to `None` (the backbone's default size).
        cap_batch: Cap the batch size to the training split (`fit_batch_size`). Defaults to `True`.
        build_base: Build the backbone (always done for a user's `.keras`, whose file fixes the size). Defaults to
            `True`; `False` leaves `Run.base` `None` (the caller has its model).

    Raises:
        ConfigError: a size the backbone cannot take. DataError: an empty training split.
    """
    spec = backbones.get_backbone(cfg.model.base)
    keras.utils.set_random_seed(cfg.seed)
    rt = runtime.setup(cfg.runtime)
    base = None
    if build_base or spec.path:
        with rt.scope():
            base = spec.build(cfg.data.image_size if spec.path else (cfg.data.image_size or default_size),
                              cfg.model.weights)
    size = backbones.resolve_image_size(spec, cfg.data.image_size or (None if spec.path else default_size), base)
    data = load_sources(cfg.data, size, cfg.seed)
    check_data(data)
    if cfg.data.cache == "memory":  # refused now, with the estimate, not when the kernel kills the run hours later
        cache_policy.decide("memory", _cached_counts(data), size, None)
    if cap_batch:
        cfg = fit_batch_size(cfg, data.train.count)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=size))
    return Run(cfg, spec, rt, base, size, data)


def check_data(data: Datasets) -> None:
    """Refuses data without training images."""
    if data.train is None or data.train.count < 1:
        raise DataError("The training split is empty.")


def fit_batch_size(cfg, train_count: int, log: bool = True):
    """`cfg` with `data.batch_size` at most the number of training images (one line says so when it changes).

    A few-shot folder (5 images x 10 classes) then runs with the default batch of 32 instead of failing.

    Example:
        >>> from tlkit.core.config import DataConfig, FinetuneConfig
        >>> fit_batch_size(FinetuneConfig(data=DataConfig(batch_size=32)), 20, log=False).data.batch_size
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
    cache, common = _pipeline_options(cfg, data, size, out_dir, log=True)
    train = make_train_pipeline(cfg, data, size, out_dir, cache=cache)  # train and val: one decision
    val = make_dataset(data.val, cache=cache, **common) if data.val else None
    test = make_dataset(data.test, cache="none", **common) if data.test else None
    plain = make_dataset(data.train, cache="none", **common)
    return train, val, test, plain


def _cached_counts(data: Datasets) -> list[int]:
    return [data.train.count] + ([data.val.count] if data.val else [])


def _pipeline_options(cfg, data: Datasets, size: int, out_dir: str | None, log: bool = False,
                      cache: str | None = None) -> tuple[str, dict[str, Any]]:
    """`(cache, make_dataset keyword arguments)`; the cache as given, else decided from `--cache`."""
    d = cfg.data
    det = True if cfg.runtime.deterministic else None
    cache_dir = os.path.join(out_dir, "cache") if out_dir else None
    if cache is None:
        decision = cache_policy.decide(d.cache, _cached_counts(data), size, cache_dir)
        cache = decision.mode
        if log:
            print(f"[tlkit] {decision.reason}", flush=True)
    return cache, dict(image_size=size, batch_size=d.batch_size, num_classes=data.num_classes, seed=cfg.seed,
                       cache_dir=cache_dir, deterministic=det)


def make_train_pipeline(cfg, data: Datasets, size: int, out_dir: str | None, augment: str | None = None,
                        flip: bool | None = None, cache: str | None = None):
    """The augmented training pipeline of a run (`augment`/`flip`/`cache` override the configuration's)."""
    cache, common = _pipeline_options(cfg, data, size, out_dir, cache=cache)
    return make_dataset(data.train, training=True, augment=augment or cfg.data.augment, cache=cache,
                        flip=cfg.data.flip if flip is None else flip, **common)


def feature_stats(feats: HeadFeatures) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and variance of the training features (float64 sums; memory-mapped ones by chunks)."""
    return features.mean_var(feats.x_train)


def build_model(spec, base: keras.Model, num_classes: int, cfg, size: int, rt, plain_ds, val_ds,
                class_names: list[str] | None = None, multi_label: bool = False, data: Datasets | None = None,
                out_dir: str | None = None, feature_dir: str | None = None,
                keep_features: bool = True) -> tuple[Classifier, HeadFeatures]:
    """The classifier with its head standardising the backbone's features, and those features.

    The features of the un-augmented training images (and of the validation images) are computed once through
    the backbone; their per-feature mean and variance become the constants of the head's `feature_norm` layer, and
    the same features train the head stage (`HeadFeatures`, passed to `loop.run_stages`).

    With `multi_label`, the head ends in a sigmoid per class (`build_classifier`). With `data` and `out_dir` (or
    `feature_dir`), the features are bounded like `--cache auto` (`cache_policy.decide_features`): memory-mapped from
    `feature_dir`, else the run folder's `cache/`, when they exceed the share of the memory available. Without
    `keep_features` (a verb that trains no head on them: `lr-find`, `distill`), only the statistics are taken, batch
    by batch (`features.feature_moments`), and the returned `HeadFeatures` is not computed: memory does not grow
    with the data.

    Returns:
        `(classifier, features)`: a `Classifier` record and the `HeadFeatures`.
    """
    with rt.scope():
        probe = build_classifier(spec, num_classes, cfg.model, size, base=base)  # for its feature extractor
    folder = feature_dir or (os.path.join(out_dir, "cache") if out_dir else None)
    rows = sum(_cached_counts(data)) if data is not None and folder else None
    feats = HeadFeatures.lazy(plain_ds, val_ds, folder, rows)
    if keep_features:
        stats = feature_stats(feats.get(probe, rt.jit_compile))
    else:
        extractor, _ = features.split_model(probe)
        stats = features.feature_moments(extractor, plain_ds, rt.jit_compile)
    with rt.scope():
        clf = Classifier.build(spec, num_classes, cfg.model, size, base=base, feature_stats=stats,
                               class_names=class_names, multi_label=multi_label)
    del probe
    return clf, feats
