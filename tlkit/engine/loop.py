"""The ONE stage loop: set what trains, compile with a fresh optimizer, fit, checkpoint, handle NaN.

`finetune`, each `tune` trial, the `distill` student, `prune` and `lr-find` all train through `run_stages`,
passing only what differs:

- `compile_fn(optimizer) -> model_to_fit`: how the stage is compiled (default: the classifier with
  label-smoothed cross-entropy; `distill` compiles its teacher-student wrapper, `prune` masks the updates);
- `callbacks`: extra callbacks of every stage (KerasTuner's, the pruning schedule, ...);
- `checkpointer`/`history_path`: the run folder's per-epoch checkpoints and `history.csv`, or none (tune trials);
- `epoch_range`: Hyperband's `[initial_epoch, epochs)` window of the plan.

A stage that trains no backbone weight and fits the classifier itself trains the head on base features
computed once (`HeadFeatures`, from the un-augmented training images): a few hundred optimizer steps there cost
seconds, so the head is trained to convergence and the best of its passes on the validation features is kept;
the run's callbacks then see the stage as one finished epoch (one history row, one checkpoint).

Example:
    rows = run_stages(clf, plan, train_ds, val_ds, cfg, rt, num_classes=5, steps_per_epoch=4,
                      features=HeadFeatures.lazy(train_plain_ds, val_ds))
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
import warnings
from typing import Any, Callable, Sequence

import keras
import numpy as np

from tlkit.core import rundir
from tlkit.core.errors import TrainingError
from tlkit.data import cache_policy
from tlkit.engine import checkpoints, class_weights, ema, weights_format
from tlkit.engine import features as F
from tlkit.models import param_groups, schedules
from tlkit.models.classifier import Classifier, is_multi_label


class EpochLog(keras.callbacks.Callback):
    """Adds stage and learning rate to each epoch's logs and (with a path) rewrites history.csv atomically."""

    def __init__(self, path: str | None, rows: list[dict[str, Any]]):
        super().__init__()
        self.path, self.rows, self.stage = path, rows, ""
        self.t0 = time.time()
        self.lr = float("nan")

    def on_epoch_begin(self, epoch, logs=None):
        self.t0 = time.time()
        self.lr = schedules.current_lr(self.model.optimizer)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        row: dict[str, Any] = {"epoch": epoch + 1, "stage": self.stage}
        row.update({k: float(v) for k, v in logs.items() if np.ndim(v) == 0})
        row["lr"] = self.lr  # at the start of the epoch
        row["seconds"] = round(time.time() - self.t0, 3)
        self.rows.append(row)
        if self.path:
            rundir.write_csv(self.path, self.rows)


class NaNGuard(keras.callbacks.Callback):
    """Stops training when the loss becomes NaN or infinite (the best checkpoint stays the model)."""

    def __init__(self):
        super().__init__()
        self.bad_epoch: int | None = None
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.bad_epoch = self.epoch + 1
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):  # a head stage on cached features reports its epoch only
        loss = (logs or {}).get("loss")
        if self.bad_epoch is None and loss is not None and not math.isfinite(float(loss)):
            self.bad_epoch = epoch + 1
            self.model.stop_training = True


def classifier_metrics(num_classes: int, multi_label: bool = False) -> list:
    """Top-1 accuracy, and top-5 with more than five classes; for multi-label, `map`: the area under each class's
    precision-recall curve averaged over the classes (`keras.metrics.AUC(multi_label=True, curve="PR")`, the macro
    average; an interpolated estimate of the mean average precision)."""
    if multi_label:
        return [keras.metrics.AUC(multi_label=True, num_labels=num_classes, curve="PR", name="map")]
    metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    if num_classes > 5:
        metrics.append(keras.metrics.TopKCategoricalAccuracy(k=5, name="top5"))
    return metrics


