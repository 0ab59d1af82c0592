"""Per-epoch checkpoints and the run's state (`checkpoints/` of a run folder).

After every finished epoch `Checkpointer` writes, each file atomically (temporary file, then rename):

- `checkpoints/epoch-NNNN.weights.h5`: the model weights (BatchNorm statistics included). In a stage that
  trains no backbone weight, the frozen layers cannot change: their weights are written once per stage, into
  `checkpoints/frozen-NNNN.weights.h5`, and the epoch's file holds the rest (the head) and names that file
  (`engine.weights_format`). When no stage of the run trains the backbone (`frozen_in_model`), no such file is
  written at all: the run rebuilds the same frozen layers from its configuration, and `model.keras` holds them;
- `checkpoints/best.weights.h5`: the best epoch's weights file (a hard link to it where the file system
  allows), in the same form;
- `checkpoints/epoch-NNNN.optimizer.npz`: every optimizer variable, its iteration count included, so the
  learning-rate schedule continues where it stopped (NumPy arrays only, read with `allow_pickle=False`);
- `checkpoints/state.json`, written last: the commit point. It names the files above, the stage index,
  the epochs done in that stage and in total, the best validation metric so far and the history rows.

A kill at any moment leaves either the previous or the new `state.json`, and both point at complete
files. `--resume` (re-running on the same `--output-dir`) reads it and continues from the last finished
epoch of the right stage.

Example:
    state = load_state("runs/try")          # None when the run folder has no checkpoint
    state.next_stage, state.next_stage_epoch
    # -> (1, 2)
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import math
import os
from typing import Any

import numpy as np
import keras

from tlkit.core import rundir
from tlkit.core.errors import ConfigError, TrainingError
from tlkit.engine.interrupts import raise_if_interrupted
from tlkit.engine.weights_format import IncrementalWeights, files_needed

STATE_FILE = rundir.STATE_FILE
STATE_VERSION = 1


@dataclasses.dataclass
class RunState:
    """The content of `checkpoints/state.json`.

    Attributes:
        stage_index: Index in the plan of the stage of the last finished epoch.
        stage_name: Its name (checked against the plan on resume).
        stage_epoch: Epochs finished in that stage.
        stage_done: The stage is over (all its epochs, or early stopping).
        epoch: Epochs finished in total (the history's last epoch number).
        best: Best value of `monitor` so far (`None` before any).
        best_epoch: Epoch of `best`.
        monitor: The metric of the best checkpoint (`val_accuracy`, or `accuracy` without validation).
        history: The history rows so far (as in `history.csv`).
        weights: File name (in `checkpoints/`) of the model weights of the last finished epoch.
        optimizer: File name of the optimizer variables of the last finished epoch.
        early_stopping: `{"wait": ..., "best": ...}` of the stage's early stopping, if any.
        best_loss: The loss (`val_loss`, or `loss` without validation) of the best epoch, the tie-break.
    """

    stage_index: int
    stage_name: str
    stage_epoch: int
    stage_done: bool
    epoch: int
    best: float | None
    best_epoch: int | None
    monitor: str
    history: list[dict[str, Any]]
    weights: str
    optimizer: str
    early_stopping: dict[str, Any] | None = None
    best_loss: float | None = None

    @property
    def next_stage(self) -> int:
        """Index of the stage to continue with."""
        return self.stage_index + 1 if self.stage_done else self.stage_index

    @property
    def next_stage_epoch(self) -> int:
        """Epochs already done in `next_stage`."""
        return 0 if self.stage_done else self.stage_epoch


    def start_of(self, index: int) -> "StageStart":
        """Where stage `index` of the plan starts when this run is resumed: THE rule of resuming."""
        if index < self.next_stage:
            return StageStart(done=True)
        if index > self.next_stage:
            return StageStart()
        inside = self.next_stage_epoch
        return StageStart(epochs_done=inside, weights=self.weights, optimizer=self.optimizer if inside else None,
                          early_stopping=self.early_stopping)

    def finished(self, num_stages: int) -> bool:
        """Every stage of a plan of `num_stages` was done before (the run is resumed after its last epoch)."""
        return self.next_stage >= num_stages


@dataclasses.dataclass(frozen=True)
class StageStart:
    """Where a stage starts: from scratch (the default), skipped, or from a checkpoint (`RunState.start_of`).

    Attributes:
        done: The stage was finished before: it is skipped.
        epochs_done: Epochs of the stage already done: the stage continues after them.
        weights: The weights file (in `checkpoints/`) to load before the stage, or `None`.
        optimizer: The optimizer file to restore (resuming inside the stage), or `None`.
        early_stopping: The stage's saved early-stopping state, or `None`.
    """

    done: bool = False
    epochs_done: int = 0
    weights: str | None = None
    optimizer: str | None = None
    early_stopping: dict[str, Any] | None = None

    @property
    def from_checkpoint(self) -> bool:
        """The stage starts from the resumed run's checkpoint."""
        return self.weights is not None


def stage_start(state: RunState | None, index: int) -> StageStart:
    """`state.start_of(index)`, or a fresh start without a state."""
    return StageStart() if state is None else state.start_of(index)


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, rundir.CHECKPOINTS)


