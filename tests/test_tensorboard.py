"""`--tensorboard`: refused up front with one line when TensorBoard is missing; logs written when it is there.

TensorFlow 2.21 no longer installs TensorBoard (the extra `tensorboard`, part of `dev`). Without this check a
run fails after its first epoch with `TBNotInstalledError` and a half-written run folder.
"""
import glob
import os
import sys

import pytest

from tlkit.cli import main


def test_missing_tensorboard_is_refused_before_anything_runs(monkeypatch, capsys, tmp_path, tiny_backbone):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as on a fresh install of TensorFlow 2.21
    run = tmp_path / "run"
    rc = main(["finetune", "--base", tiny_backbone, "--weights", "none", "--dataset", "shapes", "--image-size", "32",
               "--shapes-per-class", "4", "--batch-size", "4", "--tensorboard", "--output-dir", str(run)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "pip install 'tlkit[tensorboard]'" in err
    assert not run.exists()  # nothing written


def test_tensorboard_logs_are_written_when_installed(tmp_path, tiny_backbone):
    pytest.importorskip("tensorboard", reason="the `tensorboard` extra (pip install 'tlkit[tensorboard]'; in [dev])")
    run = str(tmp_path / "run")
    rc = main(["finetune", "--base", tiny_backbone, "--weights", "none", "--dataset", "shapes", "--image-size", "32",
               "--shapes-per-class", "4", "--batch-size", "4", "--epochs", "1",
               "--augment", "none", "--tensorboard", "--output-dir", run])
    assert rc == 0
    events = glob.glob(os.path.join(run, "tensorboard", "**", "events.out.tfevents.*"), recursive=True)
    assert events and all(os.path.getsize(e) > 0 for e in events)
    assert os.path.isfile(os.path.join(run, "model.keras"))
