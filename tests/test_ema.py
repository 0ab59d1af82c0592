"""Tests of tlkit/engine/ema.py and `--ema`: the average against a hand computation, validation and checkpoints
with the average, early stopping, resume inside a stage, and a fine-tune that saves the averaged model."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import keras
import tensorflow as tf

from conftest import write_image_folder
from tlkit import cli
from tlkit.engine import checkpoints, weights_format
from tlkit.engine import ema


def _data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 5)).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, n)]
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(4), x, y


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, activation="softmax")])


def _compile(model, ema_steps, lr=0.1, opt="sgd"):
    base = keras.optimizers.SGD(lr) if opt == "sgd" else keras.optimizers.Adam(lr)
    model.compile(optimizer=ema.with_ema(base, ema_steps), loss="categorical_crossentropy")


class _Raw(keras.callbacks.Callback):
    """The model's (raw, trained) weights after every batch."""

    def __init__(self):
        super().__init__()
        self.after = []

    def on_train_batch_end(self, batch, logs=None):
        self.after.append([w.copy() for w in self.model.get_weights()])


def test_decay_is_stated_in_steps_and_warmed_up():
    assert ema.ema_decay(0, 1000) == 0.0
    assert ema.ema_decay(1, 1000) == pytest.approx(2 / 11)
    assert ema.ema_decay(10_000, 1000) == pytest.approx(1 - 1 / 1000)
    assert ema.ema_decay(10_000, 50) == pytest.approx(0.98)


def test_ema_weights_equal_the_hand_computed_average_after_a_few_steps():
    ds, _, _ = _data()
    model = _model()
    _compile(model, ema_steps=3)
    raw = _Raw()
    model.fit(ds, epochs=1, callbacks=[raw, ema.EMAWeights()], verbose=0, shuffle=False)
    assert len(raw.after) == 4
    average = [w.copy() for w in raw.after[0]]  # d_0 = 0: the first updated weights
    for t in range(1, 4):
        d = min(1 - 1 / 3, (1 + t) / (10 + t))
        average = [d * a + (1 - d) * w for a, w in zip(average, raw.after[t])]
    for got, want in zip(model.get_weights(), average):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(model.get_weights()[0], raw.after[-1][0])  # the average, not the last weights


def test_validation_and_the_epoch_end_see_the_average():
    ds, x, y = _data()
    model = _model()
    _compile(model, ema_steps=4)
    seen = {}

    class AtEpochEnd(keras.callbacks.Callback):  # where the checkpointer sits: after EMAWeights
        def on_epoch_end(self, epoch, logs=None):
            seen[epoch] = ([w.copy() for w in self.model.get_weights()], logs["val_loss"])

    model.fit(ds, validation_data=ds, epochs=2, callbacks=[ema.EMAWeights(), AtEpochEnd()], verbose=0, shuffle=False)
    for epoch in (0, 1):
        weights, val_loss = seen[epoch]
        probe = _model()
        probe.set_weights(weights)
        probe.compile(loss="categorical_crossentropy")
        assert probe.evaluate(ds, verbose=0) == pytest.approx(val_loss, rel=1e-5)  # what was saved was validated
    for got, want in zip(model.get_weights(), seen[1][0]):
        np.testing.assert_array_equal(got, want)  # fit ends with the average in the model


