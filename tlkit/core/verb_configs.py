"""The configurations of the verbs other than `finetune`: what each adds to (or uses instead of) a
`FinetuneConfig`, with its defaults and choices. As in `tlkit.core.config`, a dataclass here is the only home
of a default: the verbs' keyword defaults and the command line's flags are read from these fields and their
`Attributes:` (whose text is each flag's help).

Example:
    ExportConfig(model="runs/x", format="tflite", quantize="int8").quantize
    # -> 'int8'
"""
from __future__ import annotations

import dataclasses
import os

from tlkit.core.config import DataConfig, _choice, _positive, _range
from tlkit.core.config_io import load_config
from tlkit.core.errors import ConfigError, suggest

EXPORT_FORMATS = ("keras", "savedmodel", "tflite", "onnx")
QUANTIZATIONS = ("none", "float16", "dynamic", "int8")
INT8_INPUTS = ("uint8", "int8", "float32")
SPLITS = ("train", "val", "test")


def run_data(run_dir: str | None, dataset: str | None = None, image_dir: str | None = None,
             data_dir: str | None = None, table: str | None = None) -> tuple[DataConfig, int]:
    """`(data, seed)` of a verb that reads data: the run folder's own data section and seed (from its config.yaml),
    with `dataset`/`image_dir`/`table` (a labels CSV; together: one replaces the others, so data named here drops
    the run's table) and `data_dir` overriding it when given; the
    defaults (no data named, seed 42) without a run folder. "The data defaults to the run's" lives here only.

    Example:
        run_data("runs/resnet50-shapes-1")[0].dataset
        # -> 'shapes'
    """
    data, seed = DataConfig(), 42
    path = os.path.join(run_dir, "config.yaml") if run_dir else None
    if path and os.path.isfile(path):
        run_cfg = load_config(path)
        data, seed = run_cfg.data, run_cfg.seed
    if dataset or image_dir or table:
        data = dataclasses.replace(data, dataset=dataset, image_dir=image_dir, labels=table)
    if data_dir:
        data = dataclasses.replace(data, data_dir=data_dir)
    return data, seed


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """What `tlkit evaluate` reads: the model, the data and what to write (flag help: the text below).

    Attributes:
        model: A run folder (model.keras + labels.txt) or a .keras file.
        dataset: TFDS name or shapes (default: the run's own data).
        image_dir: A folder of class sub-folders (default: the run's own data).
        data_dir: TensorFlow Datasets data folder.
        split: Split to evaluate (test falls back to val when there is none). Default: test.
        batch_size: Batch size (default: the run's, else 32).
        output_dir: Where to write metrics.json, confusion_matrix.png, confusion_matrix.csv and misclassified.png
            (default: RUN/eval-SPLIT for a run folder; a .keras file needs it to write files).
        labels: Class names, one per line, index = label (default: labels.txt beside the model, else the
            data's class names); a .csv file is a table of images and labels to evaluate on instead, its
            relative paths under --image-dir.
        label_delimiter: With a .csv --labels: several labels a cell, separated by this (multi-label; default: the
            run's own).
        num_misclassified: Worst errors drawn in misclassified.png and listed in metrics.json (default: 16).
        tta: Test-time augmentation: average the probabilities of each image and N deterministic views
            (flip, centre crop, its flip, corner crops, ...; crops at the scale the run was trained on), 0-11;
            0-5, crops only, for a run trained without flips; metrics.json records it (default: 0, off).
        ood: A folder of images of none of the classes: report AUROC and FPR@95%TPR of the scores msp,
            energy, mahalanobis and knn, and store in the run folder (ood.json) the top-probability threshold below
            which predict answers 'unknown' (the one that accepts 95% of the validation images).
        reject_below: Store this threshold (0 < P < 1) on the top probability instead of the 95%-of-validation one.
    """

    model: str | None = None
    dataset: str | None = None
    image_dir: str | None = None
    data_dir: str | None = None
    split: str = "test"
    batch_size: int | None = None
    output_dir: str | None = None
    labels: str | None = None
    label_delimiter: str | None = None
    num_misclassified: int = 16
    tta: int = 0
    ood: str | None = None
    reject_below: float | None = None

    def validate(self) -> "EvaluateConfig":
        """Checks the choices; raises `ConfigError` naming the bad value. Returns self."""
        _choice("split", self.split, SPLITS)
        return self