def stage_optimizer(cfg, learning_rate, clf: Classifier | None = None, ema_steps: int | None = None):
    """The configured optimizer; with `clf`, with the discriminative rates of `cfg.train` (`lr_mult`,
    `stage_lrs`) over its backbone's stages; with `ema_steps`, keeping a moving average of the weights
    (`engine.ema`)."""
    optimizer = schedules.make_optimizer(cfg.train, learning_rate)
    if ema_steps:
        optimizer = ema.with_ema(optimizer, ema_steps)
    if clf is None:
        return optimizer
    return param_groups.discriminative_optimizer(optimizer, clf.lr_factors(cfg.train))


def compile_model(model: keras.Model, cfg, learning_rate, num_classes: int, jit_compile: bool,
                  clf: Classifier | None = None) -> None:
    """Compiles with the configured optimizer, label-smoothed cross-entropy, top-1 and top-5 accuracy.

    With `clf` (the record of `model`), the optimizer applies the discriminative learning rates of
    `cfg.train.lr_mult` / `stage_lrs` to the backbone's stages (`Classifier.lr_factors`).
    """
    compile_classifier(model, stage_optimizer(cfg, learning_rate, clf), cfg, num_classes, jit_compile)


def monitor_metric(multi_label: bool, validation: bool = True) -> str:
    """The metric that picks the best epoch (maximised): `val_accuracy`, or `val_map` for multi-label (without
    validation: `accuracy`, `map`).

    Example:
        >>> monitor_metric(True)
        'val_map'
    """
    return ("val_" if validation else "") + ("map" if multi_label else "accuracy")


def classifier_loss(cfg, multi_label: bool = False, num_classes: int | None = None):
    """Label-smoothed cross-entropy; for multi-label, binary cross-entropy per class (smoothed the same way), with
    `cfg.train.class_weight` as per-class positive weights (`class_weights.PositiveWeightedBCE`)."""
    smoothing = cfg.train.label_smoothing
    if not multi_label:
        return keras.losses.CategoricalCrossentropy(label_smoothing=smoothing)
    pos_weight = class_weights.weight_vector(cfg, num_classes)
    if pos_weight is None:
        return keras.losses.BinaryCrossentropy(label_smoothing=smoothing)
    return class_weights.PositiveWeightedBCE(pos_weight.tolist(), label_smoothing=smoothing)


def compile_classifier(model: keras.Model, optimizer, cfg, num_classes: int, jit_compile: bool) -> None:
    """Compiles the classifier with `optimizer`, label-smoothed cross-entropy, top-1 and top-5 accuracy; a
    multi-label classifier (`is_multi_label`) with binary cross-entropy and `map` (`classifier_loss`)."""
    multi = is_multi_label(model)
    model.compile(optimizer=optimizer, loss=classifier_loss(cfg, multi, num_classes),
                  metrics=classifier_metrics(num_classes, multi), jit_compile=jit_compile)


