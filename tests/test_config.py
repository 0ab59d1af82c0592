"""tlkit/config.py: layering, validation, YAML."""
import dataclasses

import pytest

from tlkit.core.config import DataConfig, FinetuneConfig, TrainConfig
from tlkit.core.config_io import config_from_dict, config_to_dict, dump_yaml, load_config
from tlkit.core.errors import ConfigError


def test_nested_and_flat_keys_give_the_same_config():
    nested = config_from_dict({"data": {"dataset": "shapes", "batch_size": 8}, "train": {"lr": 0.01}})
    flat = config_from_dict({"dataset": "shapes", "batch_size": 8, "lr": 0.01})
    assert nested == flat
    assert nested.data.batch_size == 8 and nested.train.lr == 0.01
    assert nested.train.epochs == TrainConfig().epochs  # untouched keys keep defaults


def test_round_trip_through_yaml(tmp_path):
    cfg = FinetuneConfig(data=DataConfig(dataset="shapes", image_size=32), seed=7)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=3, early_stopping=2))
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(config_to_dict(cfg)))
    assert load_config(path) == cfg


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"Unknown key 'epoch'.*'epochs'"):
        config_from_dict({"epoch": 3})
    with pytest.raises(ConfigError, match=r"'batch_sise' in section 'data'.*'batch_size'"):
        config_from_dict({"data": {"batch_sise": 3}})


def test_wrong_type_is_refused():
    with pytest.raises(ConfigError, match="epochs must be of type int"):
        config_from_dict({"epochs": "three"})
    with pytest.raises(ConfigError, match="overwrite must be of type bool"):
        config_from_dict({"overwrite": "yes"})
    assert config_from_dict({"lr": "1e-3"}).train.lr == 1e-3  # YAML reads 1e-3 as a string


def test_malformed_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  dataset: [shapes\n")
    with pytest.raises(ConfigError, match="Malformed YAML"):
        load_config(path)


def test_validate_choices_and_data():
    with pytest.raises(ConfigError, match="Unknown strategy 'twostage'.*'two_stage'"):
        config_from_dict({"dataset": "shapes", "strategy": "twostage"}).validate()
    with pytest.raises(ConfigError, match="No data given"):
        FinetuneConfig().validate()


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "c.yaml"
    path.write_text("image_dir: ../images\n")
    assert load_config(path).data.image_dir == str(tmp_path / "images")


def test_absolute_paths_resolves_a_keras_hub_preset_folder_but_not_a_preset_name():
    from tlkit.core.config_io import absolute_paths, config_from_dict

    assert absolute_paths(config_from_dict({"base": "hub:presets/r50"}), "/data").model.base == "hub:/data/presets/r50"
    assert absolute_paths(config_from_dict({"base": "hub:resnet_50_imagenet"}), "/data").model.base == \
        "hub:resnet_50_imagenet"
    kaggle = "hub:kaggle://keras/resnetv2/keras/resnet_50_imagenet"
    assert absolute_paths(config_from_dict({"base": kaggle}), "/data").model.base == kaggle
