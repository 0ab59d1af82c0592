"""Configuration dataclasses of a run (`FinetuneConfig` and its sections): the ONLY home of their defaults;
the other verbs' in `tlkit.core.verb_configs`, reading and writing them (YAML, mappings) in `tlkit.core.config_io`.

A configuration is layered as in timm: defaults here, then a YAML file (`--config`), then command-line
flags; the resolved configuration is written as `config.yaml` next to the outputs so any run can be
repeated exactly with `tlkit finetune --config RUN/config.yaml`.

Example:
    cfg = FinetuneConfig(data=DataConfig(dataset="shapes", image_size=32))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=3))
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from tlkit.core.errors import ConfigError, suggest

AUGMENT_PRESETS = ("auto", "none", "light", "standard", "strong")
CACHE_CHOICES = ("auto", "memory", "disk", "none")
STRATEGIES = ("auto", "feature_extraction", "two_stage", "top_k", "gradual", "full")
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = ("constant", "cosine", "step", "exponential")
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
XLA_CHOICES = ("auto", "on", "off")
DISTRIBUTE_CHOICES = ("auto", "none", "mirrored", "multiworker", "tpu")
CLASS_WEIGHT_CHOICES = ("none", "balanced")
DEFAULT_EPOCHS = 10  # TrainConfig.epochs when not given
AUTO_LR = "auto"  # TrainConfig.lr: run the learning-rate finder first (tlkit.engine.lr_range)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they are fed.

    Attributes:
        dataset: A TensorFlow Datasets name (`oxford_flowers102`, alias `oxford_flowers`) or `shapes`, the
            built-in synthetic dataset. Defaults to `None` (then `image_dir` must be given).
        image_dir: A folder with one sub-folder per class, or with `train/`, `val/` and `test/` sub-folders
            that each hold class sub-folders; with `labels`, the folder that the table's relative file names are
            relative to. Defaults to `None`.
        labels: A CSV table of the images and their labels instead of class sub-folders: a header row, a
            `file_column` (a path, relative to `image_dir`, else to the CSV's folder), a `label_column` and an
            optional `split_column` (`train`, `val`, `test`; without it `val_split` holds out a stratified
            validation split). Rows naming a missing or unreadable file are skipped and counted. In Python also a
            sequence of `(path, label)` or `(path, label, split)` tuples, or a pandas DataFrame; a run folder then
            keeps it as `data.csv`. Defaults to `None`.
        file_column: The table's column of image files. Defaults to `"file"`.
        label_column: The table's column of labels. Defaults to `"label"`.
        split_column: The table's column of splits, used when present (a name other than the default must be
            present). Defaults to `"split"`.
        label_delimiter: Several labels in one cell of the table's label column, separated by this (e.g. a space,
            as in Kaggle's Planet CSV): multi-label data. Needs `labels`. Defaults to `None` (one label a cell; in
            Python a cell may also be a list or tuple of labels).
        multi_label: Multi-label classification: an image may have several labels (a sigmoid per class, binary
            cross-entropy, per-class thresholds chosen on the validation split, mAP as the metric). `None` decides
            from the data: multi-label when any row of the table has more than one label, or for a TensorFlow
            Datasets label that is a sequence of class labels. Defaults to `None`.
        data_dir: TensorFlow Datasets data folder (for offline use). Defaults to `None` (tfds's own).
        val_split: Fraction of the training data held out for validation when the data has no validation
            split. Defaults to `0.1`.
        image_size: Side in pixels of the square model input. Defaults to `None` (the backbone's default).
        batch_size: Global batch size. Defaults to `32`.
        augment: Augmentation preset of the training split: `auto`, `none`, `light` (flip, crop), `standard`
            (+ rotation, zoom, contrast) or `strong` (+ RandAugment, mixup/cutmix). `auto` (`finetune`): after the
            head stage, the strongest of `standard`, `light`, `none` whose augmented training images the converged
            head still classifies at least as well as the unseen validation images, and the flip only if flipped
            training images pass the same check (`tlkit.engine.adapt`); the choice is written into the run's
            config.yaml. Elsewhere (`tune`, `distill`, `prune`, `lr-find`) `auto` is `light`. Defaults to `"auto"`.
        flip: Override the preset's random horizontal flip (`True`/`False`). Defaults to `None` (the preset's;
            with `augment: auto`, decided from the data).
        cache: Cache decoded, resized images in `memory`, on `disk` (in the run folder) or `none`; `auto` decides
            from their decoded size: memory when it fits a quarter of the memory available, else disk when the
            run folder's disk has room, else none (`tlkit.data.cache_policy`). Defaults to `"auto"`.
        shapes_per_class: Training images per class of the built-in `shapes` dataset. Defaults to `200`.
    """

    dataset: str | None = None
    image_dir: str | None = None
    labels: str | None = None
    file_column: str = "file"
    label_column: str = "label"
    split_column: str = "split"
    label_delimiter: str | None = None
    multi_label: bool | None = None
    data_dir: str | None = None
    val_split: float = 0.1
    image_size: int | None = None
    batch_size: int = 32
    augment: str = "auto"
    flip: bool | None = None
    cache: str = "auto"
    shapes_per_class: int = 200


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The backbone and the classification head.

    Attributes:
        base: A registered backbone name (`tlkit.list_backbones()`), `hub:PRESET` (a keras-hub preset name
            such as `hub:resnet_50_imagenet`, or a local preset folder `hub:/path/to/preset`; needs the `hub`
            extra) or the path of a `.keras` backbone whose input is raw 0-255 RGB and whose output is a
            feature map or vector. Defaults to `"resnet50"`.
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
        strategy: `auto` (the head trained to convergence on cached features, then short trials of fine-tuning
            from it (the top `unfreeze_stages` stages at `lr * finetune_lr_scale`, the whole backbone at that rate,
            the whole backbone at `lr`), the best on validation continuing for the rest of a budget counted in
            optimizer steps (`finetune_steps`), and no fine-tuning when no trial beats the head: see
            `tlkit.engine.adapt`), `feature_extraction` (base frozen: the head alone), `two_stage` (the head trained to
            convergence on the frozen base's features, then the top `unfreeze_stages` stages with the head, the
            backbone at `lr * finetune_lr_scale`), `top_k` (the top `unfreeze_stages` stages from the start),
            `gradual` (head, then one more stage every `gradual_every` epochs, top down) or `full`.
            Defaults to `"auto"`.
        epochs: Epochs over the training images of the stages that train the backbone (`two_stage`: after the
            head stage; `feature_extraction`: of the head, at least `head_steps` steps). `None`: 10, and for `auto`
            a budget of `max(finetune_steps, 30 passes)` optimizer steps; a number given for `auto` is its budget in
            passes over the training split (`finetune_steps` is then not used). Defaults to `None`.
        head_steps: Optimizer steps of the head stage with the base frozen (`two_stage`, `gradual`,
            `feature_extraction`), counted in steps so that it means the same on 50 images and on 50,000;
            rounded up to whole passes over the training split. The head trains on features computed once from
            un-augmented images (seconds, not epochs of the backbone) unless `cache_features` is off, and
            the best of its passes on the validation split is kept. `0` skips the head stage.
            Defaults to `300`.
        finetune_steps: `auto` without `epochs`: the fine-tuning budget is at least this many optimizer steps (and
            at least 30 passes over the training split), so that 50 images get as many updates as 500; its trials
            take a fifth of it each. Defaults to `500`.
        trial_warmup: `auto`: the share of each trial's steps over which its rate rises linearly (from a hundredth
            of it) before staying constant; `0` starts every trial at its rate. A trial that jumps from the converged
            probe to a high rate can collapse within its short budget (the whole backbone at `lr` on some near
            pairs) where a longer run would recover; with the ramp it is an honest candidate (measured on the
            benchmark's 12 pairs: README). Defaults to `0.3`.
        unfreeze_stages: Number of top backbone stages to unfreeze (`two_stage`, `top_k`). Defaults to `2`.
        gradual_every: Epochs between two unfreezings of `gradual`. Defaults to `1`.
        finetune_lr_scale: Learning-rate factor of the backbone in the stages after the head stage
            (`two_stage`, `gradual`). Defaults to `0.1`.
        optimizer: `adam`, `adamw`, `sgd` (with momentum) or `rmsprop`. Defaults to `"adam"`.
        lr: Peak learning rate (of the head stage for `two_stage`), or `auto`: run the learning-rate finder
            (`tlkit lr-find`) on the first stage and train with its suggestion; the number found is saved
            in the run's config.yaml. Defaults to `1e-3`.
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
        tensorboard: Write TensorBoard logs to the run folder (needs the `tensorboard` extra; refused up front
            without it). Defaults to `False`.
        lr_mult: Discriminative learning rates: each backbone stage trains at the head's learning rate times
            `lr_mult ** depth`, where the top stage has depth 1, the one below it 2, and so on (fastai's
            `slice(lo, hi)`, ULMFiT's 1/2.6). `1.0` is off. Defaults to `1.0`.
        stage_lrs: Comma-separated learning-rate factors, one per backbone stage, bottom (stem) first, each
            relative to the head's learning rate (e.g. `0.01,0.03,0.1,0.3,1`); overrides `lr_mult`.
            Defaults to `None` (off).
        class_weight: Loss weight per class of the training examples: `none`, `balanced` (inverse frequency in the
            training split, `n / (classes * count)`, mean 1 over the training images) or one number per class in
            labels.txt order (comma-separated). `balanced` is resolved when the data is read and the numbers are
            written into the run's config.yaml. Validation loss and metrics stay unweighted. Defaults to `"none"`.
        ema: Keep an exponential moving average of the trained weights in the stages that train on images; it is
            what validation sees, what is checkpointed and what model.keras holds. The average restarts at each
            stage; the head stage on cached features keeps its best pass instead. Defaults to `False`.
        ema_steps: Horizon of `ema` in optimizer steps: the decay is `1 - 1 / ema_steps`, warmed up as
            `min(1 - 1/ema_steps, (1 + t) / (10 + t))` at the t-th step of a stage, so a short run averages its
            recent steps and a long one its last ~`ema_steps`. Defaults to `1000`.
    """

    strategy: str = "auto"
    epochs: int | None = None
    head_steps: int = 300
    finetune_steps: int = 500
    trial_warmup: float = 0.3
    unfreeze_stages: int = 2
    gradual_every: int = 1
    finetune_lr_scale: float = 0.1
    optimizer: str = "adam"
    lr: float | str = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    decay_rate: float = 0.1
    decay_every: int = 3
    label_smoothing: float = 0.1
    early_stopping: int | None = None
    tensorboard: bool = False
    lr_mult: float = 1.0
    stage_lrs: str | None = None
    class_weight: str | list[float] = "none"
    ema: bool = False
    ema_steps: int = 1000

    @property
    def num_epochs(self) -> int:
        """`epochs`, with `None` resolved to `DEFAULT_EPOCHS`."""
        return DEFAULT_EPOCHS if self.epochs is None else int(self.epochs)


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
        cache_features: Train the head stage (backbone frozen) on base features of the un-augmented training
            images computed once (`tlkit.engine.features`): `head_steps` steps then cost seconds, and the best pass on
            the validation features is kept; the stage is one row of history.csv. `None` (auto) and `True`
            (`--cache-features`): on; `False` (`--no-cache-features`): the head stage trains on the augmented
            images, `ceil(head_steps / batches per epoch)` epochs. Defaults to `None`.
    """

    precision: str = "auto"
    xla: str = "auto"
    distribute: str = "auto"
    deterministic: bool = False
    cache_features: bool | None = None


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
        resume: Continue the interrupted run in `output_dir` from its last finished epoch (weights,
            optimizer and learning-rate schedule state); starts from the beginning when the folder has no
            checkpoint. Defaults to `False`.
    """

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    runtime: RuntimeConfig = dataclasses.field(default_factory=RuntimeConfig)
    seed: int = 42
    output_dir: str | None = None
    overwrite: bool = False
    resume: bool = False

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
        if d.dataset is None and d.image_dir is None and d.labels is None:
            raise ConfigError("No data given: pass --dataset NAME (e.g. shapes, oxford_flowers102), --image-dir DIR "
                              "or --labels FILE.csv.")
        if d.dataset is not None and (d.image_dir is not None or d.labels is not None):
            raise ConfigError("Give either --dataset or --image-dir/--labels, not both.")
        for name in ("file_column", "label_column", "split_column"):
            if not str(getattr(d, name)).strip():
                raise ConfigError(f"{name} must not be empty.")
        check_label_delimiter(d)
        _range("val_split", d.val_split, 0.0, 0.9)
        _positive("batch_size", d.batch_size)
        _positive("shapes_per_class", d.shapes_per_class)
        if d.image_size is not None and d.image_size < 8:
            raise ConfigError(f"image_size must be at least 8, got {d.image_size}.")
        _range("dropout", m.dropout, 0.0, 0.99)
        _range("label_smoothing", t.label_smoothing, 0.0, 0.99)
        _range("l2", m.l2, 0.0, 1.0)
        for name in ("epochs", "head_steps", "unfreeze_stages", "finetune_steps"):
            if getattr(t, name) is not None and getattr(t, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(t, name)}.")
        _positive("gradual_every", t.gradual_every)
        _positive("decay_every", t.decay_every)
        if isinstance(t.lr, str):
            if t.lr != AUTO_LR:
                raise ConfigError(f"lr must be a positive number or {AUTO_LR!r}, got {t.lr!r}.")
        elif not t.lr > 0:
            raise ConfigError(f"lr must be > 0, got {t.lr}.")
        if t.early_stopping is not None and t.early_stopping < 1:
            raise ConfigError(f"early_stopping must be >= 1 epoch, got {t.early_stopping}.")
        _range("trial_warmup", t.trial_warmup, 0.0, 0.9)
        if t.warmup_epochs < 0:
            raise ConfigError(f"warmup_epochs must be >= 0, got {t.warmup_epochs}.")
        if not t.lr_mult > 0:
            raise ConfigError(f"lr_mult must be > 0, got {t.lr_mult}.")
        if t.stage_lrs is not None:
            parse_stage_lrs(t.stage_lrs)
        parse_class_weight(t.class_weight)
        _positive("ema_steps", t.ema_steps)
        if t.tensorboard:
            require_tensorboard()
        return self


def check_label_delimiter(d: DataConfig) -> None:
    """Refuses `label_delimiter` without a labels table, an empty one, or one that contradicts `multi_label`."""
    if d.label_delimiter is None:
        return
    if d.labels is None:
        raise ConfigError("--label-delimiter needs --labels FILE.csv (a table whose label cells hold several labels).")
    if d.label_delimiter == "" or "\n" in d.label_delimiter:
        raise ConfigError(f"label_delimiter must be a non-empty string without a line break, got {d.label_delimiter!r}.")
    if d.multi_label is False:
        raise ConfigError("--label-delimiter means several labels a cell: it cannot go with --no-multi-label.")


def require_tensorboard() -> None:
    """Refuses `--tensorboard` up front when TensorBoard is missing, in one `ConfigError` line.

    TensorFlow 2.21 no longer installs TensorBoard, and without it `tf.summary` raises `TBNotInstalledError` at
    the first write, after the first epoch, with the run folder half written. `validate()` calls this, before
    anything is read or written.
    """
    import importlib.util

    try:
        found = importlib.util.find_spec("tensorboard") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ConfigError("--tensorboard needs TensorBoard, which TensorFlow no longer installs: "
                          "pip install 'tlkit[tensorboard]' (or pip install tensorboard), or drop --tensorboard.")


def parse_class_weight(value: Any) -> str | list[float]:
    """`none`, `balanced`, or the per-class numbers of `class_weight` (a list, or "1,2.5,1"); raises `ConfigError`.

    Example:
        >>> parse_class_weight("1, 2.5")
        [1.0, 2.5]
    """
    if isinstance(value, str) and value.strip().lower() in CLASS_WEIGHT_CHOICES:
        return value.strip().lower()
    items = value.split(",") if isinstance(value, str) else value
    try:
        numbers = [float(v) for v in items if not isinstance(v, bool) and str(v).strip()]
        ok = len(numbers) == len(list(items)) and bool(numbers) and all(math.isfinite(v) and v > 0 for v in numbers)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"class_weight must be none, balanced or one positive number per class "
                          f"(comma-separated, labels.txt order), got {value!r}.")
    return numbers


def parse_stage_lrs(text: str) -> list[float]:
    """Parses `stage_lrs` ("0.01,0.1,1") into positive floats; raises `ConfigError` naming the bad text.

    Example:
        >>> parse_stage_lrs("0.01, 0.1, 1")
        [0.01, 0.1, 1.0]
    """
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(v > 0 for v in values):
        raise ConfigError(f"stage_lrs must be comma-separated positive numbers, one per backbone stage, bottom "
                          f"first (e.g. 0.01,0.1,1), got {text!r}.")
    return values


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
