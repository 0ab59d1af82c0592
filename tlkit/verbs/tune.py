"""`tune`: hyperparameter search with KerasTuner, on the same model and data code as `finetune`.

The roles are KerasTuner's: `TlkitHyperModel` is the search space (`build(hp)` calls
`model.build_classifier`, `fit(hp, model)` re-batches the `tf.data` pipeline with the trial's batch size and
trains the strategy's stages at the trial's learning rate), `TlkitTuner` runs the loop (random, Bayesian,
Hyperband or grid oracle; chief/worker distribution through `KERASTUNER_*`), and `tune` writes the run folder:

    RUN/tune.yaml           the search settings (`tlkit tune --config RUN/tune.yaml` repeats the search)
    RUN/search/             KerasTuner's project folder (oracle state, one folder per trial): resume point
    RUN/trials.csv          every trial: its values, objective, status, seconds, failure reason
    RUN/best_config.yaml    the best configuration (`tlkit finetune --config RUN/best_config.yaml`)
    RUN/objective_vs_lr.png the objective against the learning rate
    RUN/finetune/           the full `finetune` of the best configuration (`then_finetune`)

A trial that fails (NaN loss, out of memory, any exception inside it) is recorded as failed with its reason
and the search goes on; a configuration error (`ConfigError`, `DataError`, `BackboneError`, `OfflineError`)
stops it at once. Between trials the Keras session is cleared (and the dtype policy, which
`clear_session` resets, set again).

Example:
    from tlkit import FinetuneConfig, DataConfig, ModelConfig, TrainConfig, TuneConfig, tune
    result = tune(FinetuneConfig(data=DataConfig(dataset="shapes", image_size=32),
                                 model=ModelConfig(base="resnet50", weights="none"),
                                 train=TrainConfig(strategy="feature_extraction", epochs=2)),
                  TuneConfig(tuner="random", max_trials=4, batch_sizes=(16, 32)))
    result.best_config.train.lr
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
import traceback
import typing
from typing import Any, Mapping, Sequence

import numpy as np
import keras
import keras_tuner as kt
import tensorflow as tf
from keras_tuner.engine.trial import TrialStatus  # public
# Private KerasTuner modules, with no public equivalent in 1.4.x (pinned <1.5 in setup.cfg, tested with 1.4.8):
# config.DEBUG (a failed trial prints one line, not its traceback) and tuner_utils.SaveBestEpoch (the per-trial
# checkpoint callback, dropped unless Hyperband needs it).
from keras_tuner.src import config as kt_config
from keras_tuner.src.engine import tuner_utils as kt_tuner_utils

from tlkit.models import backbones, strategies
from tlkit.core import rundir, runtime
from tlkit.core import config as C
from tlkit.core.config import FinetuneConfig, TuneConfig, absolute_paths, config_to_dict, dump_yaml
from tlkit.engine import features as F
from tlkit.engine import setup as engine_setup
from tlkit.engine import class_weights
from tlkit.engine.loop import HeadFeatures, run_stages
from tlkit.data import Datasets, make_dataset
from tlkit.core.errors import (BackboneError, ConfigError, DataError, OfflineError, OutputExistsError,
                          TrainingError, suggest)
from tlkit.engine.resume import load_weights
from tlkit.engine.run import finetune_run
from tlkit.models.classifier import Classifier, build_classifier

SEARCH_DIR = "search"  # KerasTuner's project folder inside the run folder
SETTINGS_FILE = "tune.yaml"
TRIAL_INFO_FILE = "tlkit_trial.json"  # per trial, beside KerasTuner's trial.json: seconds, worker, reason
PLOT_FILE = "objective_vs_lr.png"
# Errors that are the user's to fix: they stop the search instead of failing one trial after another.
FATAL_ERRORS = (ConfigError, DataError, BackboneError, OfflineError, OutputExistsError)
# Settings that may change when a search is resumed; anything else must match the saved search.
RESUMABLE_CHANGES = ("max_trials", "then_finetune", "max_consecutive_failures")
# Ranges of the optional dimensions (documented in `TuneConfig`).
DROPOUT_RANGE = (0.0, 0.5, 0.1)
LABEL_SMOOTHING_RANGE = (0.0, 0.2, 0.05)
SEARCH_OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclasses.dataclass
class TuneResult:
    """What `tune` returns.

    Attributes:
        best_config: The best trial's configuration (as in `best_config.yaml`), `None` on a worker.
        best_value: Its objective value, `None` on a worker.
        trials: One dict per trial, as in `trials.csv` (empty on a worker).
        run_dir: The run folder.
        seconds: Wall-clock seconds of the search.
        finetune: The `RunResult` of `then_finetune`, else `None`.
    """

    best_config: FinetuneConfig | None
    best_value: float | None
    trials: list[dict[str, Any]]
    run_dir: str
    seconds: float
    finetune: Any = None


class _FatalTrialError(kt.errors.FatalError):
    """Carries a configuration error out of KerasTuner's loop, which only lets `FatalError` through."""

    def __init__(self, original: BaseException):
        super().__init__(str(original))
        self.original = original


# ------------------------------------------------------------------------------------------------ config

