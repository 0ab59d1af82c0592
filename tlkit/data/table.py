"""Labels from a table: a CSV file (or, in Python, a sequence of `(path, label)` pairs or a pandas DataFrame) that
names each image file and its class, and optionally its split.

The table feeds the same `Split`s as a folder of class sub-folders (`tlkit.data.sources`): unusable files are
skipped and counted, and without a split column the validation split is drawn per class (`val_split`).

Example:
    # labels.csv                      # then
    # file,label,split                load_sources(DataConfig(labels="labels.csv", image_dir="photos"), 224)
    # cat1.jpg,cat,train
    # dog7.jpg,dog,val
"""
from __future__ import annotations

import csv
import dataclasses
import os
from typing import Any, Sequence

from tlkit.core.config import DataConfig
from tlkit.core.errors import DataError

# Spellings of the three splits in a split column (case-insensitive).
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test"}
TABLE_FILE = "data.csv"  # the copy a run folder keeps of a table given in memory


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of a table: the image file (as written), its label cell (as written), its split (`None` without a split
    column), where it came from (`labels.csv, line 7`) for error messages, and its labels (the cell split at the
    label delimiter; the cell itself without one)."""

    file: str
    label: str
    split: str | None
    where: str
    labels: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.labels:
            object.__setattr__(self, "labels", (self.label,))


def is_in_memory(labels: Any) -> bool:
    """Whether `labels` is a table given in memory (pairs or a DataFrame) rather than a CSV path."""
    return labels is not None and not isinstance(labels, (str, os.PathLike))


def _describe(labels: Any) -> str:
    return os.fspath(labels) if isinstance(labels, (str, os.PathLike)) else "the labels table"


def read_rows(labels: Any, file_column: str = "file", label_column: str = "label",
              split_column: str = "split", split_column_required: bool = False,
              label_delimiter: str | None = None) -> list[Row]:
    """Reads the rows of a table.

    Args:
        labels: A CSV path (header row), a sequence of `(path, label)` or `(path, label, split)` tuples, or a pandas
            DataFrame.
        file_column: Column of the image files. Defaults to `"file"`.
        label_column: Column of the labels. Defaults to `"label"`.
        split_column: Column of the splits (`train`, `val`, `test`); used when present. Defaults to `"split"`.
        split_column_required: Refuse a table without `split_column`. Defaults to `False`.
        label_delimiter: Split each label cell at this into several labels. Defaults to `None` (one label a cell;
            a list or tuple cell of pairs or a DataFrame is several labels either way).

    Raises:
        DataError: a missing file or column, an empty cell (or one of delimiters only), an unknown split value.

    Example:
        >>> [r.label for r in read_rows([("a.jpg", "cat"), ("b.jpg", "dog")])]
        ['cat', 'dog']
    """
    name = _describe(labels)
    if isinstance(labels, (str, os.PathLike)):
        header, records = _read_csv(os.fspath(labels))
        where = [f"{name}, line {i}" for i in range(2, len(records) + 2)]
    elif hasattr(labels, "columns") and hasattr(labels, "itertuples"):  # a pandas DataFrame (pandas not imported)
        header = [str(c) for c in labels.columns]
        records = [[_cell_value(v) for v in row] for row in labels.itertuples(index=False, name=None)]
        where = [f"{name}, row {i}" for i in range(len(records))]
    else:
        try:
            records = [list(r) for r in labels]
        except TypeError:
            raise DataError(f"labels must be a CSV path, a sequence of (path, label) pairs or a pandas DataFrame, "
                            f"got {type(labels).__name__}.") from None
        bad = next((i for i, r in enumerate(records) if len(r) not in (2, 3)), None)
        if bad is not None:
            raise DataError(f"labels row {bad} has {len(records[bad])} item(s): expected (path, label) or "
                            f"(path, label, split).")
        header = [file_column, label_column] + ([split_column] if records and len(records[0]) == 3 else [])
        records = [[_cell_value(v) for v in r] for r in records]
        where = [f"{name}, row {i}" for i in range(len(records))]
    col = {c.strip(): i for i, c in enumerate(header)}
    for column, option in ((file_column, "--file-column"), (label_column, "--label-column")):
        if column not in col:
            raise DataError(f"{name} has no column {column!r} (its columns: {', '.join(header) or 'none'}); name "
                            f"the column with {option}.")
    if split_column_required and split_column not in col:
        raise DataError(f"{name} has no column {split_column!r} (its columns: {', '.join(header)}); name the "
                        "column with --split-column.")
    fi, li, si = col[file_column], col[label_column], col.get(split_column)
    rows = []
    for rec, at in zip(records, where):
        if not any(_text(cell) for cell in rec):
            continue  # a blank line
        cell = lambda i: _text(rec[i]) if i < len(rec) else ""  # noqa: E731
        if not cell(fi):
            raise DataError(f"{at}: the {file_column!r} cell is empty.")
        names = split_labels(rec[li] if li < len(rec) else "", label_delimiter)
        if not names:
            raise DataError(f"{at}: the {label_column!r} cell of {cell(fi)!r} is empty"
                            + (f" (no label between the delimiters {label_delimiter!r})." if cell(li) else "."))
        split = None
        if si is not None:
            split = SPLIT_NAMES.get(cell(si).lower())
            if split is None:
                raise DataError(f"{at}: unknown split {cell(si)!r} in column {split_column!r} (expected train, val "
                                "or test).")
        rows.append(Row(cell(fi), cell(li), split, at, names))
    if not rows:
        raise DataError(f"{name} lists no images.")
    return rows


def _cell_value(v: Any) -> Any:
    """A table cell as text, or a tuple of texts for a list or tuple of labels; `None` and NaN are empty."""
    if isinstance(v, (list, tuple)):
        return tuple(str(x) for x in v if not _isna(x))
    return "" if _isna(v) else str(v)


def _text(v: Any) -> str:
    return " ".join(v).strip() if isinstance(v, tuple) else v.strip()


def split_labels(cell: Any, delimiter: str | None) -> tuple[str, ...]:
    """The labels of one cell: a tuple cell's items, else the text split at `delimiter` (the whole text without
    one), stripped, empty ones and repeats dropped, in order.

    Example:
        >>> split_labels(" haze primary  water", " ")
        ('haze', 'primary', 'water')
    """
    parts = cell if isinstance(cell, tuple) else (cell.split(delimiter) if delimiter is not None else [cell])
    return tuple(dict.fromkeys(p.strip() for p in parts if p.strip()))


def _isna(v: Any) -> bool:
    try:
        return v is None or bool(v != v)  # NaN
    except Exception:
        return False


def _read_csv(path: str) -> tuple[list[str], list[list[str]]]:
    if not os.path.isfile(path):
        raise DataError(f"--labels {path!r} does not exist or is not a file.")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            records = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"Could not read --labels {path!r}: {e}") from None
    if not records:
        raise DataError(f"--labels {path!r} is empty (expected a header row, e.g. file,label).")
    return records[0], records[1:]


def resolve_rows(rows: Sequence[Row], root: str) -> dict[str, Row]:
    """`{absolute path: row}`, a file listed twice once; refuses a file listed twice with different labels or
    splits."""
    out: dict[str, Row] = {}
    for r in rows:
        path = os.path.normpath(r.file if os.path.isabs(r.file) else os.path.join(root, r.file))
        seen = out.get(path)
        if seen is not None:
            if set(seen.labels) != set(r.labels):
                raise DataError(f"{r.file!r} is listed twice with different labels: {seen.label!r} ({seen.where}) and "
                                f"{r.label!r} ({r.where}).")
            if seen.split != r.split:
                raise DataError(f"{r.file!r} is listed twice in different splits: {seen.split} ({seen.where}) and "
                                f"{r.split} ({r.where}).")
            continue
        out[path] = r
    return out


@dataclasses.dataclass
class Table:
    """A table read and checked, before its files are: what `tlkit.data.sources` turns into `Split`s.

    Attributes:
        name: Short name (the CSV's name without extension; the image folder's, else `table`, in memory).
        class_names: The train split's labels, sorted; index = label.
        splits: `{"train"|"val"|"test": (absolute paths, labels)}`, a label an index, or for multi-label a tuple of
            indices; `val`/`test` empty without such rows.
        has_split_column: Whether the rows named their splits.
        description: What to call the table in messages (the CSV's path).
        multi_label: Whether an image may have several labels (`DataConfig.multi_label`, else decided from the
            rows: any with more than one label).
    """

    name: str
    class_names: list[str]
    splits: dict[str, tuple[list[str], list[Any]]]
    has_split_column: bool
    description: str
    multi_label: bool = False


def _is_multi_label(rows: dict[str, Row], cfg: DataConfig) -> bool:
    """`cfg.multi_label`, else whether a row has several labels; refuses several labels under `multi_label: false`."""
    several = next((r for r in rows.values() if len(r.labels) > 1), None)
    if cfg.multi_label is False and several is not None:
        raise DataError(f"{several.where}: {len(several.labels)} labels ({', '.join(map(repr, several.labels[:3]))}) "
                        "but multi-label is off (--no-multi-label).")
    return bool(cfg.multi_label) if cfg.multi_label is not None else several is not None


def read_table(cfg: DataConfig) -> Table:
    """Reads the table `cfg.labels`, its relative paths under `cfg.image_dir` (else the CSV's folder, else the
    working directory), and checks it.

    Raises:
        DataError: bad rows (see `read_rows`), a file listed twice with different labels, a label in val/test never
            seen in train, fewer than two labels.
    """
    labels = cfg.labels
    description = _describe(labels)
    if cfg.image_dir is not None:
        if not os.path.isdir(cfg.image_dir):
            raise DataError(f"--image-dir {cfg.image_dir!r} does not exist or is not a folder.")
        root = cfg.image_dir
    elif not is_in_memory(labels):
        root = os.path.dirname(os.path.abspath(os.fspath(labels)))
    else:
        root = os.getcwd()
    rows = resolve_rows(read_rows(labels, cfg.file_column, cfg.label_column, cfg.split_column,
                                  split_column_required=cfg.split_column != DataConfig.split_column,
                                  label_delimiter=cfg.label_delimiter), root)
    multi = _is_multi_label(rows, cfg)
    by_split: dict[str, list[tuple[str, tuple[str, ...]]]] = {"train": [], "val": [], "test": []}
    for path, r in rows.items():
        by_split[r.split or "train"].append((path, r.labels))
    if not by_split["train"]:
        raise DataError(f"{description} has no rows of the train split.")
    classes = sorted({label for _, names in by_split["train"] for label in names})
    for split in ("val", "test"):
        unseen = sorted({label for _, names in by_split[split] for label in names} - set(classes))
        if unseen:
            where = next(rows[p].where for p, names in by_split[split] if unseen[0] in names)
            raise DataError(f"{where}: label {unseen[0]!r} of the {split} split never appears in the train split"
                            + (f" (nor do {len(unseen) - 1} more)" if len(unseen) > 1 else "") + ".")
    if len(classes) < 2:
        raise DataError(f"{description} has only one label in its train split ({classes[0]!r}); a classifier needs "
                        "at least two.")
    index = {c: i for i, c in enumerate(classes)}
    if multi:
        splits = {k: ([p for p, _ in v], [tuple(index[n] for n in names) for _, names in v])
                  for k, v in by_split.items()}
    else:
        splits = {k: ([p for p, _ in v], [index[names[0]] for _, names in v]) for k, v in by_split.items()}
    if is_in_memory(labels):
        name = os.path.basename(os.path.normpath(root)) if cfg.image_dir else "table"
    else:
        name = os.path.splitext(os.path.basename(os.fspath(labels)))[0]
    return Table(name, classes, splits, any(r.split is not None for r in rows.values()), description, multi)


def write_table(labels: Any, path: str, cfg: DataConfig) -> DataConfig:
    """Writes a table given in memory as a CSV with `cfg`'s column names (what a run folder keeps as `data.csv`, so
    that its config.yaml names the data); returns `cfg` with the label delimiter the CSV needs (several labels of
    a list cell are joined with one that no label contains)."""
    rows = read_rows(labels, cfg.file_column, cfg.label_column, cfg.split_column, label_delimiter=cfg.label_delimiter)
    with_split = any(r.split is not None for r in rows)
    delimiter = cfg.label_delimiter
    if delimiter is None and any(len(r.labels) > 1 for r in rows):
        used = {c for r in rows for name in r.labels for c in name}
        delimiter = next((d for d in (" ", ";", "|", ",", "\t") if d not in used), None)
        if delimiter is None:
            raise DataError("Cannot write the labels table: its labels use every delimiter tried (space ; | , tab).")
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow([cfg.file_column, cfg.label_column] + ([cfg.split_column] if with_split else []))
        for r in rows:
            cell = delimiter.join(r.labels) if delimiter is not None else r.label
            w.writerow([r.file, cell] + ([r.split] if with_split else []))
    os.replace(tmp, path)
    return dataclasses.replace(cfg, label_delimiter=delimiter)


def recorded(cfg: Any, out_dir: str) -> Any:
    """`cfg` (a `FinetuneConfig`) with a table given in memory replaced by its copy `out_dir/data.csv` (written), so
    that config.yaml names data that `evaluate`, `export` and `--config` find again; other configs unchanged.
    Relative file names of an in-memory table without `image_dir` were relative to the working directory: the copy
    records that folder as `image_dir`."""
    d = cfg.data
    if not is_in_memory(d.labels):
        return cfg
    path = os.path.join(out_dir, TABLE_FILE)
    d = write_table(d.labels, path, d)
    return dataclasses.replace(cfg, data=dataclasses.replace(d, labels=path, image_dir=d.image_dir or os.getcwd()))

