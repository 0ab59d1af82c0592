"""A whole fine-tuning run: data -> runtime -> classifier -> strategy stages -> best model, metrics and outputs in a
run folder. `tlkit finetune` (`verbs/finetune.py`) is this; `tune --then-finetune` runs it with the best trial's
configuration."""
from __future__ import annotations

import dataclasses
import math
import os
import time

import keras

from tlkit.core import rundir
from tlkit.core.config import AUTO_LR, FinetuneConfig
from tlkit.core.config_io import absolute_paths
from tlkit.core.errors import TrainingError
from tlkit.engine import adapt, checkpoints, class_weights, features, interrupts, resume, run_folder, weights_format
from tlkit.engine import setup as engine_setup
from tlkit.engine.loop import HeadFeatures, monitor_metric, run_stages
from tlkit.engine import lr_range
from tlkit.engine.metrics import per_class_table, predict_split, summary_table, training_report
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
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, multi_label=data.multi_label))  # as decided
    out_dir = cfg.output_dir or rundir.default_run_dir(spec.name, data.name)
    resolved = absolute_paths(dataclasses.replace(cfg, output_dir=out_dir))
    resolved = resume.open_run_dir(out_dir, resolved)  # refuses a non-empty folder unless --overwrite/--resume
    run_folder.write_config(out_dir, resolved)
    run_folder.write_labels(out_dir, data.class_names)

    train_ds, val_ds, test_ds, plain_ds = engine_setup.make_pipelines(resolved, data, size, out_dir)
    clf, feats = engine_setup.build_model(spec, run.base, data.num_classes, resolved, size, rt, plain_ds, val_ds,
                                          class_names=data.class_names, multi_label=data.multi_label, data=data,
                                          out_dir=out_dir)
    model = clf.model
    del run
    steps = math.ceil(data.train.count / resolved.data.batch_size)
    if resolved.train.lr == AUTO_LR:  # --lr auto: the LR finder first; config.yaml gets the number it found
        resolved = lr_range.resolve_auto_lr(resolved, clf, data, size, rt, out_dir, features=feats)
        run_folder.write_config(out_dir, resolved)
    plan = strategies.plan(resolved.train, clf.num_stages, steps,
                           head_on_features=features.head_on_features(resolved))
    frozen_run = all(s.trainable == frozenset() for s in plan)  # the backbone stays as built: no copy of it saved
    print(f"[tlkit] {spec.name} on {data.name}: {data.train.count} train / "
          f"{data.val.count if data.val else 0} val / {data.test.count if data.test else 0} test images, "
          f"{data.num_classes} {'labels (multi-label)' if data.multi_label else 'classes'}, {size}px, batch "
          f"{resolved.data.batch_size}; {rt.describe()}", flush=True)
    t0 = time.time()
    failure: TrainingError | None = None
    monitor = monitor_metric(data.multi_label, val_ds is not None)
    state = checkpoints.load_state(out_dir) if resolved.resume else None
    if state is not None:
        checkpoints.check_plan(state, plan, out_dir)
        print(f"[tlkit] resuming {out_dir} after epoch {state.epoch} (stage {state.stage_name!r}, "
              f"{state.stage_epoch} epoch(s) done in it)", flush=True)
    elif resolved.resume:
        print(f"[tlkit] --resume: no checkpoint in {out_dir} yet; starting from the first epoch", flush=True)
    callbacks: list = []
    if resolved.train.tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(out_dir, "tensorboard")))
    rt.per_replica_batch(resolved.data.batch_size)  # the batch is global: it must split evenly over the replicas

    adapter = adapt.Adapter(
        clf, resolved, rt, feats, val_ds,
        lambda augment, flip: class_weights.weighted_dataset(  # as run_stages weights the planned pipeline
            engine_setup.make_train_pipeline(resolved, data, size, out_dir, augment, flip),
            class_weights.weight_vector(resolved, data.num_classes)),
        data.train, out_dir, on_resolved=lambda decided: run_folder.write_config(out_dir, decided))
    n_val = data.val.count if (data.val is not None and val_ds is not None) else 0
    checkpointer = checkpoints.Checkpointer(out_dir, monitor, head_margin=1.0 / n_val if n_val else 0.0,
                                            frozen_in_model=frozen_run)
    with interrupts.interruptible(out_dir, checkpoints.epochs_saved):  # Ctrl-C / SIGTERM -> Interrupted
        try:
            history = run_stages(clf, plan, train_ds, val_ds, resolved, rt, num_classes=data.num_classes,
                                 steps_per_epoch=steps, features=feats, callbacks=callbacks,
                                 checkpointer=checkpointer,
                                 history_path=os.path.join(out_dir, "history.csv"), state=state, adapt=adapter)
        except TrainingError as e:  # NaN/inf loss: outputs from the last good checkpoint, then the error
            failure, history = e, getattr(e, "history", [])
    train_seconds = time.time() - t0
    best = os.path.join(out_dir, "checkpoints", "best.weights.h5")
    if failure is not None and not os.path.exists(best):
        raise TrainingError(f"{failure} No epoch had finished with a finite loss, so no model was saved.")
    frozen_run = frozen_run and failure is None
    if os.path.exists(best) and not (frozen_run and checkpointer.holds_best):  # else the model holds it already
        weights_format.load_weights(model, best)  # the weights only, not the optimizer state stored with them
    exact = frozen_run and state is None and feats.fresh and rt.precision == "float32"
    metrics = run_folder.split_metrics(model, {"val": val_ds, "test": test_ds}, data.class_names,
                                       predict=_predictor(model, feats, val_ds, resolved.data.batch_size, exact,
                                                          data.multi_label),
                                       thresholds_dir=out_dir)  # multi-label: thresholds.json, chosen on val
    feats.release()
    summary = {k: {kk: vv for kk, vv in m.items() if kk not in ("per_class", "confusion_matrix")}
               for k, m in metrics.items()}
    ran = [s for s in plan if not s.adaptive] + ([adapter.stage] if adapter.stage is not None else [])
    out_metrics = run_folder.run_metrics(metrics, train_seconds=train_seconds, epochs=len(history), stages=ran,
                                         **({"recipe": adapter.decision} if adapter.decision else {}),
                                         skipped_files=data.skipped, num_skipped_files=len(data.skipped))
    if failure is not None:
        out_metrics["stopped"] = str(failure)
    overfitting = training_report(history, metrics, data.class_names, out_dir)  # curves.png, confusion_matrix.png
    if overfitting:
        out_metrics["overfitting"] = overfitting
    clf.save(os.path.join(out_dir, "model.keras"))
    run_folder.write_metrics(out_dir, out_metrics)
    _report(metrics, summary, imbalance, overfitting, data.skipped)
    if failure is None:  # finished: the decoded-image disk cache has served (an interrupted run keeps it)
        freed = run_folder.remove_image_cache(out_dir)
        if freed:
            print(f"[tlkit] removed the decoded-image disk cache ({freed / 2**30:.2f} GB) from "
                  f"{os.path.join(out_dir, 'cache')}: the run is finished", flush=True)
    if failure is not None:
        raise TrainingError(f"{failure} The best model before it was saved to {os.path.join(out_dir, 'model.keras')}.")
    print(f"[tlkit] run folder: {out_dir}", flush=True)
    return RunResult(model, history, out_metrics, out_dir, data.class_names, adapter.cfg)


