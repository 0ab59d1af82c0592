"""tlkit/models/classifier.py: the `Classifier` record names the parts of a plain Keras classifier once."""
from __future__ import annotations

import os

import keras
import numpy as np
import pytest

from tlkit.core.config import DataConfig, FinetuneConfig, ModelConfig, TrainConfig
from tlkit.core.config_io import config_to_dict, dump_yaml
from tlkit.core.errors import ConfigError
from tlkit.models.backbones import get_backbone
from tlkit.models.classifier import Classifier


@pytest.fixture
def clf(tiny_backbone):
    keras.utils.set_random_seed(0)
    return Classifier.build(get_backbone(tiny_backbone), 3, ModelConfig(base=tiny_backbone, weights="none",
                                                                        dropout=0.0), 32, class_names=["a", "b", "c"])


def test_record_names_the_parts(clf, tiny_backbone):
    spec = get_backbone(tiny_backbone)
    assert clf.backbone is clf.model.get_layer("backbone")
    assert len(clf.stage_of_layer) == len(clf.backbone.layers)
    assert clf.num_stages == spec.num_stages(clf.backbone) >= 2
    assert [layer.name for layer in clf.head_layers][-2:] == ["logits", "probs"]
    assert clf.image_size == 32 and clf.num_classes == 3 and clf.class_names == ["a", "b", "c"]


def test_set_trainable_and_lr_factors_follow_the_stages(clf):
    top = clf.num_stages - 1
    clf.set_trainable({top})
    trains = {layer.name for layer, s in zip(clf.backbone.layers, clf.stage_of_layer)
              if layer.trainable and layer.weights}
    assert trains and all(s == top for layer, s in zip(clf.backbone.layers, clf.stage_of_layer)
                          if layer.name in trains)
    assert clf.model.get_layer("logits").trainable
    assert clf.lr_factors(TrainConfig()) == {}  # lr_mult 1: every variable at the stage's rate
    factors = clf.lr_factors(TrainConfig(lr_mult=0.5))
    kernel = next(layer.kernel for layer, s in zip(clf.backbone.layers, clf.stage_of_layer)
                  if s == 0 and hasattr(layer, "kernel"))
    assert factors[id(kernel)] == pytest.approx(0.5 ** clf.num_stages)
    assert id(clf.model.get_layer("logits").kernel) not in factors  # the head is at the stage's rate


def test_split_composes_to_the_model(clf):
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    logits = clf.model.get_layer("logits")
    logits.kernel.assign(np.random.default_rng(1).normal(0, 1, logits.kernel.shape).astype("float32"))
    extractor, head = clf.split()
    np.testing.assert_allclose(head(extractor(x)), clf.model(x), atol=1e-5)


def test_save_reloads_with_plain_keras_and_from_run_restores_the_record(clf, tiny_backbone, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    clf.save(str(run / "model.keras"))
    (run / "labels.txt").write_text("a\nb\nc\n")
    cfg = FinetuneConfig(data=DataConfig(image_dir=str(tmp_path)), model=ModelConfig(base=tiny_backbone))
    (run / "config.yaml").write_text(dump_yaml(config_to_dict(cfg)))
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    plain = keras.models.load_model(str(run / "model.keras"))
    np.testing.assert_allclose(plain(x), clf.model(x), atol=1e-6)
    again = Classifier.from_run(str(run))
    assert again.class_names == ["a", "b", "c"] and again.run_dir == str(run)
    assert again.num_stages == clf.num_stages and again.stage_of_layer == clf.stage_of_layer
    # A .keras file alone: no config.yaml, so no stages; it can still be used whole, not by stage.
    alone = Classifier.from_run(str(run / "model.keras"))
    assert alone.spec is None and alone.num_stages == 0 and alone.lr_factors(TrainConfig(lr_mult=0.5)) == {}
    with pytest.raises(ConfigError, match="no known stages"):
        alone.set_trainable({0})
    with pytest.raises(ConfigError, match="No model found"):
        Classifier.from_run(str(tmp_path / "missing"))
