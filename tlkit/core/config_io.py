"""Reading and writing configurations: a nested or flat mapping, a YAML file or the command line's flags ->
`FinetuneConfig` (every key and type checked, naming the bad one), and back; paths made absolute; the
differences of two configurations. The dataclasses and their defaults stay in `tlkit.core.config`.

Example:
    cfg = load_config("runs/resnet50-shapes-1/config.yaml")
    cfg = config_from_dict({"epochs": 3}, cfg)
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Mapping

import yaml

from tlkit.core.config import SECTIONS, FinetuneConfig
from tlkit.core.errors import ConfigError, suggest


def field_index() -> dict[str, str]:
    """Maps every leaf field name to its section ('' for top-level fields); names are unique."""
    index: dict[str, str] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            index[f.name] = section
    for f in dataclasses.fields(FinetuneConfig):
        if f.name not in SECTIONS:
            index[f.name] = ""
    return index


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Checks `value` against the type hint of field `name`; ints are accepted for floats."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) > 1:  # e.g. lr: float | str ("auto"): the first type that accepts the value
            for option in inner:
                try:
                    return _coerce(name, value, option)
                except ConfigError:
                    pass
            raise ConfigError(f"{name} must be of type {' or '.join(a.__name__ for a in inner)}, "
                              f"got {type(value).__name__} {value!r}.")
        hint = inner[0]
    if value is None:
        raise ConfigError(f"{name} must not be empty.")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads "1e-3" as a string
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise ConfigError(f"{name} must be of type {hint.__name__}, got {type(value).__name__} {value!r}.")


def _build(cls: type, values: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"Unknown key {key!r} in {where}.{suggest(key, names)}")
        kwargs[key] = _coerce(key, value, hints[key])
    return cls(**kwargs)


def config_from_dict(values: Mapping[str, Any], base: FinetuneConfig | None = None) -> FinetuneConfig:
    """Builds a `FinetuneConfig` from a nested (`{data: {...}}`) or flat (`{dataset: ...}`) mapping.

    Keys not given keep the values of `base` (or the defaults). Unknown keys and wrong types raise
    `ConfigError` naming the key.

    Example:
        >>> config_from_dict({"data": {"dataset": "shapes"}, "epochs": 2}).train.epochs
        2
    """
    base = base or FinetuneConfig()
    if not isinstance(values, Mapping):
        raise ConfigError(f"A configuration must be a mapping of keys to values, got {type(values).__name__}.")
    index = field_index()
    sections: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    top: dict[str, Any] = {}
    for key, value in values.items():
        key = str(key)
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ConfigError(f"Section {key!r} must be a mapping, got {type(value).__name__}.")
            known = [f.name for f in dataclasses.fields(SECTIONS[key])]
            for k in value:
                if k not in known:
                    raise ConfigError(f"Unknown key {k!r} in section {key!r}.{suggest(str(k), known)}")
            sections[key].update(value)
        elif key in index:
            section = index[key]
            (sections[section] if section else top)[key] = value
        else:
            raise ConfigError(f"Unknown key {key!r}.{suggest(key, list(index) + list(SECTIONS))}")
    kwargs: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        current = dataclasses.asdict(getattr(base, section))
        current.update(sections[section])
        kwargs[section] = _build(cls, current, f"section {section!r}")
    hints = typing.get_type_hints(FinetuneConfig)
    for key, value in top.items():
        kwargs[key] = _coerce(key, value, hints[key])
    return dataclasses.replace(base, **kwargs)


def config_to_dict(cfg: FinetuneConfig) -> dict[str, Any]:
    """The nested mapping that `config_from_dict` reads back to an equal config."""
    return dataclasses.asdict(cfg)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a YAML mapping with the safe loader; raises `ConfigError` for a missing or malformed file."""
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"Config file not found: {path}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"Malformed YAML in {path}{where}: {getattr(e, 'problem', e)}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of keys to values, got {type(values).__name__}.")
    return values


def load_config(path: str | os.PathLike, base: FinetuneConfig | None = None) -> FinetuneConfig:
    """Reads a `FinetuneConfig` from YAML.

    Relative paths (image_dir, labels, data_dir, a .keras base, a weights file, output_dir) are resolved against the
    YAML file's folder, not the working directory.
    """
    values = load_yaml(path)
    return absolute_paths(config_from_dict(values, base), os.path.dirname(os.path.abspath(path)))


def absolute_paths(cfg: FinetuneConfig, folder: str | None = None) -> FinetuneConfig:
    """The config with image_dir, labels, data_dir, a .keras base or keras-hub preset folder, a weights file and output_dir
    made absolute.

    Args:
        cfg: A `FinetuneConfig`.
        folder: What relative paths are relative to. Defaults to `None` (the working directory).

    Example:
        >>> absolute_paths(config_from_dict({"image_dir": "imgs"}), "/data").data.image_dir
        '/data/imgs'
    """
    def fix(value: str | None, keep: tuple[str, ...] = ()) -> str | None:
        if not value or str(value).lower() in keep or os.path.isabs(value):
            return value
        return os.path.normpath(os.path.join(folder, value)) if folder else os.path.abspath(value)

    d, m = cfg.data, cfg.model
    if m.base.startswith("hub:"):  # a keras-hub preset folder; a preset name or a kaggle:// handle stays
        rest = m.base[len("hub:"):]
        base = "hub:" + fix(rest) if (os.sep in rest and "://" not in rest) else m.base
    else:
        base = fix(m.base) if (m.base.endswith(".keras") or os.sep in m.base) else m.base
    return dataclasses.replace(
        cfg, output_dir=fix(cfg.output_dir),
        data=dataclasses.replace(d, image_dir=fix(d.image_dir), data_dir=fix(d.data_dir),
                                 labels=fix(os.fspath(d.labels)) if isinstance(d.labels, (str, os.PathLike))
                                 else d.labels),  # a CSV path; pairs or a DataFrame stay (in Python only)
        model=dataclasses.replace(m, base=base, weights=fix(m.weights, keep=("imagenet", "none"))))


def differences(old: Any, new: Any, *, ignore: tuple[str, ...] = (), paths: tuple[str, ...] = (),
                prefix: str = "") -> list[str]:
    """`key: old -> new` for every setting that differs between two (nested) dicts of settings, as
    `config_to_dict` writes them; a nested key is named by its path (`train.epochs`).

    Keys in `ignore` are skipped; values of keys in `paths` are compared as normalised paths.

    Example:
        >>> differences({"train": {"epochs": 3}}, {"train": {"epochs": 5}})
        ['train.epochs: 3 -> 5']
    """
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[str] = []
        for key in dict.fromkeys([*old, *new]):
            if key not in ignore:
                out += differences(old.get(key), new.get(key), ignore=ignore, paths=paths,
                                   prefix=f"{prefix}{key}.")
        return out
    key = prefix.rstrip(".")
    if key.rpartition(".")[2] in paths and old and new:
        old, new = os.path.normpath(str(old)), os.path.normpath(str(new))
    return [] if old == new else [f"{key}: {old!r} -> {new!r}"]


def dump_yaml(values: Mapping[str, Any]) -> str:
    """YAML text of a mapping, keys in insertion order."""
    return yaml.safe_dump(dict(values), sort_keys=False, default_flow_style=False)
