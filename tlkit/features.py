"""Frozen-feature caching: train the head of a frozen-backbone stage on base features computed once.

When a stage trains no backbone weight, every epoch pushes the same images through the same frozen base to
get the same features; only the head (dropout -> Dense -> softmax) learns. `fit_stage` then computes the
features once (with a progress bar), and trains the head on them: a `keras.Model` made of the classifier's own
head layers (the same layer objects, so the same architecture and the weights land in the full model), with
the full model's optimizer, loss and metrics, and the run's callbacks still seeing the full model (the best
checkpoint and the saved model are base + head). An epoch then costs a few matrix products instead of a
forward pass through the backbone, which makes the `head` stage of `two_stage` and `feature_extraction`
many times faster.

When it applies (`use_feature_cache`): the backbone has no trainable weight in this stage, and
`RuntimeConfig.cache_features` is `True`, or `None` (auto) with `DataConfig.augment == "none"` (with
augmentation, each epoch sees other images, so auto leaves it off; `--cache-features` reuses the features of one
augmented pass). Features are computed in inference mode (`training=False`), as the frozen base runs anyway.

Example:
    >>> history = fit_stage(model, cfg, rt, train_ds, validation_data=val_ds, epochs=3, callbacks=cbs)
"""
from __future__ import annotations

import warnings
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tlkit.model import get_base, head_layers


def use_feature_cache(model: keras.Model, cfg: Any, head_stage: bool = False) -> bool:
    """Whether the coming stage of `model` trains on cached features (call after `set_trainable`).

    Args:
        model: A classifier from `build_classifier`.
        cfg: The `FinetuneConfig` (`runtime.cache_features`, `data.augment`).
        head_stage: The stage is the recipe's head stage, which trains on the features of the un-augmented
            training images whatever the augmentation (the engine's `HeadFeatures`): then only
            `cache_features: false` turns the cache off. Defaults to `False`.

    Example:
        >>> use_feature_cache(model, cfg)
        True
    """
    flag = getattr(cfg.runtime, "cache_features", None)
    if flag is False:
        return False
    if get_base(model).trainable_weights:
        return False
    if any(w.trainable for layer in model.layers[:_base_index(model)] for w in layer.weights):
        return False  # something trainable before the backbone (not a classifier we know)
    return bool(flag) or head_stage or cfg.data.augment == "none"


def _base_index(model: keras.Model) -> int:
    base = get_base(model)
    return [layer.name for layer in model.layers].index(base.name)


def split_model(model: keras.Model) -> tuple[keras.Model, keras.Model]:
    """Splits a classifier into a feature extractor and a head model that share the classifier's layers.

    The cut is after the last weightless layer that follows the backbone (the global pooling of
    `build_classifier`), so the cached features are pooled vectors, not feature maps.

    Returns:
        `(extractor, head)`: `extractor` maps images to features; `head` maps features to probabilities with
        the classifier's own head layers (training the head trains the classifier).

    Example:
        >>> extractor, head = split_model(model)
        >>> [l.name for l in head.layers]
        ['features', 'feature_norm', 'head_dropout', 'logits', 'probs']
    """
    layers = head_layers(model)
    for layer in layers:
        node_inputs = layer._inbound_nodes[0].input_tensors if layer._inbound_nodes else []
        if len(node_inputs) != 1:
            raise ValueError(f"Layer {layer.name!r} of the head does not take exactly one input; the head of a "
                             "build_classifier model is a chain of single-input layers.")
    cut = 0
    while cut < len(layers) - 1 and not layers[cut].weights and isinstance(
            layers[cut], (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D, keras.layers.Flatten)):
        cut += 1
    # The input of the first head layer as the classifier calls it (its first node): the cached features.
    feat_tensor = layers[cut]._inbound_nodes[0].input_tensors[0]
    extractor = keras.Model(model.inputs, feat_tensor, name=f"{model.name}_features")
    inputs = keras.Input(tuple(feat_tensor.shape[1:]), dtype="float32", name="features")
    x = inputs
    for layer in layers[cut:]:
        x = layer(x)
    head = keras.Model(inputs, x, name=f"{model.name}_head")
    return extractor, head