def tune_config_from_dict(values: Mapping[str, Any], base: TuneConfig | None = None) -> TuneConfig:
    """Builds a `TuneConfig` from a mapping (the `tune:` section of a YAML file, or flags).

    Lists are accepted for `lr_range` and `batch_sizes` (also "16,32" strings) and for `search`.

    Example:
        >>> tune_config_from_dict({"tuner": "random", "batch_sizes": [16, 32]}).batch_sizes
        (16, 32)
    """
    base = base or TuneConfig()
    if not isinstance(values, Mapping):
        raise ConfigError(f"The tune section must be a mapping of keys to values, got {type(values).__name__}.")
    hints = typing.get_type_hints(TuneConfig)
    names = [f.name for f in dataclasses.fields(TuneConfig)]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        key = str(key)
        if key not in names:
            raise ConfigError(f"Unknown key {key!r} in section 'tune'.{suggest(key, names)}")
        if key == "lr_range":
            kwargs[key] = _numbers(key, value, float)
        elif key == "batch_sizes":
            kwargs[key] = _numbers(key, value, int)
        elif key == "search":
            if isinstance(value, (list, tuple)):
                value = ",".join(str(v) for v in value)
            kwargs[key] = "" if value is None else str(value)
        else:
            kwargs[key] = C._coerce(key, value, hints[key])
    return dataclasses.replace(base, **kwargs)


def _numbers(name: str, value: Any, kind: type) -> tuple:
    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split() if v]
    if not isinstance(value, (list, tuple)):
        value = [value]
    out = []
    for v in value:
        try:
            if kind is int and (isinstance(v, bool) or float(v) != int(float(v))):
                raise ValueError
            out.append(kind(float(v)) if kind is int else kind(v))
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a list of {kind.__name__}s, got {value!r}.") from None
    return tuple(out)


def load_tune_config(path: str | os.PathLike) -> tuple[FinetuneConfig, TuneConfig]:
    """Reads a YAML file of finetune keys plus an optional `tune:` section (as `tune.yaml` is written).

    A plain finetune `config.yaml` works too (the search settings keep their defaults). Relative paths
    are resolved against the file's folder, as `load_config` does.
    """
    values = C.load_yaml(path)
    if "tune" not in values:
        return C.load_config(path), TuneConfig()
    tune_values = values.pop("tune") or {}
    cfg = C.config_from_dict(values)
    folder = os.path.dirname(os.path.abspath(path))
    return absolute_paths(cfg, folder), tune_config_from_dict(tune_values)


def settings_yaml(cfg: FinetuneConfig, tc: TuneConfig) -> str:
    """The text of `tune.yaml`: the finetune configuration plus a `tune:` section."""
    values = config_to_dict(cfg)
    t = dataclasses.asdict(tc)
    t["lr_range"], t["batch_sizes"] = list(tc.lr_range), list(tc.batch_sizes)
    values["tune"] = t
    return dump_yaml(values)


def _identity(cfg: FinetuneConfig, tc: TuneConfig) -> dict[str, Any]:
    """What defines a search: equal identities may share a project folder (resume)."""
    fc = config_to_dict(dataclasses.replace(cfg, output_dir=None, overwrite=False))
    fc.pop("resume", None)
    t = dataclasses.asdict(tc)
    for k in RESUMABLE_CHANGES:
        t.pop(k)
    t["lr_range"] = [float(v) for v in tc.lr_range]
    t["batch_sizes"] = sorted(set(int(v) for v in tc.batch_sizes))
    t["search"] = sorted(tc.dimensions)
    return {"finetune": fc, "tune": t}


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in list(dict.fromkeys(list(a) + list(b))):
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}." if prefix or k not in ("finetune", "tune")
                                else "")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]


# ------------------------------------------------------------------------------------------------ search space

