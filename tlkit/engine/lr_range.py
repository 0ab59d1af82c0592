"""The learning-rate finder (fastai's `lr_find`, after Leslie Smith's LR range test).

Trains the stage the user is about to train for up to `num_steps` batches while the learning rate grows
exponentially from `start_lr` to `end_lr`, records the loss of each batch, stops when the smoothed loss
diverges (above `diverge_factor` times its lowest value, or not finite), then puts every variable of the
model back exactly as it was. Two suggestions, as in fastai: `valley` (the default: a point about two
thirds down the longest descending stretch of the loss curve) and `steepest` (where the smoothed loss falls
fastest against log LR).

Written here because no library does it for Keras 3: Keras has no LR range test, and KerasTuner searches
by full trials, not within one run (checked for this release; replace it if Keras gains one).

The verb `tlkit lr-find` (`verbs/lr_find.py`) and `finetune --lr auto` (`resolve_auto_lr`) both run `find_lr`.

Example:
    r = find_lr(clf, cfg, train_ds, num_classes=5, num_steps=50)
    r.suggestion
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
from typing import Any, Callable

import numpy as np
import keras
import tensorflow as tf

from tlkit.core import rundir, runtime
from tlkit.core.config import AUTO_LR, FinetuneConfig, TrainConfig
from tlkit.core.errors import ConfigError, TrainingError
from tlkit.engine.loop import compile_model
from tlkit.models import strategies
from tlkit.models.classifier import Classifier

SUGGESTIONS = ("valley", "steepest")


@dataclasses.dataclass
class LRFindResult:
    """What the learning-rate finder measured and suggests.

    Attributes:
        lrs: Learning rate of each step run.
        losses: Training loss of each step (one batch).
        smoothed: Debiased exponential moving average of `losses`.
        suggestion: The suggested peak learning rate of the stage (the `valley` suggestion).
        suggestions: `{"valley": lr, "steepest": lr}`.
        stage: Name of the stage whose trainable layers were trained (`head`, `finetune`, `full`, ...).
        diverged: Whether the run stopped early because the loss diverged.
        start_lr: First learning rate. end_lr: Last learning rate of the planned range.
        num_steps: Planned number of steps.
        output_dir: Folder of `lr_find.png` and `lr_find.json`, or `None` when nothing was written.
    """

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestion: float
    suggestions: dict[str, float]
    stage: str
    diverged: bool
    start_lr: float
    end_lr: float
    num_steps: int
    output_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able content of `lr_find.json` (a non-finite loss becomes `None`)."""
        clean = lambda v: v if not isinstance(v, float) or math.isfinite(v) else None
        return {k: [clean(x) for x in v] if isinstance(v, list) else clean(v)
                for k, v in dataclasses.asdict(self).items()}

    def describe(self) -> str:
        """One line: the suggestion and how the run ended."""
        stop = f"diverged after {len(self.lrs)} steps" if self.diverged else f"{len(self.lrs)} steps"
        return (f"suggested learning rate {self.suggestion:.2e} (valley; steepest descent at "
                f"{self.suggestions['steepest']:.2e}) for stage {self.stage!r}; {stop}, lr "
                f"{self.start_lr:.0e} -> {self.lrs[-1]:.2e}")


def lr_schedule(start_lr: float, end_lr: float, num_steps: int) -> np.ndarray:
    """The learning rate of each step: exponential from `start_lr` to `end_lr` (both included).

    Example:
        >>> lr_schedule(1e-4, 1e-2, 3).tolist()
        [0.0001, 0.001, 0.01]
    """
    if num_steps == 1:
        return np.array([start_lr], np.float64)
    return start_lr * (end_lr / start_lr) ** (np.arange(num_steps, dtype=np.float64) / (num_steps - 1))


def smoothing_beta(num_steps: int) -> float:
    """EMA factor of the loss: fastai's 0.98 for long runs, less for short ones so the curve does not lag."""
    return float(min(0.98, 1.0 - 5.0 / max(num_steps, 10)))


