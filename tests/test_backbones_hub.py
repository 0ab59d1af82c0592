"""tlkit/backbones.py, keras-hub part: `--base hub:PRESET` from a preset folder a test writes (offline).

keras-hub is the optional extra `hub` (in `dev`, so CI runs these); the preset is a small, randomly
initialised keras-hub ResNet and its image converter (`tlkit.testing.make_tiny_hub_preset`).
"""
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import keras
import pytest

from tlkit.models import backbones
from tlkit.cli import main
from tlkit.core.config import ModelConfig
from tlkit.core.errors import ConfigError, OfflineError
from tlkit.models.classifier import build_classifier, set_trainable
from tlkit.testing import make_tiny_hub_preset

keras_hub = pytest.importorskip("keras_hub", reason="the `hub` extra (pip install 'tlkit[hub]'; part of [dev])")


@pytest.fixture(scope="module")
def hub_preset(tmp_path_factory) -> str:
    return make_tiny_hub_preset(str(tmp_path_factory.mktemp("hub") / "tiny_resnet"))


def test_preset_folder_spec_converter_and_pyramid_stages(hub_preset):
    spec = backbones.get_backbone("hub:" + hub_preset)
    assert spec.hub_preset == hub_preset and spec.default_size == 32
    assert spec.stage_names == ("P2", "P3", "P4")  # the backbone's own pyramid levels
    base = spec.build(32, "imagenet")
    stages = spec.stages(base)
    names = [l.name for l in base.layers]
    assert stages == sorted(stages) and spec.num_stages(base) == 3
    assert stages[names.index("conv1_conv")] == 0  # the stem joins the first level
    assert stages[names.index("stack0_block0_out")] == 0  # P2 ends with stack 0
    assert stages[names.index("stack1_block0_1_conv")] == 1
    assert stages[names.index("stack2_block0_out")] == 2
    # The weights are the preset's, as written.
    ref = keras_hub.models.Backbone.from_preset(hub_preset)
    for a, b in zip(ref.get_weights(), base.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_converter_folded_in_as_built_in_layer_and_reload_without_keras_hub(hub_preset, tmp_path):
    spec = backbones.get_backbone("hub:" + hub_preset)
    model = build_classifier(spec, 3, ModelConfig(base="hub:" + hub_preset), 32)
    pre = model.get_layer("preprocess")
    assert isinstance(pre, keras.layers.Rescaling)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    converter = keras_hub.layers.ImageConverter.from_preset(hub_preset)
    np.testing.assert_allclose(np.asarray(pre(x)), np.asarray(converter(x)), rtol=1e-5, atol=1e-5)
    # The backbone's output through the classifier equals keras-hub's own backbone on the converted images.
    hub_out = keras_hub.models.Backbone.from_preset(hub_preset)(converter(x))
    ours = model.get_layer("backbone")(pre(x), training=False)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(hub_out), rtol=1e-4, atol=1e-4)
    path = str(tmp_path / "clf.keras")
    model.save(path)
    assert "keras_hub" not in zipfile.ZipFile(path).read("config.json").decode()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", model.predict(x, verbose=0))
    code = ("import sys; sys.modules['keras_hub'] = None; sys.modules['tlkit'] = None\n"
            "import numpy as np, keras\n"
            f"m = keras.models.load_model({path!r})\n"
            f"d = np.abs(m.predict(np.load({str(tmp_path / 'x.npy')!r}), verbose=0) - np.load({str(tmp_path / 'y.npy')!r}))\n"
            "print(float(d.max()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-6


def test_set_trainable_unfreezes_the_top_pyramid_stage(hub_preset):
    spec = backbones.get_backbone("hub:" + hub_preset)
    model = build_classifier(spec, 3, ModelConfig(base="hub:" + hub_preset), 32)
    set_trainable(model, spec, {2})
    base = model.get_layer("backbone")
    assert base.get_layer("stack2_block0_1_conv").trainable
    assert not base.get_layer("stack1_block0_1_conv").trainable
    assert not base.get_layer("stack2_block0_1_bn").trainable  # BatchNorm stays frozen


def test_unknown_preset_name_and_missing_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"Unknown keras-hub preset 'resnet_50_imagenett'.*'resnet_50_imagenet'"):
        backbones.get_backbone("hub:resnet_50_imagenett")
    with pytest.raises(ConfigError, match="preset folder not found"):
        backbones.get_backbone("hub:" + str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ConfigError, match="no config.json"):
        backbones.get_backbone("hub:" + str(tmp_path / "empty"))