class TlkitHyperModel(kt.HyperModel):
    """The search space: a `finetune` configuration whose learning rate, batch size and chosen dimensions vary.

    `build(hp)` makes the classifier with `model.build_classifier`; `fit(hp, model, ...)` re-batches the
    unbatched splits with `data.make_dataset` at the trial's batch size and runs the strategy's stages (as
    `finetune` does), the searched learning rate applied exactly to its stage.

    Args:
        cfg: The base `FinetuneConfig` (validated).
        tc: The `TuneConfig` (validated).
        spec: The backbone's spec.
        data: The loaded `Datasets` (with a validation split).
        image_size: Input side in pixels.
        rt: The `Runtime` of `runtime.setup`.
        cache_dir: Folder of the `disk` cache of this tuner process. Defaults to `None`.
        num_stages: Stages of the backbone (for `unfreeze_stages`). Defaults to `None`.
        verbose: `model.fit` verbosity. Defaults to `2`.
    """

    def __init__(self, cfg: FinetuneConfig, tc: TuneConfig, spec: backbones.BackboneSpec, data: Datasets,
                 image_size: int, rt: runtime.Runtime, cache_dir: str | None = None, num_stages: int | None = None,
                 verbose: int = 2):
        super().__init__(name="tlkit")
        self.cfg, self.tc, self.spec, self.data = cfg, tc, spec, data
        self.image_size, self.rt, self.cache_dir = image_size, rt, cache_dir
        self.num_stages, self.verbose = num_stages, verbose
        self.execution = 0  # builds within the current trial (one per execution): the seed offset
        self.feature_stats = None  # the head's standardisation, from the training images' features (tune())
        self.head_features: HeadFeatures | None = None  # those features, for every trial's head stage
        self.keep_checkpoints = False  # KerasTuner's per-trial best weights; only Hyperband needs them
        two = cfg.train.strategy == "two_stage"
        self.lr_names: tuple[str, ...] = {"finetune": ("finetune_lr",), "head": ("lr",),
                                          "both": ("lr", "finetune_lr")}[tc.two_stage_lr] if two else ("lr",)

    @property
    def plot_lr_name(self) -> str:
        """The learning rate the plot shows: the fine-tuning stage's when it is searched."""
        return self.lr_names[-1]

    # -- space
    def declare_hyperparameters(self, hp: kt.HyperParameters) -> None:
        self.space(hp)

    def space(self, hp: kt.HyperParameters) -> dict[str, Any]:
        """Declares the dimensions on `hp` (first call) and returns the trial's values."""
        tc = self.tc
        lo, hi = (float(v) for v in tc.lr_range)
        values: dict[str, Any] = {}
        for name in self.lr_names:
            if tc.tuner == "grid":
                points = [float(v) for v in np.geomspace(lo, hi, tc.grid_points)] if tc.grid_points > 1 else [lo]
                values[name] = hp.Choice(name, [float(f"{p:.6g}") for p in points], ordered=True)
            else:
                values[name] = hp.Float(name, lo, hi, sampling="log")
        sizes = sorted(set(int(b) for b in tc.batch_sizes))
        default = self.cfg.data.batch_size if self.cfg.data.batch_size in sizes else sizes[0]
        values["batch_size"] = hp.Choice("batch_size", sizes, ordered=True, default=default)
        dims = tc.dimensions
        if "dropout" in dims:
            values["dropout"] = hp.Float("dropout", *DROPOUT_RANGE[:2], step=DROPOUT_RANGE[2])
        if "label_smoothing" in dims:
            values["label_smoothing"] = hp.Float("label_smoothing", *LABEL_SMOOTHING_RANGE[:2],
                                                 step=LABEL_SMOOTHING_RANGE[2])
        if "unfreeze_stages" in dims:
            values["unfreeze_stages"] = hp.Int("unfreeze_stages", 1, max(int(self.num_stages or 1), 1))
        if "optimizer" in dims:
            values["optimizer"] = hp.Choice("optimizer", list(SEARCH_OPTIMIZERS))
        if "augment" in dims:
            values["augment"] = hp.Choice("augment", [p for p in C.AUGMENT_PRESETS if p != "auto"])  # auto: light
        return values

    def trial_config(self, values: Mapping[str, Any], epochs: int | None = None) -> FinetuneConfig:
        """The `FinetuneConfig` of a trial's values; `epochs` replaces the configured epochs when given."""
        cfg = self.cfg
        d, m, t = cfg.data, cfg.model, cfg.train
        d = dataclasses.replace(d, image_size=self.image_size, batch_size=int(values["batch_size"]),
                                augment=str(values.get("augment", d.augment)))
        m = dataclasses.replace(m, dropout=_round(values.get("dropout", m.dropout)))
        changes: dict[str, Any] = {}
        if "label_smoothing" in values:
            changes["label_smoothing"] = _round(values["label_smoothing"])
        if "unfreeze_stages" in values:
            changes["unfreeze_stages"] = int(values["unfreeze_stages"])
        if "optimizer" in values:
            changes["optimizer"] = str(values["optimizer"])
        if "lr" in values:
            changes["lr"] = float(values["lr"])
        if "finetune_lr" in values:
            head = float(changes.get("lr", t.lr))
            changes["finetune_lr_scale"] = float(values["finetune_lr"]) / head
        if epochs is not None:
            changes["epochs"] = int(epochs)
        return dataclasses.replace(cfg, data=d, model=m, train=dataclasses.replace(t, **changes))

    def plan(self, cfg: FinetuneConfig, values: Mapping[str, Any], num_stages: int) -> list[strategies.Stage]:
        """The strategy's stages, the searched learning rates set exactly (not through a scale factor)."""
        steps = math.ceil(self.data.train.count / cfg.data.batch_size)
        stages = strategies.plan(cfg.train, num_stages, steps, head_on_features=F.head_on_features(cfg))
        if "finetune_lr" in values:
            stages = [dataclasses.replace(s, lr=float(values["finetune_lr"])) if s.name == "finetune" else s
                      for s in stages]
        return stages

    def values(self, hp: kt.HyperParameters) -> dict[str, Any]:
        """The trial's values of this space's dimensions (KerasTuner's own `tuner/...` entries left out)."""
        return {k: v for k, v in hp.values.items() if not k.startswith("tuner/")}

    @property
    def trial_epochs(self) -> int:
        return int(self.tc.trial_epochs if self.tc.trial_epochs is not None else self.cfg.train.num_epochs)

    def total_epochs(self) -> int:
        """Epochs of a whole trial, all stages (Hyperband's `max_epochs`)."""
        cfg = dataclasses.replace(self.cfg, train=dataclasses.replace(self.cfg.train, epochs=self.trial_epochs))
        return sum(s.epochs for s in self.plan(cfg, {}, max(int(self.num_stages or 1), 1)))

    # -- build and fit
    def build(self, hp: kt.HyperParameters) -> keras.Model:
        values = self.space(hp)
        # KerasTuner clears the Keras session before every build, and clear_session() resets the global
        # dtype policy to float32: set the run's precision again so mixed precision holds in every trial.
        keras.mixed_precision.set_dtype_policy(self.rt.precision)
        keras.utils.set_random_seed(self.cfg.seed + self.execution)
        self.execution += 1
        cfg = self.trial_config(values)
        with self.rt.scope():
            return build_classifier(self.spec, self.data.num_classes, cfg.model, self.image_size,
                                    feature_stats=self.feature_stats)

    def fit(self, hp: kt.HyperParameters, model: keras.Model, *args, callbacks: Sequence[Any] | None = None,
            epochs: int | None = None, initial_epoch: int = 0, **kwargs) -> dict[str, float]:
        """Trains one execution of a trial; returns the objective's best epoch metrics.

        `epochs`/`initial_epoch` are Hyperband's: the trial trains the plan's epochs `[initial_epoch, epochs)`
        (continuing the weights of the trial it was promoted from).
        """
        values = self.values(hp)
        cfg = self.trial_config(values, epochs=self.trial_epochs)
        bs = cfg.data.batch_size
        d, n = self.data, self.data.num_classes
        det = True if cfg.runtime.deterministic else None
        common = dict(image_size=self.image_size, batch_size=bs, num_classes=n, seed=cfg.seed,
                      cache_dir=self.cache_dir, deterministic=det)
        # The batch size of a tf.data.Dataset is its own (fit(batch_size=...) is ignored): re-batch the splits.
        train_ds = make_dataset(d.train, training=True, augment=cfg.data.augment, cache=cfg.data.cache, **common)
        val_ds = make_dataset(d.val, cache=cfg.data.cache, **common)
        steps = math.ceil(d.train.count / bs)
        clf = Classifier(model, self.spec)
        plan = self.plan(cfg, values, clf.num_stages)
        total = sum(s.epochs for s in plan)
        end = total if epochs is None else min(int(epochs), total)
        callbacks = [c for c in (callbacks or [])
                     if self.keep_checkpoints or not isinstance(c, kt_tuner_utils.SaveBestEpoch)]
        objective = self.tc.objective
        feats = None
        if self.head_features is not None:  # the trial's own copy: the arrays are shared, the state is not
            feats = dataclasses.replace(self.head_features, fresh=True)
        try:
            rows = run_stages(clf, plan, train_ds, val_ds, cfg, self.rt, num_classes=n,
                              steps_per_epoch=steps, features=feats, callbacks=callbacks,
                              epoch_range=(int(initial_epoch), end), early_stopping_monitor=objective,
                              verbose=self.verbose, describe=False)
        except TrainingError as e:
            stage = getattr(e, "stage", None)
            raise kt.errors.FailedTrialError(
                f"loss became NaN or infinite in epoch {getattr(e, 'epoch', '?')} (stage {getattr(stage, 'name', '?')!r}, "
                f"lr {getattr(stage, 'lr', float('nan')):.3g}, batch size {bs})") from None
        skip = ("epoch", "lr", "seconds", "head_passes", "kept_pass")
        rows = [{k: float(v) for k, v in r.items() if k not in skip and isinstance(v, (int, float))} for r in rows]
        return _best_epoch(rows, objective)


