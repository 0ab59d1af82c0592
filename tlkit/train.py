"""`finetune`: data -> runtime -> model -> strategy stages -> best model, metrics and outputs in a run folder."""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import time
from typing import Any

import numpy as np
import keras
import tensorflow as tf

from tlkit import backbones, features, param_groups, resume, rundir, runtime, schedules, strategies
from tlkit.config import AUTO_LR, FinetuneConfig, absolute_paths, config_to_dict, dump_yaml
from tlkit.data import Datasets, load_sources, make_dataset
from tlkit.errors import ConfigError, DataError, TrainingError
from tlkit.evaluate import compute_metrics, predict_split, summary_table, training_report
from tlkit.model import build_classifier, set_trainable

log = logging.getLogger("tlkit")


@dataclasses.dataclass
class RunResult:
    """What `finetune` returns.

    Attributes:
        model: The trained classifier (best validation checkpoint).
        history: Per-epoch metrics, one dict per epoch, with the stage name.
        metrics: Metrics per split (`val`, `test`), as in `metrics.json`.
        run_dir: The run folder.
        class_names: Class names, index = label.
        config: The resolved configuration.
    """

    model: keras.Model
    history: list[dict[str, Any]]
    metrics: dict[str, Any]
    run_dir: str
    class_names: list[str]
    config: FinetuneConfig


class EpochLog(keras.callbacks.Callback):
    """Adds stage and learning rate to each epoch's logs and rewrites history.csv atomically."""

    def __init__(self, path: str, rows: list[dict[str, Any]]):
        super().__init__()
        self.path, self.rows, self.stage = path, rows, ""
        self.t0 = time.time()

    def on_epoch_begin(self, epoch, logs=None):
        self.t0 = time.time()
        self.lr = schedules.current_lr(self.model.optimizer)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        row = {"epoch": epoch + 1, "stage": self.stage}
        row.update({k: float(v) for k, v in logs.items() if np.ndim(v) == 0})
        row["lr"] = self.lr  # at the start of the epoch
        row["seconds"] = round(time.time() - self.t0, 3)
        self.rows.append(row)
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


def compile_model(model: keras.Model, cfg: FinetuneConfig, learning_rate, num_classes: int, jit_compile: bool,
                  spec: backbones.BackboneSpec | None = None) -> None:
    """Compiles with the configured optimizer, label-smoothed cross-entropy, top-1 and top-5 accuracy.

    With `spec`, the optimizer applies the discriminative learning rates of `cfg.train.lr_mult` /
    `stage_lrs` to the backbone's stages (`param_groups`).
    """
    metrics = [keras.metrics.CategoricalAccuracy(name="accuracy")]
    if num_classes > 5:
        metrics.append(keras.metrics.TopKCategoricalAccuracy(k=5, name="top5"))
    optimizer = schedules.make_optimizer(cfg.train, learning_rate)
    if spec is not None:
        optimizer = param_groups.discriminative_optimizer(optimizer, model, spec, cfg.train)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.train.label_smoothing),
                  metrics=metrics, jit_compile=jit_compile)