@dataclasses.dataclass
class HeadFeatures:
    """Pooled base features of the un-augmented training images (and the validation images), for head stages.

    Computed at most once per backbone state: `finetune` computes them before the model is built (they give the
    head's feature statistics) and the first head stage reuses them; `get` computes them on first use otherwise.

    Attributes:
        x_train, y_train, x_val, y_val: Features and one-hot labels (`x_val`/`y_val` `None` without validation).
        train_ds, val_ds: The un-augmented batched datasets to compute them from (when not given).
    """

    x_train: np.ndarray | None = None
    y_train: np.ndarray | None = None
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    train_ds: Any = None
    val_ds: Any = None
    fresh: bool = False  # computed with the current backbone weights
    cache_dir: str | None = None  # where they are memory-mapped from when too large for memory (the run's cache/)
    rows: int | None = None  # examples of train and validation, for that decision (None: memory)

    @classmethod
    def lazy(cls, train_ds, val_ds, cache_dir: str | None = None, rows: int | None = None) -> "HeadFeatures":
        return cls(train_ds=train_ds, val_ds=val_ds, cache_dir=cache_dir, rows=rows)

    def get(self, model: keras.Model, jit_compile: bool = False) -> "HeadFeatures":
        if not self.fresh:
            extractor, _ = F.split_model(model)
            folder = None
            if self.rows is not None:  # bounded like --cache auto: memory when it fits, else memory-mapped files
                decision = cache_policy.decide_features(self.rows, int(extractor.output_shape[-1]), self.cache_dir)
                print(f"[tlkit] {decision.reason}", flush=True)
                folder = self.cache_dir if decision.mode == "memmap" else None
            self.x_train, self.y_train, self.x_val, self.y_val = F.extract_splits(
                extractor, self.train_ds, self.val_ds, jit_compile, folder)
            self.fresh = True
        return self

    def release(self) -> None:
        """Drops the features; removes their memory-mapped files, if any."""
        arrays = (self.x_train, self.y_train, self.x_val, self.y_val)
        self.x_train = self.y_train = self.x_val = self.y_val = None
        self.fresh = False
        for a in arrays:
            if isinstance(a, np.memmap) and a.filename:
                with contextlib.suppress(OSError):
                    os.remove(a.filename)


class KeepBest(keras.callbacks.Callback):
    """In memory: the weights and logs of the best epoch by `monitor` (maximised); ties go to the later epoch.

    Args:
        monitor: The metric.
        target: The model whose weights are kept. Defaults to `None` (the fitted model).
        by_loss: Break ties by the lower loss (`val_loss`, or `loss` without validation) and skip an epoch whose
            loss is not finite (the head's passes on cached features); else skip an epoch whose `monitor` is not
            finite (the `distill` student). Defaults to `True`.

    Example:
        keep = KeepBest("val_accuracy")
        model.fit(..., callbacks=[keep]); model.set_weights(keep.weights)
    """

    def __init__(self, monitor: str, target: keras.Model | None = None, by_loss: bool = True):
        super().__init__()
        self.monitor, self.target, self.by_loss = monitor, target, by_loss
        self.loss_key = "val_loss" if monitor.startswith("val_") else "loss"
        self.key: tuple[float, ...] | None = None
        self.weights: list | None = None
        self.logs: dict[str, float] = {}
        self.epoch = 0
        self.passes: list[dict[str, Any]] = []  # fit_head_on_features: every pass's logs

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items() if np.ndim(v) == 0}
        if self.by_loss:
            if not math.isfinite(logs.get("loss", float("nan"))):
                return
            key: tuple[float, ...] = (logs.get(self.monitor, -math.inf), -logs.get(self.loss_key, math.inf))
        else:
            if not math.isfinite(logs.get(self.monitor, float("nan"))):
                return
            key = (logs[self.monitor],)
        if self.key is None or key >= self.key:  # ties: the later epoch (further converged)
            self.key, self.logs, self.epoch = key, logs, epoch + 1
            self.weights = (self.target or self.model).get_weights()


