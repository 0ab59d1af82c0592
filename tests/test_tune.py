"""Tests of tlkit/tune.py and `tlkit tune`: tiny backbone, 32 px `shapes`, one-epoch trials."""
from __future__ import annotations

import csv
import dataclasses
import os
import socket
import subprocess
import sys
import threading

import pytest

import keras
import keras_tuner as kt
import tensorflow as tf

from tlkit import cli
from tlkit.models import schedules
from tlkit.core import config as C
from tlkit.core import config_io
from tlkit.core import verb_configs as V
from tlkit.core.errors import ConfigError
from tlkit.engine.tuner import TlkitTuner, make_oracle
from tlkit.engine.tuning import TlkitHyperModel
from tlkit.verbs.tune import tune

# KerasTuner deep-copies callbacks for every execution: what they see goes to module-level lists.
FITS: list[dict] = []
STARTS: list[int] = []


class Recorder(keras.callbacks.Callback):
    """Records the optimizer's learning rate of every fit and the batch size of every train step."""

    def on_train_begin(self, logs=None):
        model = self.model
        entry = {"lr": schedules.current_lr(model.optimizer), "batch_sizes": [], "lrs": []}
        FITS.append(entry)
        original = type(model).train_step.__get__(model)  # the class's step, not an earlier stage's patch

        def train_step(data):  # the step itself reports the batch it trains on
            n = tf.shape(data[0])[0]
            tf.py_function(lambda v: entry["batch_sizes"].append(int(v)), [n], [])
            return original(data)

        model.train_step = train_step
        model.make_train_function(force=True)  # fit() made it from the unpatched step already

    def on_train_batch_begin(self, batch, logs=None):
        FITS[-1]["lrs"].append(schedules.current_lr(self.model.optimizer))


class FailSome(keras.callbacks.Callback):
    """Raises `errors[i]` at the start of the i-th fit of the test (None: no failure; "nan": the loss that the
    callbacks after this one see becomes NaN)."""

    errors: list = []

    def on_train_begin(self, logs=None):
        STARTS.append(1)
        i = len(STARTS) - 1
        self.nan = i < len(self.errors) and isinstance(self.errors[i], str) and self.errors[i] == "nan"
        if i < len(self.errors) and self.errors[i] is not None and not self.nan:
            raise self.errors[i]

    def on_train_batch_end(self, batch, logs=None):
        if self.nan and logs is not None:
            logs["loss"] = float("nan")

    def on_epoch_end(self, epoch, logs=None):  # a head stage on cached features reports its epoch only
        self.on_train_batch_end(0, logs)


