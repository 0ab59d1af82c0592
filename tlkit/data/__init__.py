"""Data: sources (TFDS, image folders, built-in `shapes`), the tf.data pipeline, augmentation."""
from tlkit.data.sources import Datasets, Split, list_datasets, load_sources
from tlkit.data.pipeline import make_dataset

__all__ = ["Datasets", "Split", "list_datasets", "load_sources", "make_dataset"]