def run_stages(model: keras.Model, spec: backbones.BackboneSpec, plan: list[strategies.Stage], train_ds, val_ds,
               cfg: FinetuneConfig, rt: runtime.Runtime, out_dir: str, num_classes: int,
               steps_per_epoch: int) -> list[dict[str, Any]]:
    """Runs the stages in order: set trainable layers, recompile (fresh optimizer), fit. Returns the history rows.

    The best weights by validation accuracy (over all stages) are kept in `out_dir/checkpoints/`, and after
    every epoch a full checkpoint (weights, optimizer state, stage and history: `tlkit.resume`); with
    `cfg.resume` the run continues from the last one.
    """
    rows: list[dict[str, Any]] = []
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    os.makedirs(ckpt_dir, exist_ok=True)
    monitor = "val_accuracy" if val_ds is not None else "accuracy"
    epoch_log = EpochLog(os.path.join(out_dir, "history.csv"), rows)
    guard = NaNGuard()
    ckpt = resume.Checkpointer(out_dir, monitor, rows, bad_epoch=lambda: guard.bad_epoch)
    state = resume.load_state(out_dir) if cfg.resume else None
    if state is not None:
        resume.check_plan(state, plan, out_dir)
        ckpt.restore(state)
        print(f"[tlkit] resuming {out_dir} after epoch {state.epoch} (stage {state.stage_name!r}, "
              f"{state.stage_epoch} epoch(s) done in it)", flush=True)
    elif cfg.resume:
        print(f"[tlkit] --resume: no checkpoint in {out_dir} yet; starting from the first epoch", flush=True)
    callbacks: list[keras.callbacks.Callback] = [guard, epoch_log]
    if cfg.train.tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(out_dir, "tensorboard")))
    rt.per_replica_batch(cfg.data.batch_size)  # the batch is global: it must split evenly over the replicas
    num_stages = spec.num_stages(_base(model))
    epoch = 0
    verbose = 1 if sys.stdout.isatty() else 2
    for index, stage in enumerate(plan):
        if state is not None and index < state.next_stage:
            epoch += stage.epochs
            continue
        n = set_trainable(model, spec, None if stage.trainable is None else set(stage.trainable), cfg.model.bn_trains)
        print(f"[tlkit] stage {stage.describe(num_stages)}; {n} trainable weight tensors", flush=True)
        if stage.trainable != frozenset() and param_groups.describe_factors(num_stages, cfg.train, stage.lr):
            print(f"[tlkit] {param_groups.describe_factors(num_stages, cfg.train, stage.lr)}", flush=True)
        lr = schedules.make_schedule(cfg.train, stage.lr, stage.epochs, steps_per_epoch)
        with rt.scope():
            compile_model(model, cfg, lr, num_classes, rt.jit_compile, spec=spec)
        rt.verify_compiled(model)  # --xla on must not silently fall back to off
        epoch_log.stage = stage.name
        stage_cbs = list(callbacks)
        if cfg.train.early_stopping:
            stage_cbs.append(keras.callbacks.EarlyStopping(monitor=monitor, mode="max",
                                                           patience=cfg.train.early_stopping))
        stage_cbs.append(ckpt)  # last: it records what the others did in the epoch
        start = epoch
        if state is not None and index == state.next_stage:  # resuming: weights, optimizer, schedule step
            with rt.scope():
                resume.load_weights(model, os.path.join(ckpt.dir, state.weights))
                if state.next_stage_epoch:
                    resume.restore_optimizer(model, os.path.join(ckpt.dir, state.optimizer))
            start = epoch + state.next_stage_epoch
        ckpt.begin_stage(index, stage, epoch, stage_cbs,
                         state.early_stopping if state is not None and start > epoch else None)
        features.fit_stage(model, cfg, rt, train_ds, validation_data=val_ds, epochs=epoch + stage.epochs,
                           initial_epoch=start, callbacks=stage_cbs, verbose=verbose, shuffle=False)
        if guard.bad_epoch is not None:
            if ckpt.last is not None:  # the last good checkpoint becomes the model again
                resume.load_weights(model, os.path.join(ckpt.dir, ckpt.last.weights))
            err = TrainingError(resume.nan_message(guard.bad_epoch, stage, model.optimizer, rt.precision))
            err.history = rows  # type: ignore[attr-defined]
            raise err
        epoch += stage.epochs
    if state is not None and state.next_stage >= len(plan):  # a finished run resumed: its final weights
        resume.load_weights(model, os.path.join(ckpt.dir, state.weights))
    return rows


def _base(model):
    from tlkit.model import get_base
    return get_base(model)


def resolve_image_size(cfg: FinetuneConfig, spec: backbones.BackboneSpec, base: keras.Model | None) -> int:
    if cfg.data.image_size:
        return cfg.data.image_size
    if base is not None and base.input_shape[1]:
        return int(base.input_shape[1])
    return spec.default_size


