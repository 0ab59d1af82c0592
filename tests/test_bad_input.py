"""Bad input: each case through `tlkit.cli.main` gives exit code 2 and ONE clear line on stderr (no traceback).

Also: undecodable image files are skipped and listed (the run goes on), a full disk during save keeps the
previous model, NaN loss keeps the last good checkpoint, safe_mode model loading, config-relative paths.
"""
from __future__ import annotations

import csv
import errno
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import write_image_folder
from tlkit import cli

TINY = ["--image-size", "32", "--weights", "none", "--batch-size", "4", "--augment", "none"]


def run_cli(capsys, argv):
    """Runs the CLI; returns (exit code, stdout, the stderr lines that are tlkit's own)."""
    capsys.readouterr()
    code = cli.main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    # Keras's own "Your input ran out of data" UserWarning (two lines) is not tlkit's output: see the report.
    lines = [l for l in lines if "UserWarning: Your input ran out of data" not in l and "_interrupted_warning()" not in l]
    # the warning that lists skipped unreadable files (one line on stderr, tested below) is not the error
    lines = [l for l in lines if not l.startswith("[tlkit] skipping ")]
    return code, out, lines


def assert_one_line(capsys, argv, *needles):
    code, _, err = run_cli(capsys, argv)
    assert code == 2, err
    assert len(err) == 1, err  # one line, no traceback
    assert err[0].startswith("tlkit"), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    print("user sees:", err[0])  # pytest -s shows what each bad input gives
    return err[0]


def finetune_args(tiny_backbone, image_dir, *extra):
    return ["finetune", "--base", tiny_backbone, "--image-dir", str(image_dir), *TINY, *extra]


# ---------------------------------------------------------------- image folders


def test_image_dir_missing(capsys, tiny_backbone, tmp_path):
    assert_one_line(capsys, finetune_args(tiny_backbone, tmp_path / "nope"), "does not exist")


