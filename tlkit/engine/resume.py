"""Resume after interruption: per-epoch checkpoints, the run's state, signals, and the resumable run folder (the
folder rules themselves are `core.rundir`'s).

After every finished epoch `Checkpointer` writes, each file atomically (temporary file, then rename):

- `checkpoints/epoch-NNNN.weights.h5`: the model weights (BatchNorm statistics included). In a stage that
  trains no backbone weight, the frozen layers cannot change: their weights are written once per stage, into
  `checkpoints/frozen-NNNN.weights.h5`, and the epoch's file holds the rest (the head) and names that file;
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
import shlex
import signal
import threading
from typing import Any, Iterator

import numpy as np
import keras

from tlkit.core import rundir
from tlkit.core.errors import ConfigError, TrainingError

STATE_FILE = rundir.STATE_FILE
STATE_VERSION = 1
# Fields that may differ between an interrupted run and its resumption.
RESUME_FREE_FIELDS = ("output_dir", "overwrite", "resume", "cache", "tensorboard", "cache_features", "deterministic")
PATH_FIELDS = ("image_dir", "data_dir", "base", "weights", "output_dir")


class Interrupted(KeyboardInterrupt):
    """Raised when a run is stopped by SIGINT (Ctrl-C) or SIGTERM; carries what is needed to resume.

    Attributes:
        signum: The signal number (`signal.SIGINT` or `signal.SIGTERM`).
        run_dir: The run folder, or `None` before it existed.
        epochs_done: Epochs saved in the last checkpoint (0 when none).
    """

    def __init__(self, signum: int = signal.SIGINT, run_dir: str | None = None, epochs_done: int = 0):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.run_dir, self.epochs_done = signum, run_dir, epochs_done

    @property
    def exit_code(self) -> int:
        """128 + the signal number: 130 for Ctrl-C, 143 for SIGTERM."""
        return 128 + int(self.signum)


# ---------------------------------------------------------------- the run's state


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


def save_weights(model: keras.Model, path: str) -> None:
    """Saves the model's weights (`.weights.h5`) atomically, without the optimizer's variables.

    The file is a plain Keras weights file (`model.load_weights` reads it). A compiled model's `save_weights`
    also stores the optimizer (3x the size with Adam); the optimizer is saved once, by `save_optimizer`.
    """
    with rundir.atomic_path(path, suffix=".weights.h5") as tmp:
        _write_weights(model, tmp)


def load_weights(model: keras.Model, path: str) -> None:
    """Loads model weights from `path`, ignoring any optimizer state stored with them.

    `path` is a plain Keras weights file, or a `Checkpointer` file that holds the changing weights only and
    names the file of the frozen ones (`FROZEN_ATTR`): both parts are then loaded, with Keras's own checks.

    Raises:
        TrainingError: the frozen-weights file that `path` names is missing.
    """
    import warnings

    frozen = _frozen_reference(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Skipping variable loading for optimizer.*")
        if frozen is None:
            model.load_weights(path)
            return
        with _joined_weights(path, *frozen) as full:
            model.load_weights(full)


# ---------------------------------------------------------------- checkpoints that cost what changed
#
# A stage that trains no backbone weight (the head warm-up, feature extraction) cannot change the backbone:
# its layers are not trainable, so Keras neither updates their weights nor their BatchNorm statistics. Writing
# them again after every epoch (and again as the best checkpoint) is most of a checkpoint's bytes, and walking
# their layers is most of its time. `Checkpointer` writes such frozen sub-trees once per stage into
# `frozen-NNNN.weights.h5`; each epoch's `.weights.h5` holds the rest (the head) and names that file and the
# sub-trees in two attributes. `load_weights` joins both into a plain Keras file before loading, so the
# loading code and its checks stay Keras's own. (HDF5 external links would be simpler, but Keras refuses them.)

FROZEN_ATTR = "tlkit_frozen_file"
FROZEN_PATHS_ATTR = "tlkit_frozen_paths"


def _saving_lib():
    """Keras's weights-file walk (`_save_state`, `H5IOStore`), or `None` where this Keras lacks it."""
    try:
        from keras.src.saving import saving_lib
    except ImportError:
        return None
    if not all(hasattr(saving_lib, n) for n in ("_save_state", "H5IOStore")):
        return None
    return saving_lib


