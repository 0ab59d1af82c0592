"""Tests of tlkit/engine/class_weights.py and `--class-weight`: the weights, the weighted loss on a batch, the
warning, config.yaml, the head on cached features, tune and resume."""
from __future__ import annotations

import os

import numpy as np
import pytest
import yaml

import keras
import tensorflow as tf

from conftest import write_image_folder
from tlkit import cli
from tlkit.core import config as C
from tlkit.core import verb_configs as V
from tlkit.engine import class_weights as CW
from tlkit.core.errors import ConfigError


def test_balanced_weights_are_inverse_frequency_with_mean_one():
    counts = [20, 20, 5, 5]
    w = CW.balanced_weights(counts)
    assert w == [0.625, 0.625, 2.5, 2.5]  # n / (C * n_c) = 50 / (4 * n_c)
    assert np.dot(counts, w) / sum(counts) == pytest.approx(1.0)  # mean weight over the training images
    assert CW.balanced_weights([3, 0]) == [0.5, 0.0]  # a class without images never occurs


def test_imbalance_warning_names_the_largest_and_smallest_class():
    text = CW.imbalance_warning([40, 5, 12], ["cat", "dog", "fox"])
    assert "cat has 40 images" in text and "dog 5" in text and "8.0x" in text and "\n" not in text
    assert CW.imbalance_warning([25, 5, 12], ["cat", "dog", "fox"]) is None  # 5x exactly: not more than 5x


def test_class_weighted_loss_equals_the_hand_computed_one_on_a_batch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 4)).astype("float32")
    labels = np.array([0, 0, 0, 1, 2, 2])
    y = np.eye(3, dtype="float32")[labels]
    weights = [0.5, 2.0, 1.25]
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    smoothing = 0.1
    model.compile(optimizer="sgd", loss=keras.losses.CategoricalCrossentropy(label_smoothing=smoothing))
    ds = CW.weighted_dataset(tf.data.Dataset.from_tensor_slices((x, y)).batch(6), weights)
    loss = model.evaluate(ds, verbose=0)

    p = model.predict(x, verbose=0).astype("float64")
    target = y * (1 - smoothing) + smoothing / 3
    ce = -(target * np.log(np.clip(p, 1e-7, 1.0))).sum(-1)
    w = np.array(weights)[labels]
    assert loss == pytest.approx(float((w * ce).sum() / len(ce)), rel=1e-5)  # sum_i w_i * loss_i / B
    # mixed labels (mixup) get the mixture of their classes' weights
    mixed = np.array([[0.25, 0.75, 0.0]], np.float32)
    assert float(CW.sample_weights(mixed, weights)[0]) == pytest.approx(0.25 * 0.5 + 0.75 * 2.0)


@pytest.mark.parametrize("value", ["heavy", "1,-2", "1,x", [], [0.0, 1.0]])
def test_bad_class_weight_is_a_config_error(value):
    cfg = C.FinetuneConfig(data=C.DataConfig(dataset="shapes"), train=C.TrainConfig(class_weight=value))
    with pytest.raises(ConfigError, match="class_weight must be none, balanced or one positive number"):
        cfg.validate()
    assert C.parse_class_weight("Balanced") == "balanced" and C.parse_class_weight("1, 2") == [1.0, 2.0]


def _imbalanced_folder(root, big=12, small=2):
    root = write_image_folder(root, classes=("a", "b", "c"), per_class=big)
    for f in sorted(os.listdir(os.path.join(root, "c")))[small:]:
        os.remove(os.path.join(root, "c", f))
    return root


def test_finetune_balanced_writes_numbers_warns_trains_on_features_and_resumes(tmp_path, tiny_backbone, capsys):
    images = _imbalanced_folder(tmp_path / "images")
    run = str(tmp_path / "run")
    args = ["finetune", "--base", tiny_backbone, "--weights", "none", "--image-dir", images, "--image-size", "32",
            "--val-split", "0.25", "--batch-size", "4", "--head-steps", "4", "--epochs", "1", "--augment", "none",
            "--class-weight", "balanced", "--output-dir", run]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    # 19 training images: a 9, b 9, c 1 (the split holds out 3, 3 and 1)
    assert "[tlkit] warning: imbalanced training split: a has 9 images, c 1 (9.0x)" in out
    assert "head trained on cached features" in out  # the weighted head stage ran on the feature cache
    assert "per class (val, worst F1 first)" in out
    with open(os.path.join(run, "config.yaml")) as f:
        saved = yaml.safe_load(f)
    assert saved["train"]["class_weight"] == [round(19 / 27, 4), round(19 / 27, 4), round(19 / 3, 4)]
    # --resume with the same flags (balanced, resolved to the same numbers) is the same configuration
    assert cli.main(args + ["--resume"]) == 0
    assert "Epoch " not in capsys.readouterr().out
    # the number of weights must match the classes
    assert cli.main(args[:-4] + ["--class-weight", "1,2", "--output-dir", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tlkit: error: class_weight gives 2 weights but the data has 3 classes") and "\n" not in err


def test_cli_rejects_a_bad_class_weight_in_one_line(capsys):
    assert cli.main(["finetune", "--dataset", "shapes", "--class-weight", "heavy"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tlkit: error: class_weight must be none, balanced") and "\n" not in err


def test_tune_trials_train_with_the_resolved_weights_and_ema(tmp_path, tiny_backbone):
    from tlkit.verbs.tune import tune

    images = _imbalanced_folder(tmp_path / "images")
    cfg = C.FinetuneConfig(
        data=C.DataConfig(image_dir=images, image_size=32, augment="none", batch_size=4, val_split=0.25),
        model=C.ModelConfig(base=tiny_backbone, weights="none"),
        train=C.TrainConfig(strategy="two_stage", epochs=1, head_steps=2, unfreeze_stages=1, class_weight="balanced",
                            ema=True, ema_steps=10),  # the weighted head on features, then an averaged image stage
        runtime=C.RuntimeConfig(precision="float32", xla="off"), output_dir=str(tmp_path / "tune"), seed=1)
    result = tune(cfg, V.TuneConfig(tuner="random", max_trials=1, batch_sizes=(4,)))
    assert result.best_config.train.ema and result.best_value is not None
    assert result.best_config.train.class_weight == [round(19 / 27, 4), round(19 / 27, 4), round(19 / 3, 4)]
    with open(tmp_path / "tune" / "best_config.yaml") as f:
        assert yaml.safe_load(f)["train"]["class_weight"][2] == round(19 / 3, 4)
