"""The run folder and atomic writes: a kill never leaves a half-written output file."""
from __future__ import annotations

import contextlib
import csv
import datetime
import errno
import json
import os
import shutil
import tempfile
from typing import Any, Iterable, Iterator, Mapping

from tlkit.errors import DiskFullError, OutputExistsError

_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
    """Yields a temporary path beside `path`; on success it is renamed onto `path`, on error removed.

    A full disk (ENOSPC, EDQUOT) raises `DiskFullError` naming the file; the previous `path` is left intact.

    Example:
        >>> with atomic_path("out/model.keras", suffix=".keras") as tmp:
        ...     model.save(tmp)
    """
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=suffix + ".tmp" + suffix, dir=folder)
    os.close(fd)
    os.remove(tmp)
    try:
        yield tmp
        if os.path.isdir(tmp) and os.path.isdir(path):
            old = tmp + ".old"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as e:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        if _no_space(e) and not isinstance(e, DiskFullError):
            kept = " (the previous version is intact)" if os.path.exists(path) else ""
            raise DiskFullError(f"No space left on the device while writing {path}{kept}. Free some space, then "
                                "run the same command again (add --resume to continue a training run).") from e
        raise


def _no_space(e: BaseException) -> bool:
    """Whether `e` (or an exception it wraps, as h5py and Keras do) is a full disk."""
    seen = 0
    while e is not None and seen < 5:
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            return True
        if "No space left on device" in str(e):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def write_text(path: str, text: str) -> None:
    """Writes text atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def write_json(path: str, data: Any) -> None:
    """Writes JSON atomically (indented, NaN as null)."""
    write_text(path, json.dumps(_clean(data), indent=2) + "\n")


def write_csv(path: str, rows: Iterable[Mapping[str, Any]]) -> None:
    """Writes a list of dicts as CSV atomically (columns from all rows, in order of appearance)."""
    rows = list(rows)
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)


def _clean(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        try:
            x = x.item()
        except (ValueError, AttributeError):
            return x
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return None
    return x


def default_run_dir(base: str, dataset: str, root: str = "runs") -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = lambda s: "".join(c if c.isalnum() or c in "-_." else "_" for c in s)
    return os.path.join(root, f"{safe(base)}-{safe(dataset)}-{stamp}")


def prepare_run_dir(path: str, overwrite: bool) -> str:
    """Creates the run folder; refuses an existing non-empty one unless `overwrite`.

    Raises:
        OutputExistsError: the folder exists, is not empty, and `overwrite` is False.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputExistsError(f"Output path {path!r} exists and is not a folder.")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise OutputExistsError(f"Output folder {path!r} exists and is not empty; pass --overwrite to reuse it "
                                "or choose another --output-dir.")
    os.makedirs(path, exist_ok=True)
    return path
