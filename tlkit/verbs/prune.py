"""`prune`: magnitude pruning of a fine-tuned run, with a sparsity schedule and fine-tuning to recover.

Written for Keras 3 (the TensorFlow Model Optimization toolkit's `prune_low_magnitude` targets Keras 2 and
wraps layers in classes plain Keras cannot load). Here the model stays the plain `build_classifier`
model: every pruned kernel (Conv, DepthwiseConv, SeparableConv, Dense; not the frozen `preprocess` layer,
and not the classification layer `logits` unless asked) gets a 0/1 mask outside the model. A callback
raises the sparsity on schedule by zeroing the smallest-magnitude weights of each kernel, and the
optimizer (`param_groups.scaled_optimizer`) multiplies each kernel by its mask after every update inside
the compiled train step, so pruned weights stay exactly zero while the rest fine-tune. Each pruned kernel
ends with exactly `round(sparsity * size)` zeros. The output is a normal run folder (`model.keras` loads
with plain Keras), and `metrics.json` reports accuracy against sparsity and the compressed size.

Example:
    result = prune(PruneConfig(run_dir="runs/resnet50-shapes-1", sparsity=0.5, epochs=2))
    result.metrics["pruning"]["table"]
"""
from __future__ import annotations

import dataclasses
import io
import math
import os
import shutil
import tempfile
import time
import zipfile
from typing import Any, Callable

import numpy as np
import keras
import tensorflow as tf

from tlkit.models import param_groups
from tlkit.core import rundir, runtime
from tlkit.core.config import FinetuneConfig
from tlkit.core.config_io import load_config
from tlkit.core.verb_configs import PruneConfig, parse_sparsities
from tlkit.data import load_sources
from tlkit.core.errors import ConfigError, DataError, TrainingError
from tlkit.engine.loop import run_stages
from tlkit.engine import run_folder
from tlkit.engine.metrics import forward_fn, predict_split
from tlkit.engine import setup as engine_setup
from tlkit.engine.setup import RunResult
from tlkit.models.classifier import Classifier, save_model
from tlkit.models.strategies import Stage

_PRUNABLE = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D, keras.layers.DepthwiseConv2D,
             keras.layers.Conv2DTranspose, keras.layers.Dense)


def _all_layers(model: keras.Model) -> list[keras.layers.Layer]:
    out = []
    for layer in model.layers:
        out.append(layer)
        if isinstance(layer, keras.Model):
            out += _all_layers(layer)
    return out


def prunable_kernels(model: keras.Model, prune_head: bool = False) -> dict[str, keras.Variable]:
    """The kernels magnitude pruning applies to, by variable path.

    Args:
        model: A classifier (backbone nested or not).
        prune_head: Include the classification layer `logits`. Defaults to `False`.

    Returns:
        `{variable path: kernel variable}` of Conv/Dense-like layers, except `preprocess` (frozen).

    Example:
        sorted(prunable_kernels(model))[:2]
    """
    out: dict[str, keras.Variable] = {}
    for layer in _all_layers(model):
        if layer.name == "preprocess" or (layer.name == "logits" and not prune_head):
            continue
        if isinstance(layer, keras.layers.SeparableConv2D):
            found = [layer.depthwise_kernel, layer.pointwise_kernel]
        elif isinstance(layer, _PRUNABLE) and getattr(layer, "kernel", None) is not None:
            found = [layer.kernel]
        else:
            found = []
        for v in found:
            key, i = v.path, 1
            while key in out:  # same layer name in two nested models
                key, i = f"{v.path}#{i}", i + 1
            out[key] = v
    return out


def magnitude_mask(weights: np.ndarray, sparsity: float) -> np.ndarray:
    """A 0/1 mask zeroing exactly `round(sparsity * size)` entries of smallest magnitude (ties by position).

    Linear time: the k-th smallest magnitude is found by selection (`np.partition`), not by sorting every
    weight; everything below it is zeroed, then, among the weights equal to it, the first ones by position
    until there are exactly k zeros (what a stable sort of the magnitudes would pick).

    Example:
        >>> magnitude_mask(np.array([0.3, -0.1, 0.2, 0.05]), 0.5).tolist()
        [1.0, 0.0, 1.0, 0.0]
    """
    flat = np.abs(np.asarray(weights)).ravel()
    k = int(round(sparsity * flat.size))
    mask = np.ones(flat.size, np.float32)
    if k >= flat.size:
        mask[:] = 0.0
    elif k > 0:
        kth = np.partition(flat, k - 1)[k - 1]
        below = flat < kth
        mask[below] = 0.0
        ties = np.flatnonzero(flat == kth)[: k - int(np.count_nonzero(below))]
        mask[ties] = 0.0
    return mask.reshape(np.shape(weights))


