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

The features are N x D float32 (10 GB for ImageNet through ResNet50). A run bounds them like `--cache auto`
(`data.cache_policy.decide_features`): beyond a share of the memory available they are written batch by batch to
`.npy` files in the run folder's `cache/` (`NpyWriter`) and memory-mapped; `features_dataset` then reads each batch by
its row indices, shuffled exactly as the in-memory rows would be, and `mean_var` reads them by chunks. The labels are
stored the same way, whatever their shape and dtype.

Example:
    extractor, head = split_model(model)
    x_train, y_train, x_val, y_val = extract_splits(extractor, plain_train_ds, val_ds)
"""
from __future__ import annotations

import os
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


class _InMemory:
    """Collects the batches of `extract_features` in lists, joined at the end."""

    def __init__(self):
        self.parts: tuple[list, list] = ([], [])

    def add(self, feats: np.ndarray, labels: np.ndarray) -> None:
        self.parts[0].append(feats)
        self.parts[1].append(labels)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self.parts[0]), np.concatenate(self.parts[1])


class NpyWriter:
    """Appends batches (any shape after the first axis, any dtype) to a `.npy` file, then maps it read-only.

    The header written first (for 0 rows) has room for any row count (NumPy pads it for growth along the first
    axis), so it is rewritten in place at the end. The file is written under a temporary name and renamed, so a
    memory map of an earlier file of the same name stays valid.

    Example:
        w = NpyWriter("run/cache/features-train.npy")
        w.append(batch); x = w.finish()           # np.memmap [N, ...]
    """

    def __init__(self, path: str):
        self.path, self.tmp = path, path + ".part"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.file = open(self.tmp, "wb")
        self.rows, self.header_len = 0, 0
        self.dtype, self.shape = None, ()

    def _header(self, rows: int) -> None:
        self.file.seek(0)
        np.lib.format.write_array_header_1_0(self.file, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                         "fortran_order": False, "shape": (rows, *self.shape)})

    def append(self, batch: np.ndarray) -> None:
        batch = np.ascontiguousarray(batch)
        if self.dtype is None:
            self.dtype, self.shape = batch.dtype, batch.shape[1:]
            self._header(0)
            self.header_len = self.file.tell()
        self.file.write(batch.astype(self.dtype, copy=False).tobytes())
        self.rows += len(batch)

    def finish(self) -> np.memmap:
        end = self.file.tell()
        self._header(self.rows)
        if self.file.tell() != self.header_len:  # NumPy's header no longer has room for growth: cannot happen
            raise RuntimeError(f"The header of {self.path} changed length.")
        self.file.seek(end)
        self.file.close()
        os.replace(self.tmp, self.path)
        return np.load(self.path, mmap_mode="r")


class _OnDisk:
    """Collects the batches of `extract_features` in two memory-mapped `.npy` files (features, labels)."""

    def __init__(self, folder: str, what: str):
        self.writers = (NpyWriter(os.path.join(folder, f"features-{what}.npy")),
                        NpyWriter(os.path.join(folder, f"labels-{what}.npy")))

    def add(self, feats: np.ndarray, labels: np.ndarray) -> None:
        self.writers[0].append(feats)
        self.writers[1].append(labels)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        return self.writers[0].finish(), self.writers[1].finish()


def extract_features(extractor: keras.Model, ds: tf.data.Dataset, jit_compile: bool = False,
                     what: str = "train", forward=None, folder: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Runs `extractor` over a batched `(images, labels)` dataset once, with a progress bar.

    Args:
        extractor: Images -> features.
        ds: Batches of `(images, labels)` (one-hot, or any per-example array).
        jit_compile: Compile the forward pass with XLA. Defaults to `False`.
        what: Name of the split, for the progress line and the file names. Defaults to `"train"`.
        forward: An already compiled forward pass to reuse. Defaults to `None` (compiled here).
        folder: Write the features and labels to `features-{what}.npy` and `labels-{what}.npy` there and return
            them memory-mapped (`cache_policy.decide_features`). Defaults to `None` (in memory).

    Returns:
        `(features float32 [N, ...], labels float32 [N, ...])`.

    Example:
        f, y = extract_features(extractor, val_ds, what="val")
    """
    out = _OnDisk(folder, what) if folder else _InMemory()
    stream_features(extractor, ds, jit_compile, what, forward, out)
    return out.result()


def stream_features(extractor: keras.Model, ds: tf.data.Dataset, jit_compile: bool, what: str, forward,
                    out) -> None:
    """The loop of `extract_features`: each batch's features and labels into `out.add(features, labels)`, with a
    progress bar. `out` may keep them (`extract_features`) or only fold them into a figure (`Moments`, the `auto`
    recipe's augmentation scores): memory then stays that of one batch."""
    forward = forward or compiled_forward(extractor, jit_compile)
    steps = int(ds.cardinality())
    bar = keras.utils.Progbar(steps if steps > 0 else None, unit_name="batch")
    print(f"[tlkit] computing base features of the {what} split (once)", flush=True)
    empty = True
    for x, y in ds:
        out.add(forward(x).numpy(), np.asarray(y, np.float32))
        empty = False
        bar.add(1)
    if empty:
        raise ValueError(f"The {what} split gave no batches to compute features from.")


