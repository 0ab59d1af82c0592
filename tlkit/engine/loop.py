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
from tlkit.engine import class_weights, ema
from tlkit.engine import features as F
from tlkit.models import param_groups, schedules
from tlkit.models.classifier import Classifier


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


def classifier_metrics(num_classes: int) -> list:
    """Top-1 accuracy, and top-5 with more than five classes."""
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
    _compile_classifier(model, stage_optimizer(cfg, learning_rate, clf), cfg, num_classes, jit_compile)


def _compile_classifier(model: keras.Model, optimizer, cfg, num_classes: int, jit_compile: bool) -> None:
    model.compile(optimizer=optimizer,
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.train.label_smoothing),
                  metrics=classifier_metrics(num_classes), jit_compile=jit_compile)


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

    @classmethod
    def lazy(cls, train_ds, val_ds) -> "HeadFeatures":
        return cls(train_ds=train_ds, val_ds=val_ds)

    def get(self, model: keras.Model, jit_compile: bool = False) -> "HeadFeatures":
        if not self.fresh:
            extractor, _ = F.split_model(model)
            self.x_train, self.y_train, self.x_val, self.y_val = F.extract_splits(
                extractor, self.train_ds, self.val_ds, jit_compile)
            self.fresh = True
        return self


class _KeepBestHead(keras.callbacks.Callback):
    """In memory: the weights and logs of the best pass of the head (val accuracy, then val loss)."""

    def __init__(self, monitor: str):
        super().__init__()
        self.monitor = monitor
        self.loss_key = "val_loss" if monitor.startswith("val_") else "loss"
        self.key: tuple[float, float] | None = None
        self.weights: list | None = None
        self.logs: dict[str, float] = {}
        self.epoch = 0

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items() if np.ndim(v) == 0}
        if not math.isfinite(logs.get("loss", float("nan"))):
            return
        key = (logs.get(self.monitor, -math.inf), -logs.get(self.loss_key, math.inf))
        if self.key is None or key >= self.key:  # ties: the later pass (further converged)
            self.key, self.weights, self.logs, self.epoch = key, self.model.get_weights(), logs, epoch + 1