def fit_head_on_features(model: keras.Model, feats: HeadFeatures, cfg, rt, batch_size: int, monitor: str,
                         epochs: int, verbose: int) -> tuple[dict[str, float], NaNGuard]:
    """Trains the head of the compiled `model` on cached features for `epochs` passes; keeps the best pass.

    The head model shares the classifier's layers and optimizer (`features.split_model`), so the classifier
    holds the result. Returns the logs of the kept pass (as `fit` would report them) and the NaN guard.
    """
    _, head = F.split_model(model)
    jit = bool(model.jit_compile)
    train = F.features_dataset(feats.x_train, feats.y_train, batch_size, training=True, seed=cfg.seed)
    train = class_weights.weighted_dataset(train, class_weights.example_weights(cfg, feats.y_train.shape[-1],
                                                                                is_multi_label(model)))
    val = None
    if feats.x_val is not None:
        val = F.features_dataset(feats.x_val, feats.y_val, batch_size, training=False)
    with rt.scope():
        head.compile(optimizer=model.optimizer, loss=model.loss, metrics=F.fresh_metrics(model), jit_compile=jit)
    keep, guard = KeepBest(monitor), NaNGuard()
    t0 = time.time()
    fitted = head.fit(train, validation_data=val, epochs=epochs, callbacks=[guard, keep], verbose=0, shuffle=False)
    keep.passes = pass_rows(fitted.history if fitted is not None else {})
    if keep.weights is not None:
        head.set_weights(keep.weights)
        keep.logs = dict(keep.logs, head_passes=float(epochs), kept_pass=float(keep.epoch))
    steps = int(model.optimizer.iterations.numpy())
    shown = ", ".join(f"{k} {v:.4f}" for k, v in keep.logs.items() if k not in ("head_passes", "kept_pass"))
    if verbose:
        print(f"[tlkit] head trained on cached features: {epochs} passes ({steps} steps, batch {batch_size}) in "
              f"{time.time() - t0:.1f} s; kept pass {keep.epoch}: {shown}", flush=True)
    return keep.logs, guard, keep.passes


PASSES_FILE = "head_passes.csv"


def pass_rows(history: dict[str, list]) -> list[dict[str, Any]]:
    """The head's passes on cached features as rows (`pass`, then `fit`'s logs of that pass), for `head_passes.csv`
    and the curves of a run whose only stage is the head."""
    n = max((len(v) for v in history.values()), default=0)
    return [{"pass": i + 1, **{k: float(v[i]) for k, v in history.items() if i < len(v) and np.ndim(v[i]) == 0}}
            for i in range(n)]


def nan_message(epoch: int, stage, optimizer: keras.optimizers.Optimizer, precision: str) -> str:
    """The one line for a NaN/inf loss: the epoch, the stage, the learning rate at the time and the likely cause."""
    try:
        lr = f"{schedules.current_lr(optimizer):.3g}"
    except Exception:  # an exotic optimizer: its peak rate will do
        lr = f"{stage.lr:g}"
    text = (f"The loss became NaN or infinite in epoch {epoch} (stage {stage.name!r}, learning rate {lr} at the time, "
            f"peak {stage.lr:g}): the learning rate is likely too high; lower --lr (or --finetune-lr-scale)")
    if "float16" in str(precision):
        text += (f", or {precision} overflowed: use --precision float32 (or mixed_bfloat16 where supported)")
    return text + "."


