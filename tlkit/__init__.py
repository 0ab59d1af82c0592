"""tlkit: transfer learning for Keras 3.

Example:
    >>> import tlkit
    >>> from tlkit import FinetuneConfig, DataConfig, ModelConfig, TrainConfig
    >>> result = tlkit.finetune(FinetuneConfig(data=DataConfig(dataset="shapes", image_size=64),
    ...                                        model=ModelConfig(base="resnet50", weights="none"),
    ...                                        train=TrainConfig(epochs=2)))
    >>> result.metrics["val"]["accuracy"]
"""
import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tlkit.config import (  # noqa: E402
    DataConfig, FinetuneConfig, ModelConfig, RuntimeConfig, TrainConfig, config_from_dict, load_config,
)
from tlkit.errors import ConfigError, DataError, OfflineError, TlkitError  # noqa: E402
from tlkit.backbones import get_backbone, list_backbones  # noqa: E402
from tlkit.data import Datasets, list_datasets  # noqa: E402
from tlkit.evaluate import evaluate  # noqa: E402
from tlkit.export import ExportResult, export  # noqa: E402
from tlkit.predict import Predictor, load, predict  # noqa: E402
from tlkit.lr_find import LRFindResult, lr_find  # noqa: E402
from tlkit.train import RunResult, finetune  # noqa: E402
from tlkit.config import DistillConfig, PruneConfig  # noqa: E402
from tlkit.distill import distill  # noqa: E402
from tlkit.prune import prune  # noqa: E402
from tlkit.config import TuneConfig  # noqa: E402
from tlkit.tune import TuneResult, tune  # noqa: E402

__version__ = "0.1.0"


def load_dataset(data: DataConfig, image_size: int = 224, seed: int = 42) -> Datasets:
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
