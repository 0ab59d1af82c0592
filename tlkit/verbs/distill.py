"""`distill`: train a small student classifier from a fine-tuned teacher (Hinton et al., 2015).

The loss is `alpha * CE(labels, student) + (1 - alpha) * T^2 * KL(softmax(teacher/T) || softmax(student/T))`.
The teacher runs in inference mode (BatchNorm statistics and dropout off) inside the training step, or,
when the training split has no augmentation, once over the data with its logits fed next to the labels.
The student is built with `models.classifier.build_classifier` and trained with the same stage plans, schedules,
optimizers and discriminative learning rates as `finetune`; what is saved is the plain student, so its
run folder (`model.keras`, `labels.txt`, `config.yaml`, `metrics.json`, `history.csv`) works with
`evaluate`, `export` and `predict`. `metrics.json` adds a `distillation` section comparing teacher and
student: accuracy, parameters, size on disk and CPU latency per image.

Example:
    from tlkit import DataConfig, DistillConfig, FinetuneConfig, ModelConfig
    result = distill(FinetuneConfig(data=DataConfig(dataset="shapes", image_size=64),
                                    model=ModelConfig(base="mobilenetv2", weights="none")),
                     DistillConfig(teacher="runs/resnet50-shapes-1", temperature=4.0, alpha=0.5))
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import numpy as np
import keras
import tensorflow as tf
from keras import ops

from tlkit.core import rundir
from tlkit.core.config import FinetuneConfig
from tlkit.core.config_io import load_config
from tlkit.core.verb_configs import DistillConfig, run_data
from tlkit.core.errors import ConfigError, DataError, TrainingError
from tlkit.data import make_dataset
from tlkit.engine import setup as engine_setup
from tlkit.engine.loop import KeepBest, run_stages
from tlkit.engine import run_folder
from tlkit.engine.metrics import predict_split
from tlkit.engine.setup import RunResult
from tlkit.models import strategies
from tlkit.models.classifier import is_multi_label, load_model_and_labels


class _LogOf(keras.layers.Layer):
    """log(p): logits (up to a constant) of a teacher that only exposes probabilities."""

    def call(self, p):
        return ops.log(ops.clip(ops.cast(p, "float32"), 1e-7, 1.0))


def logits_model(classifier: keras.Model, image_size: int | None = None) -> keras.Model:
    """A model from images to the classifier's pre-softmax outputs, optionally at another input size.

    The layer named `logits` gives them (every `build_classifier` model has it); else the input of a final
    softmax activation; else the log of the output probabilities.

    Args:
        classifier: A classifier from images (float32 0..255) to class probabilities.
        image_size: Input side the returned model takes; images are resized to the classifier's own size
            first when it differs. Defaults to `None` (the classifier's size).

    Returns:
        A `keras.Model` sharing the classifier's layers.

    Example:
        teacher_logits = logits_model(keras.models.load_model("run/model.keras"), 64)
    """
    try:
        out = classifier.get_layer("logits").output
    except ValueError:
        last = classifier.layers[-1]
        if isinstance(last, keras.layers.Activation) and last.get_config().get("activation") == "softmax":
            out = last.input
        else:
            out = _LogOf(name="log_probs")(classifier.output)
    inner = keras.Model(classifier.inputs, out, name=f"{classifier.name}_logits")
    own = int(classifier.input_shape[1])
    if image_size is None or image_size == own:
        return inner
    x = inp = keras.Input((image_size, image_size, 3), dtype="float32")
    x = keras.layers.Resizing(own, own, name="teacher_resize")(x)
    return keras.Model(inp, inner(x), name=f"{classifier.name}_logits_{image_size}")


def probs_at_size(classifier: keras.Model, image_size: int) -> keras.Model:
    """The classifier taking `image_size` inputs (resized to its own size inside)."""
    own = int(classifier.input_shape[1])
    if own == image_size:
        return classifier
    x = inp = keras.Input((image_size, image_size, 3), dtype="float32")
    x = keras.layers.Resizing(own, own)(x)
    return keras.Model(inp, classifier(x), name=f"{classifier.name}_at_{image_size}")


MULTI_LABEL_REFUSAL = ("distill handles single-label (softmax) classifiers only; multi-label distillation (a sigmoid "
                       "per class) is not implemented: fine-tune the small backbone directly instead.")


def distillation_terms(y_true, student_logits, teacher_logits, temperature: float, label_smoothing: float = 0.0):
    """Per-example hard-label cross-entropy and `T^2 * KL(softmax(teacher/T) || softmax(student/T))`.

    Example:
        ce, kl = distillation_terms(y, s, t, temperature=4.0)
    """
    s = ops.cast(student_logits, "float32")
    t = ops.cast(teacher_logits, "float32")
    ce = keras.losses.categorical_crossentropy(y_true, s, from_logits=True, label_smoothing=label_smoothing)
    log_p_t = ops.log_softmax(t / temperature, axis=-1)
    log_p_s = ops.log_softmax(s / temperature, axis=-1)
    kl = ops.sum(ops.exp(log_p_t) * (log_p_t - log_p_s), axis=-1) * (temperature ** 2)
    return ce, kl


class Distiller(keras.Model):
    """Training wrapper: calls the student for logits, adds the teacher's soft targets in `compute_loss`.

    Not saved: the student inside is the model that is kept. Labels are one-hot `[B, C]`, or with cached
    teacher logits `[B, 2C]` (one-hot, then the teacher's logits).

    Args:
        student_logits: Images -> student logits (shares the student classifier's layers).
        teacher_logits: Images -> teacher logits, or `None` when the data carries them.
        num_classes: Number of classes.
        temperature: T. Defaults to `4.0`.
        alpha: Weight of the hard-label term. Defaults to `0.5`.
        label_smoothing: Of the hard-label term. Defaults to `0.0`.
    """

    def __init__(self, student_logits: keras.Model, teacher_logits: keras.Model | None, num_classes: int,
                 temperature: float = 4.0, alpha: float = 0.5, label_smoothing: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.student_logits = student_logits
        self.teacher_logits = teacher_logits
        if teacher_logits is not None:
            teacher_logits.trainable = False
        self.num_classes = int(num_classes)
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.label_smoothing = float(label_smoothing)
        self.ce_tracker = keras.metrics.Mean(name="ce")
        self.kl_tracker = keras.metrics.Mean(name="kl")
        self.accuracy_metric = keras.metrics.CategoricalAccuracy(name="accuracy")

    def call(self, x, training=False):
        return self.student_logits(x, training=training)

    def _split(self, x, y):
        if self.teacher_logits is None:
            return y[:, :self.num_classes], y[:, self.num_classes:]
        return y, ops.stop_gradient(self.teacher_logits(x, training=False))

    def _hard(self, y):
        return y[:, :self.num_classes] if self.teacher_logits is None else y

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        y_true, teacher = self._split(x, y)
        ce, kl = distillation_terms(y_true, y_pred, teacher, self.temperature, self.label_smoothing)
        self.ce_tracker.update_state(ce)
        self.kl_tracker.update_state(kl)
        loss = self.alpha * ops.mean(ce) + (1.0 - self.alpha) * ops.mean(kl)
        if self.losses:  # the student's L2 penalty
            loss = loss + ops.cast(ops.sum(self.losses), "float32")
        return loss

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        self.accuracy_metric.update_state(self._hard(y), ops.cast(y_pred, "float32"))
        return self.get_metrics_result()


def teacher_paths(teacher: str) -> tuple[str, str | None]:
    """`(model.keras path, run folder or None)` of a teacher given as a run folder or a .keras file."""
    if os.path.isdir(teacher):
        return os.path.join(teacher, "model.keras"), teacher
    return teacher, None


def teacher_run_config(teacher: str | None) -> FinetuneConfig:
    """A `FinetuneConfig` with the teacher run's data section and seed (defaults elsewhere), so that a
    student trains on the teacher's data unless told otherwise; the defaults when the teacher has none.

    Example:
        teacher_run_config("runs/resnet50-shapes-1").data.dataset
        # -> 'shapes'
    """
    data, seed = run_data(teacher)
    return FinetuneConfig(data=data, seed=seed)


def model_size_bytes(path: str) -> int:
    """Size on disk of a model file."""
    return int(os.path.getsize(path))


def cpu_latency_ms(path: str, image_size: int | None = None, runs: int = 30) -> float:
    """Median CPU time of one single-image forward pass of a saved model, in milliseconds.

    The model is loaded from `path` onto the CPU (as a user would deploy it), traced once with
    `tf.function`, warmed up, then timed `runs` times.

    Example:
        cpu_latency_ms("runs/x/model.keras", runs=20)
    """
    with tf.device("/CPU:0"):
        model = keras.models.load_model(path, compile=False, safe_mode=True)
        size = image_size or int(model.input_shape[1])
        fn = tf.function(lambda x: model(x, training=False))
        x = tf.random.uniform((1, size, size, 3), 0, 255, seed=0)
        for _ in range(3):
            np.asarray(fn(x))
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            np.asarray(fn(x))
            times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000.0)


def with_teacher_logits(split, teacher: keras.Model, image_size: int, batch_size: int, num_classes: int, *,
                        training: bool, cache: str, seed: int, cache_dir: str | None = None) -> tf.data.Dataset:
    """A split's batches with the teacher's logits computed once and packed after the one-hot labels.

    The images come from `make_dataset` without augmentation, in a fixed order; the teacher runs over
    them once; the training split is then shuffled (images and logits together) each epoch.

    Returns:
        A dataset of `(images float32 [B, S, S, 3], [one-hot | teacher logits] float32 [B, 2C])`.
    """
    plain = make_dataset(split, image_size, batch_size, num_classes, training=False, cache=cache,
                         cache_dir=cache_dir, seed=seed)
    _, logits = predict_split(teacher, plain)
    ds = plain.unbatch().map(lambda x, y: (tf.cast(x, tf.uint8), y))  # uint8 in the shuffle buffer
    ds = tf.data.Dataset.zip((ds, tf.data.Dataset.from_tensor_slices(logits.astype(np.float32))))
    ds = ds.map(lambda xy, t: (xy[0], tf.concat([xy[1], t], axis=-1)))
    if training:
        ds = ds.shuffle(max(len(logits), 1), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def _count_params(model: keras.Model) -> int:
    return int(sum(int(np.prod(v.shape)) for v in model.weights if "seed_generator" not in v.path))


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of teacher vs student: parameters, size, CPU latency, accuracies."""
    header = ["model", "backbone", "params", "size_MB", "cpu_ms/img", "val_acc", "test_acc"]
    lines = [header]
    for r in rows:
        fmt = lambda v, f: "-" if v is None else f.format(v)  # noqa: E731
        lines.append([r["model"], str(r["backbone"]), f"{r['params']:,}", fmt(r["size_bytes"] / 1e6, "{:.2f}"),
                      fmt(r["cpu_ms_per_image"], "{:.2f}"), fmt(r.get("val_accuracy"), "{:.4f}"),
                      fmt(r.get("test_accuracy"), "{:.4f}")])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines)


def distill(cfg: FinetuneConfig, dcfg: DistillConfig) -> RunResult:
    """Trains the student `cfg.model.base` from the teacher `dcfg.teacher` and writes a student run folder.

    Args:
        cfg: The student's `FinetuneConfig`: data, student backbone (`model.base`), strategy, optimizer,
            schedule, runtime, output folder — as for `finetune`.
        dcfg: The `DistillConfig`: teacher, temperature, alpha, teacher-logit caching, latency runs.

    Returns:
        A `RunResult` of the student; `metrics["distillation"]` holds the teacher/student comparison.

    Raises:
        ConfigError: bad settings, or a teacher that cannot be loaded.
        DataError: the teacher's classes differ from the data's.

    Example:
        r = distill(FinetuneConfig(data=DataConfig(dataset="shapes"), model=ModelConfig(base="mobilenetv2")),
                    DistillConfig(teacher="runs/resnet50-shapes-1"))
        r.metrics["distillation"]["student"]["test_accuracy"]
    """
    cfg.validate()
    dcfg.validate()
    if isinstance(cfg.train.lr, str):
        raise ConfigError(f"distill needs a numeric --lr, got {cfg.train.lr!r}.")
    teacher_file, teacher_dir = teacher_paths(dcfg.teacher)
    cached = dcfg.cache_teacher if dcfg.cache_teacher is not None else cfg.data.augment == "none"
    if cached and cfg.data.augment != "none":
        raise ConfigError(f"--cache-teacher needs a training split without augmentation (--augment none), got "
                          f"--augment {cfg.data.augment}: the teacher must see the augmented images.")
    teacher, teacher_labels, _ = load_model_and_labels(dcfg.teacher)
    if is_multi_label(teacher) or cfg.data.multi_label or cfg.data.label_delimiter is not None:
        raise ConfigError(MULTI_LABEL_REFUSAL)
    run = engine_setup.setup_run(cfg, default_size=int(teacher.input_shape[1]))
    cfg, spec, rt, size, data = run.cfg, run.spec, run.rt, run.size, run.data
    if data.multi_label:
        raise ConfigError(MULTI_LABEL_REFUSAL)
    if int(teacher.output_shape[-1]) != data.num_classes:
        raise DataError(f"The teacher {dcfg.teacher!r} predicts {teacher.output_shape[-1]} classes but the data has "
                        f"{data.num_classes}.")
    if teacher_labels is not None and list(teacher_labels) != list(data.class_names):
        raise DataError(f"The teacher's labels.txt differs from the data's classes: {list(teacher_labels)[:5]}... vs "
                        f"{data.class_names[:5]}...")

    out_dir = cfg.output_dir or rundir.default_run_dir(f"distill-{spec.name}", data.name)
    rundir.prepare_run_dir(out_dir, cfg.overwrite)
    resolved = dataclasses.replace(cfg, output_dir=os.path.abspath(out_dir),
                                   data=dataclasses.replace(cfg.data, image_size=size))
    run_folder.write_config(out_dir, resolved)
    run_folder.write_labels(out_dir, data.class_names)

    d = resolved.data
    train_ds, val_ds, test_ds, plain = engine_setup.make_pipelines(resolved, data, size, out_dir)
    val_fit = val_ds
    t_logits = logits_model(teacher, size)
    if cached:
        print("[tlkit] computing the teacher's logits once (no augmentation)", flush=True)
        # own disk-cache folders: make_dataset names every non-training cache "eval"
        packed = dict(image_size=size, batch_size=d.batch_size, num_classes=data.num_classes, seed=cfg.seed,
                      cache_dir=os.path.join(out_dir, "cache", "teacher-train"))
        train_ds = with_teacher_logits(data.train, t_logits, training=True, cache=d.cache, **packed)
        packed["cache_dir"] = os.path.join(out_dir, "cache", "teacher-val")
        val_fit = with_teacher_logits(data.val, t_logits, training=False, cache=d.cache, **packed) if data.val else None
    # The student's head standardises its backbone's features of the training images, as finetune's does.
    clf, _ = engine_setup.build_model(spec, run.base, data.num_classes, cfg, size, rt, plain, None,
                                      class_names=data.class_names, keep_features=False)
    student = clf.model
    del run
    with rt.scope():
        distiller = Distiller(logits_model(student), None if cached else t_logits, data.num_classes,
                              dcfg.temperature, dcfg.alpha, cfg.train.label_smoothing, name="distiller")
    num_stages = clf.num_stages
    steps = math.ceil(data.train.count / d.batch_size)
    # The head stage trains on the images here (the distillation loss needs the teacher's view of each one).
    plan = strategies.plan(cfg.train, num_stages, steps, head_on_features=False)
    print(f"[tlkit] distilling {os.path.basename(os.path.normpath(dcfg.teacher))} -> {spec.name} on {data.name}: "
          f"{data.train.count} train images, {data.num_classes} classes, {size}px, T={dcfg.temperature:g}, "
          f"alpha={dcfg.alpha:g}, teacher logits {'cached' if cached else 'computed each step'}; {rt.describe()}",
          flush=True)
    monitor = "val_accuracy" if val_fit is not None else "accuracy"
    keep = KeepBest(monitor, target=student, by_loss=False)
    t0 = time.time()

    def compile_fn(optimizer):  # the stage's optimizer (the student's variables), the distillation loss
        distiller.compile(optimizer=optimizer, jit_compile=rt.jit_compile)
        return distiller

    try:
        rows = run_stages(clf, plan, train_ds, val_fit, cfg, rt, num_classes=data.num_classes,
                          steps_per_epoch=steps, compile_fn=compile_fn, callbacks=[keep],
                          history_path=os.path.join(out_dir, "history.csv"))
    except TrainingError as e:
        stage = getattr(e, "stage", None)
        raise TrainingError(f"The distillation loss became NaN or infinite (stage {getattr(stage, 'name', '?')!r}); "
                            "lower --lr or --temperature, or use --precision float32.") from None
    train_seconds = time.time() - t0
    if keep.weights is not None:
        student.set_weights(keep.weights)

    student_path = os.path.join(out_dir, "model.keras")
    clf.save(student_path)
    metrics = run_folder.split_metrics(student, {"val": val_ds, "test": test_ds}, data.class_names)
    summary = _comparison(teacher, teacher_file, teacher_dir, student, student_path, spec.name, metrics,
                          {"val": val_ds, "test": test_ds}, size, dcfg, cached)
    t, s = summary["teacher"], summary["student"]
    out_metrics = run_folder.run_metrics(metrics, train_seconds=train_seconds, epochs=len(rows), stages=plan,
                                         skipped_files=data.skipped, distillation=summary)
    run_folder.write_metrics(out_dir, out_metrics)
    print(comparison_table([t, s]), flush=True)
    print(f"[tlkit] student run folder: {out_dir}", flush=True)
    return RunResult(student, rows, out_metrics, out_dir, data.class_names, resolved)


def _comparison(teacher: keras.Model, teacher_file: str, teacher_dir: str | None, student: keras.Model,
                student_path: str, student_backbone: str, metrics: dict[str, Any], splits: dict[str, Any],
                size: int, dcfg: DistillConfig, cached: bool) -> dict[str, Any]:
    """`metrics.json`'s `distillation`: teacher and student side by side (accuracy, parameters, size, CPU latency)."""
    teacher_eval = probs_at_size(teacher, size)
    compare: dict[str, dict[str, Any]] = {"teacher": {}, "student": {}}
    for name, ds in splits.items():
        if ds is None:
            continue
        compare["student"][f"{name}_accuracy"] = metrics[name]["accuracy"]
        yt, pt = predict_split(teacher_eval, ds)
        compare["teacher"][f"{name}_accuracy"] = float(np.mean(pt.argmax(-1) == yt))
    teacher_backbone = None
    if teacher_dir and os.path.isfile(os.path.join(teacher_dir, "config.yaml")):
        teacher_backbone = os.path.basename(load_config(os.path.join(teacher_dir, "config.yaml")).model.base)
    for who, model, path, backbone in (("teacher", teacher, teacher_file, teacher_backbone or teacher.name),
                                       ("student", student, student_path, student_backbone)):
        compare[who].update({"model": who, "backbone": backbone, "params": _count_params(model),
                             "size_bytes": model_size_bytes(path),
                             "cpu_ms_per_image": cpu_latency_ms(path, runs=dcfg.latency_runs), "path": path})
    t, s = compare["teacher"], compare["student"]
    return {"teacher": t, "student": s, "temperature": dcfg.temperature, "alpha": dcfg.alpha,
            "teacher_logits_cached": bool(cached),
            "compression": t["params"] / max(s["params"], 1),
            "speedup": t["cpu_ms_per_image"] / max(s["cpu_ms_per_image"], 1e-9),
            "config": dataclasses.asdict(dcfg)}