def smooth(losses: list[float] | np.ndarray, beta: float = 0.98) -> np.ndarray:
    """Debiased exponential moving average (as fastai's `SmoothenValue`)."""
    out, avg = [], 0.0
    for i, v in enumerate(losses):
        avg = beta * avg + (1 - beta) * float(v)
        out.append(avg / (1 - beta ** (i + 1)))
    return np.asarray(out, np.float64)


def suggest_steepest(lrs: np.ndarray, losses: np.ndarray) -> int:
    """Index of the steepest descent of `losses` against log LR."""
    lrs, losses = np.asarray(lrs, np.float64), np.asarray(losses, np.float64)
    grads = np.diff(losses) / np.diff(np.log(lrs))
    return int(np.argmin(grads))


def suggest_valley(lrs: np.ndarray, losses: np.ndarray) -> int:
    """Index of fastai's `valley`: the longest descending stretch of the curve, a bit past its middle.

    Example:
        suggest_valley(np.logspace(-5, 0, 6), np.array([3.0, 2.5, 2.0, 1.5, 1.0, 4.0]))
        # -> 2
    """
    losses = np.asarray(losses, np.float64)
    n = len(losses)
    lds = [1] * n
    max_start = max_end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    return int(min(max(max_start + int(sections) + int(sections / 2), 0), n - 1))


def suggestions_for(lrs: list[float], smoothed: list[float] | np.ndarray) -> dict[str, float]:
    """The valley and steepest suggestions of a recorded curve (its first tenth and last 5 points left out,
    as fastai does, when enough points remain).

    Raises:
        TrainingError: fewer than 3 usable points.
    """
    lrs_a, sm = np.asarray(lrs, np.float64), np.asarray(smoothed, np.float64)
    finite = np.isfinite(sm)
    lrs_a, sm = lrs_a[finite], sm[finite]
    lo, hi = len(sm) // 10, len(sm) - 5
    if hi - lo >= 5:
        lrs_a, sm = lrs_a[lo:hi], sm[lo:hi]
    if len(sm) < 3:
        raise TrainingError(f"The learning-rate finder got only {len(sm)} usable loss value(s) before the loss "
                            "diverged: lower --start-lr, or raise --num-steps.")
    return {"valley": float(lrs_a[suggest_valley(lrs_a, sm)]), "steepest": float(lrs_a[suggest_steepest(lrs_a, sm)])}


def check_range(start_lr: float, end_lr: float, num_steps: int) -> None:
    if not (isinstance(start_lr, (int, float)) and start_lr > 0 and math.isfinite(start_lr)):
        raise ConfigError(f"start_lr must be a positive number, got {start_lr!r}.")
    if not (isinstance(end_lr, (int, float)) and math.isfinite(end_lr) and end_lr > start_lr):
        raise ConfigError(f"end_lr must be larger than start_lr ({start_lr:g}), got {end_lr!r}.")
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 5:
        raise ConfigError(f"num_steps must be an integer >= 5, got {num_steps!r}.")


def pick_stage(cfg: TrainConfig, num_stages: int, stage: str | None = None) -> tuple[strategies.Stage, float]:
    """The stage of `cfg`'s plan to search (the first one by default) and its LR as a multiple of `cfg.lr`.

    Raises:
        ConfigError: `stage` is not a stage of the plan.
    """
    unit = strategies.plan(dataclasses.replace(cfg, lr=1.0), num_stages, 1)
    if not unit:
        raise ConfigError(f"Strategy {cfg.strategy!r} with these epochs has no stage to train (all have 0 epochs).")
    if stage is None:
        return unit[0], unit[0].lr
    for s in unit:
        if s.name == stage:
            return s, s.lr
    raise ConfigError(f"Unknown stage {stage!r} for strategy {cfg.strategy!r}. Its stages: "
                      f"{', '.join(s.name for s in unit)}.")


