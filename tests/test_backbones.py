"""tlkit/backbones.py: registry, stages, weights files, offline errors."""
import numpy as np
import keras
import pytest

from tlkit.models import backbones
from tlkit.core.errors import ConfigError, OfflineError


def test_registry_has_the_required_backbones():
    names = backbones.list_backbones()
    for n in ("resnet50", "resnet101", "resnet152", "resnet50v2", "mobilenetv2", "efficientnetb0", "vgg16"):
        assert n in names
    spec = backbones.get_backbone("resnet50")
    assert spec.preprocess == "caffe" and spec.default_size == 224
    assert backbones.get_backbone("mobilenetv2").preprocess == "tf"


def test_unknown_backbone_suggests():
    with pytest.raises(ConfigError, match=r"Unknown backbone 'resnet5'.*'resnet50'"):
        backbones.get_backbone("resnet5")


def test_resnet50_stages_are_conv1_to_conv5():
    spec = backbones.get_backbone("resnet50")
    base = spec.build(32, "none")
    stages = spec.stages(base)
    names = [l.name for l in base.layers]
    assert spec.num_stages(base) == 5
    assert stages[names.index("conv1_conv")] == 0
    assert stages[names.index("conv2_block1_1_conv")] == 1
    assert stages[names.index("conv4_block6_out")] == 3
    assert stages[names.index("conv5_block3_out")] == 4
    assert stages == sorted(stages)  # stages are contiguous, bottom to top


def test_too_small_image_size():
    with pytest.raises(ConfigError, match="too small for resnet50"):
        backbones.get_backbone("resnet50").build(16, "none")


def test_weights_path_is_loaded(tmp_path):
    spec = backbones.get_backbone("mobilenetv2")
    src = spec.build(32, "none")
    rng = np.random.default_rng(0)
    src.set_weights([rng.normal(size=w.shape).astype("float32") for w in src.get_weights()])
    path = str(tmp_path / "mnv2.weights.h5")
    src.save_weights(path)
    loaded = spec.build(32, path)
    for a, b in zip(src.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_offline_imagenet_gives_one_clear_error(tmp_path, monkeypatch):
    import urllib.error

    from keras.src.utils import file_utils

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(file_utils, "urlretrieve", no_network)
    with pytest.raises(OfflineError) as e:
        backbones.get_backbone("resnet50").build(32, "imagenet")
    msg = str(e.value)
    assert "\n" not in msg
    assert "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5" in msg
    assert "--weights PATH" in msg


def test_user_backbone_stages_from_resolution(tiny_backbone):
    spec = backbones.get_backbone(tiny_backbone)
    base = spec.build(32, "none")
    stages = spec.stages(base)
    assert spec.num_stages(base) == 4  # input stage + three downsamplings
    assert stages[[l.name for l in base.layers].index("s2_down")] == 3
    with pytest.raises(ConfigError, match="--image-size 32"):
        spec.build(48, "none")