def test_early_stopping_ends_with_the_average_in_the_model():
    ds, _, _ = _data()
    model = _model()
    _compile(model, ema_steps=4)
    seen = []

    class Stop(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            self.model.stop_training = True

    class AtEpochEnd(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append([w.copy() for w in self.model.get_weights()])

    model.fit(ds, epochs=3, callbacks=[Stop(), ema.EMAWeights(), AtEpochEnd()], verbose=0, shuffle=False)
    assert len(seen) == 1
    for got, want in zip(model.get_weights(), seen[0]):
        np.testing.assert_array_equal(got, want)


def test_resume_inside_a_stage_continues_the_same_average(tmp_path):
    ds, _, _ = _data()
    saved = {}

    class Save(keras.callbacks.Callback):  # the checkpointer's job, after EMAWeights
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                weights_format.save_weights(self.model, str(tmp_path / "e1.weights.h5"))
                checkpoints.save_optimizer(self.model.optimizer, str(tmp_path / "e1.optimizer.npz"))
                saved["w"] = [w.copy() for w in self.model.get_weights()]

    ref = _model()
    _compile(ref, ema_steps=5, lr=0.05, opt="adam")
    ref.fit(ds, epochs=2, callbacks=[ema.EMAWeights(), Save()], verbose=0, shuffle=False)

    again = _model(seed=7)  # other initial weights: all that matters comes from the checkpoint
    _compile(again, ema_steps=5, lr=0.05, opt="adam")
    weights_format.load_weights(again, str(tmp_path / "e1.weights.h5"))
    assert checkpoints.restore_optimizer(again, str(tmp_path / "e1.optimizer.npz")) == 4
    again.fit(ds, epochs=2, initial_epoch=1, callbacks=[ema.EMAWeights(resumed=True)], verbose=0, shuffle=False)
    for got, want in zip(again.get_weights(), ref.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert int(again.optimizer._ema_updates.numpy()) == 8


def test_finetune_with_ema_saves_the_averaged_model_and_resumes(tmp_path, tiny_backbone, capsys, monkeypatch):
    images = write_image_folder(tmp_path / "images", classes=("a", "b"), per_class=8)
    run = str(tmp_path / "run")
    # no head stage, two image epochs of 3 steps, discriminative learning rates (the optimizer mixins compose)
    args = ["finetune", "--base", tiny_backbone, "--weights", "none", "--image-dir", images, "--image-size", "32",
            "--val-split", "0.25", "--batch-size", "4", "--strategy", "top_k", "--unfreeze-stages", "1",
            "--epochs", "2", "--augment", "none", "--lr", "0.01", "--lr-mult", "0.5", "--ema", "--ema-steps", "20",
            "--output-dir", run]
    original = checkpoints.Checkpointer.on_train_batch_end

    def interrupt_in_epoch_2(self, batch, logs=None):
        if self.last is not None and self.last.epoch == 1:
            raise KeyboardInterrupt
        original(self, batch, logs)

    monkeypatch.setattr(checkpoints.Checkpointer, "on_train_batch_end", interrupt_in_epoch_2)
    assert cli.main(args) == 130
    monkeypatch.undo()
    first = []

    def record(self, batch, logs=None):  # the resumed epoch trains on from the raw weights, not from the average
        if not first:
            with np.load(os.path.join(self.dir, self.last.optimizer)) as opt:
                saved = [opt[k] for k in opt.files]
            first.append([(v.numpy(), saved) for v in self.model.trainable_variables])

    monkeypatch.setattr(checkpoints.Checkpointer, "on_train_batch_begin", record, raising=False)
    assert cli.main(args + ["--resume"]) == 0
    monkeypatch.undo()
    capsys.readouterr()
    assert first and all(any(a.shape == w.shape and np.array_equal(a, w) for a in saved) for w, saved in first[0])
    state = checkpoints.load_state(run)
    assert state.epoch == 2
    with np.load(os.path.join(run, "checkpoints", state.optimizer)) as opt:
        counts = [int(opt[k]) for k in sorted(opt.files) if opt[k].dtype == np.int64]
    assert counts == [6, 6]  # iterations and EMA updates: 2 epochs x 3 steps, carried through the resume

    # model.keras is the best epoch's averaged weights: it scores what validation logged for that epoch.
    from tlkit.core.config import DataConfig
    from tlkit.data import load_sources, make_dataset

    model = keras.models.load_model(os.path.join(run, "model.keras"), compile=False)
    data = load_sources(DataConfig(image_dir=images, val_split=0.25, image_size=32), 32, 42)
    val = make_dataset(data.val, 32, 4, 2)
    model.compile(loss=keras.losses.CategoricalCrossentropy(label_smoothing=0.1))
    best = state.history[state.best_epoch - 1]
    assert model.evaluate(val, verbose=0) == pytest.approx(best["val_loss"], rel=1e-4)
    with open(os.path.join(run, "metrics.json")) as f:
        assert json.load(f)["epochs"] == 2