def _write_weights(model: keras.Model, path: str, skip: dict[str, Any] | None = None,
                   frozen_file: str | None = None) -> None:
    """Writes the model's weights in Keras's layout, leaving out the optimizer and the sub-trees in `skip`
    (`{path in the file: layer}`), whose file name is then recorded in the root attributes."""
    lib = _saving_lib()
    skip = skip or {}
    if lib is None:  # a Keras without the internals used here: a plain, complete weights file
        keras.Model(model.inputs, model.outputs, name=model.name).save_weights(path)
        return
    store = lib.H5IOStore(path, mode="w")
    try:
        visited = {id(o) for o in _optimizers(model)} | {id(layer) for layer in skip.values()}
        lib._save_state(model, weights_store=store, assets_store=None, inner_path="", visited_saveables=visited)
        if skip:
            store.h5_file.attrs[FROZEN_ATTR] = frozen_file or ""
            store.h5_file.attrs[FROZEN_PATHS_ATTR] = json.dumps(sorted(skip))
    finally:
        store.close()


def _optimizers(model: keras.Model) -> list:
    opt = getattr(model, "optimizer", None)
    return [opt] if opt is not None else []


@dataclasses.dataclass
class _Entry:
    """One object's own variables in Keras's weights layout: written under `path/vars`, keys "0", "1", ..."""

    path: str
    metadata: dict | None
    values: dict
    obj_id: int | None = None


def weights_layout(model: keras.Model) -> list[_Entry]:
    """What `save_weights` writes for `model`, and where: Keras's own walk, run once without writing.

    The values are the model's variables themselves, so a layout recorded once serves every later save of
    the same model (the walk, not the writing, is most of the time of a Keras weights save).
    """
    lib = _saving_lib()
    if lib is None:
        return []
    entries: list[_Entry] = []

    class Recorder(lib.H5IOStore):
        def __init__(self):  # no file: it only records what the walk would write
            pass

        def __bool__(self):
            return True

        def make(self, path, metadata=None):
            entry = _Entry(path, dict(metadata) if metadata else None, {})
            entries.append(entry)
            return entry.values

    class Visited(set):
        def add(self, item):  # the walk adds an object right after saving its own variables
            if entries and entries[-1].obj_id is None:
                entries[-1].obj_id = item
            super().add(item)

    lib._save_state(model, weights_store=Recorder(), assets_store=None, inner_path="",
                    visited_saveables=Visited(id(o) for o in _optimizers(model)))
    return entries


def frozen_subtrees(model: keras.Model, layout: list[_Entry] | None = None) -> dict[str, Any]:
    """The largest parts of the model's weights file that training cannot change: `{path in the file: layer}`.

    A part is frozen when every variable in it belongs to a layer whose `trainable` is off (Keras updates
    neither its weights nor, for BatchNormalization, its moving statistics). The paths are those of Keras's
    own walk (`weights_layout`, recorded again unless `layout` is given).

    Example:
        set_trainable(model, spec, set())      # the head warm-up: the whole backbone is frozen
        list(frozen_subtrees(model))
        # -> ['layers/functional']
    """
    layout = weights_layout(model) if layout is None else layout
    frozen_ids: set[int] = set()
    layers = model._flatten_layers(include_self=False, recursive=True)
    for layer in layers:
        if not layer.trainable:
            frozen_ids.update(id(v) for v in layer.weights)
    by_id = {id(layer): layer for layer in layers}

    def status(entry: _Entry) -> str:
        values = list(entry.values.values())
        if not values:
            return "empty"
        ok = all(isinstance(v, keras.Variable) and id(v) in frozen_ids for v in values)
        return "frozen" if ok else "changing"

    statuses = [(e.path, status(e), e.obj_id) for e in layout]
    changing = [p for p, st, _ in statuses if st == "changing"]
    frozen = [p for p, st, _ in statuses if st == "frozen"]
    out: dict[str, Any] = {}
    for path, _, obj_id in statuses:
        if not path or obj_id not in by_id or any(path.startswith(p + "/") for p in out):
            continue
        inside = lambda p: p == path or p.startswith(path + "/")  # noqa: E731
        if not any(inside(p) for p in changing) and any(inside(p) for p in frozen):
            out[path] = by_id[obj_id]
    return out


