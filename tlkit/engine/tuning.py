"""The search space of `tune` (KerasTuner's HyperModel role) and the table of its trials.

`TlkitHyperModel`: `build(hp)` calls `models.classifier.build_classifier`, `fit(hp, model)` re-batches the
`tf.data` pipeline with the trial's batch size and trains the strategy's stages at the trial's learning rate
through `engine.loop.run_stages`. `trial_rows` and `summary_table` read the trials back for `trials.csv` and the
printed table. The tuner that runs the loop is `engine.tuner`'s.

Example:
    hm = TlkitHyperModel(cfg, tc, spec, data, 32, rt)
    hm.trial_config({"lr": 1e-3, "batch_size": 16}).train.lr
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
import keras
import keras_tuner as kt

from tlkit.core import config as C
from tlkit.core import runtime
from tlkit.core.config import FinetuneConfig
from tlkit.core.verb_configs import TuneConfig, maximised
from tlkit.core.errors import TrainingError
from tlkit.data import Datasets, make_dataset
from tlkit.engine import features as F
from tlkit.engine.loop import HeadFeatures, run_stages
from tlkit.core.private import kt_save_best_epoch
from tlkit.models import backbones, strategies
from tlkit.models.classifier import Classifier, build_classifier

TRIAL_INFO_FILE = "tlkit_trial.json"  # per trial, beside KerasTuner's trial.json: seconds, worker, reason
DROPOUT_RANGE = (0.0, 0.5, 0.1)
LABEL_SMOOTHING_RANGE = (0.0, 0.2, 0.05)
SEARCH_OPTIMIZERS = ("adam", "adamw", "sgd")


class TlkitHyperModel(kt.HyperModel):
    """The search space: a `finetune` configuration whose learning rate, batch size and chosen dimensions vary.

    `build(hp)` makes the classifier with `models.classifier.build_classifier`; `fit(hp, model, ...)` re-batches the
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
                                    feature_stats=self.feature_stats, multi_label=self.data.multi_label)

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
                     if self.keep_checkpoints or not isinstance(c, kt_save_best_epoch())]
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
    pick = max if maximised(objective) else min
    best = pick(finite, key=lambda r: r[objective])
    out = {k: v for k, v in best.items() if math.isfinite(v)}
    out["epochs"] = float(len(rows))
    return out


def _round(x: Any) -> float:
    return float(round(float(x), 6))


def value_names(hm: TlkitHyperModel) -> list[str]:
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
        for name in value_names(hm):
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
        reason = info.get("reason") or ("" if status == "COMPLETED" or not t.message else last_line(t.message))
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
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def summary_table(rows: list[dict[str, Any]], objective: str, hm: TlkitHyperModel, top: int = 10) -> str:
    """The printed table: the best `top` completed trials, then the failed ones."""
    names = value_names(hm)
    done = [r for r in rows if r["status"] == "COMPLETED"]
    done.sort(key=lambda r: r[objective], reverse=maximised(objective))
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


def last_line(text: str) -> str:
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    line = lines[-1] if lines else ""
    for prefix in ("keras_tuner.src.errors.FailedTrialError: ", "FailedTrialError: "):
        if line.startswith(prefix):
            line = line[len(prefix):]
    return line[:300]
