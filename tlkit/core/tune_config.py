"""The search settings of `tune` as files: the `tune:` section of a YAML file, `tune.yaml`, and what identifies a
search (`search_identity`: equal identities may share a project folder and resume it).

Example:
    cfg, tc = load_tune_config("runs/tune-resnet50-shapes/tune.yaml")
"""
from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, Mapping

from tlkit.core import config_io
from tlkit.core.verb_configs import TuneConfig
from tlkit.core.config import FinetuneConfig
from tlkit.core.config_io import absolute_paths, config_to_dict, dump_yaml
from tlkit.core.errors import ConfigError, suggest

RESUMABLE_CHANGES = ("max_trials", "then_finetune", "max_consecutive_failures")


def tune_config_from_dict(values: Mapping[str, Any], base: TuneConfig | None = None) -> TuneConfig:
    """Builds a `TuneConfig` from a mapping (the `tune:` section of a YAML file, or flags).

    Lists are accepted for `lr_range` and `batch_sizes` (also "16,32" strings) and for `search`.

    Example:
        >>> tune_config_from_dict({"tuner": "random", "batch_sizes": [16, 32]}).batch_sizes
        (16, 32)
    """
    base = base or TuneConfig()
    if not isinstance(values, Mapping):
        raise ConfigError(f"The tune section must be a mapping of keys to values, got {type(values).__name__}.")
    hints = typing.get_type_hints(TuneConfig)
    names = [f.name for f in dataclasses.fields(TuneConfig)]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        key = str(key)
        if key not in names:
            raise ConfigError(f"Unknown key {key!r} in section 'tune'.{suggest(key, names)}")
        if key == "lr_range":
            kwargs[key] = _numbers(key, value, float)
        elif key == "batch_sizes":
            kwargs[key] = _numbers(key, value, int)
        elif key == "search":
            if isinstance(value, (list, tuple)):
                value = ",".join(str(v) for v in value)
            kwargs[key] = "" if value is None else str(value)
        else:
            kwargs[key] = config_io._coerce(key, value, hints[key])
    return dataclasses.replace(base, **kwargs)


def _numbers(name: str, value: Any, kind: type) -> tuple:
    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split() if v]
    if not isinstance(value, (list, tuple)):
        value = [value]
    out = []
    for v in value:
        try:
            if kind is int and (isinstance(v, bool) or float(v) != int(float(v))):
                raise ValueError
            out.append(kind(float(v)) if kind is int else kind(v))
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a list of {kind.__name__}s, got {value!r}.") from None
    return tuple(out)


def load_tune_config(path: str | os.PathLike) -> tuple[FinetuneConfig, TuneConfig]:
    """Reads a YAML file of finetune keys plus an optional `tune:` section (as `tune.yaml` is written).

    A plain finetune `config.yaml` works too (the search settings keep their defaults). Relative paths
    are resolved against the file's folder, as `load_config` does.
    """
    values = config_io.load_yaml(path)
    if "tune" not in values:
        return config_io.load_config(path), TuneConfig()
    tune_values = values.pop("tune") or {}
    cfg = config_io.config_from_dict(values)
    folder = os.path.dirname(os.path.abspath(path))
    return absolute_paths(cfg, folder), tune_config_from_dict(tune_values)


def settings_yaml(cfg: FinetuneConfig, tc: TuneConfig) -> str:
    """The text of `tune.yaml`: the finetune configuration plus a `tune:` section."""
    values = config_to_dict(cfg)
    t = dataclasses.asdict(tc)
    t["lr_range"], t["batch_sizes"] = list(tc.lr_range), list(tc.batch_sizes)
    values["tune"] = t
    return dump_yaml(values)


def search_identity(cfg: FinetuneConfig, tc: TuneConfig) -> dict[str, Any]:
    """What defines a search: equal identities may share a project folder (resume)."""
    fc = config_to_dict(dataclasses.replace(cfg, output_dir=None, overwrite=False))
    fc.pop("resume", None)
    t = dataclasses.asdict(tc)
    for k in RESUMABLE_CHANGES:
        t.pop(k)
    t["lr_range"] = [float(v) for v in tc.lr_range]
    t["batch_sizes"] = sorted(set(int(v) for v in tc.batch_sizes))
    t["search"] = sorted(tc.dimensions)
    return {"finetune": fc, "tune": t}
