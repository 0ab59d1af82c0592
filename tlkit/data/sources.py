"""Where examples come from: TensorFlow Datasets, a folder of class sub-folders, a table of files and labels
(`tlkit.data.table`), or built-in `shapes`.

Every source gives the same thing: a `Datasets` of `Split`s, each an unbatched `tf.data.Dataset` of
`(image, label)` where `image` is either encoded bytes / a file path (decoded later, in parallel, by the
pipeline) or an already decoded uint8 array. Nothing here knows about models.
"""
from __future__ import annotations

import dataclasses
import os
import random
import sys
from typing import Literal

import numpy as np
import tensorflow as tf

from tlkit.core.config import DataConfig
from tlkit.core.errors import DataError, OfflineError, first_line, suggest
from tlkit.data.multilabel import label_counts, multi_hot, multi_label_split

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# Larger images are skipped: decoding one takes gigabytes (PIL's own decompression-bomb limit).
MAX_IMAGE_PIXELS = 178_956_970
# Folders with more files than this show a progress bar while they are checked.
CHECK_PROGRESS_MIN = 500
DATASET_ALIASES = {"oxford_flowers": "oxford_flowers102", "flowers102": "oxford_flowers102"}
BUILTIN_DATASETS = ("shapes",)


@dataclasses.dataclass
class Split:
    """One split of a dataset.

    Attributes:
        ds: Unbatched `tf.data.Dataset` of `(image, label int64)`, or for multi-label data of `(image, multi-hot
            float32 [C])`.
        count: Number of examples.
        kind: `encoded` (image is encoded bytes), `path` (image is a file path) or `decoded` (uint8 HxWx3).
        files: For `path` splits, the file paths in order (for reporting and pictures).
    """

    ds: tf.data.Dataset
    count: int
    kind: Literal["encoded", "path", "decoded"]
    files: list[str] | None = None


@dataclasses.dataclass
class Datasets:
    """The splits of one dataset and its class names.

    Attributes:
        train: Training split.
        val: Validation split (may be taken from train), or `None` when `val_split` is 0.
        test: Test split, or `None` when the data has none.
        class_names: Class names, index = label.
        name: Short name for run folders and reports.
        skipped: Files found but not usable (reported in the summary).
        skip_reasons: Why each skipped file was skipped (`{path: reason}`).
        multi_label: An image may have several labels: the labels are multi-hot vectors.
    """

    train: Split
    val: Split | None
    test: Split | None
    class_names: list[str]
    name: str
    skipped: list[str] = dataclasses.field(default_factory=list)
    skip_reasons: dict[str, str] = dataclasses.field(default_factory=dict)
    multi_label: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def list_datasets() -> list[str]:
    """Built-in dataset names and the TFDS aliases tlkit knows (any TFDS image classification name works)."""
    return list(BUILTIN_DATASETS) + sorted(DATASET_ALIASES)


def load_sources(cfg: DataConfig, image_size: int, seed: int = 42) -> Datasets:
    """Finds the data named by `cfg` and returns its splits.

    Args:
        cfg: The `DataConfig`.
        image_size: Model input size (the built-in dataset is drawn at this size).
        seed: Seed of the train/validation split. Defaults to `42`.

    Raises:
        DataError: the data is missing or unusable. OfflineError: a download failed.
    """
    if cfg.labels is not None:  # a table of files and labels (tlkit.data.table)
        return _from_table(cfg, seed)
    if cfg.image_dir is not None:
        data = _from_folder(cfg.image_dir, cfg.val_split, seed)
    elif (cfg.dataset or "").strip() == "shapes":
        data = _shapes(cfg.shapes_per_class, image_size, cfg.val_split, seed)
    else:
        name = (cfg.dataset or "").strip()
        data = _from_tfds(DATASET_ALIASES.get(name, name), cfg.data_dir, cfg.val_split)
    if cfg.multi_label is False and data.multi_label:
        raise DataError(f"Dataset {data.name!r} gives several labels an image (a sequence of class labels); "
                        "drop --no-multi-label.")
    return as_multi_label(data) if cfg.multi_label and not data.multi_label else data


