"""Multi-label classification from a table (#21): several labels a cell (`--label-delimiter`), multi-hot splits, the
sigmoid head, the metrics (`tlkit/engine/metrics_multilabel.py`, against scikit-learn as the oracle), the thresholds,
and a run end to end: finetune -> evaluate -> predict -> export -> tlkit.load (tiny backbone, 32 px).

The images are colour-coded: label `red`, `green`, `blue` present <=> that colour channel is bright, so that even a
randomly initialised backbone's features separate the labels and a linear head learns them surely."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import yaml

from tlkit import cli
from tlkit.core.config import DataConfig
from tlkit.core.errors import DataError
from tlkit.data import load_sources, make_dataset
from tlkit.engine import metrics_multilabel as ML
from tlkit.testing import write_multilabel_table

COLOURS = ("red", "green", "blue")


def label_set(i: int) -> list[str]:
    """Image i's labels in `write_multilabel_table`: the non-empty subsets of the colours in turn (7 of them)."""
    k = i % 7 + 1
    return [c for j, c in enumerate(COLOURS) if k >> j & 1]


def write_csv(path, rows, header=("file", "label", "split")) -> str:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """42 colour-coded images and a CSV (space-separated labels, a split column: each split has all 7 sets)."""
    root = str(tmp_path_factory.mktemp("ml") / "imgs")
    path = write_multilabel_table(root)
    images = [(f"img{i}.{'png' if i % 2 else 'jpg'}", label_set(i)) for i in range(42)]
    return root, path, images


# ---------------------------------------------------------------- the table

def test_space_delimited_cells_give_multi_hot_splits_and_are_detected(table):
    root, path, images = table
    data = load_sources(DataConfig(labels=path, label_delimiter=" "), 32)
    assert data.multi_label and data.class_names == ["blue", "green", "red"]
    assert (data.train.count, data.val.count, data.test.count) == (28, 7, 7)
    want = {os.path.join(root, n): sorted(l) for n, l in images}
    for split in (data.train, data.val, data.test):
        for f, y in zip(split.files, (y for _, y in split.ds.as_numpy_iterator())):
            assert y.dtype == np.float32 and sorted(np.array(data.class_names)[y > 0.5]) == want[f]
    single = load_sources(DataConfig(labels=path), 32)  # no delimiter: each cell one label ("red green" a class)
    assert not single.multi_label and "red green" in single.class_names


def test_pairs_with_list_labels_multi_label_flag_and_the_recorded_copy(table, tmp_path):
    from tlkit.core.config import FinetuneConfig
    from tlkit.data.table import recorded

    root, _, images = table
    pairs = [(os.path.join(root, n), tuple(l)) for n, l in images[:21]]
    data = load_sources(DataConfig(labels=pairs, val_split=0.2), 32, seed=1)
    assert data.multi_label and data.val.count == 4
    train_y = np.stack([y for _, y in data.train.ds.as_numpy_iterator()])
    assert (train_y.sum(0) > 0).all()  # every label keeps training images
    cfg = recorded(FinetuneConfig(data=DataConfig(labels=pairs, val_split=0.2)), str(tmp_path))
    assert cfg.data.label_delimiter == " " and cfg.data.labels == str(tmp_path / "data.csv")
    again = load_sources(cfg.data, 32, seed=1)
    assert again.multi_label and again.val.files == data.val.files
    # a single-label table trained multi-label: one-hot vectors, the same classes
    forced = load_sources(DataConfig(labels=[(p, l[0]) for p, l in pairs], multi_label=True), 32)
    assert forced.multi_label and next(forced.train.ds.as_numpy_iterator())[1].sum() == 1.0


def test_bad_multi_label_tables_are_refused_with_the_row(table, tmp_path):
    root, _, images = table
    rows = [(n, " ".join(l), "train") for n, l in images[:6]]
    with pytest.raises(DataError, match=r"line 4: the 'label' cell of 'img2.jpg' is empty"):
        load_sources(DataConfig(labels=write_csv(tmp_path / "a.csv", rows[:2] + [("img2.jpg", "  ", "train")]),
                                image_dir=root, label_delimiter=" "), 32)
    with pytest.raises(DataError, match=r"line 8: label 'purple' of the val split never appears in the train split"):
        load_sources(DataConfig(labels=write_csv(tmp_path / "b.csv", rows + [("img7.png", "red purple", "val")]),
                                image_dir=root, label_delimiter=" "), 32)
    with pytest.raises(DataError, match=r"row 1: 2 labels \('red', 'green'\) but multi-label is off"):
        load_sources(DataConfig(labels=[("img0.jpg", ["red"]), ("img2.jpg", ["red", "green"])], image_dir=root,
                                multi_label=False), 32)