def polynomial_sparsity(step: int, final: float, end_step: int, initial: float = 0.0, power: float = 3.0) -> float:
    """tfmot's PolynomialDecay: `final + (initial - final) * (1 - step / end_step) ** power`, then `final`.

    Example:
        >>> polynomial_sparsity(0, 0.5, 100), polynomial_sparsity(100, 0.5, 100)
        (0.0, 0.5)
    """
    frac = min(max(step, 0) / max(end_step, 1), 1.0)
    return float(final + (initial - final) * (1.0 - frac) ** power)


class Pruner:
    """Masks of the pruned kernels; `set_sparsity` recomputes them by magnitude and zeroes the kernels.

    Args:
        kernels: `{path: kernel variable}` (from `prunable_kernels`).
    """

    def __init__(self, kernels: dict[str, keras.Variable]):
        self.kernels = kernels
        self.masks = {p: tf.Variable(tf.ones(v.shape, tf.float32), trainable=False, name="mask")
                      for p, v in kernels.items()}
        self.sparsity = 0.0

    def set_sparsity(self, sparsity: float) -> None:
        """Zeroes the smallest-magnitude `sparsity` fraction of every kernel (pruned weights stay pruned)."""
        for p, v in self.kernels.items():
            w = np.asarray(v.numpy(), np.float32) * self.masks[p].numpy()
            mask = magnitude_mask(w, sparsity)
            self.masks[p].assign(mask)
            v.assign((w * mask).astype(v.dtype))
        self.sparsity = float(sparsity)

    def masks_by_id(self) -> dict[int, tf.Variable]:
        return {id(v): self.masks[p] for p, v in self.kernels.items()}

    def report(self) -> dict[str, Any]:
        """Zeros per kernel and over all pruned kernels, counted in the weights themselves."""
        layers, zeros, total = {}, 0, 0
        for p, v in self.kernels.items():
            w = np.asarray(v.numpy())
            z = int(np.sum(w == 0))
            layers[p] = {"size": int(w.size), "zeros": z, "sparsity": z / max(w.size, 1)}
            zeros += z
            total += int(w.size)
        return {"pruned_params": total, "zeros": zeros, "sparsity": zeros / max(total, 1), "layers": layers}


class PruningSchedule(keras.callbacks.Callback):
    """Raises the masks' sparsity along `target(step)` every `frequency` steps (and at `end_step`)."""

    def __init__(self, pruner: Pruner, target: Callable[[int], float], frequency: int, end_step: int):
        super().__init__()
        self.pruner, self.target, self.frequency, self.end_step = pruner, target, max(int(frequency), 1), end_step
        self.step = 0

    def on_train_batch_begin(self, batch, logs=None):
        s = self.target(self.step)
        if (self.step % self.frequency == 0 or self.step == self.end_step) and s > self.pruner.sparsity:
            self.pruner.set_sparsity(s)
        self.step += 1

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["sparsity"] = self.pruner.sparsity


def compressed_size(path: str) -> tuple[int, int]:
    """`(bytes on disk, bytes after zip deflate)` of a model file (a `.keras` archive stores its weights
    uncompressed, so the zipped size is where the zeros show)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.write(path, os.path.basename(path))
    return int(os.path.getsize(path)), len(buf.getvalue())


def _unfreeze(model: keras.Model, train_bn: bool) -> None:
    """Everything trains except BatchNorm (unless `train_bn`) and the frozen `preprocess` layer."""
    model.trainable = True
    for layer in _all_layers(model):
        if isinstance(layer, keras.Model):
            layer.trainable = True
    for layer in _all_layers(model):
        if isinstance(layer, keras.Model):
            continue
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = bool(train_bn)
        elif layer.name == "preprocess":
            layer.trainable = False


class _Evaluator:
    """Predicts the evaluation splits with one traced function, reused as the weights change."""

    def __init__(self, model: keras.Model, splits: list[tuple[str, Any]]):
        self.model, self.splits = model, splits
        self.fn = forward_fn(model)

    def predict(self, ds) -> tuple[np.ndarray, np.ndarray]:
        return predict_split(self.model, ds, forward=self.fn)

    def accuracies(self) -> dict[str, float | None]:
        out = {}
        for name, ds in self.splits:
            y, p = self.predict(ds)
            out[f"{name}_accuracy"] = float(np.mean(p.argmax(-1) == y)) if len(y) else None
        return out


def _row(label: str, model: keras.Model, pruner: Pruner, evaluator: _Evaluator, tmp_dir: str) -> dict[str, Any]:
    path = os.path.join(tmp_dir, "probe.keras")
    save_model(model, path)
    size, zipped = compressed_size(path)
    return {"model": label, "sparsity": round(pruner.report()["sparsity"], 4), **evaluator.accuracies(),
            "size_bytes": size, "zipped_bytes": zipped}


def sparsity_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table: model, sparsity of the pruned kernels, accuracies, size and zipped size."""
    header = ["model", "sparsity", "val_acc", "test_acc", "size_MB", "zipped_MB"]
    f = lambda v, fmt: "-" if v is None else fmt.format(v)  # noqa: E731
    lines = [header] + [[r["model"], f"{r['sparsity']:.3f}", f(r.get("val_accuracy"), "{:.4f}"),
                         f(r.get("test_accuracy"), "{:.4f}"), f"{r['size_bytes'] / 1e6:.3f}",
                         f"{r['zipped_bytes'] / 1e6:.3f}"] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines)