def as_multi_label(data: Datasets) -> Datasets:
    """Single-label `data` with its labels as one-hot float32 vectors: multi-label training on it (`--multi-label`)."""
    n = data.num_classes

    def convert(split: Split | None) -> Split | None:
        if split is None:
            return None
        ds = split.ds.map(lambda x, y: (x, tf.one_hot(y, n, dtype=tf.float32)), num_parallel_calls=tf.data.AUTOTUNE)
        return dataclasses.replace(split, ds=ds)

    return dataclasses.replace(data, train=convert(data.train), val=convert(data.val), test=convert(data.test),
                               multi_label=True)


def _shapes(per_class: int, size: int, val_split: float, seed: int) -> Datasets:
    from tlkit.data.shapes import CLASS_NAMES, make_shapes

    def split(n: int, s: int) -> Split:
        x, y = make_shapes(n, size, seed=s)
        return Split(tf.data.Dataset.from_tensor_slices((x, y)), len(y), "decoded")

    n_eval = max(1, int(round(per_class * max(val_split, 0.1))))
    return Datasets(split(per_class, seed), split(n_eval, seed + 1) if val_split > 0 else None,
                    split(n_eval, seed + 2), list(CLASS_NAMES), "shapes")


# ---------------------------------------------------------------- image folders

def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def scan_folder(root: str, class_names: list[str] | None = None) -> tuple[list[str], list[int], list[str]]:
    """Lists the image files of a folder of class sub-folders, with a progress bar.

    Returns:
        `(files, labels, class_names)`; hidden and non-image files are ignored.
    """
    import keras

    if class_names is None:
        class_names = sorted(d for d in os.listdir(root)
                             if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
    files, labels = [], []
    bar = keras.utils.Progbar(len(class_names), unit_name="class") if len(class_names) > 20 else None
    for i, cname in enumerate(class_names):
        folder = os.path.join(root, cname)
        if os.path.isdir(folder):
            for dirpath, dirnames, names in os.walk(folder):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for n in sorted(names):
                    if _is_image(n):
                        files.append(os.path.join(dirpath, n))
                        labels.append(i)
        if bar is not None:
            bar.update(i + 1)
    return files, labels, class_names


def _path_split(files: list[str], labels: list, num_classes: int | None = None) -> Split:
    """A `path` split; with `num_classes`, `labels` are tuples of indices and become multi-hot float32 vectors."""
    if num_classes is None:
        y = tf.constant(labels, tf.int64)
    else:
        y = tf.constant(multi_hot(labels, num_classes))
    return Split(tf.data.Dataset.from_tensor_slices((tf.constant(files, tf.string), y)), len(files), "path", list(files))


def _from_folder(root: str, val_split: float, seed: int) -> Datasets:
    if not os.path.isdir(root):
        raise DataError(f"--image-dir {root!r} does not exist or is not a folder.")
    subdirs = {d.lower(): d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))}
    name = os.path.basename(os.path.normpath(root)) or "images"
    reasons: dict[str, str] = {}

    def usable(files: list[str], labels: list[int]) -> tuple[list[str], list[int]]:
        good, bad = check_images(files)
        reasons.update(bad)
        return [f for f, ok in zip(files, good) if ok], [l for l, ok in zip(labels, good) if ok]

    if "train" in subdirs and any(k in subdirs for k in ("val", "validation", "test")):
        train_dir = os.path.join(root, subdirs["train"])
        files, labels, classes = scan_folder(train_dir)
        _check_classes(train_dir, files, labels, classes)
        files, labels = usable(files, labels)
        _check_classes(train_dir, files, labels, classes, reasons)
        val = test = None
        vkey = "val" if "val" in subdirs else ("validation" if "validation" in subdirs else None)
        if vkey:
            vf, vl = usable(*scan_folder(os.path.join(root, subdirs[vkey]), classes)[:2])
            val = _path_split(vf, vl) if vf else None
        if "test" in subdirs:
            tf_, tl = usable(*scan_folder(os.path.join(root, subdirs["test"]), classes)[:2])
            test = _path_split(tf_, tl) if tf_ else None
        if val is None and val_split > 0:
            files, labels, vf, vl = _stratified_split(files, labels, val_split, seed, classes)
            val = _path_split(vf, vl)
        return _with_skipped(Datasets(_path_split(files, labels), val, test, classes, name), reasons)
    files, labels, classes = scan_folder(root)
    _check_classes(root, files, labels, classes)
    files, labels = usable(files, labels)
    _check_classes(root, files, labels, classes, reasons)
    val = None
    if val_split > 0:
        files, labels, vf, vl = _stratified_split(files, labels, val_split, seed, classes)
        val = _path_split(vf, vl)
    return _with_skipped(Datasets(_path_split(files, labels), val, None, classes, name), reasons)