@dataclasses.dataclass(frozen=True)
class LRFindConfig:
    """What `tlkit lr-find` adds to a `FinetuneConfig` (flag help: the text below).

    Attributes:
        start_lr: First learning rate (default: 1e-7).
        end_lr: Last learning rate (default: 10).
        num_steps: Batches to run at most (default: 100).
        stage: Stage of the strategy's plan to search: head, finetune, full, top_k or unfreeze_N (default: the
            first stage, whose LR is --lr).
    """

    start_lr: float = 1e-7
    end_lr: float = 10.0
    num_steps: int = 100
    stage: str | None = None


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """What `tlkit export` reads (flag help: the text below).

    Attributes:
        model: A run folder (model.keras + labels.txt + config.yaml) or a .keras file.
        format: keras (.keras + labels.txt), savedmodel (uint8-image and encoded-bytes signatures), tflite, or
            onnx (needs the extra: pip install 'tlkit[onnx]').
        output: Export folder, or the artifact path (.keras, .tflite, .onnx; a SavedModel is a folder).
            Default: RUN/export/FORMAT[-QUANTIZE].
        quantize: TFLite only: none, float16 weights, dynamic (int8 weights), int8 (full integer, calibrated).
            Default: none.
        int8_input: With --quantize int8: input and output type (uint8 takes raw pixels). Default: uint8.
        dataset: Data for the check and int8 calibration: TFDS name or shapes (default: the run's own data).
        image_dir: A folder of class sub-folders, instead of --dataset.
        data_dir: TensorFlow Datasets data folder.
        calibration_steps: Calibration images for --quantize int8 (training split first). Default: 100.
        check_images: Image files or folders for the parity check (default: the data's validation split first).
        num_check: Images in the parity check. Default: 32.
        min_agreement: Required top-1 agreement, 0..1 (default: 1.0 for float exports, 0.95 dynamic, 0.90 int8).
        max_diff: Largest allowed |p_export - p_keras|, inf for no bound (default: 1e-3 float exports, 2e-2
            float16, no bound for dynamic and int8).
        overwrite: Replace an existing export at --output.
    """

    model: str | None = None
    format: str = "savedmodel"
    output: str | None = None
    quantize: str = "none"
    int8_input: str = "uint8"
    dataset: str | None = None
    image_dir: str | None = None
    data_dir: str | None = None
    calibration_steps: int = 100
    check_images: tuple[str, ...] | None = None
    num_check: int = 32
    min_agreement: float | None = None
    max_diff: float | None = None
    overwrite: bool = False


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    """What `tlkit predict` reads (flag help: the text below).

    Attributes:
        model: A run folder, .keras, SavedModel or export folder, .tflite or .onnx.
        inputs: Image files and/or folders (searched recursively).
        top_k: Classes shown per image. Default: 5.
        batch_size: Images per model call. Default: 32.
        tta: Test-time augmentation: average each image's probabilities over it and N deterministic views
            (flip, centre crop, its flip, corner crops, ...), 0-11; 0-5, crops only, for a run trained without
            flips (default: 0, off).
        reject_below: Answer 'unknown' for an image whose top probability is below P, 0 < P < 1 (default: the
            threshold tlkit evaluate --ood stored with the run or export, if any).
        explain: Write Grad-CAM overlays into DIR: IMAGE_gradcam.png (the heat map of the predicted class over
            each image) and gradcam.csv; needs a run folder or .keras model (not .tflite, ONNX, SavedModel).
    """

    model: str | None = None
    inputs: tuple[str, ...] = ()
    top_k: int = 5
    batch_size: int = 32
    tta: int = 0
    reject_below: float | None = None
    explain: str | None = None


