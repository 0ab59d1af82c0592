"""`finetune`: data -> runtime -> model -> strategy stages -> best model, metrics and outputs in a run folder."""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any

import keras

from tlkit import backbones, features, resume, rundir, runtime, strategies
from tlkit.config import AUTO_LR, FinetuneConfig, absolute_paths, config_to_dict, dump_yaml
from tlkit.data import Datasets, load_sources
from tlkit.engine import class_weights
from tlkit.engine import setup as engine_setup
from tlkit.engine.loop import EpochLog, NaNGuard, compile_model, run_stages  # noqa: F401  (public names)
from tlkit.errors import ConfigError, DataError, TrainingError
from tlkit.evaluate import compute_metrics, per_class_table, predict_split, summary_table, training_report
from tlkit.model import get_base

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
    cfg = engine_setup.fit_batch_size(cfg, data.train.count)
    _check_data(cfg, data)
    cfg, imbalance = class_weights.resolve(cfg, data)  # --class-weight balanced -> numbers, before config.yaml
    out_dir = cfg.output_dir or rundir.default_run_dir(spec.name, data.name)
    resolved = absolute_paths(
        dataclasses.replace(cfg, output_dir=out_dir, data=dataclasses.replace(cfg.data, image_size=size)))
    resolved = resume.prepare_run_dir(out_dir, resolved)  # refuses a non-empty folder unless --overwrite/--resume
    rundir.write_text(os.path.join(out_dir, "config.yaml"), dump_yaml(config_to_dict(resolved)))
    rundir.write_text(os.path.join(out_dir, "labels.txt"), "\n".join(data.class_names) + "\n")

    train_ds, val_ds, test_ds, plain_ds = engine_setup.make_pipelines(resolved, data, size, out_dir)
    model, feats = engine_setup.build_model(spec, base, data.num_classes, resolved, size, rt, plain_ds, val_ds)
    steps = math.ceil(data.train.count / resolved.data.batch_size)
    if resolved.train.lr == AUTO_LR:  # --lr auto: the LR finder first; config.yaml gets the number it found
        from tlkit.lr_find import resolve_auto_lr

        resolved = resolve_auto_lr(resolved, model, spec, data, size, rt, out_dir, features=feats)
        rundir.write_text(os.path.join(out_dir, "config.yaml"), dump_yaml(config_to_dict(resolved)))
    plan = strategies.plan(resolved.train, spec.num_stages(get_base(model)), steps,
                           head_on_features=features.head_on_features(resolved))
    print(f"[tlkit] {spec.name} on {data.name}: {data.train.count} train / "
          f"{data.val.count if data.val else 0} val / {data.test.count if data.test else 0} test images, "
          f"{data.num_classes} classes, {size}px, batch {resolved.data.batch_size}; {rt.describe()}", flush=True)
    t0 = time.time()
    failure: TrainingError | None = None
    monitor = "val_accuracy" if val_ds is not None else "accuracy"
    state = resume.load_state(out_dir) if resolved.resume else None
    if state is not None:
        resume.check_plan(state, plan, out_dir)
        print(f"[tlkit] resuming {out_dir} after epoch {state.epoch} (stage {state.stage_name!r}, "
              f"{state.stage_epoch} epoch(s) done in it)", flush=True)
    elif resolved.resume:
        print(f"[tlkit] --resume: no checkpoint in {out_dir} yet; starting from the first epoch", flush=True)
    callbacks: list = []
    if resolved.train.tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(out_dir, "tensorboard")))
    rt.per_replica_batch(resolved.data.batch_size)  # the batch is global: it must split evenly over the replicas
    with resume.interruptible(out_dir):  # Ctrl-C / SIGTERM -> resume.Interrupted naming the run folder
        try:
            history = run_stages(model, spec, plan, train_ds, val_ds, resolved, rt, num_classes=data.num_classes,
                                 steps_per_epoch=steps, features=feats, callbacks=callbacks,
                                 checkpointer=resume.Checkpointer(out_dir, monitor),
                                 history_path=os.path.join(out_dir, "history.csv"), state=state)
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
    if imbalance and metrics:  # imbalanced data: the per-class table (worst first) next to the mean per-class accuracy
        split = "test" if "test" in metrics else next(iter(metrics))
        print(f"\nper class ({split}, worst F1 first):\n{per_class_table(metrics[split], limit=10)}", flush=True)
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
    """The train, val and test `tf.data` pipelines of a run (`engine.setup.make_pipelines` without the fourth)."""
    return engine_setup.make_pipelines(cfg, data, size, out_dir)[:3]


def _check_data(cfg: FinetuneConfig, data: Datasets) -> None:
    if data.train.count < 1:
        raise DataError("The training split is empty.")


def load_weights_quietly(model: keras.Model, path: str) -> None:
    """Loads model weights from a checkpoint, ignoring the optimizer state stored with them (`resume.load_weights`:
    a plain Keras weights file, or a checkpoint whose frozen layers are in a file of their own)."""
    resume.load_weights(model, path)


def save_model(model: keras.Model, path: str) -> None:
    """Saves the classifier atomically, without optimizer state, so it reloads with plain Keras."""
    plain = keras.Model(model.input, model.output, name=model.name)  # one tensor in, one out (not lists)
    with rundir.atomic_path(path, suffix=".keras") as tmp:
        plain.save(tmp)