class _Finder(keras.callbacks.Callback):
    """Sets the LR before each batch (one batch per epoch) and records the loss; stops on divergence."""

    def __init__(self, lrs: np.ndarray, beta: float, diverge_factor: float, verbose: int):
        super().__init__()
        self.lrs, self.beta, self.factor = lrs, beta, diverge_factor
        self.losses: list[float] = []
        self.avg, self.best = 0.0, math.inf
        self.diverged = False
        self.bar = keras.utils.Progbar(len(lrs), verbose=verbose, unit_name="step") if verbose else None

    def on_train_batch_begin(self, batch, logs=None):
        self.model.optimizer.learning_rate = float(self.lrs[len(self.losses)])

    def on_train_batch_end(self, batch, logs=None):
        loss = float((logs or {}).get("loss", math.nan))
        i = len(self.losses)
        self.losses.append(loss)
        if not math.isfinite(loss):
            self.diverged = True
        else:
            self.avg = self.beta * self.avg + (1 - self.beta) * loss
            smoothed = self.avg / (1 - self.beta ** (i + 1))
            self.best = min(self.best, smoothed)
            if i > 0 and smoothed > self.factor * self.best:
                self.diverged = True
        if self.bar is not None:
            self.bar.update(i + 1, [("loss", loss), ("lr", float(self.lrs[i]))], finalize=self.diverged or
                            i + 1 == len(self.lrs))
        if self.diverged or len(self.losses) >= len(self.lrs):
            self.model.stop_training = True


def find_lr(clf: Classifier, cfg: FinetuneConfig, train_ds: tf.data.Dataset,
            num_classes: int, *, start_lr: float = 1e-7, end_lr: float = 10.0, num_steps: int = 100,
            stage: str | None = None, diverge_factor: float = 4.0, jit_compile: bool = False,
            scope: Callable[[], Any] | None = None, output_dir: str | None = None,
            verbose: int | None = None) -> LRFindResult:
    """Runs the LR range test on an already built classifier and dataset, then restores the model exactly.

    The stage's layers are made trainable as `engine.loop.run_stages` would, the model is compiled with the configured
    optimizer and loss, and `fit` runs one batch per "epoch" (so distribution strategies and mixed precision
    work as in training). Afterwards every model variable (weights, BatchNorm statistics, dropout seeds) and
    every layer's `trainable` flag is as before; the model is left compiled with the finder's optimizer, so
    compile it again before training (`run_stages` does).

    Args:
        clf: The `Classifier` (its model is searched on and restored).
        cfg: The run's `FinetuneConfig` (strategy, optimizer, label smoothing, train_bn, seed).
        train_ds: Batched training dataset of `(images, one-hot labels)`; repeated as needed.
        num_classes: Number of classes.
        start_lr: First learning rate. Defaults to `1e-7`.
        end_lr: Last learning rate. Defaults to `10.0`.
        num_steps: Batches to run at most. Defaults to `100`.
        stage: Stage of the plan to search, by name. Defaults to `None` (the first stage).
        diverge_factor: Stop when the smoothed loss exceeds this times its lowest value. Defaults to `4.0`.
        jit_compile: Compile with XLA. Defaults to `False`.
        scope: Returns the distribution strategy's scope (`Runtime.scope`). Defaults to `None`.
        output_dir: Where to write `lr_find.png` and `lr_find.json`. Defaults to `None` (not written).
        verbose: 1 progress bar, 2 one line, 0 silent. Defaults to `None` (1 on a terminal, else 2).

    Returns:
        An `LRFindResult`.

    Example:
        r = find_lr(clf, cfg, train_ds, 5, num_steps=50)
    """
    check_range(start_lr, end_lr, num_steps)
    if not diverge_factor > 1:
        raise ConfigError(f"diverge_factor must be > 1, got {diverge_factor!r}.")
    model = clf.model
    chosen, _ = pick_stage(cfg.train, clf.num_stages, stage)
    lrs = lr_schedule(float(start_lr), float(end_lr), num_steps)
    verbose = (1 if sys.stdout.isatty() else 2) if verbose is None else verbose
    train_cfg = dataclasses.replace(cfg.train, lr=float(start_lr)) if cfg.train.lr == AUTO_LR else cfg.train
    run_cfg = dataclasses.replace(cfg, train=train_cfg)

    flags = [(layer, layer.trainable) for layer in _all_layers(model)]
    saved = [np.array(v.numpy(), copy=True) for v in model.variables]
    finder = _Finder(lrs, smoothing_beta(num_steps), diverge_factor, verbose)
    try:
        clf.set_trainable(None if chosen.trainable is None else set(chosen.trainable), cfg.model.bn_trains)
        if verbose:
            print(f"[tlkit] lr-find on stage {chosen.name!r}: lr {start_lr:.0e} -> {end_lr:.0e} over at most "
                  f"{num_steps} batches", flush=True)
        with (scope() if scope is not None else contextlib.nullcontext()):
            compile_model(model, run_cfg, float(start_lr), num_classes, jit_compile, clf=clf)
        model.fit(train_ds.repeat(), epochs=num_steps, steps_per_epoch=1, callbacks=[finder], verbose=0,
                  shuffle=False)
    finally:
        for v, value in zip(model.variables, saved):
            v.assign(value)
        for layer, flag in flags:
            layer.trainable = flag
    n = len(finder.losses)
    losses = np.asarray(finder.losses, np.float64)
    smoothed = smooth(np.where(np.isfinite(losses), losses, np.nan), smoothing_beta(num_steps))
    suggestions = suggestions_for(lrs[:n].tolist(), smoothed)
    result = LRFindResult(lrs=lrs[:n].tolist(), losses=losses.tolist(), smoothed=smoothed.tolist(),
                          suggestion=suggestions["valley"], suggestions=suggestions, stage=chosen.name,
                          diverged=finder.diverged, start_lr=float(start_lr), end_lr=float(end_lr),
                          num_steps=int(num_steps), output_dir=output_dir)
    if output_dir:
        write_outputs(result, output_dir)
    return result