def prune(cfg: PruneConfig) -> RunResult:
    """Prunes a run's model by magnitude to `cfg.sparsity`, fine-tunes under the masks, writes a run folder.

    Args:
        cfg: A `PruneConfig` (run folder, sparsity, schedule, epochs, ...).

    Returns:
        A `RunResult` of the pruned model; `metrics["pruning"]` holds the accuracy/sparsity/size table and
        the sparsity of every pruned kernel.

    Raises:
        ConfigError: bad settings, or a run folder without model.keras / config.yaml.

    Example:
        r = prune(PruneConfig(run_dir="runs/resnet50-shapes-1", sparsity=0.5, schedule="polynomial", epochs=2))
    """
    cfg.validate()
    run_cfg_path = os.path.join(cfg.run_dir, "config.yaml")
    if not os.path.isdir(cfg.run_dir) or not os.path.isfile(run_cfg_path):
        raise ConfigError(f"prune needs a tlkit run folder with model.keras and config.yaml, got {cfg.run_dir!r}.")
    run_cfg: FinetuneConfig = load_config(run_cfg_path)
    t = run_cfg.train
    lr = cfg.lr if cfg.lr is not None else (float(t.lr) if not isinstance(t.lr, str) else 1e-3) * t.finetune_lr_scale
    batch = cfg.batch_size or run_cfg.data.batch_size
    keras.utils.set_random_seed(run_cfg.seed)
    rt = runtime.setup(run_cfg.runtime)
    with rt.scope():
        loaded = Classifier.from_run(cfg.run_dir)
    model, labels = loaded.model, loaded.class_names
    if loaded.multi_label:
        raise ConfigError("prune handles single-label (softmax) classifiers only; pruning a multi-label model (a "
                          "sigmoid per class) is not implemented.")
    size = int(model.input_shape[1])
    data = load_sources(dataclasses.replace(run_cfg.data, image_size=size), size, run_cfg.seed)
    if labels is not None and list(labels) != list(data.class_names):
        raise DataError(f"The run's labels.txt differs from its data's classes: {labels[:5]}... vs "
                        f"{data.class_names[:5]}...")
    kernels = prunable_kernels(model, cfg.prune_head)
    if not kernels:
        raise ConfigError(f"The model in {cfg.run_dir!r} has no Conv or Dense kernels to prune.")
    out_dir = cfg.output_dir or f"{os.path.normpath(cfg.run_dir)}-pruned{int(round(cfg.sparsity * 100))}"
    if os.path.abspath(out_dir) == os.path.abspath(cfg.run_dir):
        raise ConfigError(f"The output folder must differ from the run folder {cfg.run_dir!r}.")
    rundir.prepare_run_dir(out_dir, cfg.overwrite)
    resolved = dataclasses.replace(run_cfg, output_dir=os.path.abspath(out_dir),
                                   data=dataclasses.replace(run_cfg.data, image_size=size, batch_size=batch))
    train_ds, val_ds, test_ds, _ = engine_setup.make_pipelines(resolved, data, size, out_dir)  # the run's pipelines
    splits = [(n, ds) for n, ds in (("val", val_ds), ("test", test_ds)) if ds is not None]

    pruner = Pruner(kernels)
    evaluator = _Evaluator(model, splits)
    original = [np.array(w) for w in model.get_weights()]
    rows: list[dict[str, Any]] = []
    tmp_dir = tempfile.mkdtemp(prefix=".prune-", dir=out_dir)
    try:
        print(f"[tlkit] pruning {len(kernels)} kernels ({sum(int(np.prod(v.shape)) for v in kernels.values()):,} "
              f"weights) of {cfg.run_dir} to sparsity {cfg.sparsity:g}; {rt.describe()}", flush=True)
        rows.append(_row("original", model, pruner, evaluator, tmp_dir))
        for s in sorted(set(parse_sparsities(cfg.sweep) + [cfg.sparsity])):
            if s <= 0:
                continue
            pruner.set_sparsity(s)
            rows.append(_row(f"one-shot {s:g}", model, pruner, evaluator, tmp_dir))
            model.set_weights(original)
            pruner = Pruner(kernels)
        history: list[dict[str, Any]] = []
        t0 = time.time()
        if cfg.epochs > 0:
            history = _finetune(model, pruner, cfg, run_cfg, rt, lr, train_ds, val_ds, out_dir,
                                math.ceil(data.train.count / batch))
        pruner.set_sparsity(cfg.sparsity)  # exact final masks (also when the schedule ended early)
        train_seconds = time.time() - t0
        label = f"pruned {cfg.sparsity:g} + {cfg.epochs} epoch(s) {cfg.schedule}" if cfg.epochs else f"pruned {cfg.sparsity:g}"
        rows.append(_row(label, model, pruner, evaluator, tmp_dir))
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    model_path = os.path.join(out_dir, "model.keras")
    save_model(model, model_path)
    metrics = run_folder.split_metrics(model, dict(splits), data.class_names, predict=evaluator.predict)
    report = pruner.report()
    run_folder.write_config(out_dir, resolved)
    run_folder.write_labels(out_dir, data.class_names)
    pruning = {"source": os.path.abspath(cfg.run_dir), "target_sparsity": cfg.sparsity,
                              "sparsity": report["sparsity"], "pruned_params": report["pruned_params"],
                              "total_params": int(sum(int(np.prod(w.shape)) for w in model.weights)),
                              "zeros": report["zeros"], "lr": lr, "table": rows, "layers": report["layers"],
                              "config": dataclasses.asdict(cfg)}
    out_metrics = run_folder.run_metrics(metrics, train_seconds=train_seconds, epochs=len(history), pruning=pruning)
    run_folder.write_metrics(out_dir, out_metrics)
    print(sparsity_table(rows), flush=True)
    print(f"[tlkit] pruned run folder: {out_dir}", flush=True)
    return RunResult(model, history, out_metrics, out_dir, data.class_names, resolved)