def test_offline_preset_name_is_one_line(monkeypatch, tmp_path):
    import kagglehub
    import requests

    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))

    def no_network(*args, **kwargs):
        raise requests.exceptions.ConnectionError("Failed to resolve 'api.kaggle.com' (Name or service not known)")

    monkeypatch.setattr(kagglehub, "model_download", no_network)
    with pytest.raises(OfflineError) as e:
        backbones.get_backbone("hub:resnet_18_imagenet")
    msg = str(e.value)
    assert "\n" not in msg and "resnet_18_imagenet" in msg and "--base hub:DIR" in msg and "save_to_preset" in msg


def test_without_keras_hub_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "keras_hub", None)
    monkeypatch.setattr(backbones, "_HUB_SPECS", {})
    run = tmp_path / "run"
    rc = main(["finetune", "--base", "hub:resnet_50_imagenet", "--dataset", "shapes", "--output-dir", str(run)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "pip install 'tlkit[hub]'" in err
    assert not run.exists()


def test_finetune_export_and_predict_with_a_hub_preset(hub_preset, tmp_path, capsys):
    run = str(tmp_path / "run")
    rc = main(["finetune", "--base", "hub:" + hub_preset, "--dataset", "shapes", "--image-size", "32",
               "--shapes-per-class", "8", "--batch-size", "8", "--epochs", "1",
               "--augment", "none", "--strategy", "two_stage", "--output-dir", run])
    assert rc == 0
    with open(os.path.join(run, "metrics.json")) as f:
        metrics = json.load(f)
    assert [s["name"] for s in metrics["stages"]] == ["head", "finetune"]
    assert metrics["stages"][1]["trainable"] == [1, 2]  # the top two pyramid stages
    with open(os.path.join(run, "config.yaml")) as f:
        assert f"base: hub:{hub_preset}" in f.read()
    assert main(["export", run, "--format", "tflite"]) == 0
    with open(os.path.join(run, "export", "tflite", "export.json")) as f:
        info = json.load(f)
    assert info["check"]["passed"] and info["check"]["top1_agreement"] == 1.0


def test_info_lists_the_keras_hub_families(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    hub = info["keras_hub"]
    assert hub["installed"] and info["versions"]["keras-hub"] == keras_hub.__version__
    assert {"ResNetBackbone", "DenseNetBackbone", "VGGBackbone"} <= set(hub["families"])
    assert "resnet_50_imagenet" in hub["families"]["ResNetBackbone"] and "hub:" in hub["usage"]
    for family in hub["families"]:  # every listed family is a real keras-hub class
        assert issubclass(getattr(keras_hub.models, family), keras_hub.models.Backbone)


@pytest.mark.parametrize("family", ["DenseNetBackbone", "VGGBackbone"])
def test_the_other_listed_families_build_save_and_have_stages(family, tmp_path):
    # Small random members of the other families tlkit lists: preset folder -> classifier of built-in layers.
    keras.utils.set_random_seed(0)
    if family == "DenseNetBackbone":
        hub = keras_hub.models.DenseNetBackbone(stackwise_num_repeats=[1, 1, 1], growth_rate=8)
        stage_names = ("P2", "P3", "P4")  # its pyramid outputs
    else:
        hub = keras_hub.models.VGGBackbone(stackwise_num_repeats=[1, 1, 1], stackwise_num_filters=[8, 8, 16])
        stage_names = ("stage0", "stage1", "stage2", "stage3")  # no pyramid: where the resolution drops
    folder = str(tmp_path / family)
    hub.save_to_preset(folder)
    spec = backbones.get_backbone("hub:" + folder)
    assert spec.stage_names == stage_names and spec.preprocess == "none"  # no converter saved: raw pixels
    model = build_classifier(spec, 3, ModelConfig(base="hub:" + folder), 64)
    base = model.get_layer("backbone")
    assert spec.num_stages(base) == len(stage_names) and spec.stages(base) == sorted(spec.stages(base))
    path = str(tmp_path / "clf.keras")
    model.save(path)
    assert "keras_hub" not in zipfile.ZipFile(path).read("config.json").decode()
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    np.testing.assert_allclose(keras.models.load_model(path).predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-6)
