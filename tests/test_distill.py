"""Knowledge distillation (tlkit/distill.py): a student learns from a teacher trained here on `shapes`."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

import keras
import tensorflow as tf

import tlkit
from tlkit.verbs.distill import distillation_terms, logits_model, with_teacher_logits
from tlkit.models.backbones import get_backbone
from tlkit.cli import main
from tlkit.core.config import DataConfig, DistillConfig, FinetuneConfig, ModelConfig, config_to_dict, dump_yaml
from tlkit.models.classifier import build_classifier
from tlkit.models.classifier import save_model

from conftest import make_tiny_backbone

# No validation split: the teacher memorises the training images, so "above chance" is measured there.
DATA = DataConfig(dataset="shapes", shapes_per_class=16, image_size=32, val_split=0.0, augment="none",
                  batch_size=16)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, tiny_backbone):
    """A teacher run folder: the tiny backbone + head, trained here on the shapes training split."""
    keras.utils.set_random_seed(0)
    run = tmp_path_factory.mktemp("teacher")
    data = tlkit.load_dataset(DATA, 32, seed=42)
    x, y = map(np.asarray, zip(*data.train.ds.as_numpy_iterator()))
    model = build_classifier(get_backbone(tiny_backbone), 4,
                             ModelConfig(base=tiny_backbone, weights="none", dropout=0.0, train_bn=False), 32)
    model.compile(keras.optimizers.Adam(3e-3), "categorical_crossentropy", metrics=["accuracy"])
    model.fit(x.astype("float32"), np.eye(4, dtype="float32")[y], batch_size=16, epochs=14, verbose=0)
    acc = float(np.mean(model.predict(x.astype("float32"), verbose=0).argmax(-1) == y))
    assert acc >= 0.7, f"the teacher should (mostly) memorise its 64 training images, got {acc}"
    save_model(model, str(run / "model.keras"))
    (run / "labels.txt").write_text("\n".join(data.class_names) + "\n")
    cfg = FinetuneConfig(data=DATA, model=ModelConfig(base=tiny_backbone, weights="none"))
    (run / "config.yaml").write_text(dump_yaml(config_to_dict(cfg)))
    return str(run), x.astype("float32"), y


def test_distillation_terms():
    t = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]], "float32")
    y = np.eye(3, dtype="float32")[[0, 2]]
    ce, kl = distillation_terms(y, t, t, temperature=4.0)
    np.testing.assert_allclose(np.asarray(kl), 0.0, atol=1e-6)  # student == teacher
    s = np.zeros_like(t)
    ce, kl = distillation_terms(y, s, t, temperature=2.0)
    np.testing.assert_allclose(np.asarray(ce), np.log(3.0), rtol=1e-5)
    p = np.exp(t / 2) / np.exp(t / 2).sum(-1, keepdims=True)
    expected = 4.0 * (p * (np.log(p) - np.log(1 / 3))).sum(-1)  # T^2 * KL(teacher || uniform student)
    np.testing.assert_allclose(np.asarray(kl), expected, rtol=1e-5)


def test_cached_logits_stay_with_their_images(teacher_run):
    run, _, _ = teacher_run
    teacher = keras.models.load_model(os.path.join(run, "model.keras"))
    logits = logits_model(teacher)
    data = tlkit.load_dataset(DATA, 32, seed=42)
    ds = with_teacher_logits(data.train, logits, 32, 16, 4, training=True, cache="memory", seed=1)
    x, packed = next(iter(ds))
    assert packed.shape == (16, 8)
    np.testing.assert_allclose(np.asarray(packed[:, 4:]), np.asarray(logits(x)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(packed[:, :4]).sum(-1), 1.0)


def test_student_learns_from_teacher(teacher_run, tmp_path, tiny_backbone):
    """alpha=0: the student never sees a label, yet its accuracy rises far above chance (0.25)."""
    run, x, y = teacher_run
    small = make_tiny_backbone(str(tmp_path / "small.keras"), width=8)
    out = str(tmp_path / "student")
    rc = main(["distill", "--teacher", run, "--student", small, "--weights", "none", "--alpha", "0",
               "--temperature", "2", "--strategy", "full", "--epochs", "10", "--lr", "3e-3",
               "--dropout", "0", "--label-smoothing", "0", "--latency-runs", "3",
               "--precision", "float32", "--xla", "off", "--output-dir", out])
    assert rc == 0
    for name in ("model.keras", "labels.txt", "config.yaml", "metrics.json", "history.csv"):
        assert os.path.isfile(os.path.join(out, name)), name
    with open(os.path.join(out, "history.csv")) as f:
        rows = list(csv.DictReader(f))
    kl = [float(r["kl"]) for r in rows]
    acc = [float(r["accuracy"]) for r in rows]
    assert min(kl[-3:]) < 0.75 * kl[0], kl  # the KL term decreases
    assert max(acc[-3:]) >= 0.45, acc  # chance is 0.25, and no label is used: learnt from the teacher
    m = json.load(open(os.path.join(out, "metrics.json")))
    dist = m["distillation"]
    assert dist["teacher_logits_cached"] is True and dist["alpha"] == 0.0
    t, s = dist["teacher"], dist["student"]
    assert s["params"] < t["params"] and s["size_bytes"] < t["size_bytes"]
    assert t["cpu_ms_per_image"] > 0 and s["cpu_ms_per_image"] > 0
    assert t["test_accuracy"] is not None and s["test_accuracy"] is not None
    # a normal run folder: plain Keras loads it; it agrees with the teacher on the training images
    student = keras.models.load_model(os.path.join(out, "model.keras"))
    teacher = keras.models.load_model(os.path.join(run, "model.keras"))
    ps, pt = student.predict(x, verbose=0).argmax(-1), teacher.predict(x, verbose=0).argmax(-1)
    assert np.mean(ps == y) >= 0.4 and np.mean(ps == pt) >= 0.4
    assert main(["evaluate", out, "--split", "train", "--json"]) == 0


def test_online_teacher_with_augmentation(teacher_run, tmp_path, tiny_backbone):
    """With augmentation the teacher runs inside the train step (no cache); --cache-teacher is refused."""
    run, _, _ = teacher_run
    base = FinetuneConfig(data=DATA, model=ModelConfig(base=tiny_backbone, weights="none"))
    cfg = tlkit.config_from_dict({"augment": "light", "strategy": "feature_extraction", "epochs": 1,
                                  "output_dir": str(tmp_path / "s"), "precision": "float32", "xla": "off"}, base)
    r = tlkit.distill(cfg, DistillConfig(teacher=os.path.join(run, "model.keras"), latency_runs=1))
    assert r.metrics["distillation"]["teacher_logits_cached"] is False
    assert np.isfinite(r.history[0]["kl"]) and np.isfinite(r.history[0]["ce"])
    assert main(["distill", "--teacher", run, "--student", tiny_backbone, "--weights", "none", "--augment", "light",
                 "--cache-teacher", "--output-dir", str(tmp_path / "bad")]) == 2
    assert main(["distill", "--teacher", str(tmp_path / "missing"), "--student", tiny_backbone]) == 2
    assert main(["distill", "--teacher", run, "--student", tiny_backbone, "--alpha", "1.5"]) == 2