PRUNE_SCHEDULES = ("polynomial", "constant")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """What `tlkit distill` adds to a `FinetuneConfig` (whose `model.base` is the student backbone).

    Attributes:
        teacher: A run folder (model.keras + labels.txt) or a `.keras` classifier whose layer `logits`
            gives the pre-softmax outputs (else the log of its probabilities is used). Defaults to `None`
            (required).
        temperature: Softening temperature T of both softmaxes in the distillation term. Defaults to `4.0`.
        alpha: Weight of the hard-label cross-entropy; the distillation term
            `T^2 * KL(softmax(teacher/T) || softmax(student/T))` gets `1 - alpha`. Defaults to `0.5`.
        cache_teacher: Compute the teacher's logits once and feed them with the data. `None` caches when
            the training split has no augmentation (`--augment none`); `True` requires that. Defaults to `None`.
        latency_runs: Timed single-image CPU forward passes per model for the latency column.
            Defaults to `30`.
    """

    teacher: str | None = None
    temperature: float = 4.0
    alpha: float = 0.5
    cache_teacher: bool | None = None
    latency_runs: int = 30

    def validate(self) -> "DistillConfig":
        """Checks ranges; raises `ConfigError` naming the bad value. Returns self."""
        if not self.teacher:
            raise ConfigError("distill needs a teacher: --teacher RUN_DIR or --teacher MODEL.keras.")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}.")
        _range("alpha", self.alpha, 0.0, 1.0)
        _positive("latency_runs", self.latency_runs)
        return self


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """How `tlkit prune` sparsifies a fine-tuned run.

    Attributes:
        run_dir: The run folder to prune (model.keras, labels.txt, config.yaml). Defaults to `None` (required).
        sparsity: Final fraction of zero weights in every pruned kernel (Conv2D, DepthwiseConv2D, Dense).
            Defaults to `0.5`.
        schedule: `polynomial` (sparsity rises from 0 as 1 - (1 - t)^3 over the first `ramp` of the
            fine-tuning steps, as tfmot's PolynomialDecay) or `constant` (one-shot: full sparsity from the
            first step). Defaults to `"polynomial"`.
        epochs: Fine-tuning epochs to recover accuracy under the masks. Defaults to `2`.
        ramp: Fraction of the fine-tuning steps over which `polynomial` reaches the final sparsity.
            Defaults to `0.7`.
        frequency: Steps between two mask updates of `polynomial`. Defaults to `None` (about ten updates).
        lr: Peak learning rate of the fine-tuning. Defaults to `None` (the run's `lr * finetune_lr_scale`).
        prune_head: Also prune the classification layer `logits`. Defaults to `False`.
        sweep: Comma-separated extra sparsities evaluated one-shot (no fine-tuning) for the accuracy
            table, e.g. `0.25,0.5,0.75`. Defaults to `None`.
        batch_size: Batch size. Defaults to `None` (the run's).
        output_dir: Output run folder. Defaults to `None` (`RUN_DIR-pruned<percent>`).
        overwrite: Allow writing into an existing non-empty output folder. Defaults to `False`.
    """

    run_dir: str | None = None
    sparsity: float = 0.5
    schedule: str = "polynomial"
    epochs: int = 2
    ramp: float = 0.7
    frequency: int | None = None
    lr: float | None = None
    prune_head: bool = False
    sweep: str | None = None
    batch_size: int | None = None
    output_dir: str | None = None
    overwrite: bool = False

    def validate(self) -> "PruneConfig":
        """Checks choices and ranges; raises `ConfigError` naming the bad value. Returns self."""
        if not self.run_dir:
            raise ConfigError("prune needs a run folder: tlkit prune RUN_DIR --sparsity 0.5.")
        if not 0.0 <= self.sparsity < 1.0:
            raise ConfigError(f"sparsity must be in [0, 1), got {self.sparsity}.")
        _choice("schedule", self.schedule, PRUNE_SCHEDULES)
        if self.epochs < 0:
            raise ConfigError(f"epochs must be >= 0, got {self.epochs}.")
        if not 0.0 < self.ramp <= 1.0:
            raise ConfigError(f"ramp must be in (0, 1], got {self.ramp}.")
        if self.frequency is not None:
            _positive("frequency", self.frequency)
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}.")
        if self.batch_size is not None:
            _positive("batch_size", self.batch_size)
        for s in parse_sparsities(self.sweep):
            if not 0.0 <= s < 1.0:
                raise ConfigError(f"sweep sparsities must be in [0, 1), got {s} in {self.sweep!r}.")
        return self


def parse_sparsities(text: str | None) -> list[float]:
    """Parses `sweep` ("0.25,0.5") into floats; raises `ConfigError` naming the bad text."""
    if not text:
        return []
    try:
        return [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"sweep must be comma-separated numbers such as 0.25,0.5,0.75, got {text!r}.") from None


TUNERS = ("random", "bayesian", "hyperband", "grid")
TUNE_OBJECTIVES = ("val_accuracy", "val_map", "val_loss")


def maximised(objective: str) -> bool:
    """Whether a tuning objective is maximised (`val_accuracy`, `val_map`) rather than minimised (`val_loss`).

    Example:
        >>> maximised("val_map"), maximised("val_loss")
        (True, False)
    """
    return not objective.endswith("loss")