def _finetune(model, pruner: Pruner, cfg: PruneConfig, run_cfg: FinetuneConfig, rt, lr: float, train_ds, val_ds,
              out_dir: str, steps_per_epoch: int) -> list[dict[str, Any]]:
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "constant":
        end = 0
        target = lambda step: cfg.sparsity  # noqa: E731
        frequency = max(total, 1)
    else:
        end = max(1, int(round(cfg.ramp * total)))
        target = lambda step: polynomial_sparsity(step, cfg.sparsity, end)  # noqa: E731
        frequency = cfg.frequency or max(1, end // 10)
    train_cfg = dataclasses.replace(run_cfg.train, lr=lr, lr_mult=1.0, stage_lrs=None, early_stopping=None,
                                    tensorboard=False)
    fcfg = dataclasses.replace(run_cfg, train=train_cfg)
    num_classes = int(model.output_shape[-1])

    def trainable(stage) -> int:  # everything but BatchNorm (unless train_bn) and the frozen preprocessing
        _unfreeze(model, run_cfg.model.bn_trains)
        return len(model.trainable_weights)

    def compile_fn(optimizer):  # the stage's optimizer, its updates masked
        model.compile(optimizer=param_groups.scaled_optimizer(optimizer, masks=pruner.masks_by_id()),
                      loss=keras.losses.CategoricalCrossentropy(label_smoothing=train_cfg.label_smoothing),
                      metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")], jit_compile=rt.jit_compile)
        return model

    stage = Stage(f"prune_{cfg.schedule}", cfg.epochs, lr, None)
    try:
        return run_stages(Classifier(model), [stage], train_ds, val_ds, fcfg, rt, num_classes=num_classes,
                          steps_per_epoch=steps_per_epoch, compile_fn=compile_fn,
                          callbacks=[PruningSchedule(pruner, target, frequency, end)],
                          history_path=os.path.join(out_dir, "history.csv"), trainable_fn=trainable)
    except TrainingError:
        raise TrainingError(f"The loss became NaN or infinite in the pruning fine-tuning (lr {lr:g}); lower --lr.") \
            from None