def _write_entries(path: str, entries: list[_Entry], attrs: dict[str, str] | None = None) -> None:
    """Writes recorded entries with their current values, as Keras's `H5IOStore` lays them out."""
    import h5py

    from keras.src import backend

    with h5py.File(path, "w") as f:
        for entry in entries:
            group = None
            if entry.metadata:
                group = f.require_group(f"{entry.path}/vars" if entry.path else "vars")
                for k, v in entry.metadata.items():
                    group.attrs[k] = v
            for key, value in entry.values.items():
                if group is None:
                    group = f.require_group(f"{entry.path}/vars" if entry.path else "vars")
                value = backend.convert_to_numpy(value)
                if backend.standardize_dtype(value.dtype) == "bfloat16":
                    group.create_dataset(key, data=value).attrs["dtype"] = "bfloat16"
                else:
                    group[key] = value
        for k, v in (attrs or {}).items():
            f.attrs[k] = v


def _under(path: str, prefixes) -> bool:
    return any(path == p or path.startswith(p + "/") for p in prefixes)


def _frozen_reference(path: str) -> tuple[str, list[str]] | None:
    """`(frozen file, sub-tree paths)` that a checkpoint file names, or `None` for a plain Keras file."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            name = f.attrs.get(FROZEN_ATTR)
            paths = f.attrs.get(FROZEN_PATHS_ATTR)
    except OSError:
        return None  # not HDF5: Keras's own loader says what is wrong
    if name is None or paths is None:
        return None
    name = name.decode() if isinstance(name, bytes) else str(name)
    paths = paths.decode() if isinstance(paths, bytes) else str(paths)
    return os.path.join(os.path.dirname(os.path.abspath(path)), name), list(json.loads(paths))


@contextlib.contextmanager
def _joined_weights(path: str, frozen_file: str, trees: list[str]) -> Iterator[str]:
    """A temporary plain Keras weights file: `path` with the frozen sub-trees copied in from `frozen_file`."""
    import shutil
    import tempfile

    import h5py

    if not os.path.isfile(frozen_file):
        raise TrainingError(f"{path} holds the trained weights only; the frozen ones are in {frozen_file}, which is "
                            "missing. Start again with --overwrite.")
    fd, tmp = tempfile.mkstemp(prefix=".joined-", suffix=".weights.h5", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "r+") as dst, h5py.File(frozen_file, "r") as src:
            for inner in trees:
                parent = inner.rsplit("/", 1)[0] if "/" in inner else ""
                group = dst.require_group(parent) if parent else dst
                src.copy(src[inner], group, name=inner.rsplit("/", 1)[-1])
            for key in (FROZEN_ATTR, FROZEN_PATHS_ATTR):
                del dst.attrs[key]
        yield tmp
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def files_needed(path: str) -> list[str]:
    """The files a checkpoint's weights need besides itself (its frozen-weights file), by name."""
    ref = _frozen_reference(path)
    return [os.path.basename(ref[0])] if ref else []


# ---------------------------------------------------------------- the callback