TUNE_DIMENSIONS = ("dropout", "label_smoothing", "unfreeze_stages", "optimizer", "augment")
TWO_STAGE_LR_CHOICES = ("finetune", "head", "both")


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """What `tlkit tune` adds to a `FinetuneConfig`: the search space and the search.

    The learning rate (log scale) and the batch size are always searched; `search` adds more dimensions.
    The ranges of the optional dimensions are fixed: dropout 0.0-0.5 (step 0.1), label_smoothing 0.0-0.2
    (step 0.05), unfreeze_stages 1 to the backbone's number of stages, optimizer adam|adamw|sgd, augment
    none|light|standard|strong.

    Attributes:
        tuner: Search algorithm: `random`, `bayesian` (Gaussian-process Bayesian optimisation), `hyperband`
            (many short trials, the best continued for longer) or `grid` (every combination, the learning
            rate at `grid_points` log-spaced values). Defaults to `"bayesian"`.
        max_trials: Number of trials (hyperparameter combinations) at most; re-running with a larger value
            continues the search. Defaults to `10`.
        executions_per_trial: Trainings per trial (different initialisation), averaged. Defaults to `1`.
        objective: `val_accuracy` (maximised), `val_map` (maximised: the mean average precision of multi-label data,
            which stands in for `val_accuracy` there) or `val_loss` (minimised), the best epoch of a trial counts.
            Defaults to `"val_accuracy"` (`val_map` for multi-label data).
        trial_epochs: Epochs of each trial; replaces `epochs` (for `two_stage` the fine-tuning stage: the
            head stage keeps `head_steps`); the best configuration keeps your `epochs`. For `hyperband`
            the most epochs a trial gets. Defaults to `None` (`epochs`).
        lr_range: Lowest and highest learning rate, searched on a log scale. Defaults to `(1e-05, 0.01)`.
        batch_sizes: Batch sizes to choose from (the data is re-batched for every trial).
            Defaults to `(16, 32, 64)`.
        search: Further dimensions to search, comma-separated, from `dropout`, `label_smoothing`,
            `unfreeze_stages` (two_stage and top_k), `optimizer`, `augment`. Defaults to `""` (none).
        two_stage_lr: Which learning rate is searched for `strategy: two_stage`: `finetune` (the fine-tuning
            stage's; the head stage stays at `lr` for `head_steps`), `head` (the warm-up's `lr`, the
            fine-tuning stage following at `lr * finetune_lr_scale`) or `both` (two dimensions in
            `lr_range`). Defaults to `"finetune"`.
        grid_points: Learning-rate values of the `grid` tuner, log-spaced over `lr_range`, ends included.
            Defaults to `4`.
        max_consecutive_failures: Stop the search after this many failed trials in a row. Defaults to `None`
            (never: failed trials are recorded and the search goes on).
        then_finetune: Run the full `finetune` with the best configuration at the end, into the `finetune/`
            sub-folder of the run folder. Defaults to `False`.
    """

    tuner: str = "bayesian"
    max_trials: int = 10
    executions_per_trial: int = 1
    objective: str = "val_accuracy"
    trial_epochs: int | None = None
    lr_range: tuple[float, float] = (1e-5, 1e-2)
    batch_sizes: tuple[int, ...] = (16, 32, 64)
    search: str = ""
    two_stage_lr: str = "finetune"
    grid_points: int = 4
    max_consecutive_failures: int | None = None
    then_finetune: bool = False

    @property
    def dimensions(self) -> tuple[str, ...]:
        """The optional dimensions named by `search`, in order, without duplicates."""
        names = [s.strip() for s in str(self.search or "").split(",") if s.strip()]
        return tuple(dict.fromkeys(names))

    def validate(self) -> "TuneConfig":
        """Checks choices and ranges; raises `ConfigError` naming the bad value. Returns self."""
        _choice("tuner", self.tuner, TUNERS)
        _choice("objective", self.objective, TUNE_OBJECTIVES)
        _choice("two_stage_lr", self.two_stage_lr, TWO_STAGE_LR_CHOICES)
        for name in self.dimensions:
            if name not in TUNE_DIMENSIONS:
                raise ConfigError(f"Unknown search dimension {name!r} in --search {self.search!r}. Choose from: "
                                  f"{', '.join(TUNE_DIMENSIONS)}.{suggest(name, TUNE_DIMENSIONS)}")
        _positive("max_trials", self.max_trials)
        _positive("executions_per_trial", self.executions_per_trial)
        if self.trial_epochs is not None:
            _positive("trial_epochs", self.trial_epochs)
        if self.max_consecutive_failures is not None:
            _positive("max_consecutive_failures", self.max_consecutive_failures)
        if len(self.lr_range) != 2:
            raise ConfigError(f"lr_range must be two numbers LO HI, got {self.lr_range!r}.")
        lo, hi = self.lr_range
        if not 0 < lo < hi:
            raise ConfigError(f"lr_range must satisfy 0 < LO < HI, got {lo:g} {hi:g}.")
        if not self.batch_sizes:
            raise ConfigError("batch_sizes must name at least one batch size.")
        for b in self.batch_sizes:
            if isinstance(b, bool) or not isinstance(b, int) or b < 1:
                raise ConfigError(f"batch_sizes must be positive integers, got {b!r} in {list(self.batch_sizes)}.")
        _positive("grid_points", self.grid_points)
        return self