def _compiled_forward(extractor: keras.Model, jit_compile: bool):
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
        >>> f, y = extract_features(extractor, val_ds, what="val")
    """
    forward = forward or _compiled_forward(extractor, jit_compile)
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
    forward = _compiled_forward(extractor, jit_compile)
    x_train, y_train = extract_features(extractor, train_ds, jit_compile, "train", forward)
    if val_ds is None:
        return x_train, y_train, None, None
    x_val, y_val = extract_features(extractor, val_ds, jit_compile, "validation", forward)
    return x_train, y_train, x_val, y_val


class _ToFullModel(keras.callbacks.Callback):
    """Forwards the head's fit events to callbacks that keep seeing the full model.

    The checkpoints save the full model's weights (base + head), `stop_training` set on the full model (NaN
    guard, early stopping) stops the head's fit, and the learning rate read from `model.optimizer` is the shared
    optimizer's.
    """

    def __init__(self, callbacks: list[keras.callbacks.Callback], model: keras.Model):
        super().__init__()
        self.full = model
        self.inner = keras.callbacks.CallbackList(list(callbacks), add_history=False, add_progbar=False, model=model)
        self.head: keras.Model | None = None

    def set_model(self, model):
        self.head = model  # the inner callbacks keep the full model

    def set_params(self, params):
        super().set_params(params)
        self.inner.set_params(params)

    def _sync(self):
        if self.full.stop_training and self.head is not None:
            self.head.stop_training = True

    def on_train_begin(self, logs=None):
        self.full.stop_training = False
        self.inner.on_train_begin(logs)

    def on_train_end(self, logs=None):
        self.inner.on_train_end(logs)

    def on_epoch_begin(self, epoch, logs=None):
        self.inner.on_epoch_begin(epoch, logs)

    def on_epoch_end(self, epoch, logs=None):
        self.inner.on_epoch_end(epoch, logs)
        self._sync()

    def on_train_batch_begin(self, batch, logs=None):
        self.inner.on_train_batch_begin(batch, logs)

    def on_train_batch_end(self, batch, logs=None):
        self.inner.on_train_batch_end(batch, logs)
        self._sync()

    def on_test_begin(self, logs=None):
        self.inner.on_test_begin(logs)

    def on_test_end(self, logs=None):
        self.inner.on_test_end(logs)

    def on_test_batch_begin(self, batch, logs=None):
        self.inner.on_test_batch_begin(batch, logs)

    def on_test_batch_end(self, batch, logs=None):
        self.inner.on_test_batch_end(batch, logs)


def _fresh_metrics(model: keras.Model) -> list:
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


def fit_stage(model: keras.Model, cfg: Any, rt: Any, train_ds: tf.data.Dataset, *,
              validation_data: tf.data.Dataset | None = None, callbacks: list | None = None,
              batch_size: int | None = None, **fit_kwargs) -> keras.callbacks.History:
    """`model.fit` of one stage, on cached base features when `use_feature_cache` says so.

    Call it exactly as `model.fit(train_ds, validation_data=..., epochs=..., initial_epoch=..., callbacks=...,
    ...)` after compiling `model` for the stage. With the cache, the head model is compiled with the full model's
    optimizer (the same object, so its step count and state are the stage's), loss and metrics and XLA setting,
    and trained on the features for the same epochs, with the same batch size and number of steps per epoch.

    Args:
        model: The compiled classifier.
        cfg: The `FinetuneConfig`.
        rt: The `Runtime` (strategy scope, XLA).
        train_ds: Batches of `(images, one-hot labels)`.
        validation_data: Validation batches, or `None`. Defaults to `None`.
        callbacks: The stage's callbacks (they see the full model). Defaults to `None`.
        batch_size: Batch size of the feature batches. Defaults to `None` (`cfg.data.batch_size`).
        **fit_kwargs: Passed on to `fit` (`epochs`, `initial_epoch`, `verbose`, ...).

    Returns:
        The `History` of the fit.

    Example:
        >>> fit_stage(model, cfg, rt, train_ds, validation_data=val_ds, epochs=3, verbose=2)
    """
    if not use_feature_cache(model, cfg):
        with warnings.catch_warnings():
            # Keras 3.15 warns "Your input ran out of data" at the end of every epoch of a dataset of unknown
            # length (image folders: ignore_errors); it is spurious (fixed upstream, keras-team/keras#23360).
            warnings.filterwarnings("ignore", message=".*Your input ran out of data.*")
            return model.fit(train_ds, validation_data=validation_data, callbacks=callbacks, **fit_kwargs)
    fit_kwargs["shuffle"] = False  # the feature batches are reshuffled by the dataset itself
    extractor, head = split_model(model)
    jit = bool(model.jit_compile)
    x_train, y_train, x_val, y_val = extract_splits(extractor, train_ds, validation_data, jit)
    val = None
    if validation_data is not None:
        val = features_dataset(x_val, y_val, batch_size or cfg.data.batch_size, training=False)
    train = features_dataset(x_train, y_train, batch_size or cfg.data.batch_size, training=True, seed=cfg.seed)
    print(f"[tlkit] training the head on cached features ({x_train.shape[0]} x {x_train.shape[1:]} train)",
          flush=True)
    with rt.scope():
        head.compile(optimizer=model.optimizer, loss=model.loss, metrics=_fresh_metrics(model), jit_compile=jit)
    forward = [_ToFullModel(callbacks or [], model)]
    return head.fit(train, validation_data=val, callbacks=forward, **fit_kwargs)