class Checkpointer(keras.callbacks.Callback):
    """After each finished epoch: the best weights (by `monitor`) and a full resume checkpoint.

    Put it after the callbacks whose state it records (history, early stopping, NaN guard). An epoch whose
    loss was NaN or infinite is never saved, so the last checkpoint stays the last good one.

    Args:
        run_dir: The run folder.
        monitor: Metric of the best checkpoint, maximised; ties go to the lower loss (`val_loss`, or `loss`).
            Defaults to `"val_accuracy"`.
        history: The list of history rows that the epoch logger appends to (saved in the state).
        bad_epoch: A callable returning the epoch number of a NaN/inf loss, or `None`. Defaults to `None`.
        head_margin: Added to the monitor of an epoch in which no backbone weight trained (the head on the frozen
            backbone, the probe): a fine-tuned epoch replaces it only when it beats it by more than this (one
            validation image: `1 / n_val`), or by exactly this at a lower loss. Defaults to `0.0`.

    Example:
        ckpt = Checkpointer("runs/try", "val_accuracy", rows)
        ckpt.begin_stage(0, stage, start_epoch=0, callbacks=cbs)
    """

    def __init__(self, run_dir: str, monitor: str = "val_accuracy", history: list[dict[str, Any]] | None = None,
                 bad_epoch=None, head_margin: float = 0.0):
        super().__init__()
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
        self.bad_epoch = bad_epoch or (lambda: None)
        self.best: float = -math.inf
        self.best_epoch: int | None = None
        self.stage_index, self.stage_name, self.stage_epochs, self.stage_start = 0, "", 0, 0
        self.early_stopping: keras.callbacks.EarlyStopping | None = None
        self._es_restore: dict[str, Any] | None = None
        self.last: RunState | None = None
        self._frozen_key: tuple | None = None  # which layers were frozen when `_frozen` was found
        self._layout: list[_Entry] = []  # Keras's weights layout of the model (`weights_layout`), recorded once
        self._layout_key: tuple | None = None
        self._frozen: dict[str, Any] = {}  # {path in the weights file: frozen layer} of the current stage
        self._frozen_file: str | None = None  # the file holding them, written once per stage

    def restore(self, state: RunState) -> None:
        """Takes over the best metric and history of a resumed run."""
        self.best = -math.inf if state.best is None else float(state.best)
        self.best_loss = math.inf if state.best_loss is None else float(state.best_loss)
        self.best_epoch = state.best_epoch
        self.history[:] = [dict(r) for r in state.history]
        self.last = state

    def begin_stage(self, index: int, stage, start_epoch: int, callbacks: list, es_state: dict | None = None) -> None:
        """Tells the checkpointer which stage runs next (`start_epoch`: the global epoch the stage starts at)."""
        self.stage_index, self.stage_name, self.stage_epochs, self.stage_start = (
            index, stage.name, stage.epochs, start_epoch)
        self.stage_frozen = stage.trainable == frozenset()
        self.early_stopping = next((c for c in callbacks if isinstance(c, keras.callbacks.EarlyStopping)), None)
        self._es_restore = es_state
        self._frozen_key = None  # a new stage: its frozen weights are written again, once

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
        if self.bad_epoch() is not None or (loss is not None and not math.isfinite(float(loss))):
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
        self._save_model_weights(os.path.join(self.dir, weights), epoch_done)
        save_optimizer(self.model.optimizer, os.path.join(self.dir, opt))
        if as_best:
            _link_or_copy(os.path.join(self.dir, weights), self.best_path)
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

    def _save_model_weights(self, path: str, epoch_done: int) -> None:
        """The model's weights into `path`; the frozen layers' weights only once per stage (`frozen_subtrees`).

        Keras's weights walk is recorded once per model (`weights_layout`); later saves write the recorded
        variables' current values (a walk over ResNet50 takes about a second, writing its head a few ms).
        """
        model = self.model
        layout_key = (id(model), tuple(id(v) for v in model.weights))
        if layout_key != self._layout_key:
            self._layout, self._layout_key, self._frozen_key = weights_layout(model), layout_key, None
        layers = model._flatten_layers(include_self=False, recursive=True)
        key = tuple((id(layer), bool(layer.trainable)) for layer in layers)
        if key != self._frozen_key or (self._frozen_file and not os.path.isfile(
                os.path.join(self.dir, self._frozen_file))):
            self._frozen = frozen_subtrees(model, self._layout) if self._layout else {}
            self._frozen_file = None
            if self._frozen:
                self._frozen_file = f"frozen-{epoch_done:04d}.weights.h5"
                inside = [e for e in self._layout if _under(e.path, self._frozen)]
                with rundir.atomic_path(os.path.join(self.dir, self._frozen_file), suffix=".weights.h5") as tmp:
                    _write_entries(tmp, inside)
            self._frozen_key = key
        rest = [e for e in self._layout if not _under(e.path, self._frozen)]
        with rundir.atomic_path(path, suffix=".weights.h5") as tmp:
            if rest and all(isinstance(v, keras.Variable) for e in rest for v in e.values.values()):
                attrs = ({FROZEN_ATTR: self._frozen_file, FROZEN_PATHS_ATTR: json.dumps(sorted(self._frozen))}
                         if self._frozen else None)
                _write_entries(tmp, rest, attrs)
            else:  # something saved as a computed value, not a variable: Keras's own walk, every time
                _write_weights(model, tmp, self._frozen, self._frozen_file)


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


