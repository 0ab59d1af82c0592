"""tlkit/lr_find.py: the LR range test, its suggestions, exact weight restore, `tlkit lr-find`, `--lr auto`."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import yaml

import importlib

from tlkit.engine import plots
from tlkit.cli import main
from tlkit.core.config import DataConfig, FinetuneConfig, ModelConfig, TrainConfig
from tlkit.core.config_io import config_from_dict
from tlkit.core.errors import ConfigError
from test_plots import png_size, px
from conftest import write_image_folder

LF = importlib.import_module("tlkit.engine.lr_range")


def test_schedule_is_exponential_between_the_ends():
    lrs = LF.lr_schedule(1e-6, 1.0, 13)
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0)
    np.testing.assert_allclose(np.diff(np.log10(lrs)), 0.5)


def test_suggestions_on_a_known_curve():
    lrs = np.logspace(-6, 0, 61)
    x = np.log10(lrs)
    # Flat, then falling fastest at 1e-3, a minimum near 1e-2, then diverging.
    loss = 2.0 - np.tanh(2 * (x + 3)) + np.where(x > -1.5, 10 * (x + 1.5) ** 2, 0.0)
    steep = lrs[LF.suggest_steepest(lrs, loss)]
    assert 10 ** -3.2 <= steep <= 10 ** -2.8
    valley = lrs[LF.suggest_valley(lrs, loss)]
    assert 1e-4 < valley < 3e-2  # inside the descending stretch, before the divergence
    s = LF.suggestions_for(lrs.tolist(), loss)
    assert set(s) == {"valley", "steepest"} and all(1e-6 <= v <= 1 for v in s.values())


def test_smoothing_is_debiased():
    np.testing.assert_allclose(LF.smooth([2.0, 2.0, 2.0], 0.98), [2.0, 2.0, 2.0])
    assert LF.smooth([1.0, 3.0], 0.5)[1] == pytest.approx((0.25 * 1 + 0.5 * 3) / 0.75)


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("lr") / "img", classes=("r", "g", "b"), per_class=8,
                              size=(32, 32))


def tiny_cfg(tiny_backbone, folder, **train) -> FinetuneConfig:
    return FinetuneConfig(data=DataConfig(image_dir=folder, image_size=32, batch_size=6, augment="none"),
                          model=ModelConfig(base=tiny_backbone, weights="none"),
                          train=TrainConfig(**{"strategy": "full", "epochs": 1, **train}))


def test_find_lr_returns_lr_in_range_and_restores_weights_exactly(tiny_backbone, colour_folder, tmp_path):
    from tlkit.models import backbones
    from tlkit.data import load_sources, make_dataset
    from tlkit.models.classifier import Classifier, build_classifier, get_base

    cfg = tiny_cfg(tiny_backbone, colour_folder)
    spec = backbones.get_backbone(tiny_backbone)
    data = load_sources(cfg.data, 32, cfg.seed)
    model = build_classifier(spec, 3, cfg.model, 32)
    base = get_base(model)
    base.get_layer("s0_conv").trainable = False  # a user's own freezing must survive
    before = [w.copy() for w in model.get_weights()]
    flags = [layer.trainable for layer in base.layers]
    ds = make_dataset(data.train, 32, 6, 3, training=True, cache="none")
    r = LF.find_lr(Classifier(model, spec), cfg, ds, 3, start_lr=1e-5, end_lr=1.0, num_steps=20, output_dir=str(tmp_path),
                   verbose=0)
    assert r.suggestion in r.lrs and r.suggestions["steepest"] in r.lrs  # chosen from the rates it tried
    assert r.suggestion < r.lrs[-1]  # the valley lies below the largest rate
    assert r.suggestion == r.suggestions["valley"] and r.stage == "full"
    assert len(r.lrs) == len(r.losses) == len(r.smoothed) == int(model.optimizer.iterations.numpy()) > 5
    assert r.lrs[0] == pytest.approx(1e-5)
    after = model.get_weights()
    assert len(after) == len(before)
    for a, b in zip(after, before):
        np.testing.assert_array_equal(a, b)  # bit-exact, BatchNorm statistics included
    assert [layer.trainable for layer in base.layers] == flags
    assert png_size(tmp_path / "lr_find.png") == px(plots.LR_FIND_SIZE)
    saved = json.load(open(tmp_path / "lr_find.json"))
    assert saved["suggestion"] == r.suggestion and len(saved["lrs"]) == len(r.lrs)

    # A range far too high: the loss diverges, the run stops early, and the weights still come back.
    sgd = tiny_cfg(tiny_backbone, colour_folder, optimizer="sgd")
    r = LF.find_lr(Classifier(model, spec), sgd, ds, 3, start_lr=1e-3, end_lr=1e6, num_steps=30, verbose=0)
    assert r.diverged and len(r.lrs) < 30
    assert r.suggestion < r.lrs[-1]
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)


def test_cli_lr_find_and_bad_input(tiny_backbone, colour_folder, tmp_path, capsys):
    out = tmp_path / "lf"
    rc = main(["lr-find", "--base", tiny_backbone, "--weights", "none", "--image-dir", colour_folder, "--image-size",
               "32", "--batch-size", "6", "--strategy", "two_stage", "--num-steps", "20", "--start-lr", "1e-5",
               "--end-lr", "1", "--output-dir", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "suggested --lr" in printed and "stage 'head'" in printed
    lr = float(printed.split("suggested --lr ")[1].split()[0])
    assert 1e-5 <= lr <= 1
    assert png_size(out / "lr_find.png") == (700, 450)
    assert json.load(open(out / "lr_find.json"))["stage"] == "head"
    common = ["--base", tiny_backbone, "--weights", "none", "--image-dir", colour_folder, "--image-size", "32",
              "--batch-size", "6"]
    for extra, words in ((["--start-lr", "1", "--end-lr", "0.1"], "end_lr"), (["--num-steps", "2"], "num_steps")):
        assert main(["lr-find", *common, *extra]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1


def test_lr_auto_in_config_flags_and_yaml(tmp_path, capsys):
    assert config_from_dict({"lr": "auto"}).train.lr == "auto"
    assert config_from_dict({"train": {"lr": "3e-4"}}).train.lr == pytest.approx(3e-4)
    with pytest.raises(ConfigError, match="positive number or 'auto'"):
        config_from_dict({"lr": "fast", "dataset": "shapes"}).validate()
    assert main(["finetune", "--dataset", "shapes", "--lr", "fast"]) == 2
    assert "got 'fast'" in capsys.readouterr().err


def test_finetune_lr_auto_runs_the_finder_and_saves_the_number(tiny_backbone, colour_folder, tmp_path, capsys,
                                                               monkeypatch):
    real = LF.resolve_auto_lr
    calls = []

    def fewer_steps(*args, **kwargs):  # the real finder, with 15 steps instead of 100 to keep the test short
        calls.append(1)
        return real(*args, num_steps=15, start_lr=1e-5, end_lr=1.0, **kwargs)

    monkeypatch.setattr(LF, "resolve_auto_lr", fewer_steps)
    out = tmp_path / "run"
    rc = main(["finetune", "--base", tiny_backbone, "--weights", "none", "--image-dir", colour_folder,
               "--image-size", "32", "--batch-size", "6", "--strategy", "full", "--epochs", "1", "--augment", "none",
               "--lr", "auto", "--output-dir", str(out)])
    assert rc == 0 and calls == [1]
    printed = capsys.readouterr().out
    saved = yaml.safe_load(open(out / "config.yaml"))
    lr = saved["train"]["lr"]
    assert isinstance(lr, float) and 1e-5 <= lr <= 1.0
    assert f"using lr {lr:g}" in printed
    finder = json.load(open(out / "lr_find.json"))
    assert finder["stage"] == "full" and lr == pytest.approx(finder["suggestion"], rel=1e-2)
    assert (out / "lr_find.png").is_file() and (out / "curves.png").is_file()
    metrics = json.load(open(out / "metrics.json"))
    assert [s["lr"] for s in metrics["stages"]] == pytest.approx([lr])
    assert "overfitting" not in metrics  # one epoch: nothing to call


def test_the_suggestion_is_the_first_stage_lr():
    # --lr is the head's LR; when the first stage runs at a multiple of it, lr = suggestion / multiple.
    stage, factor = LF.pick_stage(TrainConfig(strategy="two_stage", head_steps=2), 4)
    assert (stage.name, factor) == ("head", 1.0)
    stage, factor = LF.pick_stage(TrainConfig(strategy="two_stage", head_steps=0, finetune_lr_scale=0.1), 4)
    assert (stage.name, factor) == ("finetune", pytest.approx(0.1))
    stage, factor = LF.pick_stage(TrainConfig(strategy="gradual", epochs=3), 4, stage="unfreeze_2")
    assert stage.trainable == frozenset({2, 3}) and factor == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="Its stages: head, unfreeze_1"):
        LF.pick_stage(TrainConfig(strategy="gradual", epochs=2), 4, stage="finetune")
    with pytest.raises(ConfigError, match="must be resolved"):
        from tlkit.models import strategies

        strategies.plan(TrainConfig(lr="auto"), 4)