def _from_table(cfg: DataConfig, seed: int) -> Datasets:
    """The splits of a labels table (`tlkit.data.table.read_table`): unusable files skipped and counted, and a
    validation split (stratified; for multi-label data, `multi_label_split`) when the table has no `val` rows."""
    from tlkit.data.table import read_table

    table = read_table(cfg)
    classes, reasons = table.class_names, {}
    n = len(classes) if table.multi_label else None

    def usable(files: list[str], labels: list) -> tuple[list[str], list]:
        good, bad = check_images(files)
        reasons.update(bad)
        return [f for f, ok in zip(files, good) if ok], [l for l, ok in zip(labels, good) if ok]

    files, labels = usable(*table.splits["train"])
    if not files:
        first = next(iter(reasons), "?")
        raise DataError(f"{table.description} names no usable image files ({len(reasons)} missing or unreadable, "
                        f"e.g. {first!r}: {reasons.get(first, '')}).")
    counts = label_counts(labels, len(classes))
    empty = [c for c, k in zip(classes, counts) if k == 0]
    if empty:
        raise DataError(f"Label(s) with no usable training images in {table.description}: {', '.join(empty[:5])} "
                        "(their files are missing or unreadable).")
    val = test = None
    if table.splits["val"][0]:
        vf, vl = usable(*table.splits["val"])
        val = _path_split(vf, vl, n) if vf else None
    if table.splits["test"][0]:
        tf_, tl = usable(*table.splits["test"])
        test = _path_split(tf_, tl, n) if tf_ else None
    if not table.splits["val"][0] and cfg.val_split > 0:
        split = multi_label_split if table.multi_label else _stratified_split
        files, labels, vf, vl = split(files, labels, cfg.val_split, seed, classes)
        val = _path_split(vf, vl, n)
    data = Datasets(_path_split(files, labels, n), val, test, classes, table.name, multi_label=table.multi_label)
    return _with_skipped(data, reasons)


def _with_skipped(data: Datasets, reasons: dict[str, str]) -> Datasets:
    data.skipped = sorted(reasons)
    data.skip_reasons = dict(reasons)
    if reasons:
        shown = "; ".join(f"{os.path.basename(p)} ({reasons[p]})" for p in data.skipped[:5])
        more = f"; and {len(reasons) - 5} more" if len(reasons) > 5 else ""
        # stderr: a warning, not output (`evaluate --json` and `predict --json` print one JSON document on stdout)
        print(f"[tlkit] skipping {len(reasons)} unreadable image file(s): {shown}{more}", file=sys.stderr, flush=True)
    return data