def write_outputs(result: LRFindResult, output_dir: str) -> None:
    """Writes `lr_find.png` and `lr_find.json` into `output_dir`."""
    from tlkit.engine import plots

    os.makedirs(output_dir, exist_ok=True)
    plots.plot_lr_find(result.lrs, result.losses, result.smoothed, result.suggestions,
                       os.path.join(output_dir, "lr_find.png"))
    rundir.write_json(os.path.join(output_dir, "lr_find.json"), result.to_dict())


def _all_layers(model: keras.Model) -> list[keras.layers.Layer]:
    out, stack = [], [model]
    while stack:
        layer = stack.pop()
        out.append(layer)
        stack.extend(getattr(layer, "layers", []) or [])
    return out


def resolve_auto_lr(cfg: FinetuneConfig, clf: Classifier, data, image_size: int,
                    rt: runtime.Runtime, output_dir: str, features: Any = None, **kwargs: Any) -> FinetuneConfig:
    """`--lr auto`: runs the finder on the first stage and returns `cfg` with the suggested learning rate.

    The suggestion is the first stage's peak LR; `cfg.train.lr` is set so that the plan gives the first stage
    exactly that (e.g. for `two_stage` the head stage runs at the suggestion and the fine-tuning stage at
    `finetune_lr_scale` times it). `lr_find.png` and `lr_find.json` go into `output_dir`.

    Example:
        cfg = resolve_auto_lr(cfg, clf, data, 224, rt, "runs/x")
    """
    from tlkit.data import make_dataset

    if cfg.train.lr != AUTO_LR:
        return cfg
    ds = make_dataset(data.train, image_size, cfg.data.batch_size, data.num_classes, training=True,
                      augment=cfg.data.augment, cache="none", seed=cfg.seed)
    _, factor = pick_stage(cfg.train, clf.num_stages)
    result = find_lr(clf, cfg, ds, data.num_classes, jit_compile=rt.jit_compile, scope=rt.scope,
                     output_dir=output_dir, **kwargs)
    lr = float(f"{result.suggestion / factor:.3g}")
    print(f"[tlkit] --lr auto: {result.describe()}; using lr {lr:g}", flush=True)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=lr))


