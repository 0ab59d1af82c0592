"""tlkit/features.py: frozen-feature caching gives the same head, the same accuracy, and a full saved model."""
from __future__ import annotations

import csv
import dataclasses
import os

import keras
import numpy as np
import pytest

import tlkit
from tlkit.models.strategies import plan
from tlkit.engine import features
from tlkit.models.backbones import get_backbone
from tlkit.core.config import DataConfig, FinetuneConfig, ModelConfig, RuntimeConfig, TrainConfig
from tlkit.models.classifier import build_classifier, get_base, set_trainable
from conftest import write_image_folder


def _classifier(tiny_backbone):
    spec = get_backbone(tiny_backbone)
    base = spec.build(32, "none")
    return spec, build_classifier(spec, 3, ModelConfig(base=tiny_backbone, weights="none", dropout=0.0), 32, base=base)


def test_split_model_shares_the_head_layers_and_composes_to_the_model(tiny_backbone):
    spec, model = _classifier(tiny_backbone)
    extractor, head = features.split_model(model)
    assert [l.name for l in head.layers] == ["features", "feature_norm", "head_dropout", "logits", "probs"]
    assert head.get_layer("logits") is model.get_layer("logits")  # the same layer object: training it trains model
    base_out = get_base(model).output.shape
    assert len(base_out) == 4 and extractor.output.shape[1:] == (base_out[-1],)  # pooled, not the feature map
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(head(extractor(x))),
                               keras.ops.convert_to_numpy(model(x)), rtol=1e-5, atol=1e-6)


def test_when_the_head_trains_on_cached_features():
    cfg = FinetuneConfig(data=DataConfig(dataset="shapes", augment="standard"))
    assert features.head_on_features(cfg)  # auto: on, whatever the augmentation (the features are un-augmented)
    assert features.head_on_features(dataclasses.replace(cfg, runtime=RuntimeConfig(cache_features=True)))
    assert not features.head_on_features(dataclasses.replace(cfg, runtime=RuntimeConfig(cache_features=False)))
    two = dataclasses.replace(cfg.train, strategy="two_stage")
    stages = plan(two, 4, steps_per_epoch=2, head_on_features=True)
    assert [(s.name, s.epochs, s.passes) for s in stages] == [("head", 1, 150), ("finetune", 10, 0)]
    # auto (the default): the fine-tuning stage is a budget of optimizer steps (500), in 20 validated rounds of 25
    stages = plan(cfg.train, 4, steps_per_epoch=2, head_on_features=True)
    assert [(s.name, s.epochs, s.passes, s.steps, s.adaptive) for s in stages] == [
        ("head", 1, 150, 0, False), ("finetune", 20, 0, 25, True)]


def _run(root, tiny_backbone, out, cache, strategy="feature_extraction", augment="none", batch_size=4):
    cfg = FinetuneConfig(
        data=DataConfig(image_dir=root, image_size=32, batch_size=batch_size, augment=augment, val_split=0.25),
        model=ModelConfig(base=tiny_backbone, weights="none", dropout=0.0),
        train=TrainConfig(strategy=strategy, epochs=1 if strategy == "two_stage" else 8, head_steps=3, lr=0.02,
                          schedule="constant", label_smoothing=0.0),
        runtime=RuntimeConfig(precision="float32", xla="off", cache_features=cache), output_dir=str(out), seed=1)
    return tlkit.finetune(cfg)


