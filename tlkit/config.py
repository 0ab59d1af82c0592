"""Configuration dataclasses: the ONLY home of tlkit's defaults.

A configuration is layered as in timm: defaults here, then a YAML file (`--config`), then command-line
flags; the resolved configuration is written as `config.yaml` next to the outputs so any run can be
repeated exactly with `tlkit finetune --config RUN/config.yaml`.

Example:
    >>> cfg = FinetuneConfig(data=DataConfig(dataset="shapes", image_size=32))
    >>> cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=3))
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Mapping

import yaml

from tlkit.errors import ConfigError, suggest

AUGMENT_PRESETS = ("none", "light", "standard", "strong")
CACHE_CHOICES = ("memory", "disk", "none")
STRATEGIES = ("feature_extraction", "two_stage", "top_k", "gradual", "full")
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = ("constant", "cosine", "step", "exponential")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
XLA_CHOICES = ("auto", "on", "off")
DISTRIBUTE_CHOICES = ("auto", "none", "mirrored", "multiworker", "tpu")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are fed.

    Attributes:
        dataset: A TensorFlow Datasets name (`oxford_flowers102`, alias `oxford_flowers`) or `shapes`, the
            built-in synthetic dataset. Defaults to `None` (then `image_dir` must be given).
        image_dir: A folder with one sub-folder per class, or with `train/`, `val/` and `test/` sub-folders
            that each hold class sub-folders. Defaults to `None`.
        data_dir: TensorFlow Datasets data folder (for offline use). Defaults to `None` (tfds's own).
        val_split: Fraction of the training data held out for validation when the data has no validation
            split. Defaults to `0.1`.
        image_size: Side in pixels of the square model input. Defaults to `None` (the backbone's default).
        batch_size: Global batch size. Defaults to `32`.
        augment: Augmentation preset of the training split: `none`, `light` (flip, crop), `standard`
            (+ rotation, zoom, contrast) or `strong` (+ RandAugment, mixup/cutmix). Defaults to `"standard"`.
        cache: Cache decoded, resized images in `memory`, on `disk` (in the run folder) or `none`.
            Defaults to `"memory"`.
        shapes_per_class: Training images per class of the built-in `shapes` dataset. Defaults to `200`.
    """

    dataset: str | None = None
    image_dir: str | None = None
    data_dir: str | None = None
    val_split: float = 0.1
    image_size: int | None = None
    batch_size: int = 32
    augment: str = "standard"
    cache: str = "memory"
    shapes_per_class: int = 200


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The backbone and the classification head.

    Attributes:
        base: A registered backbone name (`tlkit.list_backbones()`) or the path of a `.keras` backbone
            whose input is raw 0-255 RGB and whose output is a feature map or vector. Defaults to `"resnet50"`.
        weights: `imagenet` (Keras's download and cache), `none` (random init) or the path of a weights file.
            Defaults to `"imagenet"`.
        dropout: Dropout rate before the classification layer. Defaults to `0.2`.
        l2: L2 penalty on the classification layer's kernel. Defaults to `0.0`.
        train_bn: Let BatchNorm layers of unfrozen stages train (batch statistics, trainable scale and
            offset). `None` means: frozen in inference mode for pretrained weights (Keras's transfer-learning
            advice), trained for `weights: none` (random statistics mean nothing). Defaults to `None`.
    """

    base: str = "resnet50"
    weights: str = "imagenet"
    dropout: float = 0.2
    l2: float = 0.0
    train_bn: bool | None = None

    @property
    def bn_trains(self) -> bool:
        """Whether BatchNorm trains, with `None` resolved from the weights."""
        if self.train_bn is not None:
            return self.train_bn
        return str(self.weights).lower() == "none"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How the model is trained.

    Attributes:
        strategy: `feature_extraction` (base frozen), `two_stage` (head warm-up, then the top
            `unfreeze_stages` stages at `lr * finetune_lr_scale`), `top_k` (the top `unfreeze_stages`
            stages from the start), `gradual` (one more stage every `gradual_every` epochs, top down) or
            `full`. Defaults to `"two_stage"`.
        epochs: Epochs of training; for `two_stage` the epochs after the head warm-up. Defaults to `10`.
        head_epochs: Epochs of head warm-up with the base frozen (`two_stage`). Defaults to `3`.
        unfreeze_stages: Number of top backbone stages to unfreeze (`two_stage`, `top_k`). Defaults to `2`.
        gradual_every: Epochs between two unfreezings of `gradual`. Defaults to `1`.
        finetune_lr_scale: Learning-rate factor of the fine-tuning stage of `two_stage`. Defaults to `0.1`.
        optimizer: `adam`, `adamw`, `sgd` (with momentum) or `rmsprop`. Defaults to `"adam"`.
        lr: Peak learning rate (of the head stage for `two_stage`). Defaults to `1e-3`.
        momentum: Momentum of `sgd` and `rmsprop`. Defaults to `0.9`.
        weight_decay: Decoupled weight decay. Defaults to `0.0` (`1e-4` is a good start with `adamw`).
        schedule: Learning-rate schedule within each stage: `constant`, `cosine`, `step` or `exponential`.
            Defaults to `"cosine"`.
        warmup_epochs: Linear warm-up at the start of each stage, in epochs (may be fractional).
            Defaults to `0.0`.
        decay_rate: Factor of `step` (every `decay_every` epochs) and `exponential` (per `decay_every`
            epochs, smoothly). Defaults to `0.1`.
        decay_every: Epochs per decay of `step`/`exponential`. Defaults to `3`.
        label_smoothing: Label smoothing of the cross-entropy. Defaults to `0.1`.
        early_stopping: Stop a stage after this many epochs without validation improvement.
            Defaults to `None` (off).
        tensorboard: Write TensorBoard logs to the run folder. Defaults to `False`.
    """

    strategy: str = "two_stage"
    epochs: int = 10
    head_epochs: int = 3
    unfreeze_stages: int = 2
    gradual_every: int = 1
    finetune_lr_scale: float = 0.1
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    decay_rate: float = 0.1
    decay_every: int = 3
    label_smoothing: float = 0.1
    early_stopping: int | None = None
    tensorboard: bool = False


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """Where and how fast it runs.

    Attributes:
        precision: `auto` (mixed_float16 on a GPU of compute capability >= 7.0, mixed_bfloat16 on TPU,
            float32 otherwise), `float32`, `mixed_float16` or `mixed_bfloat16`. Defaults to `"auto"`.
        xla: `auto` (on where it helps: a GPU without a distribution strategy), `on` or `off`.
            Defaults to `"auto"`.
        distribute: `auto` (mirrored with more than one GPU), `none`, `mirrored`, `multiworker` (reads
            `TF_CONFIG`) or `tpu`. Defaults to `"auto"`.
        deterministic: Make the input pipeline and ops deterministic (slower). Defaults to `False`.
    """

    precision: str = "auto"
    xla: str = "auto"
    distribute: str = "auto"
    deterministic: bool = False


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Everything `tlkit finetune` needs.

    Attributes:
        data: A `DataConfig`.
        model: A `ModelConfig`.
        train: A `TrainConfig`.
        runtime: A `RuntimeConfig`.
        seed: Seed of data splits, shuffling, augmentation and initialisation. Defaults to `42`.
        output_dir: Run folder. Defaults to `None` (`runs/<base>-<dataset>-<timestamp>`).
        overwrite: Allow writing into an existing non-empty run folder. Defaults to `False`.
    """

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)
    seed: int = 42
    output_dir: str | None = None
    overwrite: bool = False

    def validate(self) -> "FinetuneConfig":
        """Checks choices and ranges; raises `ConfigError` naming the bad value. Returns self."""
        d, m, t, r = self.data, self.model, self.train, self.runtime
        _choice("augment", d.augment, AUGMENT_PRESETS)
        _choice("cache", d.cache, CACHE_CHOICES)
        _choice("strategy", t.strategy, STRATEGIES)
        _choice("optimizer", t.optimizer, OPTIMIZERS)
        _choice("schedule", t.schedule, SCHEDULES)
        _choice("precision", r.precision, PRECISIONS)
        _choice("xla", r.xla, XLA_CHOICES)
        _choice("distribute", r.distribute, DISTRIBUTE_CHOICES)
        if d.dataset is None and d.image_dir is None:
            raise ConfigError("No data given: pass --dataset NAME (e.g. shapes, oxford_flowers102) or --image-dir DIR.")
        if d.dataset is not None and d.image_dir is not None:
            raise ConfigError("Give either --dataset or --image-dir, not both.")
        _range("val_split", d.val_split, 0.0, 0.9)
        _positive("batch_size", d.batch_size)
        _positive("shapes_per_class", d.shapes_per_class)
        if d.image_size is not None and d.image_size < 8:
            raise ConfigError(f"image_size must be at least 8, got {d.image_size}.")
        _range("dropout", m.dropout, 0.0, 0.99)
        _range("label_smoothing", t.label_smoothing, 0.0, 0.99)
        _range("l2", m.l2, 0.0, 1.0)
        for name in ("epochs", "head_epochs", "unfreeze_stages"):
            if getattr(t, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(t, name)}.")
        _positive("gradual_every", t.gradual_every)
        _positive("decay_every", t.decay_every)
        if not t.lr > 0:
            raise ConfigError(f"lr must be > 0, got {t.lr}.")
        if t.early_stopping is not None and t.early_stopping < 1:
            raise ConfigError(f"early_stopping must be >= 1 epoch, got {t.early_stopping}.")
        if t.warmup_epochs < 0:
            raise ConfigError(f"warmup_epochs must be >= 0, got {t.warmup_epochs}.")
        return self


SECTIONS: dict[str, type] = {
    "data": DataConfig, "model": ModelConfig, "train": TrainConfig, "runtime": RuntimeConfig,
}


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"Unknown {name} {value!r}. Choose one of: {', '.join(choices)}.{suggest(str(value), choices)}")


def _range(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ConfigError(f"{name} must be between {lo} and {hi}, got {value}.")


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{name} must be >= 1, got {value}.")


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
    """Reads a `FinetuneConfig` from YAML. Relative data paths are resolved against the file's folder."""
    values = load_yaml(path)
    cfg = config_from_dict(values, base)
    folder = os.path.dirname(os.path.abspath(path))
    d = cfg.data
    fixes = {}
    for key in ("image_dir", "data_dir"):
        value = getattr(d, key)
        if value and not os.path.isabs(value):
            fixes[key] = os.path.normpath(os.path.join(folder, value))
    if fixes:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(d, **fixes))
    if cfg.model.base.endswith(".keras") and not os.path.isabs(cfg.model.base):
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, base=os.path.normpath(os.path.join(folder, cfg.model.base))))
    return cfg


def dump_yaml(values: Mapping[str, Any]) -> str:
    """YAML text of a mapping, keys in insertion order."""
    return yaml.safe_dump(dict(values), sort_keys=False, default_flow_style=False)
