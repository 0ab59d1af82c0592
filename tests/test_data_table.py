"""Tests of tlkit/data/table.py: labels from a CSV table (or pairs, or a DataFrame), read into the same splits as a
folder, and a CSV run end to end through finetune, evaluate, predict, export and tune (tiny backbone, 32 px)."""
from __future__ import annotations

import csv
import dataclasses
import json
import os

import numpy as np
import pytest
import yaml

from conftest import write_image_folder
from tlkit import cli
from tlkit.core.config import DataConfig
from tlkit.core.errors import DataError
from tlkit.data import load_sources
from tlkit.data.table import read_rows

NAMES = {"cat": "kitty", "dog": "puppy"}  # labels that are not the folder names: they come from the table


def image_files(root) -> list[str]:
    """Relative paths `cat/img0.jpg`, ... of the images written by `write_image_folder`."""
    root = str(root)
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names
                  if n.endswith((".jpg", ".png")))


def write_csv(path, rows, header=("file", "label")) -> str:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


@pytest.fixture
def table(tmp_path):
    """An image folder (2 classes x 12 files of 4 kinds) and a CSV naming every file with a relative path, the
    label from `NAMES`, a split column (the first of each 8 files of a class to val, the next to test)."""
    root = write_image_folder(tmp_path / "imgs", per_class=12)
    rows = []
    for i, rel in enumerate(image_files(root)):
        cls = rel.split(os.sep)[0]
        split = "val" if i % 8 == 0 else "test" if i % 8 == 1 else "train"
        rows.append((rel, NAMES[cls], split))
    return root, rows


def json_out(out: str):
    """The JSON document of a `--json` output: the whole of stdout (the `[tlkit] skipping ...` warning of a skipped
    file goes to stderr)."""
    return json.loads(out)


def labels_of(split) -> list[int]:
    return [int(y) for _, y in split.ds.as_numpy_iterator()]


def test_csv_with_split_column_reads_labels_and_splits_from_the_table(table, tmp_path, capsys):
    root, rows = table
    rows = rows + [("cat/gone.jpg", "kitty", "train")]  # a missing file: skipped and counted
    path = write_csv(tmp_path / "labels.csv", rows, ("file", "label", "split"))
    data = load_sources(DataConfig(labels=path, image_dir=root), 32)
    assert data.class_names == ["kitty", "puppy"] and data.name == "labels"
    n = {s: sum(1 for r in rows[:-1] if r[2] == s) for s in ("train", "val", "test")}
    assert (data.train.count, data.val.count, data.test.count) == (n["train"], n["val"], n["test"])
    assert data.skipped == [os.path.join(root, "cat", "gone.jpg")] and "gone.jpg" in capsys.readouterr().err
    for split, name in ((data.train, "train"), (data.val, "val"), (data.test, "test")):
        want = {os.path.join(root, r[0]): ["kitty", "puppy"].index(r[1]) for r in rows[:-1] if r[2] == name}
        assert dict(zip(split.files, labels_of(split))) == want


def test_csv_without_split_column_takes_a_stratified_val_split_with_renamed_columns(table, tmp_path):
    root, rows = table
    # paths relative to the CSV's folder when no --image-dir: the CSV sits in the image folder
    path = write_csv(os.path.join(root, "t.csv"), [(r[1], r[0]) for r in rows], ("name", "path"))
    cfg = DataConfig(labels=path, file_column="path", label_column="name", val_split=0.25)
    data = load_sources(cfg, 32, seed=3)
    assert data.test is None and data.train.count + data.val.count == len(rows)
    assert np.bincount(labels_of(data.val)).tolist() == [3, 3]  # 25% of each label's 12 images
    again = load_sources(cfg, 32, seed=3)
    assert again.val.files == data.val.files and load_sources(cfg, 32, seed=4).val.files != data.val.files


def test_pairs_and_a_dataframe_like_table_give_the_same_splits_as_the_csv(table, tmp_path):
    root, rows = table
    path = write_csv(tmp_path / "labels.csv", rows, ("file", "label", "split"))
    from_csv = load_sources(DataConfig(labels=path, image_dir=root), 32)
    from_pairs = load_sources(DataConfig(labels=[tuple(r) for r in rows], image_dir=root), 32)

    class Frame:  # what the reader uses of a pandas DataFrame (pandas is not a dependency of the tests)
        columns = ["label", "file", "split"]

        def itertuples(self, index=True, name="Pandas"):
            assert index is False and name is None
            return iter([(r[1], r[0], r[2]) for r in rows])

    from_frame = load_sources(DataConfig(labels=Frame(), image_dir=root), 32)
    for other in (from_pairs, from_frame):
        assert other.class_names == from_csv.class_names
        for a, b in ((other.train, from_csv.train), (other.val, from_csv.val), (other.test, from_csv.test)):
            assert a.files == b.files and labels_of(a) == labels_of(b)


def test_read_rows_accepts_split_spellings_and_skips_blank_lines(tmp_path):
    path = write_csv(tmp_path / "t.csv", [("a.jpg", "x", "Validation"), (), ("b.jpg", " y ", "TRAIN")],
                     ("file", "label", "split"))
    assert [(r.file, r.label, r.split) for r in read_rows(path)] == [("a.jpg", "x", "val"), ("b.jpg", "y", "train")]
    with pytest.raises(DataError, match=r"t.csv, line 2: unknown split 'dev'"):
        read_rows(write_csv(tmp_path / "t.csv", [("a.jpg", "x", "dev")], ("file", "label", "split")))