def _best_epoch(rows: list[dict[str, float]], objective: str) -> dict[str, float]:
    finite = [r for r in rows if math.isfinite(r.get(objective, float("nan")))]
    if not finite:
        raise kt.errors.FailedTrialError(f"no epoch gave a finite {objective}")
    pick = max if objective.endswith("accuracy") else min
    best = pick(finite, key=lambda r: r[objective])
    out = {k: v for k, v in best.items() if math.isfinite(v)}
    out["epochs"] = float(len(rows))
    return out


def _round(x: Any) -> float:
    return float(round(float(x), 6))


# ------------------------------------------------------------------------------------------------ tuner

class TlkitTuner(kt.Tuner):
    """KerasTuner's `Tuner` with tlkit's trial bookkeeping.

    - a failed trial (NaN, out of memory, any exception) is marked `FAILED` with a one-line reason, written
      beside KerasTuner's `trial.json` (so a distributed chief sees it too); a `FATAL_ERRORS` error stops
      the search;
    - the Keras session is cleared after every trial (KerasTuner also clears it before every build);
    - the search space is declared without building a model;
    - Hyperband's promoted trials continue from their parent's weights;
    - the distributed chief serves the oracle (KerasTuner's servicer) and returns as soon as the workers are
      done (KerasTuner's own loop polls every 20 s).
    """

    def __init__(self, oracle: kt.Oracle, hypermodel: TlkitHyperModel, hyperband: bool = False, **kwargs):
        self.hyperband = hyperband
        self._t0: dict[str, float] = {}
        self._reasons: dict[str, tuple[str, str]] = {}
        super().__init__(oracle=oracle, hypermodel=hypermodel, **kwargs)
        hypermodel.keep_checkpoints = hyperband

    def _populate_initial_space(self):
        hp = self.oracle.get_space()
        self.hypermodel.declare_hyperparameters(hp)
        self.oracle.update_space(hp)

    def on_trial_begin(self, trial):
        self._t0[trial.trial_id] = time.time()
        self.hypermodel.execution = 0
        super().on_trial_begin(trial)

    def run_trial(self, trial, *args, **kwargs):
        hp = trial.hyperparameters
        if self.hyperband and "tuner/epochs" in hp.values:
            kwargs["epochs"] = hp.values["tuner/epochs"]
            kwargs["initial_epoch"] = hp.values["tuner/initial_epoch"]
        bs = hp.values.get("batch_size")
        try:
            return super().run_trial(trial, *args, **kwargs)
        except kt.errors.FatalError:
            raise
        except FATAL_ERRORS as e:
            raise _FatalTrialError(e) from e
        except kt.errors.FailedTrialError as e:
            self._fail(trial, str(e))
        except TrainingError as e:
            self._fail(trial, str(e))
        except (tf.errors.ResourceExhaustedError, MemoryError) as e:
            self._fail(trial, f"out of memory with batch size {bs}: {_first_line(e)}")
        except Exception as e:  # anything else inside a trial fails that trial only
            self._fail(trial, f"{type(e).__name__}: {_first_line(e)}")

    def _fail(self, trial, reason: str):
        self._reasons[trial.trial_id] = (reason, traceback.format_exc())
        raise kt.errors.FailedTrialError(reason)

    def _configure_tensorboard_dir(self, callbacks, trial, execution=0):
        # KerasTuner 1.4.8 imports tensorboard here on every trial, needed or not: only when it is used.
        if any(c.__class__.__name__ == "TensorBoard" for c in callbacks):
            super()._configure_tensorboard_dir(callbacks, trial, execution)

    def _build_hypermodel(self, hp):
        model = super()._build_hypermodel(hp)
        if self.hyperband and "tuner/trial_id" in hp.values:
            load_weights(model, self._get_checkpoint_fname(hp.values["tuner/trial_id"]))
        return model

    def on_trial_end(self, trial):
        reason, tb = self._reasons.pop(trial.trial_id, ("", ""))
        if not reason and trial.status != TrialStatus.COMPLETED and trial.message:
            reason = _last_line(trial.message)
        seconds = round(time.time() - self._t0.pop(trial.trial_id, time.time()), 2)
        info = {"trial_id": trial.trial_id, "tuner_id": self.tuner_id, "seconds": seconds,
                "status": str(trial.status), "reason": reason, "traceback": tb}
        rundir.write_json(os.path.join(self.get_trial_dir(trial.trial_id), TRIAL_INFO_FILE), info)
        if reason:
            print(f"[tlkit] trial {trial.trial_id} failed: {reason}", flush=True)
        try:
            super().on_trial_end(trial)
        finally:
            # Release the trial's layers and graphs now; KerasTuner clears (and collects garbage) again
            # before the next build.
            keras.backend.clear_session(free_memory=False)

    def search(self, *fit_args, **fit_kwargs):
        from keras_tuner.src.distribute import utils as dist_utils

        if not dist_utils.is_chief_oracle():
            return super().search(*fit_args, **fit_kwargs)
        self.oracle.verbose = fit_kwargs.get("verbose", 1)
        self.save()
        _serve_oracle(self.oracle)