def _cfg(tiny_backbone, out, **train) -> C.FinetuneConfig:
    t = dict(strategy="feature_extraction", epochs=1, schedule="constant", optimizer="adam", lr=1e-3)
    t.update(train)
    return C.FinetuneConfig(
        data=C.DataConfig(dataset="shapes", shapes_per_class=10, image_size=32, augment="none", batch_size=4),
        model=C.ModelConfig(base=tiny_backbone, weights="none"),
        train=C.TrainConfig(**t),
        runtime=C.RuntimeConfig(precision="float32", xla="off"),
        output_dir=str(out), seed=3)


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_random_search_writes_outputs_and_each_trial_trains_with_its_values(tiny_backbone, tmp_path):
    FITS.clear()
    out = tmp_path / "run"
    cfg = _cfg(tiny_backbone, out, strategy="two_stage", head_steps=0, unfreeze_stages=1, lr=2e-3)
    tc = V.TuneConfig(tuner="random", max_trials=3, batch_sizes=(4, 8), lr_range=(1e-4, 1e-1), trial_epochs=1,
                      search="dropout")
    result = tune(cfg, tc, callbacks=[Recorder()])

    rows = _read_csv(out / "trials.csv")
    assert len(rows) == 3 and [r["trial"] for r in rows] == ["0", "1", "2"]
    assert all(r["status"] == "COMPLETED" for r in rows)
    assert {"finetune_lr", "batch_size", "dropout", "val_accuracy", "val_loss", "seconds"} <= set(rows[0])
    assert (out / "objective_vs_lr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "search" / "oracle.json").is_file()

    # Inside every trial (the fine-tuning stage of two_stage): the optimizer runs at the trial's learning
    # rate, on batches of the trial's size (the data really is re-batched).
    assert len(FITS) == 3
    assert len({row["finetune_lr"] for row in rows}) == 3  # each trial drew its own rate (not the default thrice)
    for row, fit in zip(rows, FITS):
        bs, lr = int(row["batch_size"]), float(row["finetune_lr"])
        assert 1e-4 <= lr <= 1e-1
        assert fit["lr"] == pytest.approx(lr, rel=1e-6)
        assert all(v == pytest.approx(lr, rel=1e-6) for v in fit["lrs"])
        assert fit["batch_sizes"] == [bs] * (40 // bs), (bs, fit["batch_sizes"])

    # best_config.yaml holds the best trial's values and is read by `tlkit finetune --config` as it is.
    best = max(rows, key=lambda r: float(r["val_accuracy"]))
    best_path = str(out / "best_config.yaml")
    loaded = cli.config_from_args(cli.build_parser().parse_args(["finetune", "--config", best_path])).validate()
    assert loaded.data.batch_size == int(best["batch_size"])
    assert loaded.model.dropout == pytest.approx(float(best["dropout"]))
    assert loaded.train.lr == 2e-3 and loaded.train.epochs == 1 and loaded.output_dir is None
    assert loaded.train.lr * loaded.train.finetune_lr_scale == pytest.approx(float(best["finetune_lr"]), rel=1e-9)
    assert loaded.model.base == tiny_backbone and loaded.data.image_size == 32
    assert result.best_config == loaded and result.best_value == float(best["val_accuracy"])


def test_failed_trials_are_recorded_and_resume_skips_finished_trials(tiny_backbone, tmp_path, capsys):
    STARTS.clear()
    out = tmp_path / "run"
    cfg = _cfg(tiny_backbone, out)
    tc = V.TuneConfig(tuner="random", max_trials=4, batch_sizes=(4, 8), lr_range=(1e-4, 1e-2), trial_epochs=1)
    FailSome.errors = [None, tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor"),
                       RuntimeError("forced failure"), "nan"]
    result = tune(cfg, tc, callbacks=[FailSome()])
    assert len(STARTS) == 4
    rows = _read_csv(out / "trials.csv")
    assert [r["status"] for r in rows] == ["COMPLETED", "FAILED", "FAILED", "FAILED"]
    assert rows[1]["reason"].startswith(f"out of memory with batch size {rows[1]['batch_size']}")
    assert rows[2]["reason"] == "RuntimeError: forced failure"
    assert rows[3]["reason"].startswith("loss became NaN or infinite in epoch 1")
    assert result.best_value == float(rows[0]["val_accuracy"])
    assert result.best_config.data.batch_size == int(rows[0]["batch_size"])
    assert "trial 2 failed: RuntimeError: forced failure" in capsys.readouterr().out

    # The same command again: nothing left to do, nothing re-run.
    FailSome.errors = []
    tune(cfg, tc, callbacks=[FailSome()])
    assert len(STARTS) == 4
    assert _read_csv(out / "trials.csv") == rows
    # One more trial allowed, interrupted (Ctrl-C, a killed job): it is recorded as such ...
    FailSome.errors = [None] * 4 + [KeyboardInterrupt()]
    with pytest.raises(KeyboardInterrupt):
        tune(cfg, dataclasses.replace(tc, max_trials=5), callbacks=[FailSome()])
    assert len(STARTS) == 5
    rows5 = _read_csv(out / "trials.csv")
    assert rows5[:4] == rows and rows5[4]["status"] == "RUNNING" and "interrupted" in rows5[4]["reason"]
    # ... and resuming runs exactly that trial again; the finished ones keep their values and results.
    # --then-finetune (which may change on resume) then trains the best configuration for real.
    result = tune(cfg, dataclasses.replace(tc, max_trials=5, then_finetune=True), callbacks=[FailSome()])
    assert len(STARTS) == 6
    rows5b = _read_csv(out / "trials.csv")
    assert len(rows5b) == 5 and rows5b[:4] == rows and rows5b[4]["status"] == "COMPLETED"
    assert rows5b[4]["lr"] == rows5[4]["lr"] and rows5b[4]["batch_size"] == rows5[4]["batch_size"]
    assert (out / "finetune" / "model.keras").is_file()
    final = config_io.load_config(out / "finetune" / "config.yaml")
    assert final.train.lr == result.best_config.train.lr and final.data.batch_size == result.best_config.data.batch_size
    # Other settings are refused, not mixed into the old search; --overwrite starts over.
    with pytest.raises(ConfigError, match="lr_range"):
        tune(cfg, dataclasses.replace(tc, lr_range=(1e-3, 1e-1)))
    with pytest.raises(ConfigError, match="batch_size"):
        tune(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=8)), tc)


