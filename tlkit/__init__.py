"""tlkit: transfer learning for Keras 3.

The public names are imported lazily: `import tlkit` (and `tlkit --help`) loads neither TensorFlow nor Keras;
the first use of a name that needs them (`tlkit.finetune`, `tlkit.evaluate`, ...) imports its module then.

Example:
    >>> import tlkit
    >>> from tlkit import FinetuneConfig, DataConfig, ModelConfig, TrainConfig
    >>> result = tlkit.finetune(FinetuneConfig(data=DataConfig(dataset="shapes", image_size=64),
    ...                                        model=ModelConfig(base="resnet50", weights="none"),
    ...                                        train=TrainConfig(epochs=2)))
    >>> result.metrics["val"]["accuracy"]
"""
import importlib as _importlib
import os as _os
import sys as _sys
import types as _types

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Light modules (dataclasses, YAML, exceptions): imported at once.
from tlkit.config import (  # noqa: E402
    DataConfig, DistillConfig, FinetuneConfig, ModelConfig, PruneConfig, RuntimeConfig, TrainConfig, TuneConfig,
    config_from_dict, load_config,
)
from tlkit.errors import ConfigError, DataError, OfflineError, TlkitError  # noqa: E402

__version__ = "0.1.0"

# Everything else: name -> module, imported on first use (PEP 562).
_LAZY = {
    "get_backbone": "tlkit.backbones", "list_backbones": "tlkit.backbones",
    "Datasets": "tlkit.data", "list_datasets": "tlkit.data",
    "evaluate": "tlkit.evaluate",
    "ExportResult": "tlkit.export", "export": "tlkit.export",
    "Predictor": "tlkit.predict", "load": "tlkit.predict", "predict": "tlkit.predict",
    "LRFindResult": "tlkit.lr_find", "lr_find": "tlkit.lr_find",
    "RunResult": "tlkit.train", "finetune": "tlkit.train",
    "distill": "tlkit.distill",
    "prune": "tlkit.prune",
    "TuneResult": "tlkit.tune", "tune": "tlkit.tune",
}


class _Package(_types.ModuleType):
    """`tlkit.evaluate` is the function even after `import tlkit.evaluate` (the import system then sets the
    package attribute to the module; an eager `from tlkit.evaluate import evaluate` used to win that race)."""

    def __setattr__(self, name, value):
        if isinstance(value, _types.ModuleType) and _LAZY.get(name) == value.__name__ and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tlkit' has no attribute {name!r}")
    from tlkit._quiet import import_tensorflow

    import_tensorflow()  # TensorFlow's start-up lines filtered (tlkit._quiet)
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


def load_dataset(data: DataConfig, image_size: int = 224, seed: int = 42) -> "Datasets":
    """Loads the splits of a dataset (TFDS name, `shapes`, or `image_dir`) without a model.

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
    "tune", "TuneConfig", "TuneResult",
]