def _serve_oracle(oracle: kt.Oracle, poll: float = 0.25) -> None:
    """Serves `oracle` to the workers over gRPC until every worker has been told to stop."""
    import grpc
    from concurrent import futures

    from keras_tuner.src import protos
    from keras_tuner.src.distribute import oracle_chief

    address = f"{os.environ['KERASTUNER_ORACLE_IP']}:{os.environ['KERASTUNER_ORACLE_PORT']}"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    servicer = oracle_chief.OracleServicer(oracle)
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if not port:
        raise ConfigError(f"The chief cannot listen on {address} (KERASTUNER_ORACLE_IP/KERASTUNER_ORACLE_PORT): "
                          "is the port in use or the address not this machine's?")
    server.start()
    print(f"[tlkit] chief: oracle serving on {address}; start the workers with KERASTUNER_TUNER_ID=tuner0, "
          "tuner1, ...", flush=True)
    try:
        while not (servicer.stop_triggered and oracle_chief.exit_chief(oracle)):
            time.sleep(poll)
    finally:
        server.stop(grace=2).wait()


def _role() -> str:
    """`single`, `chief` or `worker`, from KerasTuner's environment variables."""
    from keras_tuner.src.distribute import utils as dist_utils

    try:
        if not dist_utils.has_chief_oracle():
            return "single"
    except RuntimeError as e:
        raise ConfigError(f"Distributed tuning: {_first_line(e)}") from None
    return "chief" if dist_utils.is_chief_oracle() else "worker"


def make_oracle(tc: TuneConfig, seed: int, max_epochs: int) -> kt.Oracle:
    """The KerasTuner oracle of `tc.tuner`."""
    direction = "max" if tc.objective.endswith("accuracy") else "min"
    common = dict(objective=kt.Objective(tc.objective, direction), seed=seed, max_retries_per_trial=0,
                  max_consecutive_failed_trials=tc.max_consecutive_failures)
    if tc.tuner == "random":
        return kt.oracles.RandomSearchOracle(max_trials=tc.max_trials, **common)
    if tc.tuner == "bayesian":
        try:
            import sklearn  # noqa: F401  (KerasTuner's Gaussian process)
        except ImportError:
            raise ConfigError("--tuner bayesian needs scikit-learn (pip install scikit-learn), or use --tuner "
                              "random.") from None
        return kt.oracles.BayesianOptimizationOracle(max_trials=tc.max_trials, **common)
    if tc.tuner == "grid":
        return kt.oracles.GridSearchOracle(max_trials=tc.max_trials, **common)
    if tc.tuner == "hyperband":
        oracle = kt.oracles.HyperbandOracle(max_epochs=max(int(max_epochs), 1), factor=3, **common)
        oracle.max_trials = tc.max_trials  # a cap: Hyperband itself decides how many brackets it runs
        return oracle
    raise ConfigError(f"Unknown tuner {tc.tuner!r}. Choose one of: {', '.join(C.TUNERS)}.")


# ------------------------------------------------------------------------------------------------ the verb

