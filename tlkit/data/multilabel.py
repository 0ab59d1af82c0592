"""Multi-label data helpers: multi-hot label vectors, label counts and a seeded validation split that keeps every
label in the training split (`tlkit.data.sources` builds multi-label `Split`s with them).

Example:
    multi_hot([(0, 2), (1,)], 3)          # labels as tuples of class indices
    # -> array([[1., 0., 1.], [0., 1., 0.]], dtype=float32)
"""
from __future__ import annotations

import random

import numpy as np

from tlkit.core.errors import DataError


def multi_hot(labels: list, num_classes: int) -> np.ndarray:
    """float32 [N, C]: row i has 1 at each index of `labels[i]` (a tuple of class indices).

    Example:
        >>> multi_hot([(0, 2), (1,)], 3).tolist()
        [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    """
    out = np.zeros((len(labels), num_classes), np.float32)
    for i, idx in enumerate(labels):
        out[i, list(idx)] = 1.0
    return out


def label_counts(labels: list, num_classes: int) -> np.ndarray:
    """Images per class of a list of labels (indices, or tuples of indices)."""
    flat = [i for l in labels for i in (l if isinstance(l, tuple) else (l,))]
    return np.bincount(np.asarray(flat, np.int64), minlength=num_classes)


def multi_label_split(files: list[str], labels: list[tuple[int, ...]], frac: float, seed: int,
                      classes: list[str]):
    """Seeded validation split of multi-label data: `frac` of the images (at least one), in a seeded order, each
    taken only when every one of its labels keeps a training image.

    Example:
        multi_label_split(["a", "b", "c"], [(0,), (0, 1), (1,)], 0.34, 42, ["x", "y"])
        # -> (['a', 'c'], [(0,), (1,)], ['b'], [(0, 1)]) or another split that keeps x and y in train
    """
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)
    left = label_counts(labels, len(classes))
    want = max(1, int(round(len(files) * frac)))
    val: set[int] = set()
    for i in order:
        if len(val) >= want:
            break
        if all(left[c] > 1 for c in labels[i]):
            val.add(i)
            for c in labels[i]:
                left[c] -= 1
    if not val:
        raise DataError(f"Too few images for a validation split of {frac}: every image holds the last training "
                        "image of one of its labels (add images or lower --val-split).")
    keep = [i for i in range(len(files)) if i not in val]
    chosen = sorted(val)
    return ([files[i] for i in keep], [labels[i] for i in keep], [files[i] for i in chosen],
            [labels[i] for i in chosen])