def finetune(cfg: FinetuneConfig) -> RunResult:
    """Fine-tunes a pretrained backbone on the configured data and writes a run folder.

    Writes `config.yaml`, `labels.txt`, `model.keras` (best by validation accuracy), `history.csv` and
    `metrics.json` (val and test: loss, top-1, top-5, mean per-class accuracy, number of examples).

    Args:
        cfg: A `FinetuneConfig`.

    Returns:
        A `RunResult`.

    Example:
        >>> result = finetune(FinetuneConfig(data=DataConfig(dataset="shapes", image_size=32),
        ...                                  model=ModelConfig(weights="none"), train=TrainConfig(epochs=2)))
    """
    cfg.validate()
    resume.check_output_dir(cfg.output_dir, cfg.overwrite, cfg.resume)  # fail before reading any data
    spec = backbones.get_backbone(cfg.model.base)
    keras.utils.set_random_seed(cfg.seed)
    rt = runtime.setup(cfg.runtime)
    # The backbone first: a user's .keras fixes its own input size, and ImageNet weights may need a download;
    # either can fail, and then before any data is read or any folder written.
    with rt.scope():
        base = spec.build(cfg.data.image_size, cfg.model.weights)
    size = resolve_image_size(cfg, spec, base)
    if size < spec.min_size:
        raise ConfigError(f"image_size {size} is too small for {spec.name}: it needs at least {spec.min_size} px.")
    data = load_sources(cfg.data, size, cfg.seed)
    _check_data(cfg, data)
    out_dir = cfg.output_dir or rundir.default_run_dir(spec.name, data.name)
    resolved = absolute_paths(
        dataclasses.replace(cfg, output_dir=out_dir, data=dataclasses.replace(cfg.data, image_size=size)))
    resolved = resume.prepare_run_dir(out_dir, resolved)  # refuses a non-empty folder unless --overwrite/--resume
    rundir.write_text(os.path.join(out_dir, "config.yaml"), dump_yaml(config_to_dict(resolved)))
    rundir.write_text(os.path.join(out_dir, "labels.txt"), "\n".join(data.class_names) + "\n")

    train_ds, val_ds, test_ds = make_pipelines(resolved, data, size, out_dir)
    with rt.scope():
        model = build_classifier(spec, data.num_classes, cfg.model, size, base=base)
    steps = math.ceil(data.train.count / cfg.data.batch_size)
    if resolved.train.lr == AUTO_LR:  # --lr auto: the LR finder first; config.yaml gets the number it found
        from tlkit.lr_find import resolve_auto_lr

        resolved = resolve_auto_lr(resolved, model, spec, data, size, rt, out_dir)
        rundir.write_text(os.path.join(out_dir, "config.yaml"), dump_yaml(config_to_dict(resolved)))
    plan = strategies.plan(resolved.train, spec.num_stages(_base(model)))
    print(f"[tlkit] {spec.name} on {data.name}: {data.train.count} train / "
          f"{data.val.count if data.val else 0} val / {data.test.count if data.test else 0} test images, "
          f"{data.num_classes} classes, {size}px; {rt.describe()}", flush=True)
    t0 = time.time()
    failure: TrainingError | None = None
    with resume.interruptible(out_dir):  # Ctrl-C / SIGTERM -> resume.Interrupted naming the run folder
        try:
            history = run_stages(model, spec, plan, train_ds, val_ds, resolved, rt, out_dir, data.num_classes, steps)
        except TrainingError as e:  # NaN/inf loss: outputs from the last good checkpoint, then the error
            failure, history = e, getattr(e, "history", [])
    train_seconds = time.time() - t0
    best = os.path.join(out_dir, "checkpoints", "best.weights.h5")
    if failure is not None and not os.path.exists(best):
        raise TrainingError(f"{failure} No epoch had finished with a finite loss, so no model was saved.")
    if os.path.exists(best):
        load_weights_quietly(model, best)
    metrics: dict[str, Any] = {}
    for name, ds in (("val", val_ds), ("test", test_ds)):
        if ds is not None:
            y, p = predict_split(model, ds)
            metrics[name] = compute_metrics(y, p, data.class_names)
    summary = {k: {kk: vv for kk, vv in m.items() if kk not in ("per_class", "confusion_matrix")}
               for k, m in metrics.items()}
    out_metrics = dict(metrics)
    out_metrics["train_seconds"] = round(train_seconds, 2)
    out_metrics["epochs"] = len(history)
    out_metrics["stages"] = [dataclasses.asdict(s) | {"trainable": None if s.trainable is None else sorted(s.trainable)}
                             for s in plan]
    out_metrics["skipped_files"] = data.skipped
    out_metrics["num_skipped_files"] = len(data.skipped)
    if failure is not None:
        out_metrics["stopped"] = str(failure)
    overfitting = training_report(history, metrics, data.class_names, out_dir)  # curves.png, confusion_matrix.png
    if overfitting:
        out_metrics["overfitting"] = overfitting
    save_model(model, os.path.join(out_dir, "model.keras"))
    rundir.write_json(os.path.join(out_dir, "metrics.json"), out_metrics)
    print(summary_table(summary), flush=True)
    if overfitting:
        print(f"[tlkit] {overfitting['message']}", flush=True)
    if data.skipped:
        print(f"[tlkit] skipped {len(data.skipped)} unreadable image file(s), listed in metrics.json: "
              + ", ".join(data.skipped[:3]) + (" ..." if len(data.skipped) > 3 else ""), flush=True)
    if failure is not None:
        raise TrainingError(f"{failure} The best model before it was saved to {os.path.join(out_dir, 'model.keras')}.")
    print(f"[tlkit] run folder: {out_dir}", flush=True)
    return RunResult(model, history, out_metrics, out_dir, data.class_names, resolved)


def make_pipelines(cfg: FinetuneConfig, data: Datasets, size: int, out_dir: str):
    """The train, val and test `tf.data` pipelines of a run."""
    d = cfg.data
    det = True if cfg.runtime.deterministic else None
    common = dict(image_size=size, batch_size=d.batch_size, num_classes=data.num_classes, seed=cfg.seed,
                  cache_dir=os.path.join(out_dir, "cache"), deterministic=det)
    train = make_dataset(data.train, training=True, augment=d.augment, cache=d.cache, **common)
    val = make_dataset(data.val, cache=d.cache, **common) if data.val else None
    test = make_dataset(data.test, cache="none", **common) if data.test else None
    return train, val, test


def _check_data(cfg: FinetuneConfig, data: Datasets) -> None:
    if data.train.count < 1:
        raise DataError("The training split is empty.")
    if cfg.data.batch_size > data.train.count:
        raise ConfigError(f"batch_size {cfg.data.batch_size} is larger than the training set ({data.train.count} "
                          "images); lower --batch-size.")


def load_weights_quietly(model: keras.Model, path: str) -> None:
    """Loads model weights from a checkpoint, ignoring the optimizer state stored with them (`resume.load_weights`:
    a plain Keras weights file, or a checkpoint whose frozen layers are in a file of their own)."""
    resume.load_weights(model, path)


def save_model(model: keras.Model, path: str) -> None:
    """Saves the classifier atomically, without optimizer state, so it reloads with plain Keras."""
    plain = keras.Model(model.input, model.output, name=model.name)  # one tensor in, one out (not lists)
    with rundir.atomic_path(path, suffix=".keras") as tmp:
        plain.save(tmp)