def load_state(run_dir: str) -> RunState | None:
    """Reads `RUN/checkpoints/state.json`; `None` when there is none.

    Raises:
        TrainingError: the state file or the files it names are missing or unreadable.
    """
    path = os.path.join(checkpoint_dir(run_dir), STATE_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        if raw.pop("version", None) != STATE_VERSION:
            raise ValueError("unknown version")
        raw.pop("note", None)
        state = RunState(**raw)
    except (ValueError, TypeError, OSError) as e:
        raise TrainingError(f"Cannot resume from {path}: the checkpoint state is unreadable ({e}). "
                            "Start again with --overwrite.") from None
    needed = files_needed(os.path.join(checkpoint_dir(run_dir), state.weights))
    for name in (state.weights, state.optimizer, *needed):
        if not os.path.isfile(os.path.join(checkpoint_dir(run_dir), name)):
            raise TrainingError(f"Cannot resume: {path} names {name}, which is missing. Start again with --overwrite.")
    return state


def write_state(run_dir: str, state: RunState) -> None:
    """Writes `state.json` atomically (the commit point of a checkpoint)."""
    data = {"version": STATE_VERSION, "note": "tlkit resume state; written last, after the files it names"}
    data.update(dataclasses.asdict(state))
    rundir.write_json(os.path.join(checkpoint_dir(run_dir), STATE_FILE), data)


def save_optimizer(optimizer: keras.optimizers.Optimizer, path: str) -> None:
    """Saves every optimizer variable (iterations, moments, loss scale) as a NumPy `.npz`, atomically."""
    arrays = {f"v{i:05d}": keras.ops.convert_to_numpy(v.value) for i, v in enumerate(optimizer.variables)}
    with rundir.atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())


def restore_optimizer(model: keras.Model, path: str) -> int:
    """Builds the compiled model's optimizer for its trainable weights and loads its variables from `path`.

    Returns:
        The restored iteration count.

    Raises:
        TrainingError: the saved variables do not fit this optimizer (the configuration changed).
    """
    opt = model.optimizer
    if not opt.built:
        opt.build(model.trainable_variables)
    with np.load(path, allow_pickle=False) as data:
        saved = [data[k] for k in sorted(data.files)]
    variables = list(opt.variables)
    shapes_ok = len(saved) == len(variables) and all(
        tuple(a.shape) == tuple(v.shape) for a, v in zip(saved, variables))
    if not shapes_ok:
        raise TrainingError(f"Cannot resume: the optimizer state in {path} ({len(saved)} variables) does not match "
                            f"this run's optimizer ({len(variables)} variables); was the configuration changed?")
    for a, v in zip(saved, variables):
        v.assign(a)
    return int(keras.ops.convert_to_numpy(opt.iterations))


def epochs_saved(run_dir: str) -> int:
    """Epochs saved in the run folder's last checkpoint (0 when none, or unreadable)."""
    try:
        state = load_state(run_dir)
    except TrainingError:
        return 0
    return state.epoch if state is not None else 0