def fit_head_on_features(model: keras.Model, feats: HeadFeatures, cfg, rt, batch_size: int, monitor: str,
                         epochs: int, verbose: int) -> tuple[dict[str, float], NaNGuard]:
    """Trains the head of the compiled `model` on cached features for `epochs` passes; keeps the best pass.

    The head model shares the classifier's layers and optimizer (`features.split_model`), so the classifier
    holds the result. Returns the logs of the kept pass (as `fit` would report them) and the NaN guard.
    """
    _, head = F.split_model(model)
    jit = bool(model.jit_compile)
    train = F.features_dataset(feats.x_train, feats.y_train, batch_size, training=True, seed=cfg.seed)
    train = class_weights.weighted_dataset(train, class_weights.weight_vector(cfg, feats.y_train.shape[-1]))
    val = None
    if feats.x_val is not None:
        val = F.features_dataset(feats.x_val, feats.y_val, batch_size, training=False)
    with rt.scope():
        head.compile(optimizer=model.optimizer, loss=model.loss, metrics=F._fresh_metrics(model), jit_compile=jit)
    keep, guard = _KeepBestHead(monitor), NaNGuard()
    t0 = time.time()
    head.fit(train, validation_data=val, epochs=epochs, callbacks=[guard, keep], verbose=0, shuffle=False)
    if keep.weights is not None:
        head.set_weights(keep.weights)
        keep.logs = dict(keep.logs, head_passes=float(epochs), kept_pass=float(keep.epoch))
    steps = int(model.optimizer.iterations.numpy())
    shown = ", ".join(f"{k} {v:.4f}" for k, v in keep.logs.items() if k not in ("head_passes", "kept_pass"))
    if verbose:
        print(f"[tlkit] head trained on cached features: {epochs} passes ({steps} steps, batch {batch_size}) in "
              f"{time.time() - t0:.1f} s; kept pass {keep.epoch}: {shown}", flush=True)
    return keep.logs, guard


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
        checkpointer: A `resume.Checkpointer` (best and per-epoch checkpoints), or `None`. Defaults to `None`.
        history_path: Where `history.csv` is rewritten after each epoch, or `None`. Defaults to `None`.
        state: A `resume.RunState` to continue from, or `None`. Defaults to `None`.
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
    from tlkit.engine import resume

    rows: list[dict[str, Any]] = []
    monitor = "val_accuracy" if val_ds is not None else "accuracy"
    es_monitor = early_stopping_monitor or monitor
    epoch_log = EpochLog(history_path, rows)
    guard = NaNGuard()
    if checkpointer is not None:
        checkpointer.history = rows
        checkpointer.bad_epoch = lambda: guard.bad_epoch
        if state is not None:
            checkpointer.restore(state)
    base_cbs: list[keras.callbacks.Callback] = [*callbacks, guard, epoch_log]
    verbose = (1 if sys.stdout.isatty() else 2) if verbose is None else verbose
    model, spec = clf.model, clf.spec
    num_stages = clf.num_stages
    first, last = epoch_range if epoch_range is not None else (0, sum(s.epochs for s in plan))
    batch = cfg.data.batch_size  # the split's batch (fit_batch_size has capped it to the training split)
    if compile_fn is None:  # --class-weight: per-example weights in the training batches (engine.class_weights)
        train_ds = class_weights.weighted_dataset(train_ds, class_weights.weight_vector(cfg, num_classes))
    elif cfg.train.ema or class_weights.parse_class_weight(cfg.train.class_weight) != "none":
        print("[tlkit] ema and class_weight apply to finetune and tune; this training runs without them", flush=True)
    epoch = 0
    for index, stage in enumerate(plan):
        s0, s1 = epoch, epoch + stage.epochs
        epoch = s1
        if state is not None and index < state.next_stage:
            continue
        a, b = max(s0, first), min(s1, last)
        if a >= b:
            continue
        weights_ready = False  # the adaptive stage's trials leave the model at the chosen trial's weights
        if stage.adaptive and adapt is not None:
            resumed_inside = bool(state is not None and index == state.next_stage and state.next_stage_epoch)
            if state is not None and index == state.next_stage and not resumed_inside:
                with rt.scope():  # the trials start from the head stage's result
                    resume.load_weights(model, os.path.join(checkpointer.dir, state.weights))
            decided, train_ds = adapt(index, stage, train_ds, resumed_inside)
            weights_ready = not resumed_inside
            if decided is None:  # no trial beat the head: no fine-tuning
                break
            if decided.epochs != stage.epochs:  # the trials used part of the budget
                s1 = s0 + decided.epochs
                b = min(s1, last)
                epoch = s1
            stage = decided
            if a >= b:
                continue
        if trainable_fn is not None:
            n = trainable_fn(stage)
        else:
            n = clf.set_trainable(None if stage.trainable is None else set(stage.trainable), cfg.model.bn_trains)
        if describe:
            print(f"[tlkit] stage {stage.describe(num_stages)}; {n} trainable weight tensors", flush=True)
            factors = param_groups.describe_factors(num_stages, cfg.train, stage.lr) if spec is not None else ""
            if stage.trainable != frozenset() and factors:
                print(f"[tlkit] {factors}", flush=True)
        on_features = bool(stage.passes)
        if on_features and (features is None or compile_fn is not None or stage.trainable != frozenset()):
            raise ValueError(f"Stage {stage.name!r} is planned on cached features, which need the classifier's "
                             "own compile, a frozen backbone and the run's HeadFeatures.")
        # a head stage on features: its schedule spans all its passes; a stage of fixed-step rounds: its steps
        stage_steps = stage.steps or steps_per_epoch
        lr = schedules.make_schedule(cfg.train, stage.lr, stage.passes or stage.epochs, stage_steps)
        averaging = bool(cfg.train.ema and compile_fn is None and not on_features)  # engine.ema: image stages
        with rt.scope():
            optimizer = stage_optimizer(cfg, lr, clf if spec is not None else None,
                                        cfg.train.ema_steps if averaging else None)
            if compile_fn is None:
                _compile_classifier(model, optimizer, cfg, num_classes, rt.jit_compile)
                fit_model = model
            else:
                fit_model = compile_fn(optimizer)
        rt.verify_compiled(fit_model)  # --xla on must not silently fall back to off
        epoch_log.stage = stage.name
        stage_cbs = list(base_cbs)
        if cfg.train.early_stopping:
            stage_cbs.append(keras.callbacks.EarlyStopping(
                monitor=es_monitor, mode="min" if es_monitor.endswith("loss") else "max",
                patience=cfg.train.early_stopping))
        if checkpointer is not None:
            stage_cbs.append(checkpointer)  # last: it records what the others did in the epoch
        start = a
        if state is not None and index == state.next_stage and state.next_stage_epoch:
            start = s0 + state.next_stage_epoch  # resuming inside a stage: weights, optimizer, schedule step
        if state is not None and index == state.next_stage and not weights_ready:
            with rt.scope():
                resume.load_weights(model, os.path.join(checkpointer.dir, state.weights))
                if state.next_stage_epoch:
                    resume.restore_optimizer(model, os.path.join(checkpointer.dir, state.optimizer))
        elif start > s0:  # Hyperband continues inside a stage: the schedule goes on where it was
            fit_model.optimizer.iterations.assign((start - s0) * stage_steps)
        if averaging:  # before the checkpointer: it saves the average; a resumed epoch's model holds the average
            resumed = bool(state is not None and index == state.next_stage and state.next_stage_epoch)
            stage_cbs.insert(len(stage_cbs) - (checkpointer is not None), ema.EMAWeights(resumed=resumed))
        if checkpointer is not None:
            es_state = state.early_stopping if state is not None and index == state.next_stage and start > s0 else None
            checkpointer.begin_stage(index, stage, s0, stage_cbs, es_state)
        if on_features:
            feats = features.get(model, bool(model.jit_compile))
            # The run's callbacks see the stage as one epoch, the last of the stage: it begins before the head trains
            # (the learning rate at its start, its seconds) and ends with the kept pass's logs.
            cbl = keras.callbacks.CallbackList(stage_cbs, add_history=False, add_progbar=False, model=model)
            cbl.on_train_begin()
            cbl.on_epoch_begin(b - 1)
            logs, head_guard = fit_head_on_features(model, feats, cfg, rt, batch, monitor, stage.passes,
                                                    verbose)
            if head_guard.bad_epoch is not None and not logs:
                guard.bad_epoch = s0 + 1
            else:
                cbl.on_epoch_end(b - 1, logs)
            cbl.on_train_end()
        else:
            with warnings.catch_warnings():
                # Keras 3.15 warns "Your input ran out of data" at the end of each epoch of a dataset of unknown
                # length; it is spurious (fixed upstream, keras-team/keras#23360).
                warnings.filterwarnings("ignore", message=".*Your input ran out of data.*")
                # a stage of fixed-step rounds repeats the training split; otherwise an epoch is one pass over it
                fit_model.fit(train_ds.repeat() if stage.steps else train_ds, steps_per_epoch=stage.steps or None,
                              validation_data=val_ds, epochs=b, initial_epoch=start, callbacks=stage_cbs,
                              verbose=verbose, shuffle=False)
        if features is not None and stage.trainable != frozenset():
            features.fresh = False  # the backbone moved: features of a later head stage are computed again
        if guard.bad_epoch is not None:
            if checkpointer is not None and checkpointer.last is not None:  # the last good checkpoint
                resume.load_weights(model, os.path.join(checkpointer.dir, checkpointer.last.weights))
            err = TrainingError(resume.nan_message(guard.bad_epoch, stage, fit_model.optimizer, rt.precision))
            err.history = rows  # type: ignore[attr-defined]
            err.stage = stage  # type: ignore[attr-defined]
            err.epoch = guard.bad_epoch  # type: ignore[attr-defined]
            raise err
    if state is not None and state.next_stage >= len(plan) and checkpointer is not None:
        resume.load_weights(model, os.path.join(checkpointer.dir, state.weights))  # a finished run resumed
    return rows
