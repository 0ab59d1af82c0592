"""Each file in examples/ is exercised in smoke form.

- finetune_flowers.yaml loads with `tlkit finetune --config` and runs a tiny smoke through flag overrides;
- custom_folder.py and multilabel_csv.py run with TLKIT_SMOKE=1 (their own images, a tiny backbone, 32 px);
- the shell scripts pass `bash -n`, and run with the `tlkit` command replaced by a recorder: every command
  line they would run parses with tlkit's own parser (so a renamed flag fails here), and the two-host
  example's TF_CONFIG is valid for two workers.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from tlkit import cli
from tlkit.core import config_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EX = os.path.join(ROOT, "examples")
YAML = os.path.join(EX, "finetune_flowers.yaml")
SCRIPTS = ["tune_then_finetune.sh", "distributed/two_gpu.sh", "distributed/two_host.sh"]

RECORDER = """#!{python}
import json, os, sys
with open(os.environ["TLKIT_RECORD"], "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "TF_CONFIG": os.environ.get("TF_CONFIG"),
                        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}}) + "\\n")
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    from tlkit.testing import make_tiny_backbone

    return make_tiny_backbone(str(tmp_path_factory.mktemp("tiny") / "tiny.keras"))


def _parse(argv: list[str]):
    """Parses a recorded tlkit command line with the real parser; fails the test on a parse error."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            return cli.build_parser().parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"`tlkit {shlex.join(argv)}` does not parse (exit {e.code}): {err.getvalue().strip()}")


def _run_recorded(script: str, tmp_path, args=(), **env) -> list[dict]:
    rec = tmp_path / "tlkit_recorder.py"
    rec.write_text(RECORDER.format(python=sys.executable))
    rec.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    log.write_text("")
    full_env = dict(os.environ, TLKIT=str(rec), TLKIT_RECORD=str(log), **env)
    full_env.pop("TF_CONFIG", None)
    p = subprocess.run(["bash", os.path.join(EX, script), *args], env=full_env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, f"{script} failed:\n{p.stdout}\n{p.stderr}"
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls, f"{script} ran no tlkit command"
    return calls


# ------------------------------------------------------------------ finetune_flowers.yaml

def test_yaml_is_the_recommended_flowers_configuration():
    cfg = config_io.load_config(YAML).validate()
    assert (cfg.data.dataset, cfg.data.image_size, cfg.model.base, cfg.model.weights) == \
        ("oxford_flowers102", 224, "resnet50", "imagenet")
    assert cfg.train.strategy == "two_stage" and cfg.train.optimizer == "adamw"
    assert cfg.train.weight_decay == pytest.approx(1e-4) and cfg.train.lr == pytest.approx(1e-3)
    # Every value written in the file is taken (nothing silently dropped): compare with the raw YAML.
    raw = config_io.load_yaml(YAML)
    resolved = config_io.config_to_dict(cfg)
    for section, values in raw.items():
        if isinstance(values, dict):
            for key, value in values.items():
                got = resolved[section][key]
                assert got == value or (isinstance(value, str) and got == pytest.approx(float(value))), (section, key)
        else:
            assert resolved[section] == values, section


def test_yaml_loads_with_cli_and_runs_a_smoke(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    rc = cli.main(["finetune", "--config", YAML, "--dataset", "shapes", "--shapes-per-class", "8",
                   "--base", tiny, "--weights", "none", "--image-size", "32", "--batch-size", "8",
                   "--head-steps", "1", "--epochs", "1", "--output-dir", str(out)])
    assert rc == 0, capsys.readouterr().err
    for name in ("config.yaml", "labels.txt", "model.keras", "history.csv", "metrics.json"):
        assert (out / name).is_file(), name
    saved = config_io.load_config(str(out / "config.yaml"))
    assert saved.data.dataset == "shapes" and saved.data.image_size == 32  # overrides won
    assert saved.train.optimizer == "adamw" and saved.train.warmup_epochs == 0.5  # the rest came from the YAML
    metrics = json.loads((out / "metrics.json").read_text())
    val = metrics["val"]
    cm = val["confusion_matrix"]  # the accuracy is what the confusion matrix of the validation images says
    assert metrics["epochs"] == 2 and sum(map(sum, cm)) == val["num_examples"] > 0
    assert val["accuracy"] == pytest.approx(sum(cm[i][i] for i in range(len(cm))) / val["num_examples"])


# ------------------------------------------------------------------ custom_folder.py

def _run_smoke_example(name: str, monkeypatch) -> int:
    """Imports examples/NAME.py and runs its `main([])` with TLKIT_SMOKE=1."""
    monkeypatch.setenv("TLKIT_SMOKE", "1")
    spec = importlib.util.spec_from_file_location(f"{name}_example", os.path.join(EX, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main([])


def test_custom_folder_runs_in_smoke_mode(monkeypatch, capsys):
    assert _run_smoke_example("custom_folder", monkeypatch) == 0
    out = capsys.readouterr().out
    assert "classes: ['blue', 'green', 'red']" in out
    lines = [line for line in out.splitlines() if line.split()[:1] and line.split()[0].endswith((".jpg", ".png"))]
    assert len(lines) == 3, out  # one prediction per class
    for line in lines:
        # the top class's probability: of three classes, at least a third
        assert line.split()[1] in ("blue", "green", "red") and 1 / 3 - 1e-3 <= float(line.split()[-1]) <= 1.0


# ------------------------------------------------------------------ multilabel_csv.py

def test_multilabel_csv_runs_in_smoke_mode(monkeypatch, capsys):
    assert _run_smoke_example("multilabel_csv", monkeypatch) == 0
    out = capsys.readouterr().out
    assert "labels: ['blue', 'green', 'red']" in out and "recipe:" in out  # the auto recipe decided on val_map
    maps = [float(m) for m in re.findall(r"^(?:val|test): mAP ([0-9.]+)", out, re.M)]
    assert len(maps) == 2 and min(maps) >= 0.8, out  # colour-coded labels: learnt from 28 images
    lines = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0].endswith((".jpg", ".png"))]
    assert len(lines) == 4 and all(set(w[1:]) <= {"blue", "green", "red", "(none", "above", "its", "threshold)"}
                                   for w in lines), out


# ------------------------------------------------------------------ shell scripts

@pytest.mark.parametrize("script", SCRIPTS)
def test_script_syntax(script):
    p = subprocess.run(["bash", "-n", os.path.join(EX, script)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_verbs_used_by_scripts_have_help(capsys):
    verbs = set()
    for script in SCRIPTS:
        text = open(os.path.join(EX, script), encoding="utf-8").read()
        verbs |= set(re.findall(r'"\$TLKIT" ([a-z-]+)', text))
    assert verbs >= {"tune", "finetune", "evaluate"}, verbs
    for verb in sorted(verbs):
        with pytest.raises(SystemExit) as e:
            cli.build_parser().parse_args([verb, "--help"])
        assert e.value.code == 0, verb
        assert f"usage: tlkit {verb}" in capsys.readouterr().out


@pytest.mark.parametrize("smoke", ["0", "1"])
def test_tune_then_finetune_commands_parse(tmp_path, tiny, smoke):
    calls = _run_recorded("tune_then_finetune.sh", tmp_path, TLKIT_SMOKE=smoke, TINY=tiny,
                          SMOKE_OUT=str(tmp_path / "out"), OUT=str(tmp_path / "out"))
    assert [c["argv"][0] for c in calls] == ["tune", "finetune", "evaluate"]
    tune, finetune, evaluate = (_parse(c["argv"]) for c in calls)
    search = str(tmp_path / "out" / "search")
    assert tune.output_dir == search and finetune.config == os.path.join(search, "best_config.yaml")
    assert evaluate.model == finetune.output_dir == str(tmp_path / "out" / "final")
    if smoke == "1":
        assert tune.dataset == "shapes" and tune.base == tiny and tune.weights == "none"
    else:
        assert config_io.load_config(tune.config).data.dataset == "oxford_flowers102"


def test_two_gpu_example(tmp_path):
    (call,) = _run_recorded("distributed/two_gpu.sh", tmp_path, OUT=str(tmp_path / "run"))
    assert call["CUDA_VISIBLE_DEVICES"] == "0,1"
    cfg = cli.config_from_args(_parse(call["argv"])).validate()
    assert cfg.runtime.distribute == "mirrored" and cfg.data.batch_size == 64 and cfg.train.lr == pytest.approx(2e-3)
    assert cfg.data.dataset == "oxford_flowers102" and cfg.output_dir == str(tmp_path / "run")


def test_two_host_example_tf_config(tmp_path):
    hosts = "localhost:23456,localhost:23457"
    seen = []
    for index in (0, 1):
        (call,) = _run_recorded("distributed/two_host.sh", tmp_path, args=[str(index)], HOSTS=hosts,
                                OUT=str(tmp_path / "run"))
        tf_config = json.loads(call["TF_CONFIG"])
        assert tf_config == {"cluster": {"worker": hosts.split(",")}, "task": {"type": "worker", "index": index}}
        cfg = cli.config_from_args(_parse(call["argv"])).validate()
        assert cfg.runtime.distribute == "multiworker" and cfg.runtime.xla == "off"
        seen.append(cfg.output_dir)
    assert len(set(seen)) == 2  # each worker writes its own folder
    p = subprocess.run(["bash", os.path.join(EX, "distributed/two_host.sh")], capture_output=True, text=True)
    assert p.returncode != 0 and "usage: two_host.sh TASK_INDEX" in p.stderr