def test_tfds_sequence_of_class_labels_is_multi_label_by_name():
    import tensorflow as tf
    import tensorflow_datasets as tfds

    images = [tf.io.encode_png(tf.fill([20, 24, 3], tf.constant(i * 20, tf.uint8))).numpy() for i in range(5)]
    labels = [[0, 3], [1], [2, 3, 3], [], [19]]

    def as_dataset(self, split, decoders=None, **kwargs):  # voc's real features and builder, these examples
        gen = lambda: ({"image": a, "labels": np.array(b, np.int64)} for a, b in zip(images, labels))  # noqa: E731
        return tf.data.Dataset.from_generator(gen, output_signature={
            "image": tf.TensorSpec([], tf.string), "labels": tf.TensorSpec([None], tf.int64)})

    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        data = load_sources(DataConfig(dataset="voc"), 32)
        ys = np.stack([y for _, y in data.train.ds.as_numpy_iterator()])
    assert data.multi_label and data.num_classes == 20 and data.class_names[:2] == ["aeroplane", "bicycle"]
    want = np.zeros((5, 20), np.float32)
    for i, idx in enumerate(labels):
        want[i, idx] = 1.0
    np.testing.assert_array_equal(ys, want)


def test_pipeline_keeps_multi_hot_labels_and_mixup_mixes_them(table):
    _, path, _ = table
    data = load_sources(DataConfig(labels=path, label_delimiter=" "), 32)
    truth = np.stack([y for _, y in data.train.ds.as_numpy_iterator()])
    plain = np.concatenate([y for _, y in make_dataset(data.train, 32, 8, 3, cache="none").as_numpy_iterator()])
    np.testing.assert_array_equal(plain, truth)
    from tlkit.data.augment import BatchAugmenter, Preset

    x = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    for preset in (Preset(mixup=0.4), Preset(cutmix=1.0)):  # the pipeline's mixing of one batch
        _, mixed = BatchAugmenter(preset, seed=3).mix(x, truth[:8])
        mixed = np.asarray(mixed)
        assert mixed.shape == (8, 3) and mixed.min() >= 0.0 and mixed.max() <= 1.0 + 1e-6
        assert np.any((mixed > 0.01) & (mixed < 0.99))  # soft multi-hot targets: a mixture of two label sets
        for row in mixed:  # each row is lam * one image's label set + (1 - lam) * another's
            fits = [np.allclose(row, lam * a + (1 - lam) * b, atol=1e-5) for a in truth[:8] for b in truth[:8]
                    for lam in [float(np.clip(np.dot(row - b, a - b) / max(np.dot(a - b, a - b), 1e-12), 0, 1))]]
            assert any(fits)


# ---------------------------------------------------------------- metrics and thresholds

def test_metrics_match_scikit_learn_on_random_scores_with_ties():
    from sklearn import metrics as skm

    rng = np.random.default_rng(0)
    for trial in range(10):
        y = (rng.random((40, 4)) < 0.35).astype(int)
        y[0] = 1  # every class has a positive
        p = np.round(rng.random((40, 4)), 1)  # many ties
        t = rng.uniform(0.2, 0.8, 4)
        m = ML.compute_multilabel_metrics(y, p, t)
        assert m["mean_average_precision"] == pytest.approx(skm.average_precision_score(y, p, average="macro"))
        pred = (p >= t).astype(int)
        assert m["micro_f1"] == pytest.approx(skm.f1_score(y, pred, average="micro"))
        assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
        assert m["exact_match"] == pytest.approx(skm.accuracy_score(y, pred))
        for c in range(4):
            thr, f1 = ML.best_threshold(y[:, c], p[:, c])
            best = max(2 * np.sum(y[:, c] * (p[:, c] >= u)) / (y[:, c].sum() + (p[:, c] >= u).sum())
                       for u in np.unique(p[:, c]))  # the F1 of every possible cut
            assert f1 == pytest.approx(best) and skm.f1_score(y[:, c], (p[:, c] >= thr).astype(int)) == pytest.approx(best)