def run_stages(clf: Classifier, plan: Sequence, train_ds, val_ds, cfg, rt, *, num_classes: int,
               steps_per_epoch: int, features: HeadFeatures | None = None,
               compile_fn: Callable[[keras.optimizers.Optimizer], keras.Model] | None = None,
               callbacks: Sequence[keras.callbacks.Callback] = (), checkpointer=None, history_path: str | None = None,
               state=None, epoch_range: tuple[int, int] | None = None, early_stopping_monitor: str | None = None,
               trainable_fn: Callable[[Any], int] | None = None, verbose: int | None = None,
               describe: bool = True, adapt: Callable[..., Any] | None = None) -> list[dict[str, Any]]:
    """Runs the stages of `plan` in order; returns the history rows (one dict per epoch, with the stage).

    For each stage: set what trains (`Classifier.set_trainable`), build a fresh optimizer with the stage's schedule
    and learning-rate factors, compile (`compile_fn` or the classifier's cross-entropy), fit. A head stage
    (nothing of the backbone trains) of a classifier fitted by itself runs on `features` when given
    (`HeadFeatures`), else on the images.

    Args:
        clf: The `Classifier` to train (without a `spec` it needs `trainable_fn`; no discriminative rates then).
        plan: The `strategies.Stage`s.
        train_ds, val_ds: Batched training and validation datasets (`val_ds` may be `None`).
        cfg: The `FinetuneConfig`.
        rt: The `Runtime`.
        num_classes: Number of classes.
        steps_per_epoch: Batches per epoch of `train_ds` (the schedules' length).
        features: Cached head features, or `None` (head stages train on the images). Defaults to `None`.
        compile_fn: `compile_fn(optimizer)` compiles the stage and returns the model to fit. Defaults to `None`.
        callbacks: Extra callbacks of every stage. Defaults to `()`.
        checkpointer: A `checkpoints.Checkpointer` (best and per-epoch checkpoints), or `None`; the rows returned
            are its `history`. Defaults to `None`.
        history_path: Where `history.csv` is rewritten after each epoch, or `None`. Defaults to `None`.
        state: A `checkpoints.RunState` to continue from (where each stage starts: `RunState.start_of`), or
            `None`. Defaults to `None`.
        epoch_range: `(initial_epoch, end_epoch)` of the plan to run (Hyperband), or `None` (all of it).
        early_stopping_monitor: Metric of `cfg.train.early_stopping`. Defaults to `None` (val_accuracy, or
            accuracy without validation).
        trainable_fn: `trainable_fn(stage)` sets what trains and returns the number of trainable tensors, in
            place of `clf.set_trainable` by the backbone's stages (`prune` trains everything). Defaults to `None`.
        verbose: Keras's fit verbosity. Defaults to `None` (1 on a terminal, else 2).
        describe: Print one line per stage. Defaults to `True`.
        adapt: For a stage planned `adaptive` (`strategy: auto`): `adapt(index, stage, train_ds, resumed)` decides
            it when it starts (`engine.adapt.Adapter`) and returns `(stage, train_ds)`, the stage `None` for "no
            fine-tuning"; `resumed` is true when the stage is continued from a checkpoint inside it. Without it the
            stage runs as planned. Defaults to `None`.

    Raises:
        TrainingError: The loss became NaN or infinite (`error.history` holds the rows so far).
    """
    runner = _StageRunner(clf, cfg, rt, train_ds, val_ds, num_classes, steps_per_epoch, features, compile_fn,
                          callbacks, checkpointer, history_path, early_stopping_monitor, trainable_fn, verbose,
                          describe)
    if checkpointer is not None and state is not None:
        checkpointer.restore(state)  # the best so far and the history rows
    first, last = epoch_range if epoch_range is not None else (0, sum(s.epochs for s in plan))
    epoch = 0
    for index, stage in enumerate(plan):
        s0, epoch = epoch, epoch + stage.epochs
        start = checkpoints.stage_start(state, index)
        if start.done or max(s0, first) >= min(epoch, last):
            continue
        if stage.adaptive and adapt is not None:
            inside = bool(start.epochs_done)
            if start.from_checkpoint and not inside:  # the trials start from the head stage's result
                runner.load(start.weights)
            decided, runner.train_ds = adapt(index, stage, runner.train_ds, inside)
            if not inside:  # the trials leave the model at the chosen trial's weights
                start = dataclasses.replace(start, weights=None)
            if decided is None:  # no trial beat the head: no fine-tuning
                break
            epoch = s0 + decided.epochs  # the trials may have used part of the budget
            stage = decided
            if max(s0, first) >= min(epoch, last):
                continue
        runner.run(index, stage, s0, max(s0, first), min(epoch, last), start)
    if state is not None and state.finished(len(plan)) and checkpointer is not None:
        runner.load(state.weights)  # a finished run resumed
    return runner.rows


