"""The `auto` recipe's decisions (tlkit/engine/adapt.py), each provoked by construction."""
from __future__ import annotations

import os

import numpy as np
import pytest

import tlkit
from tlkit.core.config import DataConfig, FinetuneConfig, ModelConfig, RuntimeConfig, TrainConfig
from tlkit.data import load_sources
from tlkit.engine import adapt


def _stripes(root: str, per_class: int, seed: int) -> None:
    """Two classes that a horizontal flip swaps: stripes rising to the right (`/`) and falling (`\\`)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32]
    for name, sign in (("rising", 1), ("falling", -1)):
        d = os.path.join(root, name)
        os.makedirs(d, exist_ok=True)
        for i in range(per_class):
            phase, period = rng.uniform(0, 2 * np.pi), rng.uniform(5, 8)
            wave = np.sin(2 * np.pi * (xx + sign * yy) / (period * np.sqrt(2)) + phase)
            img = 127 + 100 * wave + rng.normal(0, 10, wave.shape)
            arr = np.repeat(np.clip(img, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
            Image.fromarray(arr).save(os.path.join(d, f"{i:03d}.png"))


def test_augment_auto_refuses_a_flip_that_changes_the_class(tmp_path, tiny_backbone):
    """A flip turns `/` into `\\`: the converged probe calls every flipped training image the other class, so the
    flip is refused; crops and small rotations keep the stripes' direction, so the crop presets pass."""
    for split, n, seed in (("train", 24, 0), ("val", 12, 1), ("test", 8, 2)):
        _stripes(str(tmp_path / "data" / split), n, seed)
    cfg = FinetuneConfig(data=DataConfig(image_dir=str(tmp_path / "data"), image_size=32, augment="none"),
                         model=ModelConfig(base=tiny_backbone, weights="none"),
                         train=TrainConfig(strategy="feature_extraction", head_steps=200),
                         runtime=RuntimeConfig(precision="float32", xla="off"), output_dir=str(tmp_path / "run"),
                         seed=0)
    r = tlkit.finetune(cfg)
    probe_val = r.metrics["val"]["accuracy"]
    assert probe_val >= 0.9  # the probe separates the two directions
    split = load_sources(cfg.data, 32, 0).train
    preset, flip, evidence = adapt.choose_augment(r.model, split, 32, 2, 16, probe_val, seed=0)
    # The check flips each image with probability 1/2, as training would: the flipped half is called the other class
    assert flip is False and evidence["flip"] <= 0.6, evidence
    assert preset in ("standard", "light") and evidence[preset] >= probe_val, evidence


def test_candidates_span_probe_to_the_whole_net_at_the_head_rate():
    from tlkit.models.strategies import plan

    cfg = FinetuneConfig(data=DataConfig(dataset="shapes"))
    stage = plan(cfg.train, 5, steps_per_epoch=4, head_on_features=True)[1]
    names = [(c.name, None if c.trainable is None else sorted(c.trainable), c.lr)
             for c in adapt.candidates(stage, cfg, 5)]
    assert names == [("top2", [3, 4], 1e-4), ("all", None, 1e-4), ("all_fast", None, 1e-3)]


def test_probe_accuracy_read_by_chunks_equals_the_whole_arrays(tiny_backbone):
    """The probe is scored chunk by chunk (memory-mapped features stay on disk): the same figure as at once."""
    from tlkit.core.config import ModelConfig
    from tlkit.models.backbones import get_backbone
    from tlkit.models.classifier import build_classifier, split_model

    model = build_classifier(get_backbone(tiny_backbone), 3, ModelConfig(base=tiny_backbone, weights="none"), 32)
    _, head = split_model(model)
    rng = np.random.default_rng(0)
    head.get_layer("logits").set_weights([rng.normal(size=w.shape).astype("float32")
                                          for w in head.get_layer("logits").get_weights()])
    x = rng.normal(size=(50, int(head.input_shape[-1]))).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, 50)]
    whole = float(np.mean(np.asarray(head.predict(x, verbose=0)).argmax(-1) == y.argmax(-1)))
    assert 0 < whole < 1
    assert adapt._probe_accuracy(head, x, y, rows=7) == pytest.approx(whole)
    assert adapt._probe_accuracy(head, x, y) == pytest.approx(whole)


def test_trial_warmup_ramps_each_trial_from_a_hundredth_of_its_rate(tmp_path, tiny_backbone, monkeypatch):
    """`trial_warmup`: every trial's rate rises linearly from rate/100 over that share of its steps, then holds."""
    from conftest import write_image_folder

    from tlkit.engine import loop
    from tlkit.models import schedules

    seen: dict[int, list[float]] = {}

    class Recording(loop.NaNGuard):  # every fit of the run has one: the rate each step starts with, per optimizer
        def on_train_batch_begin(self, batch, logs=None):
            seen.setdefault(id(self.model.optimizer), []).append(schedules.current_lr(self.model.optimizer))

    monkeypatch.setattr(loop, "NaNGuard", Recording)
    root = write_image_folder(tmp_path / "img", classes=("r", "g"), per_class=12, size=(36, 36))
    cfg = FinetuneConfig(data=DataConfig(image_dir=root, image_size=32, batch_size=4, augment="none", val_split=0.25),
                         model=ModelConfig(base=tiny_backbone, weights="none"),
                         train=TrainConfig(strategy="auto", head_steps=10, finetune_steps=50, trial_warmup=0.5),
                         runtime=RuntimeConfig(precision="float32", xla="off"), output_dir=str(tmp_path / "run"),
                         seed=0)
    r = tlkit.finetune(cfg)
    trials = r.metrics["recipe"]["trials"]
    assert len(trials) >= 2
    for t in trials:
        steps, lr, warm = t["steps"], t["lr"], t["warmup_steps"]
        assert warm == round(0.5 * steps) and warm >= 2
        runs = [v for v in seen.values() if len(v) == steps and v[0] == pytest.approx(lr / 100, rel=1e-4)]
        assert runs, (t, [(len(v), v[0]) for v in seen.values()])
        rates = runs[0]
        assert all(b > a for a, b in zip(rates[:warm], rates[1:warm + 1]))  # rising through the warm-up
        np.testing.assert_allclose(rates[warm:], lr, rtol=1e-5)  # then the trial's rate
