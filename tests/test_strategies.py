"""tlkit/strategies.py and model.set_trainable: each strategy trains exactly what it says."""
import numpy as np
import keras
import pytest

from tlkit.models import backbones
from tlkit.core.config import ModelConfig, TrainConfig
from tlkit.models.classifier import build_classifier, get_base, set_trainable
from tlkit.models.strategies import plan


def _counts(model, spec):
    """Trainable weight tensors per backbone stage, and in the head."""
    base = get_base(model)
    per = {}
    for layer, s in zip(base.layers, spec.stages(base)):
        if layer.trainable and base.trainable:
            per[s] = per.get(s, 0) + len(layer.trainable_weights)
    head = len(model.trainable_weights) - sum(per.values())
    return {k: v for k, v in per.items() if v}, head


@pytest.mark.parametrize("strategy,expected", [
    ("feature_extraction", [("head", frozenset())]),
    ("full", [("full", None)]),
    ("top_k", [("top_k", frozenset({3, 4}))]),
    ("two_stage", [("head", frozenset()), ("finetune", frozenset({3, 4}))]),
])
def test_plans(strategy, expected):
    stages = plan(TrainConfig(strategy=strategy, epochs=4, head_steps=2, unfreeze_stages=2, lr=1e-3), 5)
    assert [(s.name, s.trainable) for s in stages] == expected
    if strategy == "two_stage":
        assert stages[0].epochs == 2 and stages[1].epochs == 4
        assert stages[1].lr == pytest.approx(1e-4)


def test_gradual_unfreezes_one_more_stage_each_step():
    stages = plan(TrainConfig(strategy="gradual", epochs=5, gradual_every=2, head_steps=6), 4, steps_per_epoch=4)
    assert [len(s.trainable) for s in stages] == [0, 1, 2, 3]
    assert [s.epochs for s in stages] == [2, 2, 2, 1]  # the head: ceil(6 steps / 4 a pass); then `epochs`
    assert stages[1].trainable == frozenset({3}) and stages[2].trainable == frozenset({2, 3})


@pytest.mark.parametrize("n_images,batch,head_steps,expected", [(50, 32, 300, 150), (50_000, 32, 300, 1),
                                                                  (40, 8, 1, 1), (40, 8, 0, 0)])
def test_the_head_stage_is_budgeted_in_steps(n_images, batch, head_steps, expected):
    steps = -(-n_images // batch)
    cfg = TrainConfig(strategy="two_stage", head_steps=head_steps, epochs=3)
    stages = plan(cfg, 4, steps_per_epoch=steps)
    assert [s.epochs for s in stages if s.name == "head"] == ([expected] if expected else [])
    assert [s.epochs for s in stages if s.name == "finetune"] == [3]  # --epochs means epochs of fine-tuning
    fe = plan(TrainConfig(strategy="feature_extraction", head_steps=head_steps, epochs=3), 4, steps_per_epoch=steps)
    assert fe[0].epochs == max(3, expected)


def test_resnet50_trainable_weights_per_stage():
    spec = backbones.get_backbone("resnet50")
    model = build_classifier(spec, 3, ModelConfig(weights="none", train_bn=False), 32)
    set_trainable(model, spec, set(), train_bn=False)
    assert _counts(model, spec) == ({}, 2)  # only the head's kernel and bias
    set_trainable(model, spec, {4}, train_bn=False)
    per, head = _counts(model, spec)
    assert list(per) == [4] and head == 2
    # conv5: 3 blocks x 3 convs (+ 1 shortcut conv), kernel + bias each; BatchNorm frozen
    assert per[4] == (3 * 3 + 1) * 2
    set_trainable(model, spec, {4}, train_bn=True)
    per, _ = _counts(model, spec)
    assert per[4] == (3 * 3 + 1) * 2 + (3 * 3 + 1) * 2  # + gamma and beta of each BatchNorm
    set_trainable(model, spec, None, train_bn=False)
    per, _ = _counts(model, spec)
    assert sorted(per) == [0, 1, 2, 3, 4]


def test_frozen_layers_do_not_move_during_fit(tiny_backbone):
    spec = backbones.get_backbone(tiny_backbone)
    model = build_classifier(spec, 4, ModelConfig(weights="none", train_bn=False), 32)
    set_trainable(model, spec, {3}, train_bn=False)  # only the top stage of the backbone
    base = get_base(model)
    before = {l.name: [w.copy() for w in l.get_weights()] for l in base.layers}
    head_before = model.get_layer("logits").get_weights()[0].copy()
    model.compile(keras.optimizers.SGD(0.1), "categorical_crossentropy")
    x = np.random.default_rng(0).uniform(0, 255, (16, 32, 32, 3)).astype("float32")
    y = keras.utils.to_categorical(np.arange(16) % 4, 4)
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    stages = dict(zip([l.name for l in base.layers], spec.stages(base)))
    for layer in base.layers:
        for a, b in zip(before[layer.name], layer.get_weights()):
            moved = not np.array_equal(a, b)
            if stages[layer.name] == 3 and layer.name.endswith(("_down", "_conv")):
                assert moved, layer.name
            else:
                assert not moved, layer.name  # frozen stages and inference-mode BatchNorm stay put
    assert not np.array_equal(head_before, model.get_layer("logits").get_weights()[0])
