"""Discriminative learning rates (tlkit/models/param_groups.py through Classifier.lr_factors, hooked into
engine.loop.compile_model): per-stage update sizes."""
from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest

import keras
import tensorflow as tf

from tlkit.models import param_groups
from tlkit.models.backbones import get_backbone
from tlkit.core.config import DataConfig, FinetuneConfig, ModelConfig, TrainConfig
from tlkit.core.errors import ConfigError
from tlkit.models.classifier import Classifier, get_base
from tlkit.engine.loop import compile_model


_RECORDS: dict[int, Classifier] = {}  # id(model) -> its Classifier record


def _stage_kernels(model, clf: Classifier) -> dict[str, int]:
    """One Conv2D layer name per backbone stage that has one: {layer name: stage}."""
    base = get_base(model)
    out: dict[str, int] = {}
    for layer, stage in zip(base.layers, clf.stage_of_layer):
        if isinstance(layer, keras.layers.Conv2D) and stage not in out.values():
            out[layer.name] = stage
    return out


def _model(tiny_backbone, seed=0):
    keras.utils.set_random_seed(seed)
    spec = get_backbone(tiny_backbone)
    clf = Classifier.build(spec, 3, ModelConfig(base=tiny_backbone, weights="none", dropout=0.0, train_bn=False), 32)
    clf.set_trainable(None, train_bn=False)
    model = clf.model
    # The head starts from zero logits (no gradient reaches the backbone at the first step): give it the trained-
    # head state these per-step update checks need.
    logits = model.get_layer("logits")
    logits.kernel.assign(np.random.default_rng(seed).normal(0, 0.5, logits.kernel.shape).astype("float32"))
    _RECORDS[id(model)] = clf
    return model, clf


def _batch(n=8, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 255, (n, 32, 32, 3)).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, n)]
    return x, y


def _kernels(model):
    base = get_base(model)
    out = {name: base.get_layer(name).kernel for name in _stage_kernels(model, _RECORDS[id(model)])}
    out["logits"] = model.get_layer("logits").kernel
    return out


def _grads(model, x, y):
    loss_fn = keras.losses.CategoricalCrossentropy()
    ks = _kernels(model)
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
    grads = tape.gradient(loss, [ks[k].value for k in ks])
    return {k: np.asarray(g) for k, g in zip(ks, grads)}


def _one_step(model, spec, train_cfg, x, y, jit=False):
    cfg = FinetuneConfig(train=train_cfg)
    compile_model(model, cfg, train_cfg.lr, 3, jit, clf=spec)
    before = {k: np.asarray(v) for k, v in _kernels(model).items()}
    model.train_on_batch(x, y)
    return {k: before[k] - np.asarray(v) for k, v in _kernels(model).items()}


def test_stage_factors_follow_lr_mult_and_stage_lrs():
    assert param_groups.stage_factors(4, TrainConfig(lr_mult=0.5)) == [0.0625, 0.125, 0.25, 0.5]
    assert param_groups.stage_factors(3, TrainConfig(stage_lrs="0.01,0.1,1")) == [0.01, 0.1, 1.0]
    assert param_groups.stage_factors(3, TrainConfig()) is None
    with pytest.raises(ConfigError, match="3 stages"):
        param_groups.stage_factors(3, TrainConfig(stage_lrs="0.1,1"))
    with pytest.raises(ConfigError, match="positive"):
        FinetuneConfig(data=DataConfig(dataset="shapes"), train=TrainConfig(stage_lrs="0.1,x")).validate()
    with pytest.raises(ConfigError, match="lr_mult"):
        FinetuneConfig(data=DataConfig(dataset="shapes"), train=TrainConfig(lr_mult=0.0)).validate()