def test_config_error_inside_a_trial_stops_the_search_at_once(tiny_backbone, tmp_path):
    STARTS.clear()
    FailSome.errors = [ConfigError("something the user must fix"), None, None]
    cfg = _cfg(tiny_backbone, tmp_path / "run")
    with pytest.raises(ConfigError, match="something the user must fix"):
        tune(cfg, V.TuneConfig(tuner="random", max_trials=3, batch_sizes=(4,), trial_epochs=1),
             callbacks=[FailSome()])
    assert len(STARTS) == 1


@pytest.mark.parametrize("flags, message", [
    (["--lr-range", "1e-2", "1e-5"], "lr_range must satisfy 0 < LO < HI"),
    (["--search", "dropout,label_smothing"], "Did you mean 'label_smoothing'"),
    (["--batch-sizes", "4", "64"], "batch size(s) 64 in --batch-sizes are larger than the training set (40"),
    (["--search", "unfreeze_stages"], "needs --strategy two_stage or top_k"),
    (["--val-split", "0"], "tune needs a validation split"),
])
def test_cli_configuration_errors_are_one_line(tiny_backbone, tmp_path, capsys, flags, message):
    argv = ["tune", "--base", tiny_backbone, "--image-size", "32", "--weights", "none", "--dataset", "shapes",
            "--shapes-per-class", "10", "--strategy", "feature_extraction", "--output-dir", str(tmp_path / "r"),
            "--tuner", "random", "--batch-sizes", "4"] + flags
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tlkit: error:") and message in err, err
    assert not (tmp_path / "r" / "trials.csv").exists()