class Checkpointer(keras.callbacks.Callback):
    """After each finished epoch: the best weights (by `monitor`) and a full resume checkpoint.

    Put it after the callbacks whose state it records (history, early stopping, NaN guard). An epoch whose
    loss was NaN or infinite is never saved, so the last checkpoint stays the last good one.

    Args:
        run_dir: The run folder.
        monitor: Metric of the best checkpoint, maximised; ties go to the lower loss (`val_loss`, or `loss`).
            Defaults to `"val_accuracy"`.
        history: The list of history rows that the epoch logger appends to (saved in the state). Defaults to a
            new list (`Checkpointer.history`), which `restore` fills with a resumed run's rows.
        head_margin: Added to the monitor of an epoch in which no backbone weight trained (the head on the frozen
            backbone, the probe): a fine-tuned epoch replaces it only when it beats it by more than this (one
            validation image: `1 / n_val`), or by exactly this at a lower loss. Defaults to `0.0`.
        frozen_in_model: No stage of the run trains the backbone: its frozen layers are written in no checkpoint
            (`weights_format.IncrementalWeights(in_model=True)`). Defaults to `False`.

    Example:
        ckpt = Checkpointer("runs/try", "val_accuracy", rows)
        ckpt.begin_stage(0, stage, start_epoch=0, callbacks=cbs)
    """

    def __init__(self, run_dir: str, monitor: str = "val_accuracy", history: list[dict[str, Any]] | None = None,
                 head_margin: float = 0.0, frozen_in_model: bool = False):
        super().__init__()
        self.holds_best = False  # the model holds the best weights now: the last save, a head on cached features
        self.head_margin = float(head_margin)
        self.loss_key = "val_loss" if monitor.startswith("val_") else "loss"
        self.best_loss: float = math.inf
        self.stage_frozen = False
        self.run_dir = run_dir
        self.dir = checkpoint_dir(run_dir)
        os.makedirs(self.dir, exist_ok=True)
        self.best_path = os.path.join(self.dir, "best.weights.h5")
        self.monitor = monitor
        self.history = history if history is not None else []
        self._guards: list = []  # the stage's callbacks that flag a NaN/inf loss (`bad_epoch`)
        self.best: float = -math.inf
        self.best_epoch: int | None = None
        self.stage_index, self.stage_name, self.stage_epochs, self.stage_start = 0, "", 0, 0
        self.early_stopping: keras.callbacks.EarlyStopping | None = None
        self._es_restore: dict[str, Any] | None = None
        self.last: RunState | None = None
        self._weights = IncrementalWeights(self.dir, frozen_in_model)  # the frozen layers' weights once per stage
        self.stage_on_features = False

    def restore(self, state: RunState) -> None:
        """Takes over the best metric and history of a resumed run."""
        self.best = -math.inf if state.best is None else float(state.best)
        self.best_loss = math.inf if state.best_loss is None else float(state.best_loss)
        self.best_epoch = state.best_epoch
        self.history[:] = [dict(r) for r in state.history]
        self.last = state

    def begin_stage(self, index: int, stage, start_epoch: int, callbacks: list, es_state: dict | None = None) -> None:
        """Tells the checkpointer which stage runs next (`start_epoch`: the global epoch the stage starts at).

        `callbacks` are the stage's: the early stopping whose state is saved, and the NaN guards (callbacks with
        a `bad_epoch` attribute) whose flagged epoch is never saved.
        """
        self.stage_index, self.stage_name, self.stage_epochs, self.stage_start = (
            index, stage.name, stage.epochs, start_epoch)
        self.stage_frozen = stage.trainable == frozenset()
        self.stage_on_features = bool(getattr(stage, "passes", 0))
        self.early_stopping = next((c for c in callbacks if isinstance(c, keras.callbacks.EarlyStopping)), None)
        self._guards = [c for c in callbacks if hasattr(c, "bad_epoch")]  # the loop's NaNGuard
        self._es_restore = es_state
        self._weights.new_stage()

    def on_train_begin(self, logs=None):
        if self.early_stopping is not None and self._es_restore:
            self.early_stopping.wait = int(self._es_restore.get("wait", 0))
            if self._es_restore.get("best") is not None:
                self.early_stopping.best = float(self._es_restore["best"])
        self._es_restore = None

    def on_train_batch_end(self, batch, logs=None):
        raise_if_interrupted()

    def on_test_batch_end(self, batch, logs=None):
        raise_if_interrupted()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        loss = logs.get("loss")
        if any(g.bad_epoch is not None for g in self._guards) or (loss is not None and not math.isfinite(float(loss))):
            return
        value = logs.get(self.monitor)
        # Ties go to the lower loss, not to the later epoch: on a small validation split that saturates or goes flat,
        # a later epoch at equal accuracy and higher loss is the worse model. The probe (no backbone weight trained)
        # carries a margin of one validation image: fine-tuning must beat it clearly to replace it.
        improved = False
        if value is not None and math.isfinite(float(value)):
            value = float(value) + (self.head_margin if self.stage_frozen else 0.0)
            loss = logs.get(self.loss_key)
            loss = float(loss) if loss is not None and math.isfinite(float(loss)) else math.inf
            improved = (value, -loss) > (self.best, -self.best_loss) if self.best_epoch is not None else True
        if improved:
            self.best, self.best_loss, self.best_epoch = value, loss, epoch + 1
        self.save(epoch + 1, as_best=improved)
        raise_if_interrupted()

    def save(self, epoch_done: int, as_best: bool = False) -> RunState:
        """Writes the weights, the optimizer state and then `state.json` for `epoch_done` epochs in total.

        With `as_best`, the weights also become `best.weights.h5` (a hard link to the same file, else a copy).
        """
        tag = f"epoch-{epoch_done:04d}"
        weights, opt = tag + ".weights.h5", tag + ".optimizer.npz"
        self._weights.save(self.model, os.path.join(self.dir, weights), epoch_done)
        save_optimizer(self.model.optimizer, os.path.join(self.dir, opt))
        if as_best:
            _link_or_copy(os.path.join(self.dir, weights), self.best_path)
        # a head stage on cached features ends with its kept pass in the model, which is what was saved
        self.holds_best = as_best and self.stage_on_features
        stage_epoch = epoch_done - self.stage_start
        es = None
        if self.early_stopping is not None:
            es = {"wait": int(self.early_stopping.wait), "best": _finite_or_none(self.early_stopping.best)}
        state = RunState(
            stage_index=self.stage_index, stage_name=self.stage_name, stage_epoch=stage_epoch,
            stage_done=bool(stage_epoch >= self.stage_epochs or self.model.stop_training), epoch=epoch_done,
            best=_finite_or_none(self.best), best_epoch=self.best_epoch, monitor=self.monitor,
            history=[dict(r) for r in self.history], weights=weights, optimizer=opt, early_stopping=es,
            best_loss=_finite_or_none(self.best_loss))
        write_state(self.run_dir, state)
        self.last = state
        keep = {weights, opt, *files_needed(os.path.join(self.dir, weights))}
        if os.path.isfile(self.best_path):
            keep.update(files_needed(self.best_path))
        for old in glob.glob(os.path.join(self.dir, "epoch-*")) + glob.glob(os.path.join(self.dir, "frozen-*")):
            if os.path.basename(old) not in keep:
                with contextlib.suppress(OSError):
                    os.remove(old)
        return state


def _link_or_copy(src: str, dst: str) -> None:
    """Makes `dst` the same file as `src`, atomically: a hard link where the file system has them, else a copy."""
    import shutil

    with rundir.atomic_path(dst, suffix=".weights.h5") as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def _finite_or_none(x) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def check_plan(state: RunState, plan: list, run_dir: str) -> None:
    """Checks that a saved state fits the stage plan of this run."""
    if state.stage_index >= len(plan) or plan[state.stage_index].name != state.stage_name:
        names = ", ".join(s.name for s in plan)
        raise ConfigError(f"Cannot resume {run_dir!r}: its checkpoint is in stage {state.stage_index} "
                          f"({state.stage_name!r}) but this run's stages are: {names}. Use the same settings.")