_MAGIC = ((b"\xff\xd8\xff", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
          (b"BM", "bmp"))


_PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG", "gif": "GIF", "bmp": "BMP"}
# The last bytes of a complete file: JPEG's end-of-image marker, PNG's IEND chunk, GIF's trailer.
_END_MARKERS = {"jpeg": b"\xff\xd9", "png": b"IEND\xaeB`\x82", "gif": b"\x3b"}
_TAIL = 4096  # bytes read from the end (an encoder may pad with zeros after the marker)


def image_problem(path: str) -> str | None:
    """Why the image file at `path` cannot be used, or `None` when it looks complete; reads headers, not pixels.

    The checks, cheapest first: the file's first bytes (a JPEG, PNG, GIF or BMP signature; a text file named
    `.jpg` fails here); the header read by PIL (size; images over `MAX_IMAGE_PIXELS` are refused); and the
    file's end (JPEG's end-of-image marker, PNG's IEND chunk, GIF's trailer, then at most padding; BMP's
    declared size), which a truncated file lacks. Only a file that fails the last check is decoded, by
    TensorFlow, the decoder of the pipeline: it is usable when that decode succeeds (data appended after the
    marker, as some cameras do). A file whose
    compressed data is damaged in the middle passes here; the pipeline then skips it with a warning when it
    fails to decode (`ignore_errors`). So the scan costs about what reading the headers costs, and every image
    is decoded once, in the pipeline.

    Example:
        image_problem("cats/truncated.jpg")
        # -> 'truncated or corrupt: no end-of-image marker, and TensorFlow cannot decode it (...)'
    """
    import warnings

    from PIL import Image

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(16)
            if not head:
                return "empty file"
            kind = next((k for magic, k in _MAGIC if head.startswith(magic)), None)
            if kind is None:
                return "not a JPEG, PNG, GIF or BMP image"
            f.seek(max(0, size - _TAIL))
            tail = f.read()
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=[_PIL_FORMATS[kind]]) as img:  # the header only
                w, h = img.size
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return f"truncated or corrupt: {first_line(e, 80)}"
    if w * h > MAX_IMAGE_PIXELS:
        return f"too large ({w}x{h} pixels)"
    if kind == "bmp":
        complete = size >= int.from_bytes(head[2:6], "little")
    else:
        complete = tail.rstrip(b"\x00\t\n\r ").endswith(_END_MARKERS[kind])
    if complete:
        return None
    try:  # no end marker: only a real decode can tell
        data = tf.io.read_file(path)
        if kind == "jpeg":
            tf.io.decode_jpeg(data, channels=3, ratio=8)
        else:
            tf.io.decode_image(data, channels=3, expand_animations=False)
    except (tf.errors.OpError, ValueError) as e:
        what = "no end-of-image marker" if kind == "jpeg" else "no end marker"
        return f"truncated or corrupt: {what}, and TensorFlow cannot decode it ({str(e).strip().splitlines()[-1][:60]})"
    return None


def check_images(files: list[str], workers: int | None = None) -> tuple[list[bool], dict[str, str]]:
    """Checks each image file's header and end (`image_problem`), in parallel, with a progress bar for big folders.

    Args:
        files: Image file paths.
        workers: Threads. Defaults to `None` (up to 8, by CPU count).

    Returns:
        `(ok per file, {path: reason} of the files that cannot be used)`.
    """
    import concurrent.futures

    import keras

    if not files:
        return [], {}
    workers = workers or max(1, min(8, os.cpu_count() or 1))
    bar = keras.utils.Progbar(len(files), unit_name="image") if len(files) >= CHECK_PROGRESS_MIN else None
    if bar is not None:
        print(f"[tlkit] checking {len(files)} image files", flush=True)
    problems: list[str | None] = [None] * len(files)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for i, problem in enumerate(pool.map(image_problem, files, chunksize=16)):
            problems[i] = problem
            if bar is not None and ((i + 1) % 100 == 0 or i + 1 == len(files)):
                bar.update(i + 1)
    return [p is None for p in problems], {f: p for f, p in zip(files, problems) if p is not None}


def _check_classes(root: str, files: list[str], labels: list[int], classes: list[str],
                   skipped: dict[str, str] | None = None) -> None:
    if not classes:
        raise DataError(f"--image-dir {root!r} has no class sub-folders (expected one sub-folder of images per class).")
    usable = " usable" if skipped else ""
    if not files:
        raise DataError(f"--image-dir {root!r} has no{usable} image files ({', '.join(IMAGE_EXTENSIONS)})"
                        + (f"; {len(skipped)} could not be decoded." if skipped else "."))
    counts = np.bincount(labels, minlength=len(classes))
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if empty:
        raise DataError(f"Class folder(s) with no{usable} images in {root!r}: {', '.join(empty[:5])}"
                        + (" (their files could not be decoded)." if skipped else "."))
    if len(classes) < 2:
        raise DataError(f"--image-dir {root!r} has only one class ({classes[0]!r}); a classifier needs at least two.")