class Moments:
    """Per-column count, mean and variance (float64) of batches of rows, merged one batch at a time (the pairwise
    update of Chan, Golub and LeVeque), so that the statistics of N rows need the memory of one batch.

    Example:
        m = Moments()
        for batch in batches: m.add(batch)
        mean, var = m.result()
    """

    def __init__(self):
        self.n = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None

    def add(self, x: np.ndarray, labels: Any = None) -> None:
        x = np.asarray(x, np.float64)
        nb = len(x)
        if nb == 0:
            return
        mb = x.mean(axis=0)
        m2b = np.square(x - mb).sum(axis=0)
        if self.mean is None:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + np.square(delta) * (self.n * nb / n)
        self.n = n

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.mean is None:
            raise ValueError("No rows to take the mean and variance of.")
        return self.mean, self.m2 / self.n


def feature_moments(extractor: keras.Model, ds: tf.data.Dataset, jit_compile: bool = False,
                    what: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and variance (float64) of `extractor`'s features over a batched `(images, labels)` dataset,
    streamed: no feature is kept, so the memory does not grow with the dataset (what `mean_var` of
    `extract_features`'s output gives, for a verb that needs only the statistics: `lr-find`, `distill`).

    Example:
        mean, var = feature_moments(extractor, plain_train_ds)
    """
    out = Moments()
    stream_features(extractor, ds, jit_compile, what, None, out)
    return out.result()


def extract_splits(extractor: keras.Model, train_ds: tf.data.Dataset, val_ds: tf.data.Dataset | None,
                   jit_compile: bool = False, folder: str | None = None):
    """Features of the training and (optional) validation batches with one compiled forward pass.

    Args:
        folder: Memory-map them from `.npy` files there (`extract_features`). Defaults to `None` (in memory).

    Returns:
        `(x_train, y_train, x_val, y_val)`, the last two `None` without `val_ds`.
    """
    forward = compiled_forward(extractor, jit_compile)
    x_train, y_train = extract_features(extractor, train_ds, jit_compile, "train", forward, folder)
    if val_ds is None:
        return x_train, y_train, None, None
    x_val, y_val = extract_features(extractor, val_ds, jit_compile, "validation", forward, folder)
    return x_train, y_train, x_val, y_val


def mean_var(x: np.ndarray, rows: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and variance (float64) of `x`; a memory-mapped `x` is read `rows` rows at a time."""
    if not isinstance(x, np.memmap):
        x = np.asarray(x, np.float64)
        return x.mean(axis=0), x.var(axis=0)
    n = len(x)
    total = sum(np.asarray(x[i:i + rows], np.float64).sum(axis=0) for i in range(0, n, rows))
    mean = total / n
    sq = sum(np.square(np.asarray(x[i:i + rows], np.float64) - mean).sum(axis=0) for i in range(0, n, rows))
    return mean, sq / n


def fresh_metrics(model: keras.Model) -> list:
    """New, unbuilt copies of the compiled `model`'s metrics (for a model that shares its layers)."""
    config = model.get_compile_config() or {}
    metrics = config.get("metrics") or []
    return [keras.metrics.deserialize(m) if isinstance(m, dict) else m for m in metrics]


def features_dataset(feats: np.ndarray, labels: np.ndarray, batch_size: int, *, training: bool,
                     seed: int = 42) -> tf.data.Dataset:
    """Batches of cached `(features, labels)`, reshuffled every epoch when `training`.

    Features in memory are sliced as tensors; memory-mapped ones are read by the batch (their row indices
    shuffled the same way, so both give the same batches for the same seed).
    """
    mapped = isinstance(feats, np.memmap)
    ds = tf.data.Dataset.range(len(feats)) if mapped else tf.data.Dataset.from_tensor_slices((feats, labels))
    if training:
        ds = ds.shuffle(len(feats), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if mapped:
        ds = ds.map(_rows_of(feats, labels))
    return ds.prefetch(tf.data.AUTOTUNE)


def _rows_of(feats: np.ndarray, labels: np.ndarray):
    """`indices -> (feats[indices], labels[indices])` as a tf.data map function (NumPy reads the mapped files)."""
    def take(idx):
        return np.asarray(feats[idx]), np.asarray(labels[idx])

    def rows(idx):
        x, y = tf.numpy_function(take, [idx], [tf.as_dtype(feats.dtype), tf.as_dtype(labels.dtype)], stateful=False)
        x.set_shape([None, *feats.shape[1:]])
        y.set_shape([None, *labels.shape[1:]])
        return x, y

    return rows