class _StageRunner:
    """Runs one stage of `run_stages`: what trains, a fresh optimizer, compile, callbacks, fit, the NaN check."""

    def __init__(self, clf, cfg, rt, train_ds, val_ds, num_classes, steps_per_epoch, features, compile_fn,
                 callbacks, checkpointer, history_path, early_stopping_monitor, trainable_fn, verbose, describe):
        self.clf, self.cfg, self.rt, self.val_ds = clf, cfg, rt, val_ds
        self.num_classes, self.steps_per_epoch, self.features = num_classes, steps_per_epoch, features
        self.compile_fn, self.checkpointer, self.trainable_fn = compile_fn, checkpointer, trainable_fn
        self.own_compile = compile_fn is None  # the classifier compiles itself (cross-entropy), finetune and tune
        self.describe = describe
        self.verbose = (1 if sys.stdout.isatty() else 2) if verbose is None else verbose
        self.monitor = monitor_metric(clf.multi_label, val_ds is not None)
        self.es_monitor = early_stopping_monitor or self.monitor
        self.rows: list[dict[str, Any]] = checkpointer.history if checkpointer is not None else []
        self.epoch_log = EpochLog(history_path, self.rows)
        self.history_path = history_path
        self.guard = NaNGuard()
        self.callbacks = [*callbacks, self.guard, self.epoch_log]
        if self.own_compile:  # --class-weight: per-example weights in the training batches (engine.class_weights)
            train_ds = class_weights.weighted_dataset(train_ds, class_weights.example_weights(cfg, num_classes,
                                                                                              clf.multi_label))
        elif cfg.train.ema or class_weights.parse_class_weight(cfg.train.class_weight) != "none":
            print("[tlkit] ema and class_weight apply to finetune and tune; this training runs without them",
                  flush=True)
        self.train_ds = train_ds

    def load(self, weights: str, optimizer: str | None = None) -> None:
        """Loads a checkpoint's weights (and optimizer state) from the run's `checkpoints/`."""
        with self.rt.scope():
            weights_format.load_weights(self.clf.model, os.path.join(self.checkpointer.dir, weights))
            if optimizer is not None:
                checkpoints.restore_optimizer(self.clf.model, os.path.join(self.checkpointer.dir, optimizer))

    def run(self, index: int, stage, s0: int, a: int, b: int, start) -> None:
        """Fits `stage` (index `index`, starting at global epoch `s0`) for the epochs `[a, b)`, from `start`."""
        cfg = self.cfg
        self._set_trainable(stage)
        on_features = bool(stage.passes)
        if on_features and (self.features is None or not self.own_compile or stage.trainable != frozenset()):
            raise ValueError(f"Stage {stage.name!r} is planned on cached features, which need the classifier's "
                             "own compile, a frozen backbone and the run's HeadFeatures.")
        # a head stage on features: its schedule spans all its passes; a stage of fixed-step rounds: its steps
        stage_steps = stage.steps or self.steps_per_epoch
        averaging = bool(cfg.train.ema and self.own_compile and not on_features)  # engine.ema: image stages
        fit_model = self._compile(stage, stage_steps, averaging)
        self.epoch_log.stage = stage.name
        cbs = list(self.callbacks)
        if cfg.train.early_stopping:
            cbs.append(keras.callbacks.EarlyStopping(
                monitor=self.es_monitor, mode="min" if self.es_monitor.endswith("loss") else "max",
                patience=cfg.train.early_stopping))
        begin = s0 + start.epochs_done if start.epochs_done else a  # resuming inside: weights, optimizer, step
        if start.from_checkpoint:
            self.load(start.weights, start.optimizer)
        elif begin > s0:  # Hyperband continues inside a stage: the schedule goes on where it was
            fit_model.optimizer.iterations.assign((begin - s0) * stage_steps)
        if averaging:  # before the checkpointer: it saves the average; a resumed epoch's model holds the average
            cbs.append(ema.EMAWeights(resumed=bool(start.epochs_done)))
        if self.checkpointer is not None:
            cbs.append(self.checkpointer)  # last: it records what the others did in the epoch
            self.checkpointer.begin_stage(index, stage, s0, cbs, start.early_stopping if begin > s0 else None)
        if on_features:
            self._fit_on_features(stage, s0, b, cbs)
        else:
            with warnings.catch_warnings():
                # Keras 3.15 warns "Your input ran out of data" at the end of each epoch of a dataset of unknown
                # length; it is spurious (fixed upstream, keras-team/keras#23360).
                warnings.filterwarnings("ignore", message=".*Your input ran out of data.*")
                # a stage of fixed-step rounds repeats the training split; otherwise an epoch is one pass over it
                fit_model.fit(self.train_ds.repeat() if stage.steps else self.train_ds,
                              steps_per_epoch=stage.steps or None, validation_data=self.val_ds, epochs=b,
                              initial_epoch=begin, callbacks=cbs, verbose=self.verbose, shuffle=False)
        if self.features is not None and stage.trainable != frozenset():
            self.features.fresh = False  # the backbone moved: features of a later head stage are computed again
        if self.guard.bad_epoch is not None:
            self._nan_stop(stage, fit_model)

    def _set_trainable(self, stage) -> None:
        clf, cfg = self.clf, self.cfg
        if self.trainable_fn is not None:
            n = self.trainable_fn(stage)
        else:
            n = clf.set_trainable(None if stage.trainable is None else set(stage.trainable), cfg.model.bn_trains)
        if self.describe:
            print(f"[tlkit] stage {stage.describe(clf.num_stages)}; {n} trainable weight tensors", flush=True)
            factors = (param_groups.describe_factors(clf.num_stages, cfg.train, stage.lr)
                       if clf.spec is not None else "")
            if stage.trainable != frozenset() and factors:
                print(f"[tlkit] {factors}", flush=True)

    def _compile(self, stage, stage_steps: int, averaging: bool) -> keras.Model:
        cfg, clf = self.cfg, self.clf
        lr = schedules.make_schedule(cfg.train, stage.lr, stage.passes or stage.epochs, stage_steps)
        with self.rt.scope():
            optimizer = stage_optimizer(cfg, lr, clf if clf.spec is not None else None,
                                        cfg.train.ema_steps if averaging else None)
            if self.own_compile:
                compile_classifier(clf.model, optimizer, cfg, self.num_classes, self.rt.jit_compile)
                fit_model = clf.model
            else:
                fit_model = self.compile_fn(optimizer)
        self.rt.verify_compiled(fit_model)  # --xla on must not silently fall back to off
        return fit_model

    def _fit_on_features(self, stage, s0: int, b: int, cbs: list) -> None:
        """The head on cached features; the run's callbacks see the stage as one epoch, the last of the stage: it
        begins before the head trains (the learning rate at its start, its seconds) and ends with the kept pass's
        logs."""
        model = self.clf.model
        feats = self.features.get(model, bool(model.jit_compile))
        cbl = keras.callbacks.CallbackList(cbs, add_history=False, add_progbar=False, model=model)
        cbl.on_train_begin()
        cbl.on_epoch_begin(b - 1)
        logs, head_guard, passes = fit_head_on_features(model, feats, self.cfg, self.rt, self.cfg.data.batch_size,
                                                        self.monitor, stage.passes, self.verbose)
        if self.history_path and passes:  # every pass, beside history.csv (whose row is the kept pass)
            rundir.write_csv(os.path.join(os.path.dirname(self.history_path), PASSES_FILE), passes)
        if head_guard.bad_epoch is not None and not logs:
            self.guard.bad_epoch = s0 + 1
        else:
            cbl.on_epoch_end(b - 1, logs)
        cbl.on_train_end()

    def _nan_stop(self, stage, fit_model: keras.Model) -> None:
        """Back to the last good checkpoint, then the NaN error (`error.history`: the rows so far)."""
        if self.checkpointer is not None and self.checkpointer.last is not None:
            weights_format.load_weights(self.clf.model,
                                        os.path.join(self.checkpointer.dir, self.checkpointer.last.weights))
        err = TrainingError(nan_message(self.guard.bad_epoch, stage, fit_model.optimizer, self.rt.precision))
        err.history = self.rows  # type: ignore[attr-defined]
        err.stage = stage  # type: ignore[attr-defined]
        err.epoch = self.guard.bad_epoch  # type: ignore[attr-defined]
        raise err
