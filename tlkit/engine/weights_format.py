"""The head-only weights format: plain Keras `.weights.h5` files, and checkpoints that cost what changed.

Every use of Keras's saving internals (`keras.src.saving.saving_lib`: `_save_state`, `H5IOStore`;
`keras.src.backend`) is in this module; `core.private` names them.

A stage that trains no backbone weight (the head warm-up, feature extraction) cannot change the backbone: its
layers are not trainable, so Keras neither updates their weights nor their BatchNorm statistics. Writing them
again after every epoch (and again as the best checkpoint) is most of a checkpoint's bytes, and walking their
layers is most of its time. `IncrementalWeights` writes such frozen sub-trees once per stage into
`frozen-NNNN.weights.h5`; each epoch's `.weights.h5` holds the rest (the head) and names that file and the
sub-trees in two attributes. `load_weights` joins both into a plain Keras file before loading, so the loading
code and its checks stay Keras's own. (HDF5 external links would be simpler, but Keras refuses them.)

When no stage of a run trains the backbone (feature extraction, the probe), its frozen layers are the ones the run
builds from its configuration, and `model.keras` holds them at the end: a second copy is not written at all
(`IncrementalWeights(in_model=True)`). The checkpoint names `IN_MODEL` instead of a file, with a fingerprint of the
frozen weights; loading it assigns the head's variables and checks that the model's frozen layers have that
fingerprint (the run that resumes rebuilt the same backbone).

Example:
    save_weights(model, "w.weights.h5")      # a plain Keras weights file, without the optimizer
    load_weights(model, "w.weights.h5")      # a plain file, or a head-only checkpoint with its frozen file
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any, Iterator

import keras
import numpy as np

from tlkit.core import private, rundir
from tlkit.core.errors import TrainingError

FROZEN_ATTR = "tlkit_frozen_file"
FROZEN_PATHS_ATTR = "tlkit_frozen_paths"
FINGERPRINT_ATTR = "tlkit_frozen_fingerprint"
IN_MODEL = "@model"  # the frozen weights are the model's own, as the run builds them: no file holds them


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
        elif frozen[0] is None:
            _load_changing(model, path, frozen[1], frozen[2])
        else:
            with _joined_weights(path, frozen[0], frozen[1]) as full:
                model.load_weights(full)


def fingerprint(entries: list, samples: int = 4096) -> str:
    """A digest of the current values of the variables of weights-layout entries (`weights_layout`): each one's path,
    shape and about `samples` of its values, evenly strided (about 0.1 s for ResNet50's 25 million)."""
    import hashlib

    backend = private.keras_backend()
    digest = hashlib.sha1()
    for entry in entries:
        for key, value in entry.values.items():
            flat = np.ravel(backend.convert_to_numpy(value))
            digest.update(f"{entry.path}/{key}:{np.shape(value)}:{flat.dtype}".encode())
            digest.update(np.ascontiguousarray(flat[::max(1, flat.size // samples)]).tobytes())
    return digest.hexdigest()


def _load_changing(model: keras.Model, path: str, trees: list[str], digest: str) -> None:
    """Loads a checkpoint whose frozen sub-trees are the model's own (`IN_MODEL`): checks the model's frozen weights
    against the checkpoint's fingerprint, and every other variable's name and shape, then assigns them."""
    import h5py

    layout = weights_layout(model)
    if fingerprint([e for e in layout if _under(e.path, trees)]) != digest:
        raise TrainingError(f"{path} holds the trained head of a backbone whose weights differ from this run's (was "
                            "the --base file or --weights changed?). Start again with --overwrite.")
    rest = [e for e in layout if not _under(e.path, trees) and e.values]
    with h5py.File(path, "r") as f:
        pairs = []
        for entry in rest:
            group = f.get(f"{entry.path}/vars" if entry.path else "vars")
            for key, var in entry.values.items():
                data = group.get(key) if group is not None else None
                if data is None or not isinstance(var, keras.Variable) or tuple(data.shape) != tuple(var.shape):
                    raise TrainingError(f"{path} does not fit this model ({entry.path}/vars/{key}); was the "
                                        "configuration changed? Start again with --overwrite.")
                pairs.append((var, data[()]))
    for var, value in pairs:
        var.assign(value)


def _write_weights(model: keras.Model, path: str, skip: dict[str, Any] | None = None,
                   frozen_file: str | None = None) -> None:
    """Writes the model's weights in Keras's layout, leaving out the optimizer and the sub-trees in `skip`
    (`{path in the file: layer}`), whose file name is then recorded in the root attributes."""
    lib = private.keras_saving_lib()
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
    lib = private.keras_saving_lib()
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
    layers = private.all_layers(model)
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

    backend = private.keras_backend()
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


def _frozen_reference(path: str) -> tuple[str | None, list[str], str] | None:
    """`(frozen file, sub-tree paths, fingerprint)` that a checkpoint file names (the file `None` for `IN_MODEL`), or
    `None` for a plain Keras file."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            name, paths, digest = (f.attrs.get(k) for k in (FROZEN_ATTR, FROZEN_PATHS_ATTR, FINGERPRINT_ATTR))
    except OSError:
        return None  # not HDF5: Keras's own loader says what is wrong
    if name is None or paths is None:
        return None
    name, paths, digest = (v.decode() if isinstance(v, bytes) else str(v or "") for v in (name, paths, digest))
    trees = list(json.loads(paths))
    if name == IN_MODEL:
        return None, trees, digest
    return os.path.join(os.path.dirname(os.path.abspath(path)), name), trees, digest


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
    return [os.path.basename(ref[0])] if ref and ref[0] else []


class IncrementalWeights:
    """Writes a changing model's weights again and again, the frozen layers' weights only once per stage.

    Keras's weights walk is recorded once per model (`weights_layout`); later saves write the recorded
    variables' current values (a walk over ResNet50 takes about a second, writing its head a few ms).

    Args:
        folder: Where the files go (the frozen-weights file beside the weights files).
        in_model: The frozen layers are the ones the run builds (no stage trains the backbone), and the run's model
            file will hold them: no frozen-weights file is written; the checkpoints name `IN_MODEL` and the frozen
            weights' fingerprint. Defaults to `False`.

    Example:
        writer = IncrementalWeights("runs/try/checkpoints")
        writer.new_stage()
        writer.save(model, "runs/try/checkpoints/epoch-0001.weights.h5", tag=1)
    """

    def __init__(self, folder: str, in_model: bool = False):
        self.folder, self.in_model = folder, in_model
        self._frozen_key: tuple | None = None  # which layers were frozen when `_frozen` was found
        self._layout: list[_Entry] = []  # Keras's weights layout of the model (`weights_layout`), recorded once
        self._layout_key: tuple | None = None
        self._frozen: dict[str, Any] = {}  # {path in the weights file: frozen layer} of the current stage
        self._frozen_file: str | None = None  # the file holding them, written once per stage (or IN_MODEL)
        self._digest = ""  # the frozen weights' fingerprint, for IN_MODEL

    def new_stage(self) -> None:
        """A new stage: its frozen weights are written again, once."""
        self._frozen_key = None

    def save(self, model: keras.Model, path: str, tag: int) -> None:
        """The model's weights into `path`; the frozen ones into `frozen-{tag:04d}.weights.h5` when they changed."""
        layout_key = (id(model), tuple(id(v) for v in model.weights))
        if layout_key != self._layout_key:
            self._layout, self._layout_key, self._frozen_key = weights_layout(model), layout_key, None
        key = tuple((id(layer), bool(layer.trainable)) for layer in private.all_layers(model))
        if key != self._frozen_key or (self._frozen_file not in (None, IN_MODEL) and not os.path.isfile(
                os.path.join(self.folder, self._frozen_file))):
            self._find_frozen(model, tag)
            self._frozen_key = key
        rest = [e for e in self._layout if not _under(e.path, self._frozen)]
        with rundir.atomic_path(path, suffix=".weights.h5") as tmp:
            if self._variables_only(rest):
                attrs = ({FROZEN_ATTR: self._frozen_file, FROZEN_PATHS_ATTR: json.dumps(sorted(self._frozen)),
                          FINGERPRINT_ATTR: self._digest} if self._frozen else None)
                _write_entries(tmp, rest, attrs)
            else:  # something saved as a computed value, not a variable: Keras's own walk, every time
                _write_weights(model, tmp, self._frozen, self._frozen_file)

    @staticmethod
    def _variables_only(entries: list[_Entry]) -> bool:
        return bool(entries) and all(isinstance(v, keras.Variable) for e in entries for v in e.values.values())

    def _find_frozen(self, model: keras.Model, tag: int) -> None:
        """The stage's frozen sub-trees, and their file written (or, `in_model`, their fingerprint taken)."""
        self._frozen = frozen_subtrees(model, self._layout) if self._layout else {}
        self._frozen_file, self._digest = None, ""
        if not self._frozen:
            return
        inside = [e for e in self._layout if _under(e.path, self._frozen)]
        if self.in_model and self._variables_only(self._layout):
            self._frozen_file, self._digest = IN_MODEL, fingerprint(inside)
            return
        self._frozen_file = f"frozen-{tag:04d}.weights.h5"
        with rundir.atomic_path(os.path.join(self.folder, self._frozen_file), suffix=".weights.h5") as tmp:
            _write_entries(tmp, inside)
