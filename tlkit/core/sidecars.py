"""Names of the files that travel beside an exported model, so that several exports can share a folder.

An artifact called `model.<ext>` (the default) keeps the folder's plain names: `labels.txt`, `export.json`,
`model_card.md`. Any other name gets its own: `int8.tflite` -> `int8.labels.txt`, `int8.export.json`,
`int8.model_card.md`; so `--output dir/float.tflite` and `--output dir/int8.tflite` live side by side.

Example:
    sidecar("exports/int8.tflite", "export.json")
    # -> 'exports/int8.export.json'
"""
from __future__ import annotations

import os

DEFAULT_STEM = "model"
SIDECARS = ("labels.txt", "export.json", "model_card.md")


def sidecar(artifact: str, name: str) -> str:
    """The path of the sidecar `name` (`labels.txt`, `export.json`, `model_card.md`) of a model file.

    A folder (a SavedModel) holds its sidecars inside under the plain names.
    """
    artifact = os.fspath(artifact)
    if os.path.isdir(artifact):
        return os.path.join(artifact, name)
    folder, base = os.path.split(os.path.abspath(artifact))
    stem = os.path.splitext(base)[0]
    return os.path.join(folder, name if stem == DEFAULT_STEM else f"{stem}.{name}")


def find_sidecar(artifact: str, name: str) -> str | None:
    """The sidecar of `artifact` that exists: its own (`stem.name`), else the folder's plain `name`, else `None`."""
    own = sidecar(artifact, name)
    if os.path.isfile(own):
        return own
    plain = os.path.join(os.path.dirname(os.path.abspath(os.fspath(artifact))), name)
    return plain if os.path.isfile(plain) else None


__all__ = ["sidecar", "find_sidecar", "SIDECARS"]