def test_sgd_update_equals_stage_lr_times_gradient(tiny_backbone):
    """Plain SGD: delta = lr * lr_mult ** depth * grad for a kernel of each stage; the head keeps lr."""
    model, spec = _model(tiny_backbone)
    x, y = _batch()
    grads = _grads(model, x, y)
    lr, mult = 0.1, 0.5
    delta = _one_step(model, spec, TrainConfig(optimizer="sgd", momentum=0.0, lr=lr, lr_mult=mult,
                                               label_smoothing=0.0), x, y)
    num_stages = spec.num_stages
    kernels = _stage_kernels(model, spec)
    assert sorted(kernels.values()) == list(range(num_stages)) and num_stages >= 3
    for name, stage in kernels.items():
        stage_lr = lr * mult ** (num_stages - stage)
        assert np.abs(grads[name]).max() > 0
        # atol: a delta of ~1e-6 read as the difference of float32 weights of ~0.5 carries ~3e-8 of rounding
        np.testing.assert_allclose(delta[name], stage_lr * grads[name], rtol=2e-3, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(delta["logits"], lr * grads["logits"], rtol=2e-3, atol=1e-7)


def test_adam_step_size_is_the_stage_lr(tiny_backbone):
    """Adam's first step moves each weight by about its learning rate, whatever the gradient's scale:
    the factor must scale the learning rate, not the gradient."""
    model, spec = _model(tiny_backbone)
    x, y = _batch()
    grads = _grads(model, x, y)
    lr = 1e-3
    factors = [0.003, 0.01, 0.1, 0.5]
    kernels = _stage_kernels(model, spec)
    assert len(kernels) == len(factors) == spec.num_stages
    delta = _one_step(model, spec, TrainConfig(optimizer="adam", lr=lr, stage_lrs=",".join(map(str, factors)),
                                               label_smoothing=0.0), x, y)
    for name, factor in [(name, factors[stage]) for name, stage in kernels.items()] + [("logits", 1.0)]:
        live = np.abs(grads[name]) > 1e-3 * np.abs(grads[name]).max()  # not a dead ReLU's zero gradient
        step = np.median(np.abs(delta[name][live]))
        assert step == pytest.approx(lr * factor, rel=0.05), name


@pytest.mark.parametrize("policy,jit", [("mixed_float16", False), ("float32", True)])
def test_mixed_precision_and_xla(tiny_backbone, policy, jit):
    """Under mixed_float16 (LossScaleOptimizer) and under jit_compile the updates keep the stage factors.

    (Both at once also works, but XLA compiles float16 convolutions for the CPU in ~13 s: checked by hand.)
    """
    keras.mixed_precision.set_dtype_policy(policy)
    try:
        x, y = _batch()
        model, spec = _model(tiny_backbone, seed=3)
        grads = _grads(model, x, y)
        lr, mult = 0.05, 0.5
        delta = _one_step(model, spec, TrainConfig(optimizer="sgd", momentum=0.0, lr=lr, lr_mult=mult,
                                                   label_smoothing=0.0), x, y, jit=jit)
        opt = model.optimizer
        if policy == "mixed_float16":
            assert isinstance(opt, keras.optimizers.LossScaleOptimizer)
            opt = opt.inner_optimizer
        assert type(opt).__name__ == "ScaledSGD"
        assert model.jit_compile is jit
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    n = spec.num_stages
    for name, stage in list(_stage_kernels(model, spec).items()) + [("logits", n)]:
        g = grads[name]
        big = np.abs(g) > 0.05 * np.abs(g).max()
        ratio = delta[name][big] / (lr * g[big])
        assert np.median(ratio) == pytest.approx(mult ** (n - stage), rel=0.03), name


def test_finetune_with_stage_lrs_saves_a_plain_model(tiny_backbone, tmp_path):
    from tlkit.cli import main

    out = tmp_path / "run"
    common = ["finetune", "--dataset", "shapes", "--shapes-per-class", "4", "--base", tiny_backbone,
              "--image-size", "32", "--weights", "none", "--strategy", "full", "--epochs", "1",
              "--batch-size", "8", "--augment", "none", "--xla", "off", "--precision", "float32"]
    assert main(common + ["--lr-mult", "0.3", "--output-dir", str(out)]) == 0
    path = out / "model.keras"
    with zipfile.ZipFile(path) as z:
        text = z.read("config.json").decode()
    assert "Scaled" not in text and not json.loads(text).get("compile_config")
    model = keras.models.load_model(path)
    assert model.predict(np.zeros((1, 32, 32, 3), "float32"), verbose=0).shape == (1, 4)
    assert os.path.isfile(out / "metrics.json")