def _predictor(model: keras.Model, feats: HeadFeatures, val_ds, batch_size: int, exact: bool,
               multi_label: bool = False):
    """The prediction loop of the run's final figures: with `exact` (the backbone as the features were computed, in
    float32), the validation split's from its cached features through the head, else `None` (every split through
    the images). `multi_label`: the label vectors are returned as they are (`predict_split`)."""
    if not exact or feats.x_val is None or val_ds is None:
        return None
    _, head = features.split_model(model)
    # a few matrix products: large batches, run eagerly (tracing the head would cost more than running it)
    val_feats = features.features_dataset(feats.x_val, feats.y_val, max(batch_size, 1024), training=False)
    head_forward = lambda x: head(x, training=False)  # noqa: E731
    return lambda ds: (predict_split(head, val_feats, head_forward, multi_label) if ds is val_ds
                       else predict_split(model, ds, multi_label=multi_label))


def _report(metrics: dict, summary: dict, imbalance, overfitting: dict | None, skipped: list[str]) -> None:
    """Prints the metrics table, the per-class table of imbalanced data, the overfitting note and the skipped
    files."""
    print(summary_table(summary), flush=True)
    multi = any("mean_average_precision" in m for m in metrics.values())
    if (imbalance or multi) and metrics:  # the per-class table (worst first): imbalanced data, or multi-label
        split = "test" if "test" in metrics else next(iter(metrics))
        worst = "AP" if multi else "F1"
        print(f"\nper class ({split}, worst {worst} first):\n{per_class_table(metrics[split], limit=10)}", flush=True)
    if overfitting:
        print(f"[tlkit] {overfitting['message']}", flush=True)
    if skipped:
        print(f"[tlkit] skipped {len(skipped)} unreadable image file(s), listed in metrics.json: "
              + ", ".join(skipped[:3]) + (" ..." if len(skipped) > 3 else ""), flush=True)
