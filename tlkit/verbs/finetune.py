"""`tlkit finetune`: fine-tune a pretrained backbone on your images and write a run folder (`engine/run.py`)."""
from __future__ import annotations

from tlkit.core.config import FinetuneConfig
from tlkit.engine.run import finetune_run
from tlkit.engine.setup import RunResult

__all__ = ["RunResult", "finetune"]


def finetune(cfg: FinetuneConfig) -> RunResult:
    """Fine-tunes a pretrained backbone on the configured data and writes a run folder.

    Writes `config.yaml`, `labels.txt`, `model.keras` (best by validation accuracy), `history.csv`, `metrics.json`
    (val and test: loss, top-1, top-5, mean per-class accuracy, number of examples), `curves.png` and
    `confusion_matrix.png`. The stages follow `cfg.train.strategy`; see `models/strategies.py`.

    Args:
        cfg: A `FinetuneConfig`.

    Returns:
        A `RunResult` (the trained model, history, metrics, run folder, class names, resolved configuration).

    Raises:
        ConfigError, DataError, OfflineError, OutputExistsError: bad input (the CLI prints one line, exit 2).
        TrainingError: the loss became NaN or infinite (the best model before it is saved).

    Example:
        result = finetune(FinetuneConfig(data=DataConfig(dataset="shapes", image_size=32),
                                         model=ModelConfig(weights="none"), train=TrainConfig(epochs=2)))
        result.metrics["val"]["accuracy"]
    """
    return finetune_run(cfg)