def _stratified_split(files: list[str], labels: list[int], frac: float, seed: int,
                      classes: list[str] | None = None):
    """Seeded per-class split: `frac` of each class (at least one image) goes to validation."""
    rng = random.Random(seed)
    by_class: dict[int, list[str]] = {}
    for f, l in zip(files, labels):
        by_class.setdefault(l, []).append(f)
    tf_, tl, vf, vl = [], [], [], []
    for label in sorted(by_class):
        items = by_class[label][:]
        rng.shuffle(items)
        n_val = max(1, int(round(len(items) * frac)))
        if n_val >= len(items):
            cname = repr(classes[label]) if classes else str(label)
            raise DataError(f"Class {cname} has {len(items)} usable image(s): too few for a validation split of "
                            f"{frac} (it needs at least {n_val + 1}; add images or lower --val-split).")
        vf += items[:n_val]
        vl += [label] * n_val
        tf_ += items[n_val:]
        tl += [label] * (len(items) - n_val)
    return tf_, tl, vf, vl


# ---------------------------------------------------------------- TensorFlow Datasets

def _from_tfds(name: str, data_dir: str | None, val_split: float) -> Datasets:
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # DatasetNotFoundError and friends
        if "not found" in str(e).lower() or type(e).__name__ == "DatasetNotFoundError":
            names = list(BUILTIN_DATASETS) + list(DATASET_ALIASES) + list(tfds.list_builders())
            raise DataError(f"Unknown dataset {name!r}.{suggest(name, names)} Use a TensorFlow Datasets name, "
                            "'shapes', or --image-dir DIR.") from None
        raise DataError(f"Could not open dataset {name!r}: {first_line(e, 10**6)}") from None
    features = builder.info.features
    image_key = next((k for k, f in features.items() if isinstance(f, tfds.features.Image)), None)
    label_key = next((k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)), None)
    multi = False
    if label_key is None:  # a Sequence(ClassLabel) feature: several labels an image (e.g. voc's `labels`)
        label_key = next((k for k, f in features.items() if isinstance(f, tfds.features.Sequence)
                          and isinstance(f.feature, tfds.features.ClassLabel)), None)
        multi = label_key is not None
    if image_key is None or label_key is None:
        missing = "image feature" if image_key is None else "class-label feature"
        raise DataError(f"Dataset {name!r} has no {missing}: tlkit needs an image classification dataset "
                        f"(its features: {', '.join(features.keys())}).")
    try:
        builder.download_and_prepare()
    except Exception as e:
        raise OfflineError(
            f"Could not download or prepare dataset {name!r} ({first_line(e, 200)}). To work "
            f"offline, run `tfds build {name}` on a machine with internet and copy its data folder here, then pass "
            "--data-dir DIR."
        ) from None
    splits = list(builder.info.splits.keys())

    def has(split: str) -> bool:
        if splits:
            return split in splits
        try:  # splits unknown (e.g. under tfds.testing.mock_data): probe
            builder.as_dataset(split=split)
            return True
        except Exception:
            return False

    label_feature = features[label_key].feature if multi else features[label_key]
    num_classes = label_feature.num_classes

    def label(y):
        if not multi:
            return tf.cast(y, tf.int64)
        return tf.minimum(tf.reduce_sum(tf.one_hot(tf.cast(y, tf.int64), num_classes, dtype=tf.float32), 0), 1.0)

    def load(split: str) -> Split:
        ds = builder.as_dataset(split=split, decoders={image_key: tfds.decode.SkipDecoding()}, shuffle_files=False)
        ds = ds.map(lambda ex: (ex[image_key], label(ex[label_key])), num_parallel_calls=tf.data.AUTOTUNE)
        count = int(ds.cardinality())
        if count < 0:
            count = int(ds.reduce(0, lambda c, _: c + 1))
        return Split(ds, count, "encoded")

    if not has("train"):
        raise DataError(f"Dataset {name!r} has no 'train' split (splits: {', '.join(splits) or 'unknown'}).")
    val_name = next((s for s in ("validation", "val") if has(s)), None)
    if val_name is not None:
        train, val = load("train"), load(val_name)
    elif val_split > 0:
        pct = int(round(val_split * 100))
        train, val = load(f"train[{pct}%:]"), load(f"train[:{pct}%]")
    else:
        train, val = load("train"), None
    test = load("test") if has("test") else None
    class_names = list(label_feature.names)
    return Datasets(train, val, test, class_names, name, multi_label=multi)