def test_metrics_by_hand():
    # class 0: scores .9 (pos) .8 (neg) .7 (pos) .1 (neg): AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
    assert ML.average_precision([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(5 / 6)
    assert ML.average_precision([0, 0], [0.3, 0.2]) is None
    assert ML.best_threshold([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx((0.4, 0.8))
    m = ML.compute_multilabel_metrics(np.array([[1, 0], [0, 0], [1, 1]]), np.array([[0.9, 0.6], [0.2, 0.1],
                                                                                   [0.4, 0.7]]), [0.5, 0.5], ["a", "b"])
    # a: tp 1 fn 1 -> F1 2/3; b: tp 1 fp 1 -> F1 2/3; micro: tp 2 fp 1 fn 1 -> 2/3
    assert (m["micro_f1"], m["macro_f1"], m["exact_match"]) == pytest.approx((2 / 3, 2 / 3, 1 / 3))
    assert m["per_class"][0] == {"class": "a", "ap": 1.0, "f1": pytest.approx(2 / 3), "precision": 1.0,
                                 "recall": 0.5, "threshold": 0.5, "support": 2}
    assert ML.labels_above(np.array([[0.2, 0.9, 0.55]]), [0.5, 0.5, 0.6], ["a", "b", "c"]) == [[("b", 0.9)]]


def test_keras_map_metric_is_the_macro_average_and_the_positive_weighted_loss():
    import keras

    from tlkit.engine.class_weights import PositiveWeightedBCE, positive_weights
    from tlkit.engine.loop import classifier_metrics

    rng = np.random.default_rng(1)
    y = (rng.random((64, 3)) < 0.4).astype("float32")
    p = np.clip(y * 0.5 + rng.random((64, 3)) * 0.5, 0, 1).astype("float32")
    m = classifier_metrics(3, multi_label=True)[0]
    m.update_state(y, p)
    per_class = []
    for c in range(3):
        one = keras.metrics.AUC(curve="PR")
        one.update_state(y[:, c], p[:, c])
        per_class.append(float(one.result()))
    assert m.name == "map" and float(m.result()) == pytest.approx(np.mean(per_class), abs=1e-5)
    plain = keras.losses.BinaryCrossentropy(label_smoothing=0.1)(y, p)
    assert float(PositiveWeightedBCE([1.0, 1.0, 1.0], label_smoothing=0.1)(y, p)) == pytest.approx(float(plain), 1e-5)
    q = np.array([[0.8, 0.3]], "float32")  # w=[3, 1]: -(3 ln .8 + ln .7) / 2
    assert float(PositiveWeightedBCE([3.0, 1.0])(np.array([[1.0, 0.0]]), q)) == pytest.approx(
        -(3 * np.log(0.8) + np.log(0.7)) / 2, 1e-5)
    assert positive_weights([10, 2, 0], 20) == [1.0, 9.0, 1.0]


# ---------------------------------------------------------------- end to end

def stderr_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_multi_label_input_one_line_exit_2_nothing_written(table, tiny_backbone, tmp_path, capsys):
    root, _, images = table
    out = tmp_path / "run"
    tiny = ["--base", tiny_backbone, "--weights", "none", "--image-size", "32", "--output-dir", str(out)]
    assert cli.main(["finetune", "--dataset", "shapes", "--label-delimiter", " ", *tiny]) == 2
    assert "--label-delimiter needs --labels" in stderr_line(capsys)
    rows = [(n, " ".join(l), "train") for n, l in images[:8]]
    empty = write_csv(tmp_path / "e.csv", rows + [("img9.png", "", "train")])
    assert cli.main(["finetune", "--labels", empty, "--image-dir", root, "--label-delimiter", " ", *tiny]) == 2
    assert "line 10: the 'label' cell of 'img9.png' is empty" in stderr_line(capsys)
    unseen = write_csv(tmp_path / "u.csv", rows + [("img9.png", "red cyan", "val")])
    assert cli.main(["finetune", "--labels", unseen, "--image-dir", root, "--label-delimiter", " ", *tiny]) == 2
    assert "label 'cyan' of the val split never appears in the train split" in stderr_line(capsys)
    assert not out.exists()


def test_multi_label_run_end_to_end(table, tiny_backbone, tmp_path, capsys):
    import tlkit

    root, path, images = table
    run = str(tmp_path / "run")
    assert cli.main(["finetune", "--labels", path, "--image-dir", root, "--label-delimiter", " ", "--base",
                     tiny_backbone, "--weights", "none", "--image-size", "32", "--batch-size", "8", "--augment",
                     "none", "--strategy", "feature_extraction", "--epochs", "1", "--head-steps", "200",
                     "--label-smoothing", "0", "--output-dir", run]) == 0
    with open(os.path.join(run, "config.yaml")) as f:
        assert yaml.safe_load(f)["data"]["multi_label"] is True
    with open(os.path.join(run, "metrics.json")) as f:
        metrics = json.load(f)
    for split in ("val", "test"):
        m = metrics[split]
        assert {"mean_average_precision", "micro_f1", "macro_f1", "per_class"} <= set(m)
        assert [r["class"] for r in m["per_class"]] == ["blue", "green", "red"]
        assert all({"ap", "f1", "threshold", "support"} <= set(r) for r in m["per_class"])
    assert metrics["test"]["mean_average_precision"] >= 0.95 and metrics["test"]["micro_f1"] >= 0.9
    with open(os.path.join(run, "thresholds.json")) as f:
        stored = json.load(f)
    assert stored["chosen_on"] == "val" and list(stored["thresholds"]) == ["blue", "green", "red"]
    thresholds = np.array(list(stored["thresholds"].values()))
    assert [r["threshold"] for r in metrics["val"]["per_class"]] == pytest.approx(thresholds)

    capsys.readouterr()
    assert cli.main(["evaluate", run, "--json"]) == 0  # the run's own table, its test split, its thresholds
    m = json.loads(capsys.readouterr().out)
    assert m["split"] == "test" and m["num_examples"] == 7
    assert m["mean_average_precision"] == pytest.approx(metrics["test"]["mean_average_precision"], abs=1e-6)
    with open(os.path.join(run, "eval-test", "pr_curves.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.isfile(os.path.join(run, "eval-test", "worst_examples.png"))
    # a frozen run's validation figures come from its cached features: the same as through the images
    assert cli.main(["evaluate", run, "--split", "val", "--json"]) == 0
    mv = json.loads(capsys.readouterr().out)
    assert mv["mean_average_precision"] == pytest.approx(metrics["val"]["mean_average_precision"], abs=1e-5)
    assert mv["micro_f1"] == pytest.approx(metrics["val"]["micro_f1"], abs=1e-6)

    two = [os.path.join(root, images[i][0]) for i in (4, 6)]  # labels red+blue, and all three
    assert cli.main(["predict", run, *two, "--json"]) == 0
    preds = json.loads(capsys.readouterr().out)["predictions"]
    assert [sorted(p["labels"]) for p in preds] == [["blue", "red"], ["blue", "green", "red"]]
    assert cli.main(["predict", run, two[0]]) == 0
    table_out = capsys.readouterr().out
    assert "blue" in table_out and "red" in table_out and "green" not in table_out

    keras_probs = tlkit.load(run).predict(two)
    assert keras_probs.shape == (2, 3) and not np.allclose(keras_probs.sum(1), 1.0)  # sigmoid, not softmax
    for fmt in ("keras", "tflite", "savedmodel"):  # three artifacts in one folder: each its own sidecars
        art = str(tmp_path / "exp" / (f"m_{fmt}.{fmt}" if fmt != "savedmodel" else f"m_{fmt}"))
        assert cli.main(["export", run, "--format", fmt, "--output", art]) == 0
        # a SavedModel folder holds its sidecars; a file has them beside it, under its own name
        sidecar = (lambda name: os.path.join(art, name)) if fmt == "savedmodel" else (
            lambda name: str(tmp_path / "exp" / f"m_{fmt}.{name}"))
        with open(sidecar("export.json")) as f:
            info = json.load(f)
        assert info["multi_label"] and info["check"]["passed"] and info["check"]["label_agreement"] == 1.0
        assert info["check"]["max_abs_diff"] < 1e-3
        with open(sidecar("thresholds.json")) as f:
            assert json.load(f)["thresholds"] == stored["thresholds"]
        loaded = tlkit.load(art)
        assert loaded.multi_label
        np.testing.assert_allclose(loaded.predict(two), keras_probs, atol=1e-4)
        assert [sorted(c) for c in loaded.predict_classes(two)] == [["blue", "red"], ["blue", "green", "red"]]


def test_multi_label_run_resumes_after_an_interrupt(table, tiny_backbone, tmp_path, capsys, monkeypatch):
    import signal

    from tlkit.engine import checkpoints

    root, path, _ = table
    run = str(tmp_path / "run")
    args = ["finetune", "--labels", path, "--image-dir", root, "--label-delimiter", " ", "--base", tiny_backbone,
            "--weights", "none", "--image-size", "32", "--batch-size", "8", "--augment", "none", "--strategy",
            "two_stage", "--head-steps", "40", "--epochs", "2", "--output-dir", run]
    original = checkpoints.Checkpointer.on_train_batch_end

    def interrupt_in_epoch_3(self, batch, logs=None):  # Ctrl-C inside the second fine-tuning epoch
        if self.last is not None and self.last.epoch == 2:
            signal.raise_signal(signal.SIGINT)
        original(self, batch, logs)

    monkeypatch.setattr(checkpoints.Checkpointer, "on_train_batch_end", interrupt_in_epoch_3)
    assert cli.main(args) == 130
    monkeypatch.undo()
    state = checkpoints.load_state(run)
    assert (state.epoch, state.monitor) == (2, "val_map") and not os.path.exists(os.path.join(run, "model.keras"))
    capsys.readouterr()
    assert cli.main(args + ["--resume"]) == 0
    assert "resuming" in capsys.readouterr().out
    with open(os.path.join(run, "history.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"] and all(r["val_map"] for r in rows)
    assert os.path.isfile(os.path.join(run, "thresholds.json")) and os.path.isfile(os.path.join(run, "model.keras"))


def test_tune_optimises_val_map_on_multi_label_data(table, tiny_backbone, tmp_path, capsys):
    root, path, _ = table
    out = str(tmp_path / "tune")
    assert cli.main(["tune", "--labels", path, "--image-dir", root, "--label-delimiter", " ", "--base", tiny_backbone,
                     "--weights", "none", "--image-size", "32", "--augment", "none", "--strategy",
                     "feature_extraction", "--head-steps", "20", "--tuner", "random", "--max-trials", "1",
                     "--batch-sizes", "8", "--trial-epochs", "1", "--output-dir", out]) == 0
    assert "the objective is val_map" in capsys.readouterr().out
    with open(os.path.join(out, "trials.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and 0.0 < float(rows[0]["val_map"]) <= 1.0
    with open(os.path.join(out, "tune.yaml")) as f:
        assert "val_map" in f.read()
    assert os.path.isfile(os.path.join(out, "best_config.yaml"))

    from tlkit.core.errors import ConfigError
    from tlkit.core.verb_configs import TuneConfig
    from tlkit.verbs.tune import _objective_for

    single = load_sources(DataConfig(labels=path), 32)  # one label a cell
    with pytest.raises(ConfigError, match="--objective val_map is the multi-label objective"):
        _objective_for(TuneConfig(objective="val_map"), single)
    assert _objective_for(TuneConfig(objective="val_loss"), load_sources(DataConfig(labels=path, label_delimiter=" "),
                                                                         32)).objective == "val_loss"


def test_lr_find_on_multi_label_data_trains_the_sigmoid_head_with_binary_cross_entropy(table, tiny_backbone,
                                                                                     tmp_path, capsys):
    """`lr-find` builds the run's multi-label classifier: its first step's loss is binary cross-entropy at zero
    logits (ln 2 for every label), not the softmax's ln 3."""
    import math

    root, path, _ = table
    out = tmp_path / "lf"
    assert cli.main(["lr-find", "--labels", path, "--image-dir", root, "--label-delimiter", " ", "--base",
                     tiny_backbone, "--weights", "none", "--image-size", "32", "--batch-size", "8", "--augment",
                     "none", "--label-smoothing", "0", "--num-steps", "12", "--start-lr", "1e-7", "--end-lr", "1e-6",
                     "--output-dir", str(out)]) == 0
    with open(out / "lr_find.json") as f:
        found = json.load(f)
    assert found["losses"][0] == pytest.approx(math.log(2), abs=0.02)
    assert "suggested --lr" in capsys.readouterr().out