def test_image_dir_empty(capsys, tiny_backbone, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line(capsys, finetune_args(tiny_backbone, tmp_path / "empty"), "has no class sub-folders")


def test_image_dir_one_class(capsys, tiny_backbone, tmp_path):
    root = write_image_folder(tmp_path / "one", classes=("cat",), per_class=4)
    assert_one_line(capsys, finetune_args(tiny_backbone, root), "only one class ('cat')", "at least two")


def test_class_folder_without_images(capsys, tiny_backbone, tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=4)
    os.makedirs(os.path.join(root, "bird"))
    (tmp_path / "imgs" / "bird" / "notes.txt").write_text("no images here")
    assert_one_line(capsys, finetune_args(tiny_backbone, root), "Class folder(s) with no images", "bird")


def test_class_folder_with_only_undecodable_files(capsys, tiny_backbone, tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=4)
    os.makedirs(os.path.join(root, "bird"))
    (tmp_path / "imgs" / "bird" / "a.jpg").write_text("not a jpeg")
    assert_one_line(capsys, finetune_args(tiny_backbone, root), "no usable images", "bird", "could not be decoded")


def test_class_with_too_few_images_for_the_validation_split(capsys, tiny_backbone, tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=6)
    write_image_folder(tmp_path / "imgs", classes=("bird",), per_class=1)
    assert_one_line(capsys, finetune_args(tiny_backbone, root, "--val-split", "0.2"),
                    "Class 'bird' has 1 usable image(s)", "--val-split")


# A batch size larger than the training split is not bad input any more: it is capped to the split, with one line
# (tests/test_recipe.py::test_a_few_shot_folder_smaller_than_the_batch_runs).


# ---------------------------------------------------------------- names and sizes


def test_unknown_base_suggests(capsys):
    assert_one_line(capsys, ["finetune", "--base", "resnet5", "--dataset", "shapes"],
                    "Unknown backbone 'resnet5'", "Did you mean 'resnet50'")


def test_unknown_dataset_suggests(capsys, tmp_path):
    assert_one_line(capsys, ["finetune", "--base", "resnet50", "--dataset", "oxford_flowers10", "--data-dir",
                             str(tmp_path), "--weights", "none", "--image-size", "32"],
                    "Unknown dataset 'oxford_flowers10'", "Did you mean", "oxford_flowers102")


def test_tfds_dataset_without_label(capsys, tmp_path):
    assert_one_line(capsys, ["finetune", "--base", "resnet50", "--dataset", "div2k", "--data-dir", str(tmp_path),
                             "--weights", "none", "--image-size", "32"], "'div2k' has no class-label feature")


def test_image_size_too_small_for_the_base(capsys):
    assert_one_line(capsys, ["finetune", "--base", "resnet50", "--dataset", "shapes", "--image-size", "16"],
                    "image_size 16 is too small for resnet50", "at least 32")


def test_image_size_other_than_the_user_backbone(capsys, tiny_backbone, tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=4)
    argv = finetune_args(tiny_backbone, root)
    argv[argv.index("--image-size") + 1] = "64"
    assert_one_line(capsys, argv, "takes 32x32 images", "--image-size 32")


def test_bad_flag_value_is_one_line(capsys):
    assert_one_line(capsys, ["finetune", "--epochs", "three"], "--epochs: invalid int value: 'three'")


def test_resume_needs_output_dir(capsys):
    assert_one_line(capsys, ["finetune", "--dataset", "shapes", "--resume"], "--resume needs --output-dir")


# ---------------------------------------------------------------- YAML


def test_yaml_unknown_key(capsys, tmp_path):
    (tmp_path / "c.yaml").write_text("data:\n  dataset: shapes\ntrain:\n  epoch: 3\n")
    assert_one_line(capsys, ["finetune", "--config", str(tmp_path / "c.yaml")], "Unknown key 'epoch'",
                    "Did you mean 'epochs'")


def test_yaml_wrong_type(capsys, tmp_path):
    (tmp_path / "c.yaml").write_text("dataset: shapes\nepochs: three\n")
    assert_one_line(capsys, ["finetune", "--config", str(tmp_path / "c.yaml")], "epochs must be of type int",
                    "'three'")


def test_yaml_malformed(capsys, tmp_path):
    (tmp_path / "c.yaml").write_text("data:\n  dataset: shapes\n   image_size: [32\n")
    assert_one_line(capsys, ["finetune", "--config", str(tmp_path / "c.yaml")], "Malformed YAML", "line")


def test_config_paths_are_relative_to_the_config_file(tmp_path):
    from tlkit.core.config_io import load_config

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "c.yaml").write_text(
        "image_dir: ../images\nweights: w/base.weights.h5\noutput_dir: runs/a\nbase: nets/tiny.keras\n")
    cfg = load_config(str(tmp_path / "cfg" / "c.yaml"))
    assert cfg.data.image_dir == str(tmp_path / "images")
    assert cfg.model.weights == str(tmp_path / "cfg" / "w" / "base.weights.h5")
    assert cfg.output_dir == str(tmp_path / "cfg" / "runs" / "a")
    assert cfg.model.base == str(tmp_path / "cfg" / "nets" / "tiny.keras")


# ---------------------------------------------------------------- a real run with bad files in the data


