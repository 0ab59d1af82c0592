"""The stored "unknown" threshold of a run or export (`ood.json`, written by `tlkit evaluate --ood`, `engine/ood.py`).

`predict` answers `unknown` for an image whose top probability is below `reject_below`.

Example:
    label_of(np.array([[0.9, 0.1], [0.55, 0.45]]), ["cat", "dog"], 0.6)
    # -> ['cat', 'unknown']
"""
from __future__ import annotations

import json
import os

import numpy as np

from tlkit.core.errors import ConfigError
from tlkit.core.sidecars import find_sidecar

OOD_FILE = "ood.json"
UNKNOWN = "unknown"


def check_reject_below(p: float | None) -> float | None:
    """`p` when it is a probability strictly between 0 and 1 (or `None`); else one `ConfigError` line."""
    if p is None:
        return None
    try:
        value = float(p)
    except (TypeError, ValueError):
        raise ConfigError(f"--reject-below must be a probability strictly between 0 and 1, got {p!r}.") from None
    if not 0.0 < value < 1.0:
        raise ConfigError(f"--reject-below must be a probability strictly between 0 and 1, got {p!r}.")
    return value


def read_rejection(model_path: str) -> float | None:
    """The stored `reject_below` of a run folder, model file or export (its `ood.json` sidecar), or `None`."""
    path = os.fspath(model_path)
    found = os.path.join(path, OOD_FILE) if os.path.isdir(path) else find_sidecar(path, OOD_FILE)
    if not found or not os.path.isfile(found):
        return None
    try:
        with open(found, encoding="utf-8") as f:
            value = json.load(f).get("reject_below")
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) and 0.0 < value < 1.0 else None


def label_of(probs: np.ndarray, class_names: list[str], reject_below: float | None) -> list[str]:
    """The predicted class of each row of `probs`, or `"unknown"` where its top probability is below the threshold."""
    probs = np.asarray(probs)
    top = probs.argmax(-1)
    return [UNKNOWN if reject_below is not None and probs[i, t] < reject_below else class_names[t]
            for i, t in enumerate(top)]


__all__ = ["OOD_FILE", "UNKNOWN", "check_reject_below", "read_rejection", "label_of"]