def tune(cfg: FinetuneConfig, tune_cfg: TuneConfig | None = None,
         callbacks: Sequence[keras.callbacks.Callback] | None = None) -> TuneResult:
    """Searches hyperparameters of a `finetune` configuration with KerasTuner and writes a run folder.

    Re-running with the same settings resumes the search in `cfg.output_dir` (finished trials are kept, an
    interrupted one is run again); `cfg.overwrite` starts over. With `KERASTUNER_TUNER_ID`,
    `KERASTUNER_ORACLE_IP` and `KERASTUNER_ORACLE_PORT` set, the process is KerasTuner's chief (the ID
    contains `chief`: serves the oracle, writes the outputs) or a worker (runs trials).

    Args:
        cfg: The `FinetuneConfig` whose learning rate, batch size and `tune_cfg.search` dimensions vary.
        tune_cfg: The `TuneConfig`. Defaults to `None` (`TuneConfig()`).
        callbacks: Extra Keras callbacks for every trial's `fit` (deep-copied per execution by KerasTuner).
            Defaults to `None`.

    Returns:
        A `TuneResult`.

    Raises:
        ConfigError, DataError, BackboneError, OfflineError: a configuration error, at once.
        TrainingError: every trial failed, or `max_consecutive_failures` failed in a row.

    Example:
        r = tune(FinetuneConfig(data=DataConfig(dataset="shapes", image_size=32), model=ModelConfig(
            weights="none")), TuneConfig(tuner="random", max_trials=3, batch_sizes=(16, 32)))
    """
    tc = (tune_cfg or TuneConfig()).validate()
    cfg = absolute_paths(cfg.validate())
    if not isinstance(cfg.train.lr, (int, float)) or isinstance(cfg.train.lr, bool):
        raise ConfigError(f"tune searches the learning rate itself: give lr a number (the fixed warm-up rate of "
                          f"two_stage), not {cfg.train.lr!r}.")
    role = _role()
    spec = backbones.get_backbone(cfg.model.base)
    if "unfreeze_stages" in tc.dimensions and cfg.train.strategy not in ("two_stage", "top_k"):
        raise ConfigError(f"--search unfreeze_stages needs --strategy two_stage or top_k, got "
                          f"{cfg.train.strategy!r}.")
    # the pretrained backbone once: its stages, and the features of the training images
    run = engine_setup.setup_run(cfg, cap_batch=False)  # the batch sizes are searched: _check_data refuses big ones
    rt, base, size, data = run.rt, run.base, run.size, run.data
    num_stages = spec.num_stages(base)
    del run
    _check_data(data, tc)
    cfg, _ = class_weights.resolve(cfg, data)  # --class-weight balanced -> numbers (tune.yaml, best_config.yaml)
    out = cfg.output_dir or os.path.join("runs", _safe(f"tune-{spec.name}-{data.name}"))
    _prepare(out, cfg, tc, role)
    tuner_id = os.environ.get("KERASTUNER_TUNER_ID", "tuner0")
    verbose = 1 if sys.stdout.isatty() else 2
    cache_dir = os.path.join(out, "cache", _safe(tuner_id))  # one per process: tf.data disk caches lock
    _clear_stale_cache_locks(cache_dir)
    hm = TlkitHyperModel(cfg, tc, spec, data, size, rt, cache_dir=cache_dir, num_stages=num_stages, verbose=verbose)
    if role != "chief":  # every trial's head starts from the same standardised features (finetune's recipe)
        batch = min(max(tc.batch_sizes), data.train.count)
        plain = make_dataset(data.train, size, batch, data.num_classes, cache="none", seed=cfg.seed)
        val = make_dataset(data.val, size, batch, data.num_classes, cache="none", seed=cfg.seed)
        _, feats = engine_setup.build_model(spec, base, data.num_classes, cfg, size, rt, plain, val)
        hm.feature_stats = engine_setup.feature_stats(feats)
        hm.head_features = dataclasses.replace(feats, train_ds=None, val_ds=None)
    del base
    oracle = make_oracle(tc, cfg.seed, hm.total_epochs())
    try:
        tuner = TlkitTuner(oracle, hm, hyperband=tc.tuner == "hyperband", directory=out, project_name=SEARCH_DIR,
                           overwrite=bool(cfg.overwrite and role != "worker"),
                           executions_per_trial=tc.executions_per_trial)
    except RuntimeError as e:
        raise ConfigError(f"Cannot resume the search in {os.path.join(out, SEARCH_DIR)}: {_first_line(e)}; pass "
                          "--overwrite to start over.") from None
    print(f"[tlkit] tune {spec.name} on {data.name}: {data.train.count} train / {data.val.count} val images, "
          f"{data.num_classes} classes, {size}px; {tc.tuner} search, {tc.max_trials} trials of "
          f"{hm.trial_epochs} epoch(s) over {', '.join(hm.lr_names)} {tc.lr_range[0]:g}..{tc.lr_range[1]:g} (log), "
          f"batch size {'/'.join(str(b) for b in sorted(set(tc.batch_sizes)))}"
          + (f", {', '.join(tc.dimensions)}" if tc.dimensions else "") + f"; {rt.describe()}; role {role}",
          flush=True)
    if role == "single" and tuner.remaining_trials is not None and len(tuner.oracle.trials):
        print(f"[tlkit] resuming {out}: {len(tuner.oracle.trials)} trial(s) already in the search", flush=True)
    trial_callbacks = list(callbacks or [])
    if cfg.train.tensorboard:  # KerasTuner gives every trial and execution its own log folder
        trial_callbacks.append(keras.callbacks.TensorBoard(os.path.join(out, "tensorboard")))
    t0 = time.time()
    stopped: TrainingError | None = None
    debug = kt_config.DEBUG
    kt_config.DEBUG = False  # a failed trial prints one line; its traceback goes to its tlkit_trial.json
    try:
        tuner.search(callbacks=trial_callbacks, verbose=1)
    except _FatalTrialError as e:
        raise e.original from None
    except KeyboardInterrupt:
        if role == "single":  # what is done so far; the interrupted trial runs again when the search resumes
            rows = trial_rows(tuner.oracle, hm, os.path.join(out, SEARCH_DIR))
            rundir.write_csv(os.path.join(out, "trials.csv"), rows)
            print(f"[tlkit] search interrupted; run the same command to resume it from {out}", flush=True)
        raise
    except RuntimeError as e:
        if "consecutive failures" not in str(e):
            raise
        stopped = TrainingError(f"Search stopped: {tc.max_consecutive_failures} trials failed in a row (last: "
                                f"{_last_line(str(e))}); see {os.path.join(out, 'trials.csv')}.")
    finally:
        kt_config.DEBUG = debug
        keras.backend.clear_session()
        keras.mixed_precision.set_dtype_policy(rt.precision)
    seconds = round(time.time() - t0, 2)
    if role == "worker":
        print(f"[tlkit] worker {tuner_id} done in {seconds:.1f}s; the chief writes the results to {out}", flush=True)
        return TuneResult(None, None, [], out, seconds)
    rows = trial_rows(tuner.oracle, hm, os.path.join(out, SEARCH_DIR))
    rundir.write_csv(os.path.join(out, "trials.csv"), rows)
    plot_objective_vs_lr(rows, tc.objective, hm.plot_lr_name, os.path.join(out, PLOT_FILE))
    print(summary_table(rows, tc.objective, hm), flush=True)
    if stopped is not None:
        raise stopped
    done = [r for r in rows if r["status"] == "COMPLETED"]
    if not done:
        raise TrainingError(f"All {len(rows)} trials failed (reasons in {os.path.join(out, 'trials.csv')}); first: "
                            f"{rows[0]['reason'] if rows else 'no trial ran'}.")
    best_row = (max if tc.objective.endswith("accuracy") else min)(done, key=lambda r: r[tc.objective])
    best_values = {k: best_row[k] for k in _value_names(hm) if k in best_row}
    best_cfg = dataclasses.replace(hm.trial_config(best_values), output_dir=None, overwrite=False)
    header = (f"# tlkit tune: best of {len(rows)} trial(s) ({len(done)} completed), trial {best_row['trial']}: "
              f"{tc.objective} {best_row[tc.objective]:.4f} after {hm.trial_epochs} epoch(s) per trial.\n"
              f"# Repeat with: tlkit finetune --config {os.path.join(out, 'best_config.yaml')}\n")
    best_path = os.path.join(out, "best_config.yaml")
    rundir.write_text(best_path, header + dump_yaml(config_to_dict(best_cfg)))
    print(f"[tlkit] {len(rows)} trial(s) in {seconds:.1f}s; best {tc.objective} {best_row[tc.objective]:.4f} "
          f"(trial {best_row['trial']}); best configuration: {best_path}", flush=True)
    result = TuneResult(best_cfg, float(best_row[tc.objective]), rows, out, seconds)
    if tc.then_finetune:
        final = C.load_config(best_path)  # the very file `tlkit finetune --config` reads
        final = dataclasses.replace(final, output_dir=os.path.abspath(os.path.join(out, "finetune")), overwrite=True)
        print(f"[tlkit] then-finetune: the best configuration for {final.train.num_epochs} epoch(s) into "
              f"{final.output_dir}", flush=True)
        result.finetune = finetune_run(final)
    return result


