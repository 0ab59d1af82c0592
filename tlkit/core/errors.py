"""Error hierarchy. The CLI turns any `TlkitError` into one line on stderr and exit code 2."""
from __future__ import annotations

import difflib
from typing import Iterable


class TlkitError(Exception):
    """Base class of every error that is the user's to fix (bad input, missing data, offline)."""


class ConfigError(TlkitError, ValueError):
    """A configuration value or file is invalid."""


class DataError(TlkitError, ValueError):
    """The data cannot be found or used as given."""


class BackboneError(TlkitError, ValueError):
    """The backbone or its weights cannot be built or loaded."""


class OfflineError(TlkitError, OSError):
    """Something had to be downloaded and could not be."""


class OutputExistsError(TlkitError, FileExistsError):
    """The output folder exists and is not empty (use --overwrite)."""


class TrainingError(TlkitError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN)."""


class DiskFullError(TlkitError, OSError):
    """An output file could not be written for lack of space; the previous version of the file is intact."""


def suggest(name: str, choices: Iterable[str]) -> str:
    """Returns ' Did you mean ...?' for the closest choices, or ''.

    Example:
        >>> suggest("resnet5", ["resnet50", "vgg16"])
        " Did you mean 'resnet50'?"
    """
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type's name when the message is empty), at most `limit`
    characters: for the one-line messages that wrap a library's error.

    Example:
        >>> first_line(ValueError("bad shape\\nin layer dense"))
        'bad shape'
        >>> first_line(KeyError())
        'KeyError'
    """
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:limit]