def test_every_tuner_declares_the_space_it_should(tiny_backbone, tmp_path):
    """Oracles and search spaces of all four tuners, without training (the first trial's values)."""
    from tlkit.models import backbones
    from tlkit.core import runtime
    from tlkit.data import load_sources

    cfg = _cfg(tiny_backbone, tmp_path, strategy="two_stage", head_steps=2, epochs=3)
    spec = backbones.get_backbone(cfg.model.base)
    data = load_sources(cfg.data, 32, cfg.seed)
    rt = runtime.setup(cfg.runtime)
    for name in V.TUNERS:
        tc = V.TuneConfig(tuner=name, max_trials=5, lr_range=(1e-4, 1e-1), batch_sizes=(8, 4), grid_points=4,
                          two_stage_lr="both", search="unfreeze_stages,optimizer", trial_epochs=2).validate()
        hm = TlkitHyperModel(cfg, tc, spec, data, 32, rt, num_stages=3)
        tuner = TlkitTuner(make_oracle(tc, 1, hm.total_epochs()), hm, hyperband=name == "hyperband",
                           directory=str(tmp_path), project_name=name)
        space = {hp.name: hp for hp in tuner.oracle.get_space().space}
        assert set(space) == {"lr", "finetune_lr", "batch_size", "unfreeze_stages", "optimizer"}, name
        assert list(space["batch_size"].values) == [4, 8]
        assert (space["unfreeze_stages"].min_value, space["unfreeze_stages"].max_value) == (1, 3)
        values = tuner.oracle.create_trial("t").hyperparameters.values
        assert 1e-4 <= values["lr"] <= 1e-1 and 1e-4 <= values["finetune_lr"] <= 1e-1
        if name == "grid":
            assert list(space["lr"].values) == [1e-4, 1e-3, 1e-2, 1e-1]
        if name == "hyperband":
            assert hm.total_epochs() == 3 and values["tuner/epochs"] >= 1  # the head on cached features: 1
        t = hm.trial_config(values)
        plan = hm.plan(t, values, 3)
        assert [s.name for s in plan] == ["head", "finetune"]
        assert plan[0].lr == values["lr"] and plan[1].lr == values["finetune_lr"]
        assert t.train.unfreeze_stages == values["unfreeze_stages"] and t.train.optimizer == values["optimizer"]
    # KerasTuner clears the session before each build, which resets the dtype policy: build() sets it again.
    rt_mixed = runtime.setup(C.RuntimeConfig(precision="mixed_bfloat16", xla="off"))
    try:
        hm = TlkitHyperModel(cfg, V.TuneConfig(tuner="random", batch_sizes=(4,)), spec, data, 32, rt_mixed,
                             num_stages=3)
        keras.backend.clear_session()
        assert keras.mixed_precision.dtype_policy().name == "float32"
        hp = kt.HyperParameters()
        model = hm.build(hp)
        assert model.get_layer("logits").dtype_policy.name == "mixed_bfloat16"
        assert model.get_layer("probs").dtype_policy.name == "float32"
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    # The default for two_stage: the fine-tuning stage's rate is searched, the warm-up stays at --lr.
    tc = V.TuneConfig(tuner="random", lr_range=(1e-5, 1e-3), batch_sizes=(4,)).validate()
    hm = TlkitHyperModel(cfg, tc, spec, data, 32, rt, num_stages=3)
    values = {"finetune_lr": 3e-5, "batch_size": 4}
    t = hm.trial_config(values, epochs=1)
    assert [(s.name, s.lr, s.epochs, s.passes) for s in hm.plan(t, values, 3)] == [("head", 1e-3, 1, 1),
                                                                               ("finetune", 3e-5, 1, 0)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_chief_and_two_workers_on_loopback(tiny_backbone, tmp_path, monkeypatch, capsys):
    """`tlkit tune` unchanged as KerasTuner's chief (here, in this process: it serves the oracle and writes the
    results) and two worker subprocesses (they run the trials), on 127.0.0.1."""
    out = tmp_path / "run"
    args = ["tune", "--base", tiny_backbone, "--image-size", "32", "--weights", "none", "--dataset", "shapes",
            "--shapes-per-class", "10", "--strategy", "feature_extraction", "--augment", "none", "--precision",
            "float32", "--tuner", "random", "--max-trials", "3", "--trial-epochs", "1", "--batch-sizes", "4", "8",
            "--output-dir", str(out)]
    port = _free_port()
    distributed = dict(KERASTUNER_ORACLE_IP="127.0.0.1", KERASTUNER_ORACLE_PORT=str(port))
    workers = {}
    chief_rc: list[int] = []
    try:
        for tid in ("tuner0", "tuner1"):  # workers wait for the chief to come up
            env = dict(os.environ, KERASTUNER_TUNER_ID=tid, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="",
                       **distributed)
            log = open(tmp_path / f"{tid}.log", "w")
            workers[tid] = (subprocess.Popen([sys.executable, "-m", "tlkit"] + args, env=env, stdout=log,
                                             stderr=subprocess.STDOUT, cwd=tmp_path), log)
        for k, v in dict(distributed, KERASTUNER_TUNER_ID="chief").items():
            monkeypatch.setenv(k, v)
        chief = threading.Thread(target=lambda: chief_rc.append(cli.main(args)), daemon=True)
        chief.start()
        chief.join(timeout=180)
        assert not chief.is_alive(), "the chief did not finish within 180 s"
        for p, _ in workers.values():
            p.wait(timeout=30)
    finally:
        for p, log in workers.values():
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    chief_out = capsys.readouterr().out
    logs = {tid: (tmp_path / f"{tid}.log").read_text() for tid in workers}
    assert chief_rc == [0], chief_out[-3000:]
    for tid, (p, _) in workers.items():
        assert p.returncode == 0, f"{tid} exited {p.returncode}:\n{logs[tid][-3000:]}"
        assert f"worker {tid} done" in logs[tid] and "best configuration" not in logs[tid]
    assert f"oracle serving on 127.0.0.1:{port}" in chief_out and "best configuration" in chief_out
    rows = _read_csv(out / "trials.csv")
    assert len(rows) == 3 and all(r["status"] == "COMPLETED" for r in rows)
    assert {r["worker"] for r in rows} <= {"tuner0", "tuner1"}
    assert config_io.load_config(out / "best_config.yaml").data.batch_size in (4, 8)


def test_search_head_features_too_large_for_memory_are_memory_mapped_and_removed_after(tiny_backbone, tmp_path,
                                                                                        monkeypatch, capsys):
    """The features every trial's head trains on are bounded like finetune's: memory-mapped from the tuner's cache
    folder when they exceed the share of the memory available, and their files removed when the search ends."""
    import numpy as np

    from tlkit.data import cache_policy
    from tlkit.engine import features

    seen = []
    original = features.features_dataset
    monkeypatch.setattr(features, "features_dataset", lambda x, *a, **k: seen.append(type(x)) or original(x, *a, **k))
    monkeypatch.setattr(cache_policy, "available_memory", lambda: 4096)  # 25% of it: 1 KB, less than the features
    out = tmp_path / "run"
    cfg = _cfg(tiny_backbone, out, head_steps=20)
    result = tune(cfg, V.TuneConfig(tuner="random", max_trials=2, batch_sizes=(4,), lr_range=(1e-3, 1e-2),
                                    trial_epochs=1))
    assert "feature cache -> memory-mapped files in" in capsys.readouterr().out
    assert seen and all(t is np.memmap for t in seen)  # every trial's head stage read the mapped files
    rows = _read_csv(out / "trials.csv")
    assert [r["status"] for r in rows] == ["COMPLETED", "COMPLETED"] and result.best_value is not None
    left = [f for _, _, names in os.walk(out / "cache") for f in names if f.endswith(".npy")]
    assert left == []
