"""A whole fine-tuning run: data -> runtime -> classifier -> strategy stages -> best model, metrics and outputs in a
run folder. `tlkit finetune` (`verbs/finetune.py`) is this; `tune --then-finetune` runs it with the best trial's
configuration."""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import keras

from tlkit.core import rundir
from tlkit.core.config import AUTO_LR, FinetuneConfig, absolute_paths, config_to_dict, dump_yaml
from tlkit.core.errors import TrainingError
from tlkit.engine import adapt, class_weights, features, resume
from tlkit.engine import setup as engine_setup
from tlkit.engine.loop import run_stages
from tlkit.engine import lr_range
from tlkit.engine.metrics import compute_metrics, per_class_table, predict_split, summary_table, training_report
from tlkit.engine.setup import RunResult
from tlkit.models import strategies

def finetune_run(cfg: FinetuneConfig) -> RunResult:
    """Fine-tunes a pretrained backbone on the configured data and writes a run folder.

    Writes `config.yaml`, `labels.txt`, `model.keras` (best by validation accuracy), `history.csv` and
    `metrics.json` (val and test: loss, top-1, top-5, mean per-class accuracy, number of examples).

    Args:
        cfg: A `FinetuneConfig`.

    Returns:
        A `RunResult`.

    Example:
        result = finetune_run(FinetuneConfig(data=DataConfig(dataset="shapes", image_size=32),
                                         model=ModelConfig(weights="none"), train=TrainConfig(epochs=2)))
    """
    cfg.validate()
    rundir.check_output_dir(cfg.output_dir, cfg.overwrite, cfg.resume)  # fail before reading any data
    run = engine_setup.setup_run(cfg)
    spec, rt, size, data = run.spec, run.rt, run.size, run.data
    cfg, imbalance = class_weights.resolve(run.cfg, data)  # --class-weight balanced -> numbers, before config.yaml
    out_dir = cfg.output_dir or rundir.default_run_dir(spec.name, data.name)
    resolved = absolute_paths(dataclasses.replace(cfg, output_dir=out_dir))
    resolved = resume.prepare_run_dir(out_dir, resolved)  # refuses a non-empty folder unless --overwrite/--resume
    rundir.write_text(os.path.join(out_dir, "config.yaml"), dump_yaml(config_to_dict(resolved)))
    rundir.write_text(os.path.join(out_dir, "labels.txt"), "\n".join(data.class_names) + "\n")

    train_ds, val_ds, test_ds, plain_ds = engine_setup.make_pipelines(resolved, data, size, out_dir)
    clf, feats = engine_setup.build_model(spec, run.base, data.num_classes, resolved, size, rt, plain_ds, val_ds,
                                          class_names=data.class_names)
    model = clf.model
    del run
    steps = math.ceil(data.train.count / resolved.data.batch_size)
    if resolved.train.lr == AUTO_LR:  # --lr auto: the LR finder first; config.yaml gets the number it found
        resolved = lr_range.resolve_auto_lr(resolved, clf, data, size, rt, out_dir, features=feats)
        rundir.write_text(os.path.join(out_dir, "config.yaml"), dump_yaml(config_to_dict(resolved)))
    plan = strategies.plan(resolved.train, clf.num_stages, steps,
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

    def write_config(decided_cfg):  # augment: auto, once decided, is what config.yaml says
        rundir.write_text(os.path.join(out_dir, "config.yaml"), dump_yaml(config_to_dict(decided_cfg)))

    adapter = adapt.Adapter(
        clf, resolved, rt, feats, val_ds,
        lambda augment, flip: class_weights.weighted_dataset(  # as run_stages weights the planned pipeline
            engine_setup.make_train_pipeline(resolved, data, size, out_dir, augment, flip),
            class_weights.weight_vector(resolved, data.num_classes)),
        data.train, out_dir, on_resolved=write_config)
    n_val = data.val.count if (data.val is not None and val_ds is not None) else 0
    with resume.interruptible(out_dir):  # Ctrl-C / SIGTERM -> resume.Interrupted naming the run folder
        try:
            history = run_stages(clf, plan, train_ds, val_ds, resolved, rt, num_classes=data.num_classes,
                                 steps_per_epoch=steps, features=feats, callbacks=callbacks,
                                 checkpointer=resume.Checkpointer(out_dir, monitor,
                                                                  head_margin=1.0 / n_val if n_val else 0.0),
                                 history_path=os.path.join(out_dir, "history.csv"), state=state, adapt=adapter)
        except TrainingError as e:  # NaN/inf loss: outputs from the last good checkpoint, then the error
            failure, history = e, getattr(e, "history", [])
    train_seconds = time.time() - t0
    best = os.path.join(out_dir, "checkpoints", "best.weights.h5")
    if failure is not None and not os.path.exists(best):
        raise TrainingError(f"{failure} No epoch had finished with a finite loss, so no model was saved.")
    if os.path.exists(best):
        resume.load_weights(model, best)  # the weights only, not the optimizer state stored with them
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
    ran = [s for s in plan if not s.adaptive] + ([adapter.stage] if adapter.stage is not None else [])
    out_metrics["stages"] = [dataclasses.asdict(s) | {"trainable": None if s.trainable is None else sorted(s.trainable)}
                             for s in ran]
    if adapter.decision:
        out_metrics["recipe"] = adapter.decision
    out_metrics["skipped_files"] = data.skipped
    out_metrics["num_skipped_files"] = len(data.skipped)
    if failure is not None:
        out_metrics["stopped"] = str(failure)
    overfitting = training_report(history, metrics, data.class_names, out_dir)  # curves.png, confusion_matrix.png
    if overfitting:
        out_metrics["overfitting"] = overfitting
    clf.save(os.path.join(out_dir, "model.keras"))
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
    return RunResult(model, history, out_metrics, out_dir, data.class_names, adapter.cfg)