def nan_message(epoch: int, stage, optimizer: keras.optimizers.Optimizer, precision: str) -> str:
    """The one line for a NaN/inf loss: the epoch, the stage, the learning rate at the time and the likely cause."""
    from tlkit.models.schedules import current_lr

    try:
        lr = f"{current_lr(optimizer):.3g}"
    except Exception:  # an exotic optimizer: its peak rate will do
        lr = f"{stage.lr:g}"
    text = (f"The loss became NaN or infinite in epoch {epoch} (stage {stage.name!r}, learning rate {lr} at the time, "
            f"peak {stage.lr:g}): the learning rate is likely too high; lower --lr (or --finetune-lr-scale)")
    if "float16" in str(precision):
        text += (f", or {precision} overflowed: use --precision float32 (or mixed_bfloat16 where supported)")
    return text + "."


# ---------------------------------------------------------------- the run folder


def prepare_run_dir(out_dir: str, cfg):  # the resumable run folder of finetune
    """Creates the run folder; with `resume` checks that the interrupted run had the same configuration.

    Without `resume`, an `--overwrite` of an earlier run removes its checkpoints so that a later
    `--resume` never mixes two runs. With `resume`, a setting the first run resolved (`lr: auto` -> the
    number the learning-rate finder found) is taken from its `config.yaml` instead of being searched again.

    Returns:
        The configuration to run with.

    Raises:
        OutputExistsError: the folder is not empty and neither `overwrite` nor `resume` is set.
        ConfigError: `resume` with a configuration that differs from the interrupted run's.
    """
    rundir.check_output_dir(out_dir, cfg.overwrite, cfg.resume)
    if cfg.resume:
        saved = os.path.join(out_dir, "config.yaml")
        if os.path.isfile(os.path.join(checkpoint_dir(out_dir), STATE_FILE)) and os.path.isfile(saved):
            old = _saved_config(saved)
            if isinstance(cfg.train.lr, str) and not isinstance(old.train.lr, str):  # lr: auto, already found
                cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=old.train.lr))
            if cfg.data.augment == "auto" and old.data.augment != "auto":  # augment: auto, already decided
                cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, augment=old.data.augment,
                                                                         flip=old.data.flip))
            diff = config_differences(old, cfg)
            if diff:
                raise ConfigError(f"Cannot resume {out_dir!r} with a different configuration ({'; '.join(diff[:4])})."
                                  f" Resume with the same flags, e.g. tlkit finetune --config {saved} --resume.")
        # A killed process leaves tf.data's cache lock (and a half-written cache): without this the resumed
        # run fails with "There appears to be a concurrent caching iterator running".
        for stale in glob.glob(os.path.join(out_dir, "cache", "*.lockfile")) + glob.glob(
                os.path.join(out_dir, "cache", "*.tempstate*")):
            with contextlib.suppress(OSError):
                os.remove(stale)
    else:
        # Starting over (--overwrite): an earlier run's checkpoints and disk cache (other images, other size)
        # must not be picked up.
        import shutil

        for folder in (checkpoint_dir(out_dir), os.path.join(out_dir, "cache")):
            if os.path.isdir(folder):
                shutil.rmtree(folder, ignore_errors=True)
    rundir.prepare_run_dir(out_dir, overwrite=True)
    return cfg


def _saved_config(path: str):
    from tlkit.core.config import config_from_dict, load_yaml

    try:
        return config_from_dict(load_yaml(path))
    except ConfigError as e:
        raise ConfigError(f"Cannot resume: {path} is not a valid tlkit config ({e}).") from None


def config_differences(saved, cfg) -> list[str]:
    """`key: saved -> now` for every setting that differs from a run's saved config (a `config.yaml` path or a
    `FinetuneConfig`), paths compared as absolute paths."""
    from tlkit.core.config import absolute_paths, config_to_dict

    if isinstance(saved, (str, os.PathLike)):
        saved = _saved_config(os.fspath(saved))
    old = config_to_dict(absolute_paths(saved))
    new = config_to_dict(absolute_paths(cfg))
    out = []
    for section in old:
        a, b = old[section], new.get(section)
        pairs = a.items() if isinstance(a, dict) else [(section, a)]
        for key, value in pairs:
            now = b.get(key) if isinstance(b, dict) else b
            if key in RESUME_FREE_FIELDS:
                continue
            if key in PATH_FIELDS and value and now:
                value, now = os.path.normpath(str(value)), os.path.normpath(str(now))
            if value != now:
                out.append(f"{key}: {value!r} -> {now!r}")
    return out