def test_feature_cache_trains_the_same_head_to_the_same_accuracy_and_saves_the_full_model(
        tmp_path, tiny_backbone, capsys):
    root = write_image_folder(tmp_path / "img", classes=("r", "g", "b"), per_class=12, size=(36, 36))  # 27 train
    # One full batch per epoch: the gradient does not depend on the order of the examples, so training the head
    # on cached features must follow the same trajectory as training the full model on images.
    plain = _run(root, tiny_backbone, tmp_path / "plain", cache=False, batch_size=27)
    assert "head trained on cached features" not in capsys.readouterr().out
    cached = _run(root, tiny_backbone, tmp_path / "cached", cache=None, batch_size=27)  # auto: the head stage
    assert "head trained on cached features: 8 passes" in capsys.readouterr().out
    assert plain.history[-1]["loss"] < plain.history[0]["loss"]
    # The cached head stage is one row for the run (its kept pass); the same pass of the plain run, which
    # trained the full model on the images epoch by epoch, has the same losses within float noise.
    assert len(plain.history) == 8 and len(cached.history) == 1 and cached.history[0]["stage"] == "head"
    # Every pass is in head_passes.csv (curves.png draws them: a head-only run's history is one row), the same
    # pass by pass as the plain run's epochs, and the kept one is the history's row.
    with open(os.path.join(cached.run_dir, "head_passes.csv"), newline="") as f:
        passes = list(csv.DictReader(f))
    assert [int(r["pass"]) for r in passes] == list(range(1, 9))
    np.testing.assert_allclose([float(r["loss"]) for r in passes], [r["loss"] for r in plain.history], atol=5e-3)
    kept = passes[int(cached.history[0]["kept_pass"]) - 1]
    assert float(kept["val_loss"]) == pytest.approx(cached.history[0]["val_loss"], rel=1e-6)
    assert not os.path.exists(os.path.join(plain.run_dir, "head_passes.csv"))
    row = cached.history[0]
    assert row["epoch"] == 1 and row["head_passes"] == 8  # one epoch of the run, eight passes over the features
    same = plain.history[int(row["kept_pass"]) - 1]
    np.testing.assert_allclose([row["loss"], row["val_loss"]], [same["loss"], same["val_loss"]], atol=5e-3)
    assert abs(plain.metrics["val"]["accuracy"] - cached.metrics["val"]["accuracy"]) <= 0.25
    assert row["lr"] == pytest.approx(0.02)  # the LR is read from the shared optimizer
    a = keras.models.load_model(os.path.join(plain.run_dir, "model.keras"), safe_mode=True)
    b = keras.models.load_model(os.path.join(cached.run_dir, "model.keras"), safe_mode=True)
    assert [(l.name, type(l).__name__) for l in a.layers] == [(l.name, type(l).__name__) for l in b.layers]
    assert [tuple(w.shape) for w in a.weights] == [tuple(w.shape) for w in b.weights]
    assert get_base(b).count_params() > 0 and len(b.weights) > 2  # base + head, not the head alone
    # The trained head lives in the saved full model: it reproduces the run's predictions on raw images.
    x = np.random.default_rng(1).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(b(x)), keras.ops.convert_to_numpy(cached.model(x)),
                               atol=1e-5)


def test_two_stage_caches_the_head_stage_only_then_fine_tunes(tmp_path, tiny_backbone, capsys):
    root = write_image_folder(tmp_path / "img", classes=("r", "g"), per_class=8, size=(36, 36))
    r = _run(root, tiny_backbone, tmp_path / "two", cache=True, strategy="two_stage", augment="light")
    out = capsys.readouterr().out
    assert out.count("computing base features of the train split") == 1  # once, for the head, despite augmentation
    assert out.count("head trained on cached features") == 1
    assert [row["stage"] for row in r.history] == ["head", "finetune"]
    assert os.path.exists(os.path.join(r.run_dir, "model.keras"))


def test_npy_writer_and_memory_mapped_batches_match_the_in_memory_ones(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(23, 5)).astype("float32"), rng.integers(0, 2, (23, 3)).astype("float32")
    wx, wy = features.NpyWriter(str(tmp_path / "x.npy")), features.NpyWriter(str(tmp_path / "y.npy"))
    for i in range(0, 23, 4):
        wx.append(x[i:i + 4])
        wy.append(y[i:i + 4])
    mx, my = wx.finish(), wy.finish()
    assert isinstance(mx, np.memmap) and mx.shape == (23, 5) and my.shape == (23, 3)
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), x)
    for training in (True, False):
        a = list(features.features_dataset(x, y, 4, training=training, seed=3).repeat(2))
        b = list(features.features_dataset(mx, my, 4, training=training, seed=3).repeat(2))
        assert len(a) == len(b) == 12
        for (xa, ya), (xb, yb) in zip(a, b):  # the same batches, epoch after epoch (same seed, same shuffles)
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)
    mean, var = features.mean_var(mx, rows=5)  # by chunks
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(var, x.astype(np.float64).var(0), rtol=1e-10)