def _check_data(data: Datasets, tc: TuneConfig) -> None:  # the empty training split: setup_run
    if data.val is None or data.val.count < 1:
        raise ConfigError(f"tune needs a validation split for its objective {tc.objective}: the data has none; "
                          "use --val-split 0.1 (or a val/ folder).")
    too_big = [b for b in tc.batch_sizes if b > data.train.count]
    if too_big:
        raise ConfigError(f"batch size(s) {', '.join(map(str, too_big))} in --batch-sizes are larger than the "
                          f"training set ({data.train.count} images); lower them.")


def _prepare(out: str, cfg: FinetuneConfig, tc: TuneConfig, role: str) -> None:
    """Creates the run folder; resumes only a search with the same settings; refuses foreign folders."""
    rundir.check_output_dir(out, overwrite=True)  # a file there is refused; a folder is judged below
    if role == "worker":  # the chief owns the folder and its settings; workers only add trials
        os.makedirs(out, exist_ok=True)
        return
    settings = os.path.join(out, SETTINGS_FILE)
    entries = set(os.listdir(out)) if os.path.isdir(out) else set()
    # Workers started before the chief may already have made these (a fresh search all the same).
    fresh = entries <= {SEARCH_DIR, "cache"} and not os.path.exists(os.path.join(out, SEARCH_DIR, "oracle.json"))
    if entries and not fresh and not cfg.overwrite:
        if not os.path.isfile(settings):
            raise OutputExistsError(f"Output folder {out!r} exists, is not empty and holds no tlkit search; pass "
                                    "--overwrite to reuse it or choose another --output-dir.")
        old_cfg, old_tc = load_tune_config(settings)
        diff = _differences(_identity(old_cfg, old_tc), _identity(cfg, tc))
        if diff:
            raise ConfigError(f"{out!r} holds a search with other settings ({'; '.join(diff[:4])}"
                              f"{' ...' if len(diff) > 4 else ''}): pass --overwrite to start over or choose another "
                              "--output-dir. Only --max-trials, --max-consecutive-failures and --then-finetune may "
                              "change when resuming.")
    os.makedirs(out, exist_ok=True)
    rundir.write_text(settings, settings_yaml(dataclasses.replace(cfg, output_dir=os.path.abspath(out)), tc))


def _clear_stale_cache_locks(cache_dir: str) -> None:
    """Removes what a killed process leaves of a half-written tf.data disk cache (a lock file and temporary
    state): otherwise every trial of the resumed search would fail on 'concurrent caching iterator'."""
    import glob

    stale_files = glob.glob(os.path.join(cache_dir, "*.lockfile")) + glob.glob(os.path.join(cache_dir, "*.tempstate*"))
    for stale in stale_files:
        try:
            os.remove(stale)
        except OSError:
            pass