def _write_bad_files(root):
    """A truncated JPEG and a text file named .jpg (skipped); 16-bit PNG, CMYK JPEG, 8000x8000 JPEG (used)."""
    d = os.path.join(root, "cat")
    arr = np.random.default_rng(1).integers(0, 255, (40, 30, 3), dtype=np.uint8)
    Image.fromarray(arr).save(os.path.join(d, "whole.jpg"))
    with open(os.path.join(d, "whole.jpg"), "rb") as f:
        data = f.read()
    with open(os.path.join(d, "truncated.jpg"), "wb") as f:
        f.write(data[: len(data) // 2])
    with open(os.path.join(d, "text.jpg"), "w") as f:
        f.write("this is not an image\n")
    Image.fromarray(arr[..., 0].astype(np.uint16) * 256).save(os.path.join(d, "gray16.png"))
    Image.fromarray(arr).convert("CMYK").save(os.path.join(d, "cmyk.jpg"))
    Image.fromarray(np.full((8000, 8000, 3), 90, np.uint8)).save(os.path.join(d, "huge.jpg"), quality=30)


@pytest.fixture(scope="module")
def bad_files_run(tmp_path_factory, tiny_backbone):
    """One short real run on a folder with bad files: (run folder, image folder, stdout, stderr, exit code)."""
    import contextlib
    import io

    tmp = tmp_path_factory.mktemp("badrun")
    root = write_image_folder(tmp / "images", per_class=6)
    _write_bad_files(root)
    run = str(tmp / "run")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(finetune_args(tiny_backbone, root, "--strategy", "feature_extraction", "--epochs", "1",
                                      "--val-split", "0.25", "--output-dir", run))
    return run, root, out.getvalue(), err.getvalue(), code


def test_undecodable_files_are_skipped_and_listed(bad_files_run):
    run, root, out, err, code = bad_files_run
    assert code == 0, err[-3000:]
    with open(os.path.join(run, "metrics.json")) as f:
        metrics = json.load(f)
    skipped = sorted(os.path.basename(p) for p in metrics["skipped_files"])
    assert skipped == ["text.jpg", "truncated.jpg"] and metrics["num_skipped_files"] == 2
    assert "skipped 2 unreadable image file(s)" in out  # the summary
    # the warning with the reasons goes to stderr, so that stdout stays the command's output
    assert "text.jpg (not a JPEG, PNG, GIF or BMP image)" in err and "truncated.jpg (truncated or corrupt" in err
    assert "text.jpg (not a JPEG" not in out
    # 12 + 4 usable files in cat (whole, gray16, cmyk, huge): 16 -> 12 train / 4 val.
    assert "12 train / 4 val" in out


def test_output_dir_not_empty_is_refused(capsys, bad_files_run, tiny_backbone):
    run, root, *_ = bad_files_run
    assert_one_line(capsys, finetune_args(tiny_backbone, root, "--output-dir", run),
                    "exists and is not empty", "--overwrite", "--resume")


def test_disk_full_during_save_keeps_the_previous_model(capsys, bad_files_run, tiny_backbone, monkeypatch,
                                                        tmp_path):
    import keras

    src, root, *_ = bad_files_run
    run = str(tmp_path / "run")
    shutil.copytree(src, run)
    with open(os.path.join(run, "model.keras"), "rb") as f:
        before = f.read()

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(keras.Model, "save", full)
    # --resume of the finished run: no training, then model.keras is saved again -> the disk is full.
    line = assert_one_line(capsys, finetune_args(tiny_backbone, root, "--strategy", "feature_extraction", "--epochs",
                                                 "1", "--val-split", "0.25", "--output-dir", run, "--resume"),
                           "No space left on the device while writing", "model.keras", "previous version is intact")
    monkeypatch.undo()
    with open(os.path.join(run, "model.keras"), "rb") as f:
        assert f.read() == before
    assert not [n for n in os.listdir(run) if n.startswith(".")], "a temporary file was left"
    keras.models.load_model(os.path.join(run, "model.keras"), compile=False, safe_mode=True)
    assert "--resume" in line


def test_evaluate_class_count_mismatch(capsys, bad_files_run, tmp_path):
    run, *_ = bad_files_run
    three = write_image_folder(tmp_path / "three", classes=("a", "b", "c"), per_class=3)
    assert_one_line(capsys, ["evaluate", run, "--image-dir", three],
                    "trained on 2 classes but the data has 3")


def test_evaluate_labels_mismatch(capsys, bad_files_run, tmp_path):
    src, *_ = bad_files_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    (run / "labels.txt").write_text("a\nb\nc\n")
    assert_one_line(capsys, ["evaluate", str(run)], "lists 3 classes but the model predicts 2")


def test_export_class_count_mismatch(capsys, bad_files_run, tmp_path):
    run, *_ = bad_files_run
    three = write_image_folder(tmp_path / "three", classes=("a", "b", "c"), per_class=3)
    assert_one_line(capsys, ["export", run, "--format", "keras", "--output", str(tmp_path / "exp"),
                             "--image-dir", three], "predicts 2 classes but the data", "has 3")


def test_unsafe_model_is_refused(capsys, tmp_path):
    import keras

    inp = keras.Input((32, 32, 3))
    out = keras.layers.Lambda(lambda x: x * 2.0)(inp)
    out = keras.layers.GlobalAveragePooling2D()(out)
    keras.Model(inp, keras.layers.Dense(2, activation="softmax")(out)).save(tmp_path / "lambda.keras")
    assert_one_line(capsys, ["evaluate", str(tmp_path / "lambda.keras"), "--dataset", "shapes"],
                    "Could not load model")


# ---------------------------------------------------------------- NaN loss


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(capsys, tiny_backbone, tmp_path):
    """A non-finite loss in epoch 2 by construction, whatever the CPU's kernels (oneDNN or not).

    A "step" schedule with --decay-rate 1e40: 1e40 is beyond float32 (max ~3.4e38), so the schedule's factor is
    inf ** floor(step / steps_per_epoch): inf ** 0 = 1 in epoch 1 (IEEE pow), the learning rate is 0.01; inf ** 1
    in epoch 2, the learning rate is inf. Adam's first step of epoch 2 moves every trainable variable by
    inf * m / (sqrt(v) + eps): +-inf, or NaN where m is 0 (inf * 0). The logits layer's bias is then non-finite,
    so every logit is (a sum with a non-finite term), and the cross-entropy of non-finite logits is NaN: the loss
    of the second step of epoch 2 (8 images, batch 4: two steps an epoch) is NaN, whatever the size of the
    gradients. (With --decay-rate 1e33 the rate was a finite 1e31: whether activations overflowed depended on the
    kernels' arithmetic, and on some CPUs they did not.)
    """
    import keras

    root = write_image_folder(tmp_path / "imgs", per_class=4)
    run = str(tmp_path / "run")
    line = assert_one_line(capsys, finetune_args(tiny_backbone, root, "--strategy", "full", "--epochs", "3",
                                                 "--lr", "0.01", "--schedule", "step", "--decay-rate", "1e40",
                                                 "--decay-every", "1", "--val-split", "0", "--output-dir", run),
                           "NaN or infinite in epoch 2", "stage 'full'", "learning rate inf at the time, peak 0.01",
                           "too high", "model.keras")
    assert "float16" not in line  # float32 here: the precision is not blamed
    model = keras.models.load_model(os.path.join(run, "model.keras"), compile=False, safe_mode=True)
    assert all(np.isfinite(w).all() for w in model.get_weights())
    with open(os.path.join(run, "checkpoints", "state.json")) as f:
        assert json.load(f)["epoch"] == 1  # the NaN epoch was never saved
    with open(os.path.join(run, "metrics.json")) as f:
        assert "NaN" in json.load(f)["stopped"]
    with open(os.path.join(run, "history.csv")) as f:
        rows = list(csv.DictReader(f))
    # the mechanism: a finite loss at 0.01 in epoch 1, the infinite rate from epoch 2 on (and no epoch 3)
    assert [r["epoch"] for r in rows] == ["1", "2"], rows
    assert float(rows[0]["lr"]) == pytest.approx(0.01) and np.isfinite(float(rows[0]["loss"])), rows
    assert float(rows[1]["lr"]) == np.inf and not np.isfinite(float(rows[1]["loss"])), rows


def test_image_problem_names_each_kind_of_bad_file(tmp_path, monkeypatch):
    from tlkit.data import sources

    _write_bad_files(write_image_folder(tmp_path / "imgs", per_class=1))
    d = tmp_path / "imgs" / "cat"
    (d / "empty.png").write_bytes(b"")
    assert sources.image_problem(str(d / "text.jpg")) == "not a JPEG, PNG, GIF or BMP image"
    assert sources.image_problem(str(d / "truncated.jpg")).startswith("truncated or corrupt")
    assert sources.image_problem(str(d / "empty.png")) == "empty file"
    for usable in ("whole.jpg", "gray16.png", "cmyk.jpg", "huge.jpg", "img0.jpg"):
        assert sources.image_problem(str(d / usable)) is None, usable
    ok, bad = sources.check_images([str(d / "whole.jpg"), str(d / "text.jpg")])
    assert ok == [True, False] and list(bad) == [str(d / "text.jpg")]
    monkeypatch.setattr(sources, "MAX_IMAGE_PIXELS", 10_000)
    assert sources.image_problem(str(d / "huge.jpg")) == "too large (8000x8000 pixels)"


# ---------------------------------------------------------------- labels tables (--labels FILE.csv)


def _table_args(tiny_backbone, tmp_path, rows, header=("file", "label", "split"), *extra):
    """finetune argv on a CSV of `rows` (paths relative to a written image folder of cat/dog), with an output
    folder that must stay unwritten."""
    import csv as _csv

    root = tmp_path / "imgs"
    if not root.exists():
        write_image_folder(root, per_class=4)
    path = tmp_path / "labels.csv"
    with open(path, "w", newline="") as f:
        w = _csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return ["finetune", "--base", tiny_backbone, "--labels", str(path), "--image-dir", str(root), *TINY,
            "--output-dir", str(tmp_path / "out"), *extra]


GOOD_ROWS = [("cat/img0.jpg", "cat", "train"), ("cat/img1.png", "cat", "train"), ("dog/img0.jpg", "dog", "train"),
             ("dog/img1.png", "dog", "train"), ("cat/img2_gray.png", "cat", "val"), ("dog/img2_gray.png", "dog", "val")]


@pytest.mark.parametrize("rows, header, extra, needles", [
    (GOOD_ROWS, ("path", "label", "split"), (), ("labels.csv has no column 'file'", "its columns: path, label, split",
                                                 "--file-column")),
    (GOOD_ROWS, ("file", "label", "split"), ("--label-column", "class"), ("has no column 'class'",)),
    (GOOD_ROWS, ("file", "label", "fold"), ("--split-column", "part"), ("has no column 'part'", "--split-column")),
    (GOOD_ROWS + [("dog/img3_rgba.png", "dog", "holdout")], ("file", "label", "split"), (),
     ("labels.csv, line 8: unknown split 'holdout'", "train, val or test")),
    (GOOD_ROWS + [("dog/img3_rgba.png", "", "train")], ("file", "label", "split"), (),
     ("labels.csv, line 8: the 'label' cell of 'dog/img3_rgba.png' is empty",)),
    (GOOD_ROWS + [("dog/img3_rgba.png", "bird", "val")], ("file", "label", "split"), (),
     ("line 8: label 'bird' of the val split never appears in the train split",)),
    (GOOD_ROWS + [("cat/img0.jpg", "dog", "train")], ("file", "label", "split"), (),
     ("'cat/img0.jpg' is listed twice with different labels: 'cat' (", "line 2) and 'dog' (", "line 8)")),
    ([(r[0].replace("img", "gone"), r[1], r[2]) for r in GOOD_ROWS], ("file", "label", "split"), (),
     ("names no usable image files (4 missing or unreadable",)),
    ([r for r in GOOD_ROWS if r[1] == "cat"], ("file", "label", "split"), (), ("has only one label",)),
])
def test_bad_labels_table_is_one_line_and_writes_nothing(capsys, tiny_backbone, tmp_path, rows, header, extra,
                                                         needles):
    assert_one_line(capsys, _table_args(tiny_backbone, tmp_path, rows, header, *extra), *needles)
    assert not (tmp_path / "out").exists()


def test_labels_table_missing_or_given_with_dataset(capsys, tiny_backbone, tmp_path):
    argv = _table_args(tiny_backbone, tmp_path, GOOD_ROWS)
    os.remove(tmp_path / "labels.csv")
    assert_one_line(capsys, argv, "--labels", "labels.csv' does not exist or is not a file")
    argv = _table_args(tiny_backbone, tmp_path, GOOD_ROWS) + ["--dataset", "shapes"]
    assert_one_line(capsys, argv, "Give either --dataset or --image-dir/--labels, not both")
    assert not (tmp_path / "out").exists()