def test_features_too_large_for_memory_are_memory_mapped_and_train_the_same_head(tmp_path, tiny_backbone, capsys,
                                                                                   monkeypatch):
    from tlkit.data import cache_policy
    from tlkit.engine import run as engine_run

    root = write_image_folder(tmp_path / "img", classes=("r", "g", "b"), per_class=8, size=(36, 36))
    in_memory = _run(root, tiny_backbone, tmp_path / "mem", cache=None)
    assert "feature cache -> memory:" in capsys.readouterr().out
    mapped_files = []
    finish = features.NpyWriter.finish
    monkeypatch.setattr(features.NpyWriter, "finish", lambda self: mapped_files.append(self.path) or finish(self))
    monkeypatch.setattr(cache_policy, "available_memory", lambda: 4096)  # 25% of it: 1 KB, less than the features
    monkeypatch.setattr(engine_run, "_predictor", lambda *a: None)  # and the final figures through the images
    mapped = _run(root, tiny_backbone, tmp_path / "map", cache=None)
    assert "feature cache -> memory-mapped files in" in capsys.readouterr().out
    assert sorted(os.path.basename(p) for p in mapped_files) == [
        "features-train.npy", "features-validation.npy", "labels-train.npy", "labels-validation.npy"]
    assert all(os.path.dirname(p) == str(tmp_path / "map" / "cache") for p in mapped_files)
    assert not any(os.path.exists(p) for p in mapped_files)  # removed at the end of the run
    assert mapped.history[0]["kept_pass"] == in_memory.history[0]["kept_pass"]
    for key in ("loss", "val_loss", "val_accuracy"):  # the same head, trained on the same batches
        assert mapped.history[0][key] == pytest.approx(in_memory.history[0][key], abs=1e-6)
    # the validation figures from the cached features (first run) are those through the images (second run)
    for key in ("accuracy", "loss", "mean_per_class_accuracy"):
        assert mapped.metrics["val"][key] == pytest.approx(in_memory.metrics["val"][key], abs=1e-5)


def test_moments_merged_batch_by_batch_equal_the_whole_arrays():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(37, 6)) * 50 + 1000).astype("float32")  # a large mean: the naive sum of squares loses it
    m = features.Moments()
    for lo, hi in ((0, 1), (1, 9), (9, 9), (9, 30), (30, 37)):  # uneven batches, one empty
        m.add(x[lo:hi])
    mean, var = m.result()
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(var, x.astype(np.float64).var(0), rtol=1e-9)
    with pytest.raises(ValueError):
        features.Moments().result()


def test_statistics_only_build_streams_the_features_and_standardises_as_the_kept_ones(tmp_path, tiny_backbone,
                                                                                      capsys, monkeypatch):
    """lr-find and distill need only the head's statistics: `keep_features=False` streams them (no feature array
    is collected) and the classifier's `feature_norm` gets the same constants as from the kept features."""
    from tlkit.core.config import DataConfig, FinetuneConfig, ModelConfig, RuntimeConfig
    from tlkit.engine import setup as engine_setup

    root = write_image_folder(tmp_path / "img", classes=("r", "g"), per_class=10, size=(36, 36))
    cfg = FinetuneConfig(data=DataConfig(image_dir=root, image_size=32, batch_size=4),
                         model=ModelConfig(base=tiny_backbone, weights="none"),
                         runtime=RuntimeConfig(precision="float32", xla="off"), seed=0)
    run = engine_setup.setup_run(cfg)
    _, _, _, plain = engine_setup.make_pipelines(run.cfg, run.data, run.size, None)
    kept_clf, kept = engine_setup.build_model(run.spec, run.base, 2, run.cfg, run.size, run.rt, plain, None)
    assert kept.fresh and kept.x_train.shape[0] == run.data.train.count
    collected = []
    monkeypatch.setattr(features._InMemory, "add", lambda self, *a: collected.append(a))
    clf, feats = engine_setup.build_model(run.spec, run.base, 2, run.cfg, run.size, run.rt, plain, None,
                                          keep_features=False)
    assert not collected and not feats.fresh and feats.x_train is None  # nothing kept
    assert capsys.readouterr().out.count("computing base features of the train split") == 2

    def norm(model):
        layer = model.get_layer("feature_norm")
        return [keras.ops.convert_to_numpy(layer.mean), keras.ops.convert_to_numpy(layer.variance)]

    assert np.ptp(norm(clf.model)[0]) > 0  # real statistics, not the zeros/ones of no statistics
    for a, b in zip(norm(kept_clf.model), norm(clf.model)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