def _value_names(hm: TlkitHyperModel) -> list[str]:
    return list(hm.lr_names) + ["batch_size"] + list(hm.tc.dimensions)


def trial_rows(oracle: kt.Oracle, hm: TlkitHyperModel, project_dir: str) -> list[dict[str, Any]]:
    """One row per trial, in trial order: trial, status, objective, values, metrics, seconds, worker, reason."""
    obj = hm.tc.objective
    rows = []
    for tid in sorted(oracle.trials):
        t = oracle.trials[tid]
        info = _read_json(os.path.join(project_dir, f"trial_{tid}", TRIAL_INFO_FILE))
        status = str(t.status)
        row: dict[str, Any] = {"trial": tid, "status": status}
        metrics = {name: _last(t, name) for name in (obj, "val_accuracy", "val_loss", "accuracy", "loss", "epochs")}
        row[obj] = float(t.score) if status == "COMPLETED" and t.score is not None else metrics.get(obj)
        for name in _value_names(hm):
            v = t.hyperparameters.values.get(name)
            row[name] = (_round(v) if isinstance(v, float) and name not in hm.lr_names else v)
        if hm.tc.tuner == "hyperband":
            row["hyperband_epochs"] = t.hyperparameters.values.get("tuner/epochs")
            row["continued_from"] = t.hyperparameters.values.get("tuner/trial_id", "")
        for name in ("val_accuracy", "val_loss", "accuracy", "loss"):
            if name != obj:
                row[name] = metrics.get(name)
        row["epochs"] = None if metrics.get("epochs") is None else int(metrics["epochs"])
        row["seconds"] = info.get("seconds")
        row["worker"] = info.get("tuner_id", "")
        reason = info.get("reason") or ("" if status == "COMPLETED" or not t.message else _last_line(t.message))
        if status == "RUNNING":
            reason = reason or "interrupted (runs again when the search is resumed)"
        row["reason"] = reason
        rows.append(row)
    return rows


def _last(trial, name: str) -> float | None:
    try:
        if trial.metrics.exists(name):
            v = trial.metrics.get_last_value(name)
            return None if v is None else float(v)
    except Exception:  # a metric KerasTuner could not record
        return None
    return None


def _read_json(path: str) -> dict[str, Any]:
    import json

    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def summary_table(rows: list[dict[str, Any]], objective: str, hm: TlkitHyperModel, top: int = 10) -> str:
    """The printed table: the best `top` completed trials, then the failed ones."""
    names = _value_names(hm)
    done = [r for r in rows if r["status"] == "COMPLETED"]
    done.sort(key=lambda r: r[objective], reverse=objective.endswith("accuracy"))
    failed = [r for r in rows if r["status"] != "COMPLETED"]
    cols = ["rank", "trial", objective] + names + ["seconds", "status"]
    table = []
    for i, r in enumerate(done[:top]):
        table.append([str(i + 1), r["trial"], f"{r[objective]:.4f}"] + [_fmt(r.get(n)) for n in names]
                     + [_fmt(r.get("seconds")), "ok"])
    for r in failed:
        table.append(["-", r["trial"], "-"] + [_fmt(r.get(n)) for n in names] + [_fmt(r.get("seconds")),
                                                                                 f"{r['status']}: {r['reason'][:60]}"])
    widths = [max(len(c), *(len(row[i]) for row in table)) if table else len(c) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [line(cols), line(["-" * w for w in widths])] + [line(r) for r in table]
    if len(done) > top:
        out.append(f"... and {len(done) - top} more completed trial(s) in trials.csv")
    return "\n".join(out)


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def plot_objective_vs_lr(rows: list[dict[str, Any]], objective: str, lr_name: str, path: str) -> None:
    """Writes a PNG of the objective against the learning rate (log scale), one colour per batch size,
    failed trials as red crosses at the bottom."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    done = [r for r in rows if r["status"] == "COMPLETED" and r.get(lr_name) and r.get(objective) is not None]
    for bs in sorted({r["batch_size"] for r in done}):
        pts = sorted((float(r[lr_name]), float(r[objective])) for r in done if r["batch_size"] == bs)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", label=f"batch size {bs}", alpha=0.8)
    failed = [float(r[lr_name]) for r in rows if r["status"] != "COMPLETED" and r.get(lr_name)]
    if failed:
        ys = [float(r[objective]) for r in done] or [0.0]
        ax.plot(failed, [min(ys)] * len(failed), "x", color="red", markersize=9, label="failed trial")
    if done:
        best = (max if objective.endswith("accuracy") else min)(done, key=lambda r: r[objective])
        ax.plot([float(best[lr_name])], [float(best[objective])], "*", color="black", markersize=14,
                label=f"best (trial {best['trial']})")
    ax.set_xscale("log")
    label = {"lr": "learning rate", "finetune_lr": "fine-tuning stage learning rate"}.get(lr_name, lr_name)
    ax.set_xlabel(f"{label} (log scale)")
    ax.set_ylabel(objective)
    ax.set_title(f"{objective} against {label}: {len(done)} completed, {len(failed)} failed trial(s)")
    ax.grid(True, which="both", alpha=0.3)
    if done or failed:
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    with rundir.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def _last_line(text: str) -> str:
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    line = lines[-1] if lines else ""
    for prefix in ("keras_tuner.src.errors.FailedTrialError: ", "FailedTrialError: "):
        if line.startswith(prefix):
            line = line[len(prefix):]
    return line[:300]


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)
