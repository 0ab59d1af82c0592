"""Magnitude pruning (tlkit/prune.py): exact sparsity on the pruned layers, masks held during training, reload."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

import keras

import tlkit
from tlkit.cli import main
from tlkit.models.backbones import get_backbone
from tlkit.core.config import DataConfig, FinetuneConfig, ModelConfig, RuntimeConfig
from tlkit.core.config_io import config_to_dict, dump_yaml
from tlkit.core.verb_configs import PruneConfig
from tlkit.models.classifier import build_classifier
from tlkit.models.classifier import save_model
from tlkit.models.param_groups import scaled_optimizer
from tlkit.verbs.prune import Pruner, magnitude_mask, polynomial_sparsity, prunable_kernels


@pytest.fixture(scope="module")
def untrained_run(tmp_path_factory, tiny_backbone):
    """A run folder as finetune writes it (model.keras, labels.txt, config.yaml) of the tiny backbone on shapes;
    pruning needs weights, not skill, so the classifier is built and saved without training."""
    keras.utils.set_random_seed(0)
    out = tmp_path_factory.mktemp("run")
    data = DataConfig(dataset="shapes", shapes_per_class=4, image_size=32, augment="none", batch_size=8)
    model = build_classifier(get_backbone(tiny_backbone), 4, ModelConfig(base=tiny_backbone, weights="none"), 32)
    save_model(model, str(out / "model.keras"))
    (out / "labels.txt").write_text("circle\nsquare\ntriangle\ncross\n")
    cfg = FinetuneConfig(data=data, model=ModelConfig(base=tiny_backbone, weights="none"),
                         runtime=RuntimeConfig(precision="float32", xla="off"), output_dir=str(out))
    (out / "config.yaml").write_text(dump_yaml(config_to_dict(cfg)))
    return str(out)


def test_magnitude_mask_and_schedule():
    w = np.array([[0.3, -0.1], [0.2, 0.05], [-0.7, 0.0]])
    m = magnitude_mask(w, 0.5)
    assert m.tolist() == [[1, 0], [1, 0], [1, 0]]
    assert magnitude_mask(w, 0.0).min() == 1.0 and magnitude_mask(w, 0.34).sum() == 4  # round(0.34 * 6) = 2
    assert polynomial_sparsity(0, 0.8, 100) == 0.0 and polynomial_sparsity(100, 0.8, 100) == pytest.approx(0.8)
    assert polynomial_sparsity(50, 0.8, 100) == pytest.approx(0.8 * (1 - 0.5 ** 3))
    assert polynomial_sparsity(500, 0.8, 100) == pytest.approx(0.8)


def test_masks_hold_inside_the_compiled_train_step(untrained_run):
    """Adam with momentum would revive zeroed weights; the masked optimizer keeps them exactly zero.
    (The same optimizer class under jit_compile: tests/test_discriminative_lr.py.)"""
    model = keras.models.load_model(os.path.join(untrained_run, "model.keras"))
    pruner = Pruner(prunable_kernels(model))
    pruner.set_sparsity(0.6)
    before = {p: np.asarray(v) == 0 for p, v in pruner.kernels.items()}
    model.compile(scaled_optimizer(keras.optimizers.Adam(1e-2), masks=pruner.masks_by_id()),
                  "categorical_crossentropy", jit_compile=False)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    y = np.eye(4, dtype="float32")[rng.integers(0, 4, 8)]
    for _ in range(3):
        model.train_on_batch(x, y)
    for p, v in pruner.kernels.items():
        w = np.asarray(v)
        assert np.array_equal(w == 0, before[p]), p  # same zeros, no more, no fewer
        assert (w == 0).sum() == round(0.6 * w.size)
    head = np.asarray(model.get_layer("logits").kernel)
    assert (head == 0).sum() == 0  # not pruned by default


def test_prune_cli_polynomial(untrained_run, tmp_path):
    out = str(tmp_path / "pruned")
    assert main(["prune", untrained_run, "--sparsity", "0.5", "--schedule", "polynomial", "--epochs", "2",
                 "--frequency", "1", "--sweep", "0.8", "--output-dir", out]) == 0
    for name in ("model.keras", "labels.txt", "config.yaml", "metrics.json", "history.csv"):
        assert os.path.isfile(os.path.join(out, name)), name
    model = keras.models.load_model(os.path.join(out, "model.keras"))  # plain Keras
    kernels = prunable_kernels(model)
    assert len(kernels) == 6
    for p, v in kernels.items():
        w = np.asarray(v)
        assert (w == 0).sum() == round(0.5 * w.size), p  # exactly the asked sparsity on every pruned layer
    probs = model.predict(np.zeros((3, 32, 32, 3), "float32"), verbose=0)
    assert probs.shape == (3, 4) and np.allclose(probs.sum(-1), 1.0, atol=1e-5)
    m = json.load(open(os.path.join(out, "metrics.json")))
    pr = m["pruning"]
    assert pr["sparsity"] == pytest.approx(0.5, abs=1e-4) and pr["target_sparsity"] == 0.5
    labels = [r["model"] for r in pr["table"]]
    assert labels[0] == "original" and "one-shot 0.5" in labels and "one-shot 0.8" in labels
    rows = {r["model"]: r for r in pr["table"]}
    assert rows["one-shot 0.8"]["zipped_bytes"] < rows["one-shot 0.5"]["zipped_bytes"] < rows["original"]["zipped_bytes"]
    assert pr["table"][-1]["zipped_bytes"] < rows["original"]["zipped_bytes"]
    with open(os.path.join(out, "history.csv")) as f:
        sparsities = [float(r["sparsity"]) for r in csv.DictReader(f)]
    assert sparsities[0] < 0.5 and sparsities[-1] == pytest.approx(0.5)  # the schedule ramps up
    assert "val" in m and "test" in m
    assert main(["evaluate", out, "--json"]) == 0


def test_prune_constant_with_head_and_bad_input(untrained_run, tmp_path):
    r = tlkit.prune(PruneConfig(run_dir=untrained_run, sparsity=0.75, schedule="constant", epochs=1, prune_head=True,
                                batch_size=16, output_dir=str(tmp_path / "p75")))
    head = np.asarray(r.model.get_layer("logits").kernel)
    assert (head == 0).sum() == round(0.75 * head.size)
    assert r.metrics["pruning"]["sparsity"] == pytest.approx(0.75, abs=1e-3)
    assert main(["prune", untrained_run, "--sparsity", "1.5"]) == 2
    assert main(["prune", str(tmp_path / "nothing"), "--sparsity", "0.5"]) == 2
    assert main(["prune", untrained_run, "--schedule", "cubic"]) == 2


def test_magnitude_mask_by_selection_equals_a_stable_sort_with_ties():
    import numpy as np

    from tlkit.verbs.prune import magnitude_mask

    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 80))
        w = (rng.integers(-3, 4, n) * rng.choice([1.0, 0.5])).astype(np.float32)  # many equal magnitudes
        s = float(rng.uniform(0, 1))
        k = int(round(s * n))
        expected = np.ones(n, np.float32)
        expected[np.argsort(np.abs(w), kind="stable")[:k]] = 0.0
        got = magnitude_mask(w.reshape(1, n), s)
        assert got.shape == (1, n) and np.array_equal(got.ravel(), expected), (w, s)
        assert int(np.sum(got == 0)) == k
    assert magnitude_mask(np.ones((2, 3)), 1.0).sum() == 0
