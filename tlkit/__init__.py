"""tlkit: transfer learning for Keras 3.

The public names are imported lazily: `import tlkit` (and `tlkit --help`) loads neither TensorFlow nor Keras;
the first use of a name that needs them (`tlkit.finetune`, `tlkit.evaluate`, ...) imports its module then.

Example:
    import tlkit
    from tlkit import FinetuneConfig, DataConfig, ModelConfig, TrainConfig
    result = tlkit.finetune(FinetuneConfig(data=DataConfig(dataset="shapes", image_size=64),
                                           model=ModelConfig(base="resnet50", weights="none"),
                                           train=TrainConfig(epochs=2)))
    result.metrics["val"]["accuracy"]
"""
import importlib as _importlib
import os as _os



_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Light modules (dataclasses, YAML, exceptions): imported at once.
from tlkit.core.config import DataConfig, FinetuneConfig, ModelConfig, RuntimeConfig, TrainConfig  # noqa: E402
from tlkit.core.config_io import config_from_dict, load_config  # noqa: E402
from tlkit.core.verb_configs import DistillConfig, PruneConfig, TuneConfig  # noqa: E402
from tlkit.core.errors import ConfigError, DataError, OfflineError, TlkitError  # noqa: E402

from tlkit.core import VERSION as __version__  # noqa: E402

# Everything else: name -> module, imported on first use (PEP 562).
_LAZY = {
    "Classifier": "tlkit.models.classifier",
    "get_backbone": "tlkit.models.backbones", "list_backbones": "tlkit.models.backbones",
    "Datasets": "tlkit.data", "list_datasets": "tlkit.data",
    "evaluate": "tlkit.verbs.evaluate",
    "ExportResult": "tlkit.verbs.export", "export": "tlkit.verbs.export",
    "Predictor": "tlkit.engine.predictors", "load": "tlkit.engine.predictors", "predict": "tlkit.verbs.predict",
    "LRFindResult": "tlkit.engine.lr_range", "lr_find": "tlkit.verbs.lr_find",
    "RunResult": "tlkit.engine.setup", "finetune": "tlkit.verbs.finetune",
    "distill": "tlkit.verbs.distill",
    "prune": "tlkit.verbs.prune",
    "TuneResult": "tlkit.verbs.tune", "tune": "tlkit.verbs.tune",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tlkit' has no attribute {name!r}")
    from tlkit.core.quiet import import_tensorflow

    import_tensorflow()  # TensorFlow's start-up lines filtered (tlkit.core.quiet)
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


def load_dataset(data: DataConfig, image_size: int = 224, seed: int = 42) -> "Datasets":
    """Loads the splits of a dataset (TFDS name, `shapes`, `image_dir`, or a `labels` table) without a model.

    Args:
        data: A `DataConfig`.
        image_size: Size the built-in dataset is drawn at. Defaults to `224`.
        seed: Seed of the train/validation split. Defaults to `42`.

    Returns:
        A `Datasets` whose splits `make_dataset` turns into batches.
    """
    from tlkit.data import load_sources

    return load_sources(data, data.image_size or image_size, seed)


__all__ = [
    "DataConfig", "FinetuneConfig", "ModelConfig", "RuntimeConfig", "TrainConfig", "config_from_dict", "load_config",
    "ConfigError", "DataError", "OfflineError", "TlkitError", "get_backbone", "list_backbones", "list_datasets",
    "load_dataset", "evaluate", "export", "ExportResult", "load", "predict", "Predictor",
    "lr_find", "LRFindResult", "finetune", "RunResult", "Datasets", "__version__",
    "distill", "DistillConfig", "prune", "PruneConfig",
    "tune", "TuneConfig", "TuneResult", "Classifier",
]
