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

from tlkit.core.errors import ConfigError, DiskFullError, OutputExistsError

_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
    """Yields a temporary path beside `path`; on success it is renamed onto `path`, on error removed.

    A full disk (ENOSPC, EDQUOT) raises `DiskFullError` naming the file; the previous `path` is left intact.

    Example:
        with atomic_path("out/model.keras", suffix=".keras") as tmp:
            model.save(tmp)
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


# ---------------------------------------------------------------- output-folder rules: the only home
# Every verb that writes a folder or a file goes through these: a run folder (`finetune`, `distill`, `prune`,
# `lr-find`), a search folder (`tune`), an export (`export`). Nothing is overwritten without `--overwrite`.

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"  # in CHECKPOINTS: what `--resume` continues from


def check_output_dir(output_dir: str | None, overwrite: bool, resume: bool = False) -> None:
    """Fails early (before any data is read) on an output folder that would be refused later.

    Raises:
        ConfigError: `resume` without a folder.
        OutputExistsError: the path is a file, or a non-empty folder without `overwrite` or `resume`.
    """
    if resume and not output_dir:
        raise ConfigError("--resume needs --output-dir DIR: the folder of the run to continue.")
    if not output_dir:
        return
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise OutputExistsError(f"Output path {output_dir!r} exists and is not a folder.")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not (overwrite or resume):
        hint = " or --resume to continue it" if os.path.isfile(os.path.join(output_dir, CHECKPOINTS,
                                                                             STATE_FILE)) else ""
        raise OutputExistsError(f"Output folder {output_dir!r} exists and is not empty; pass --overwrite to "
                                f"start over in it{hint}, or choose another --output-dir.")


def prepare_run_dir(path: str, overwrite: bool) -> str:
    """Creates the run folder; refuses an existing non-empty one unless `overwrite`.

    Raises:
        OutputExistsError: the folder exists, is not empty, and `overwrite` is False.
    """
    check_output_dir(path, overwrite)
    os.makedirs(path, exist_ok=True)
    return path


def refuse_existing(paths: list[str], overwrite: bool, flag: str = "--output") -> None:
    """Refuses to replace any of `paths` (files, or non-empty folders) unless `overwrite`.

    Raises:
        OutputExistsError: naming the first path that exists.
    """
    if overwrite:
        return
    for p in paths:
        if (os.path.isdir(p) and os.listdir(p)) or (os.path.exists(p) and not os.path.isdir(p)):
            raise OutputExistsError(f"Output {p!r} already exists; pass --overwrite to replace it or choose another "
                                    f"{flag}.")


def remove_stale_cache_files(cache_dir: str) -> None:
    """Removes what a killed process leaves of a half-written tf.data disk cache in `cache_dir` (a lock file and
    temporary state): otherwise the next run fails with "There appears to be a concurrent caching iterator
    running"."""
    import glob

    for stale in glob.glob(os.path.join(cache_dir, "*.lockfile")) + glob.glob(os.path.join(cache_dir, "*.tempstate*")):
        with contextlib.suppress(OSError):
            os.remove(stale)
