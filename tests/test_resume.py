"""Fault injection: a real `python -m tlkit finetune` is SIGKILLed mid-epoch, resumed with the same command +
`--resume`, interrupted with Ctrl-C (SIGINT), resumed again with the command it printed; the result matches an
uninterrupted run. Tests `tlkit/engine/{checkpoints,weights_format,interrupts,resume}.py` and their use in
`tlkit/engine/loop.py`.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from conftest import write_image_folder
from tlkit import cli
from tlkit.core import rundir
from tlkit.engine import checkpoints, interrupts, loop, resume, weights_format
from tlkit.core.config import DataConfig, FinetuneConfig, TrainConfig
from tlkit.core.config_io import config_to_dict, dump_yaml
from tlkit.core.errors import ConfigError, OutputExistsError

# Imported by the child interpreter (PYTHONPATH): once epoch 1's checkpoint is on disk, the child stops
# inside epoch 2, after its first training batch, and waits there to be killed.
SITECUSTOMIZE = '''
import os
_flag = os.environ.get("TLKIT_TEST_PAUSE_FLAG")
if _flag:
    import time
    import tlkit.engine.checkpoints as _r

    def _on_train_batch_end(self, batch, logs=None):
        if self.last is not None and self.last.epoch == 1:
            open(_flag, "w").close()
            time.sleep(300)

    _r.Checkpointer.on_train_batch_end = _on_train_batch_end
'''


def _history(run):
    with open(os.path.join(run, "history.csv"), encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _files(run):
    out = set()
    for dirpath, _, names in os.walk(run):
        out |= {os.path.relpath(os.path.join(dirpath, n), run) for n in names}
    return out


def _in(folder, fn, *args):
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        return fn(*args)
    finally:
        os.chdir(cwd)


def test_sigkill_sigint_resume_matches_uninterrupted(tmp_path, tiny_backbone, capsys, monkeypatch):
    images = write_image_folder(tmp_path / "images", per_class=6)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    work = tmp_path / "work"  # the working directory: nothing may be written here but the run folders
    work.mkdir()
    args = ["finetune", "--base", tiny_backbone, "--image-size", "32", "--weights", "none", "--image-dir", images,
            "--batch-size", "4", "--val-split", "0.25", "--head-steps", "4", "--epochs", "1", "--augment", "none",
            "--lr", "0.01", "--seed", "3", "--no-cache-features",  # the head stage on images: 2 epochs of 2 steps
            "--strategy", "two_stage"]  # a fixed plan (auto's trials may end the run after the head stage)
    ref, run = str(work / "ref"), str(work / "run")

    # 1. A real subprocess, SIGKILLed inside epoch 2, after epoch 1's checkpoint.
    flag = tmp_path / "paused"
    env = dict(os.environ, PYTHONPATH=str(hook) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TLKIT_TEST_PAUSE_FLAG=str(flag))
    proc = subprocess.Popen([sys.executable, "-m", "tlkit", *args, "--output-dir", "run"], env=env, cwd=work,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not flag.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (rc {proc.returncode}) before it was killed:\n{out[-2000:]}\n{err[-3000:]}")
        if time.time() - t0 > 300:
            proc.kill()
            pytest.fail("the child never reached epoch 2")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(run, "model.keras"))
    assert checkpoints.load_state(run).epoch == 1
    assert len(_history(run)) == 1

    # 2. The same command + --resume; Ctrl-C (a real SIGINT to this process) inside epoch 3.
    original = checkpoints.Checkpointer.on_train_batch_end

    def interrupt_in_epoch_3(self, batch, logs=None):
        if self.last is not None and self.last.epoch == 2:
            signal.raise_signal(signal.SIGINT)
        original(self, batch, logs)

    monkeypatch.setattr(checkpoints.Checkpointer, "on_train_batch_end", interrupt_in_epoch_3)
    capsys.readouterr()
    assert _in(work, cli.main, args + ["--output-dir", "run", "--resume"]) == 130
    out, err = capsys.readouterr()
    monkeypatch.undo()
    assert "resuming run after epoch 1" in out
    assert "SIGINT: stopping after the current batch" in out
    assert err.startswith("tlkit: interrupted (SIGINT); epoch 2 is the last one saved"), err
    command = err.split("Resume with:\n", 1)[1].strip()
    assert command.startswith("tlkit finetune ") and command.endswith("--output-dir run --resume")
    state = checkpoints.load_state(run)
    assert (state.epoch, state.stage_name, state.stage_done) == (2, "head", True)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers put back

    # 3. The printed command finishes the run; then an uninterrupted reference run.
    assert _in(work, cli.main, shlex.split(command)[1:]) == 0
    assert _in(work, cli.main, args + ["--output-dir", "ref"]) == 0
    capsys.readouterr()

    # Same outputs: files, epochs and stages, learning rates (the schedule continued), metrics' structure. (A
    # resumed process writes the frozen layers of its stage once more, under the epoch it resumed at.)
    frozen = lambda files: {re.sub(r"frozen-\d+", "frozen-N", f) for f in files}  # noqa: E731
    assert frozen(_files(run)) == frozen(_files(ref))
    assert sorted(os.listdir(work)) == ["ref", "run"]  # nothing written outside the run folders
    assert not [f for f in _files(run) if os.path.basename(f).startswith(".")], "a temporary file was left"
    h_run, h_ref = _history(run), _history(ref)
    assert [(r["epoch"], r["stage"]) for r in h_run] == [(r["epoch"], r["stage"]) for r in h_ref] == [
        ("1", "head"), ("2", "head"), ("3", "finetune")]
    for a, b in zip(h_run, h_ref):
        assert float(a["lr"]) == pytest.approx(float(b["lr"]), rel=1e-5), (a, b)
    with open(os.path.join(run, "metrics.json")) as f:
        m_run = json.load(f)
    with open(os.path.join(ref, "metrics.json")) as f:
        m_ref = json.load(f)
    assert set(m_run) == set(m_ref) and m_run["epochs"] == m_ref["epochs"] == 3
    assert m_run["stages"] == m_ref["stages"]
    assert checkpoints.load_state(run).epoch == checkpoints.load_state(ref).epoch == 3
    import keras

    model = keras.models.load_model(os.path.join(run, "model.keras"), compile=False, safe_mode=True)
    assert model.output_shape == (None, 2)

    # 4. --resume of a finished run trains nothing and rewrites the same outputs.
    before = _history(run)
    assert _in(work, cli.main, args + ["--output-dir", "run", "--resume"]) == 0
    assert "Epoch " not in capsys.readouterr().out
    assert _history(run) == before


def test_resume_refuses_a_changed_config(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    cfg = FinetuneConfig(data=DataConfig(dataset="shapes"), train=TrainConfig(epochs=3), output_dir=str(run))
    (run / "config.yaml").write_text(dump_yaml(config_to_dict(cfg)))
    (run / "checkpoints" / "state.json").write_text("{}")
    changed = dataclasses.replace(cfg, train=TrainConfig(epochs=5), resume=True)
    with pytest.raises(ConfigError, match="epochs: 3 -> 5"):
        resume.open_run_dir(str(run), changed)
    # Without --resume or --overwrite the folder is refused, with a hint to resume.
    with pytest.raises(OutputExistsError, match="--resume to continue it"):
        rundir.check_output_dir(str(run), overwrite=False, resume=False)
    with pytest.raises(ConfigError, match="--resume needs --output-dir"):
        rundir.check_output_dir(None, overwrite=False, resume=True)


def test_sigterm_message_and_exit_code():
    err = interrupts.Interrupted(signal.SIGTERM, "runs/x", 3)
    assert err.exit_code == 143
    text = resume.interrupt_message(err, ["finetune", "--dataset", "shapes"])
    assert text.startswith("tlkit: interrupted (SIGTERM); epoch 3 is the last one saved")
    assert text.endswith("tlkit finetune --dataset shapes --output-dir runs/x --resume")


def test_nan_message_names_the_cause():
    from tlkit.models.strategies import Stage
    import keras

    opt = keras.optimizers.Adam(0.5)
    text = loop.nan_message(3, Stage("finetune", 4, 0.5, frozenset({1})), opt, "mixed_float16")
    assert text.startswith("The loss became NaN or infinite in epoch 3 (stage 'finetune', learning rate 0.5")
    assert "mixed_float16 overflowed: use --precision float32" in text
    assert "overflowed" not in loop.nan_message(3, Stage("head", 4, 0.5, frozenset()), opt, "float32")


def test_resume_keeps_the_learning_rate_the_finder_found(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    found = FinetuneConfig(data=DataConfig(dataset="shapes"), train=TrainConfig(lr=0.0123), output_dir=str(run))
    (run / "config.yaml").write_text(dump_yaml(config_to_dict(found)))
    (run / "checkpoints" / "state.json").write_text("{}")
    again = dataclasses.replace(found, train=dataclasses.replace(found.train, lr="auto"), resume=True)
    assert resume.open_run_dir(str(run), again).train.lr == 0.0123  # not searched again


def test_interrupt_outside_training_still_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    argv = ["finetune", "--dataset", "shapes", "--output-dir", str(run)]
    assert resume.interrupt_message(KeyboardInterrupt(), argv) == "tlkit: interrupted (SIGINT)."
    (run / "checkpoints" / "state.json").write_text("{}")  # unreadable state: 0 epochs, but resumable
    text = resume.interrupt_message(KeyboardInterrupt(), argv)
    assert "no epoch had finished yet" in text and text.endswith(f"--output-dir {run} --resume")


def test_resume_clears_a_killed_runs_cache_lock_and_overwrite_clears_old_state(tmp_path):
    run = tmp_path / "run"
    (run / "cache").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    for name in ("train_0.lockfile", "train_0.data-00000-of-00001.tempstate123", "eval.index"):
        (run / "cache" / name).write_text("x")
    (run / "checkpoints" / "best.weights.h5").write_text("x")
    cfg = FinetuneConfig(data=DataConfig(dataset="shapes"), output_dir=str(run), resume=True)
    resume.open_run_dir(str(run), cfg)  # no state.json yet: resumable from the start
    assert sorted(os.listdir(run / "cache")) == ["eval.index"]  # a finished cache stays
    assert (run / "checkpoints" / "best.weights.h5").exists()
    resume.open_run_dir(str(run), dataclasses.replace(cfg, resume=False, overwrite=True))
    assert not (run / "cache").exists() and not (run / "checkpoints").exists()


def _tiny_compiled_model():
    import keras
    import numpy as np

    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(keras.layers.Dense(3)(inp)))
    from tlkit.models.schedules import StageSchedule

    model.compile(optimizer=keras.optimizers.Adam(StageSchedule("cosine", 0.1, total_steps=10)),
                  loss="categorical_crossentropy")
    x, y = np.random.default_rng(0).normal(size=(8, 4)), np.eye(2)[[0, 1] * 4]
    return model, x, y


def test_where_each_stage_of_a_resumed_plan_starts():
    def state(stage_index, stage_epoch, stage_done):
        return checkpoints.RunState(stage_index=stage_index, stage_name="s", stage_epoch=stage_epoch,
                                    stage_done=stage_done, epoch=5, best=None, best_epoch=None, monitor="accuracy",
                                    history=[], weights="epoch-0005.weights.h5", optimizer="epoch-0005.optimizer.npz",
                                    early_stopping={"wait": 1, "best": 0.5})

    inside = state(1, 2, False)  # two epochs of stage 1 done: stage 0 is skipped, stage 1 continues after them
    assert inside.start_of(0) == checkpoints.StageStart(done=True)
    start = inside.start_of(1)
    assert (start.done, start.epochs_done, start.from_checkpoint) == (False, 2, True)
    assert (start.weights, start.optimizer) == ("epoch-0005.weights.h5", "epoch-0005.optimizer.npz")
    assert start.early_stopping == {"wait": 1, "best": 0.5}
    assert inside.start_of(2) == checkpoints.StageStart() and not inside.finished(3)
    between = state(1, 4, True)  # stage 1 over: stage 2 starts from its weights, with a fresh optimizer
    assert between.start_of(1).done and between.start_of(2).optimizer is None
    assert between.start_of(2).weights == "epoch-0005.weights.h5" and between.finished(2)
    assert checkpoints.stage_start(None, 0) == checkpoints.StageStart()


def test_optimizer_state_and_schedule_step_survive_a_restore(tmp_path):
    import numpy as np

    model, x, y = _tiny_compiled_model()
    model.fit(x, y, batch_size=2, epochs=1, verbose=0)  # 4 steps
    checkpoints.save_optimizer(model.optimizer, str(tmp_path / "opt.npz"))
    weights_format.save_weights(model, str(tmp_path / "w.weights.h5"))
    fresh, _, _ = _tiny_compiled_model()
    weights_format.load_weights(fresh, str(tmp_path / "w.weights.h5"))
    assert checkpoints.restore_optimizer(fresh, str(tmp_path / "opt.npz")) == 4
    for a, b in zip(model.optimizer.variables, fresh.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(fresh.optimizer.learning_rate) == pytest.approx(float(model.optimizer.learning_rate))
    with pytest.raises(Exception, match="does not match"):  # another optimizer: refused, not silently wrong
        import keras

        other, _, _ = _tiny_compiled_model()
        other.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="categorical_crossentropy")
        checkpoints.restore_optimizer(other, str(tmp_path / "opt.npz"))


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    import numpy as np

    from tlkit.core.errors import DiskFullError
    from tlkit.models.strategies import Stage

    model, x, y = _tiny_compiled_model()
    model.fit(x, y, batch_size=2, epochs=1, verbose=0)
    ckpt = checkpoints.Checkpointer(str(tmp_path), "accuracy", [{"epoch": 1}])
    ckpt.set_model(model)
    ckpt.begin_stage(0, Stage("head", 3, 0.1, frozenset()), 0, [])
    ckpt.save(1)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    with pytest.raises(DiskFullError, match="epoch-0002.optimizer.npz"):
        ckpt.save(2)
    state = checkpoints.load_state(str(tmp_path))  # still the epoch-1 checkpoint, complete
    assert state.epoch == 1 and state.weights == "epoch-0001.weights.h5"
    left = sorted(os.listdir(tmp_path / "checkpoints"))
    assert not [n for n in left if n.startswith(".")], left  # no temporary file left behind


def _tiny_classifier(tiny_backbone):
    from tlkit.models.backbones import get_backbone
    from tlkit.core.config import ModelConfig
    from tlkit.models.classifier import build_classifier

    spec = get_backbone(tiny_backbone)
    model = build_classifier(spec, 3, ModelConfig(base=tiny_backbone, weights="none"), 32,
                             base=spec.build(32, "none"))
    return spec, model


def test_a_frozen_stage_writes_the_backbone_once_and_its_checkpoints_load_exactly(tmp_path, tiny_backbone):
    import keras
    import numpy as np

    from tlkit.models.classifier import set_trainable
    from tlkit.models.strategies import Stage
    from tlkit.core.errors import TrainingError

    spec, model = _tiny_classifier(tiny_backbone)
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 255, (8, 32, 32, 3)).astype("float32"), np.eye(3)[rng.integers(0, 3, 8)]
    full = tmp_path / "full.weights.h5"
    weights_format.save_weights(model, str(full))  # the plain Keras file, for the size comparison
    ckpt = checkpoints.Checkpointer(str(tmp_path / "run"), "accuracy", [])
    ckpt.set_model(model)

    def run_stage(index, stage, start):
        set_trainable(model, spec, set(stage.trainable))
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy", metrics=["accuracy"])
        ckpt.begin_stage(index, stage, start, [])
        model.fit(x, y, batch_size=4, epochs=start + stage.epochs, initial_epoch=start, verbose=0,
                  callbacks=[ckpt])

    run_stage(0, Stage("head", 3, 1e-2, frozenset()), 0)
    ck = tmp_path / "run" / "checkpoints"
    frozen = sorted(p.name for p in ck.glob("frozen-*"))
    assert frozen == ["frozen-0001.weights.h5"], sorted(os.listdir(ck))  # written once, at the first epoch
    epoch_file = ck / checkpoints.load_state(str(tmp_path / "run")).weights
    # The epoch's file holds the head, not the backbone: a fraction of the full weights file.
    assert epoch_file.stat().st_size < 0.2 * full.stat().st_size
    assert weights_format.files_needed(str(epoch_file)) == frozen
    after_head = [np.array(w) for w in model.get_weights()]
    _, fresh = _tiny_classifier(tiny_backbone)
    weights_format.load_weights(fresh, str(epoch_file))
    for a, b in zip(after_head, fresh.get_weights()):
        np.testing.assert_array_equal(a, b)
    # The best checkpoint is loadable the same way, from another working directory.
    _, fresh2 = _tiny_classifier(tiny_backbone)
    _in(str(tmp_path), weights_format.load_weights, fresh2, str(ck / "best.weights.h5"))
    for a, b in zip(model.get_layer("backbone").get_weights(), fresh2.get_layer("backbone").get_weights()):
        np.testing.assert_array_equal(a, b)  # the frozen backbone, joined in from its own file

    # Fine-tuning the top stage: the weights change, and every epoch's file holds them.
    run_stage(1, Stage("finetune", 2, 1e-2, frozenset({spec.num_stages(model.get_layer("backbone")) - 1})), 3)
    state = checkpoints.load_state(str(tmp_path / "run"))
    assert state.epoch == 5
    now = [np.array(w) for w in model.get_weights()]
    assert any(not np.array_equal(a, b) for a, b in zip(after_head, now))
    weights_format.load_weights(fresh, str(ck / state.weights))
    for a, b in zip(now, fresh.get_weights()):
        np.testing.assert_array_equal(a, b)
    # Frozen files no checkpoint needs any more are removed; one that is needed and missing is reported.
    needed = (set(weights_format.files_needed(str(ck / state.weights)))
              | set(weights_format.files_needed(str(ck / "best.weights.h5"))))
    assert {p.name for p in ck.glob("frozen-*")} == needed
    for name in weights_format.files_needed(str(ck / state.weights)):
        os.remove(ck / name)
        with pytest.raises(TrainingError, match="missing"):
            checkpoints.load_state(str(tmp_path / "run"))


def test_auto_resumes_inside_fine_tuning_with_the_decision_it_made(tmp_path, tiny_backbone, capsys, monkeypatch):
    """strategy auto: the trials run once; a run interrupted inside the fine-tuning they chose continues that stage
    (the same trainable stages, rate, rounds and augmentation) without trying again."""
    images = write_image_folder(tmp_path / "images", classes=("red", "green", "blue"), per_class=8)
    args = ["finetune", "--base", tiny_backbone, "--image-size", "32", "--weights", "none", "--image-dir", images,
            "--batch-size", "4", "--val-split", "0.25", "--head-steps", "10", "--epochs", "4", "--seed", "3",
            "--lr", "0.01", "--output-dir", str(tmp_path / "run")]
    run = str(tmp_path / "run")
    # Decide by construction: the trials' validation accuracies are what this stub says (the whole backbone at
    # the lower rate wins), so the test is about resuming, whatever the arithmetic of this CPU.
    from tlkit.engine import adapt

    real_fit = adapt.keras.Model.fit
    scores = {"top2": 0.5, "all": 0.9, "all_fast": 0.7}

    def fake_trial_fit(self, *a, **kw):
        hist = real_fit(self, *a, **kw)
        if kw.get("epochs") == 1 and "steps_per_epoch" in kw and not kw.get("callbacks", [None])[1:]:
            name = fake_trial_fit.next.pop(0)
            hist.history["val_accuracy"] = [scores[name]]
        return hist

    fake_trial_fit.next = ["top2", "all", "all_fast"]
    monkeypatch.setattr(adapt.keras.Model, "fit", fake_trial_fit)
    original = checkpoints.Checkpointer.on_train_batch_end

    def interrupt_in_round_3(self, batch, logs=None):  # head = epoch 1, first fine-tuning round = epoch 2
        if self.last is not None and self.last.epoch == 2:
            signal.raise_signal(signal.SIGINT)
        original(self, batch, logs)

    monkeypatch.setattr(checkpoints.Checkpointer, "on_train_batch_end", interrupt_in_round_3)
    assert cli.main(args) == 130
    out = capsys.readouterr().out
    assert out.count("[tlkit] trial ") == 3 and "recipe: fine-tuning the whole backbone at lr 0.001" in out
    with open(os.path.join(run, "checkpoints", "adapt.json")) as f:
        decision = json.load(f)
    assert decision["stage"]["name"] == "all" and decision["stage"]["trainable"] is None
    with open(os.path.join(run, "config.yaml")) as f:
        decided_augment = [line for line in f.read().splitlines() if line.strip().startswith(("augment:", "flip:"))]
    assert "augment: auto" not in [s.strip() for s in decided_augment]  # the decision is written into config.yaml

    monkeypatch.setattr(checkpoints.Checkpointer, "on_train_batch_end", original)
    fake_trial_fit.next = []  # a trial now would fail: there must be none
    assert cli.main(args + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert "[tlkit] trial " not in out and "resumed with the decision of" in out
    rows = _history(run)
    assert [r["stage"] for r in rows] == ["head"] + ["finetune"] * decision["stage"]["epochs"]
    with open(os.path.join(run, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["stages"][-1]["trainable"] is None and metrics["stages"][-1]["lr"] == pytest.approx(0.001)


def test_a_run_that_never_trains_the_backbone_writes_no_copy_of_it_and_its_checkpoints_check_it(tmp_path,
                                                                                                 tiny_backbone):
    """feature extraction: the checkpoints hold the head and a fingerprint of the backbone the run builds again."""
    import keras
    import numpy as np

    from tlkit.core.errors import TrainingError
    from tlkit.models.classifier import set_trainable
    from tlkit.models.strategies import Stage

    spec, model = _tiny_classifier(tiny_backbone)
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 255, (8, 32, 32, 3)).astype("float32"), np.eye(3)[rng.integers(0, 3, 8)]
    ckpt = checkpoints.Checkpointer(str(tmp_path / "run"), "accuracy", [], frozen_in_model=True)
    ckpt.set_model(model)
    set_trainable(model, spec, set())
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy", metrics=["accuracy"])
    ckpt.begin_stage(0, Stage("head", 2, 1e-2, frozenset()), 0, [])
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[ckpt])
    ck = tmp_path / "run" / "checkpoints"
    assert not list(ck.glob("frozen-*")), sorted(os.listdir(ck))
    state = checkpoints.load_state(str(tmp_path / "run"))  # names no missing file
    assert weights_format.files_needed(str(ck / state.weights)) == []
    _, fresh = _tiny_classifier(tiny_backbone)  # the same backbone, built again
    weights_format.load_weights(fresh, str(ck / state.weights))
    for a, b in zip(model.get_weights(), fresh.get_weights()):
        np.testing.assert_array_equal(a, b)
    _, other = _tiny_classifier(tiny_backbone)
    w = other.get_layer("backbone").weights[0]
    w.assign(w + 1.0)  # a backbone that differs from the one the head was trained on
    with pytest.raises(TrainingError, match="differ"):
        weights_format.load_weights(other, str(ck / state.weights))


def test_a_finished_feature_extraction_run_resumes_to_the_same_figures(tmp_path, tiny_backbone, capsys):
    images = write_image_folder(tmp_path / "images", per_class=6)
    args = ["finetune", "--base", tiny_backbone, "--image-size", "32", "--weights", "none", "--image-dir", images,
            "--batch-size", "4", "--val-split", "0.25", "--epochs", "3", "--augment", "none", "--seed", "3",
            "--strategy", "feature_extraction", "--output-dir", str(tmp_path / "run")]
    assert cli.main(args) == 0
    first = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert not list((tmp_path / "run" / "checkpoints").glob("frozen-*"))
    assert cli.main(args + ["--resume"]) == 0  # the head from its checkpoint, the backbone as built
    again = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("accuracy", "loss"):
        assert again["val"][key] == pytest.approx(first["val"][key], abs=1e-5)
