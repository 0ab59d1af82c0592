"""`tune`: hyperparameter search with KerasTuner, on the same model and data code as `finetune`.

The roles are KerasTuner's: `TlkitHyperModel` is the search space (`build(hp)` calls
`models.classifier.build_classifier`, `fit(hp, model)` re-batches the `tf.data` pipeline with the trial's batch size and
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
import os
import sys
import time
from typing import Any, Sequence

import keras

from tlkit.core import config_io
from tlkit.core import rundir
from tlkit.core.verb_configs import TuneConfig, maximised
from tlkit.core.config import FinetuneConfig
from tlkit.core.config_io import absolute_paths, config_to_dict, differences, dump_yaml
from tlkit.core.errors import ConfigError, OutputExistsError, TrainingError, first_line
from tlkit.core.tune_config import load_tune_config, search_identity, settings_yaml
from tlkit.data import Datasets, make_dataset
from tlkit.data.table import TABLE_FILE, is_in_memory, recorded
from tlkit.engine import class_weights
from tlkit.engine import setup as engine_setup
from tlkit.engine.plots import plot_objective_vs_lr
from tlkit.engine.run import finetune_run
from tlkit.engine.tuner import TlkitTuner, make_oracle, role as tuner_role, run_search
from tlkit.engine.tuning import TlkitHyperModel, last_line, summary_table, trial_rows, value_names
from tlkit.models import backbones

SEARCH_DIR = "search"  # KerasTuner's project folder inside the run folder
SETTINGS_FILE = "tune.yaml"
PLOT_FILE = "objective_vs_lr.png"



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
    role = tuner_role()
    spec = backbones.get_backbone(cfg.model.base)
    if "unfreeze_stages" in tc.dimensions and cfg.train.strategy not in ("two_stage", "top_k"):
        raise ConfigError(f"--search unfreeze_stages needs --strategy two_stage or top_k, got "
                          f"{cfg.train.strategy!r}.")
    # the pretrained backbone once: its stages, and the features of the training images
    run = engine_setup.setup_run(cfg, cap_batch=False)  # the batch sizes are searched: _check_data refuses big ones
    rt, base, size, data = run.rt, run.base, run.size, run.data
    num_stages = spec.num_stages(base)
    del run
    tc = _objective_for(tc, data)
    _check_data(data, tc)
    cfg, _ = class_weights.resolve(cfg, data)  # --class-weight balanced -> numbers (tune.yaml, best_config.yaml)
    out = cfg.output_dir or os.path.join("runs", _safe(f"tune-{spec.name}-{data.name}"))
    if is_in_memory(cfg.data.labels) and role != "worker":  # pairs or a DataFrame: kept as out/data.csv
        rundir.check_output_dir(out, overwrite=True)
        os.makedirs(out, exist_ok=True)
        cfg = recorded(cfg, out)
    _prepare(out, cfg, tc, role)
    tuner_id = os.environ.get("KERASTUNER_TUNER_ID", "tuner0")
    cache_dir = os.path.join(out, "cache", _safe(tuner_id))  # one per process: tf.data disk caches lock
    rundir.remove_stale_cache_files(cache_dir)
    hm = TlkitHyperModel(cfg, tc, spec, data, size, rt, cache_dir=cache_dir, num_stages=num_stages,
                         verbose=1 if sys.stdout.isatty() else 2)
    if role != "chief":  # every trial's head starts from the same standardised features (finetune's recipe)
        _share_head_features(hm, base)
    del base
    oracle = make_oracle(tc, cfg.seed, hm.total_epochs())
    try:
        tuner = TlkitTuner(oracle, hm, hyperband=tc.tuner == "hyperband", directory=out, project_name=SEARCH_DIR,
                           overwrite=bool(cfg.overwrite and role != "worker"),
                           executions_per_trial=tc.executions_per_trial)
    except RuntimeError as e:
        raise ConfigError(f"Cannot resume the search in {os.path.join(out, SEARCH_DIR)}: {first_line(e)}; pass "
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
    stopped = _search(tuner, hm, trial_callbacks, out, role)
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
    result = _write_best(hm, rows, out, seconds)
    if tc.then_finetune:
        final = config_io.load_config(os.path.join(out, "best_config.yaml"))  # the very file `tlkit finetune --config` reads
        final = dataclasses.replace(final, output_dir=os.path.abspath(os.path.join(out, "finetune")), overwrite=True)
        print(f"[tlkit] then-finetune: the best configuration for {final.train.num_epochs} epoch(s) into "
              f"{final.output_dir}", flush=True)
        result.finetune = finetune_run(final)
    return result


def _objective_for(tc: TuneConfig, data) -> TuneConfig:
    """`tc` with its objective fitted to the data: multi-label data is tuned for `val_map` where `val_accuracy` is
    asked (the default); `val_map` on single-label data is refused."""
    if data.multi_label and tc.objective == "val_accuracy":
        print("[tlkit] multi-label data: the objective is val_map (mean average precision), not val_accuracy",
              flush=True)
        return dataclasses.replace(tc, objective="val_map")
    if not data.multi_label and tc.objective == "val_map":
        raise ConfigError("--objective val_map is the multi-label objective; this data is single-label (use "
                          "val_accuracy or val_loss).")
    return tc


def _share_head_features(hm: TlkitHyperModel, base) -> None:
    """The base features of the training images, once: every trial's head starts from them (and their statistics
    standardise its input), as in `finetune`."""
    cfg, data, size = hm.cfg, hm.data, hm.image_size
    batch = min(max(hm.tc.batch_sizes), data.train.count)
    plain = make_dataset(data.train, size, batch, data.num_classes, cache="none", seed=cfg.seed)
    val = make_dataset(data.val, size, batch, data.num_classes, cache="none", seed=cfg.seed)
    _, feats = engine_setup.build_model(hm.spec, base, data.num_classes, cfg, size, hm.rt, plain, val,
                                        multi_label=data.multi_label, data=data, feature_dir=hm.cache_dir)
    hm.feature_stats = engine_setup.feature_stats(feats)
    hm.head_features = dataclasses.replace(feats, train_ds=None, val_ds=None)


def _search(tuner: TlkitTuner, hm: TlkitHyperModel, callbacks: list, out: str, role: str) -> TrainingError | None:
    """Runs the search; returns the error that stopped it after too many failures in a row (else `None`)."""
    try:
        run_search(tuner, callbacks)
    except KeyboardInterrupt:
        if role == "single":  # what is done so far; the interrupted trial runs again when the search resumes
            rows = trial_rows(tuner.oracle, hm, os.path.join(out, SEARCH_DIR))
            rundir.write_csv(os.path.join(out, "trials.csv"), rows)
            print(f"[tlkit] search interrupted; run the same command to resume it from {out}", flush=True)
        raise
    except RuntimeError as e:
        if "consecutive failures" not in str(e):
            raise
        return TrainingError(f"Search stopped: {hm.tc.max_consecutive_failures} trials failed in a row (last: "
                             f"{last_line(str(e))}); see {os.path.join(out, 'trials.csv')}.")
    finally:
        if hm.head_features is not None:  # memory-mapped features (a large training split): their files go
            hm.head_features.release()
        keras.backend.clear_session()
        keras.mixed_precision.set_dtype_policy(hm.rt.precision)
    return None


def _write_best(hm: TlkitHyperModel, rows: list[dict[str, Any]], out: str, seconds: float) -> TuneResult:
    """Writes `best_config.yaml` (the best completed trial's configuration) and returns the result."""
    tc = hm.tc
    done = [r for r in rows if r["status"] == "COMPLETED"]
    if not done:
        raise TrainingError(f"All {len(rows)} trials failed (reasons in {os.path.join(out, 'trials.csv')}); first: "
                            f"{rows[0]['reason'] if rows else 'no trial ran'}.")
    best_row = (max if maximised(tc.objective) else min)(done, key=lambda r: r[tc.objective])
    best_values = {k: best_row[k] for k in value_names(hm) if k in best_row}
    best_cfg = dataclasses.replace(hm.trial_config(best_values), output_dir=None, overwrite=False)
    header = (f"# tlkit tune: best of {len(rows)} trial(s) ({len(done)} completed), trial {best_row['trial']}: "
              f"{tc.objective} {best_row[tc.objective]:.4f} after {hm.trial_epochs} epoch(s) per trial.\n"
              f"# Repeat with: tlkit finetune --config {os.path.join(out, 'best_config.yaml')}\n")
    best_path = os.path.join(out, "best_config.yaml")
    rundir.write_text(best_path, header + dump_yaml(config_to_dict(best_cfg)))
    print(f"[tlkit] {len(rows)} trial(s) in {seconds:.1f}s; best {tc.objective} {best_row[tc.objective]:.4f} "
          f"(trial {best_row['trial']}); best configuration: {best_path}", flush=True)
    return TuneResult(best_cfg, float(best_row[tc.objective]), rows, out, seconds)


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
    fresh = entries <= {SEARCH_DIR, "cache", TABLE_FILE} and not os.path.exists(os.path.join(out, SEARCH_DIR, "oracle.json"))
    if entries and not fresh and not cfg.overwrite:
        if not os.path.isfile(settings):
            raise OutputExistsError(f"Output folder {out!r} exists, is not empty and holds no tlkit search; pass "
                                    "--overwrite to reuse it or choose another --output-dir.")
        old_cfg, old_tc = load_tune_config(settings)
        old, now = search_identity(old_cfg, old_tc), search_identity(cfg, tc)
        diff = differences(old["finetune"], now["finetune"]) + differences(old["tune"], now["tune"])
        if diff:
            raise ConfigError(f"{out!r} holds a search with other settings ({'; '.join(diff[:4])}"
                              f"{' ...' if len(diff) > 4 else ''}): pass --overwrite to start over or choose another "
                              "--output-dir. Only --max-trials, --max-consecutive-failures and --then-finetune may "
                              "change when resuming.")
    os.makedirs(out, exist_ok=True)
    rundir.write_text(settings, settings_yaml(dataclasses.replace(cfg, output_dir=os.path.abspath(out)), tc))


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)