def test_a_csv_run_end_to_end_finetune_evaluate_predict_export_tune(table, tiny_backbone, tmp_path, capsys):
    root, rows = table
    with open(os.path.join(root, "cat", "notes.jpg"), "w") as f:  # a text file named .jpg: skipped and counted
        f.write("not an image")
    path = write_csv(tmp_path / "labels.csv", rows + [("cat/notes.jpg", "kitty", "train")], ("file", "label", "split"))
    run = str(tmp_path / "run")
    tiny = ["--base", tiny_backbone, "--weights", "none", "--image-size", "32", "--batch-size", "8",
            "--augment", "none"]
    assert cli.main(["finetune", "--labels", path, "--image-dir", root, *tiny, "--strategy", "feature_extraction",
                     "--epochs", "1", "--head-steps", "4", "--output-dir", run]) == 0
    with open(os.path.join(run, "config.yaml")) as f:
        saved = yaml.safe_load(f)["data"]
    assert saved["labels"] == path and saved["image_dir"] == root
    with open(os.path.join(run, "labels.txt")) as f:
        assert f.read().split() == ["kitty", "puppy"]
    with open(os.path.join(run, "metrics.json")) as f:
        metrics = json.load(f)
    n_test = sum(1 for r in rows if r[2] == "test")
    assert metrics["test"]["num_examples"] == n_test
    assert metrics["num_skipped_files"] == 1 and "notes.jpg" in str(metrics["skipped_files"])

    capsys.readouterr()
    assert cli.main(["evaluate", run, "--json"]) == 0  # the run's data: the table, its test split
    m = json_out(capsys.readouterr().out)
    assert m["split"] == "test" and m["num_examples"] == n_test
    assert cli.main(["evaluate", run, "--split", "val", "--json", "--labels", path, "--image-dir", root]) == 0
    assert json_out(capsys.readouterr().out)["num_examples"] == sum(1 for r in rows if r[2] == "val")

    one = os.path.join(root, rows[0][0])
    assert cli.main(["predict", run, one, "--json"]) == 0
    top = json.loads(capsys.readouterr().out)["predictions"][0]["top"]
    assert {t["class"] for t in top} <= {"kitty", "puppy"}

    assert cli.main(["export", run, "--format", "keras", "--output", str(tmp_path / "exp")]) == 0  # checked on the table
    with open(os.path.join(str(tmp_path / "exp"), "export.json")) as f:
        check = json.load(f)["check"]
    assert check["source"].startswith("labels: validation split first") and check["num_images"] == len(rows)

    assert cli.main(["tune", "--labels", path, "--image-dir", root, *tiny, "--strategy", "feature_extraction",
                     "--tuner", "random", "--max-trials", "1", "--batch-sizes", "8", "--trial-epochs", "1",
                     "--output-dir", str(tmp_path / "tune")]) == 0
    with open(os.path.join(str(tmp_path / "tune"), "best_config.yaml")) as f:
        assert yaml.safe_load(f)["data"]["labels"] == path


def test_python_api_with_pairs_keeps_the_table_in_the_run_folder(table, tiny_backbone, tmp_path, capsys):
    from tlkit import finetune
    from tlkit.core.config import FinetuneConfig, ModelConfig, TrainConfig

    root, rows = table
    pairs = [(os.path.join(root, r[0]), r[1]) for r in rows]  # absolute paths, no split: val_split holds out 10%
    run = str(tmp_path / "run")
    cfg = FinetuneConfig(data=DataConfig(labels=pairs, image_size=32, batch_size=8, augment="none"),
                         model=ModelConfig(base=tiny_backbone, weights="none"),
                         train=TrainConfig(strategy="feature_extraction", epochs=1, head_steps=4), output_dir=run)
    result = finetune(cfg)
    assert result.class_names == ["kitty", "puppy"]
    with open(os.path.join(run, "config.yaml")) as f:
        saved = yaml.safe_load(f)["data"]
    assert saved["labels"] == os.path.join(run, "data.csv")
    assert [tuple(r) for r in csv.reader(open(saved["labels"]))][1:] == pairs
    capsys.readouterr()
    assert cli.main(["evaluate", run, "--split", "val", "--json"]) == 0  # the same val split from data.csv
    assert json.loads(capsys.readouterr().out)["num_examples"] == result.metrics["val"]["num_examples"]

    from tlkit.core.verb_configs import TuneConfig
    from tlkit.verbs.tune import tune

    out = str(tmp_path / "tune")  # tune keeps the in-memory table too: its best_config.yaml names out/data.csv
    tune(dataclasses.replace(cfg, output_dir=out),
         TuneConfig(tuner="random", max_trials=1, batch_sizes=(8,), trial_epochs=1))
    with open(os.path.join(out, "best_config.yaml")) as f:
        assert yaml.safe_load(f)["data"]["labels"] == os.path.join(out, "data.csv")
    assert os.path.isfile(os.path.join(out, "data.csv"))