# ---------------------------------------------------------------- signals


_pending: dict[str, int | None] = {"signum": None}


def _on_signal(signum, frame):
    """First Ctrl-C/SIGTERM: stop at the end of the current batch (a clean point); a second one: at once."""
    if _pending["signum"] is not None:
        raise Interrupted(signum)
    _pending["signum"] = signum
    print(f"\n[tlkit] {signal.Signals(signum).name}: stopping after the current batch (press Ctrl-C again to "
          "stop at once); the last finished epoch is kept.", flush=True)


def interrupt_pending() -> int | None:
    """The signal received inside `interruptible` and not yet acted on, or `None`."""
    return _pending["signum"]


def raise_if_interrupted() -> None:
    """Raises `Interrupted` when a signal arrived (called by `Checkpointer` after every batch)."""
    signum = _pending["signum"]
    if signum is not None:
        raise Interrupted(signum)


def _epochs_saved(run_dir: str) -> int:
    try:
        state = load_state(run_dir)
    except TrainingError:
        return 0
    return state.epoch if state is not None else 0


@contextlib.contextmanager
def interruptible(run_dir: str) -> Iterator[None]:
    """Turns Ctrl-C (SIGINT) and SIGTERM inside the block into `Interrupted`, naming the run folder to resume.

    The first signal only sets a flag: training stops at the end of the current batch (`Checkpointer`
    calls `raise_if_interrupted`), never inside a TensorFlow call, where an exception would surface as an
    unrelated `SystemError`. A second signal stops at once. The handlers are installed only in the main
    thread; the previous ones are put back afterwards.

    Example:
        with interruptible("runs/try"):
            run_stages(...)
    """
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, _on_signal)
    _pending["signum"] = None
    try:
        yield
    except Interrupted as e:
        e.run_dir = e.run_dir or run_dir
        e.epochs_done = _epochs_saved(run_dir)
        raise
    except KeyboardInterrupt:
        raise Interrupted(signal.SIGINT, run_dir, _epochs_saved(run_dir)) from None
    except SystemError as e:  # a second Ctrl-C raised inside a TensorFlow call surfaces as SystemError
        if isinstance(e.__context__, KeyboardInterrupt) or _pending["signum"] is not None:
            raise Interrupted(_pending["signum"] or signal.SIGINT, run_dir, _epochs_saved(run_dir)) from None
        raise
    finally:
        _pending["signum"] = None
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def resume_command(argv: list[str], run_dir: str | None) -> str:
    """The command line that resumes an interrupted `tlkit finetune`: the same flags plus `--resume`."""
    args = list(argv)
    flags = {a.split("=", 1)[0] for a in args}
    if run_dir and "--output-dir" not in flags:
        args += ["--output-dir", run_dir]
    if "--resume" not in flags:
        args.append("--resume")
    if "--no-resume" in flags:
        args.remove("--no-resume")
    return "tlkit " + shlex.join(args)


def interrupt_message(e: KeyboardInterrupt, argv: list[str]) -> str:
    """The line(s) the CLI prints on Ctrl-C or SIGTERM."""
    name = signal.Signals(getattr(e, "signum", signal.SIGINT)).name
    run_dir = getattr(e, "run_dir", None)
    if not argv or argv[0] != "finetune":
        return f"tlkit: interrupted ({name})."
    if not run_dir:  # outside training (loading data, writing outputs): resumable when a checkpoint exists
        given = _flag_value(argv, "--output-dir")
        if not given or not os.path.isfile(os.path.join(checkpoint_dir(given), STATE_FILE)):
            return f"tlkit: interrupted ({name})."
        run_dir, e.epochs_done = given, _epochs_saved(given)  # type: ignore[attr-defined]
    done = getattr(e, "epochs_done", 0)
    saved = (f"epoch {done} is the last one saved in {checkpoint_dir(run_dir)}" if done
             else "no epoch had finished yet")
    return f"tlkit: interrupted ({name}); {saved}. Resume with:\n  {resume_command(argv, run_dir)}"


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None
