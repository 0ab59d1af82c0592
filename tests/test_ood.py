"""tlkit/engine/ood.py: `evaluate --ood` (AUROC, FPR@95%TPR of msp, energy, mahalanobis), the stored
threshold, and `predict` answering "unknown" below it (CLI, `tlkit.load(...).predict_classes`, exports)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import tlkit
from tlkit import cli
from tlkit.engine import ood


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Known classes: colour-cast noise images (tlkit.testing); unknowns: smooth grey gradients, real PNG files."""
    from PIL import Image

    from tlkit.testing import write_image_folder

    root = tmp_path_factory.mktemp("ood")
    known = write_image_folder(str(root / "known"), ("red", "green", "blue"), per_class=16, size=(32, 32))
    unknown = root / "unknown"
    unknown.mkdir()
    for i in range(12):
        ramp = np.linspace(0, 255, 32, dtype=np.float32)
        arr = np.stack([np.add.outer(ramp, ramp * (i / 12.0)) / 2] * 3, -1).clip(0, 255).astype(np.uint8)
        Image.fromarray(arr).save(unknown / f"grey{i}.png")
    return known, str(unknown)


@pytest.fixture(scope="module")
def run(tiny_backbone, data, tmp_path_factory):
    known, _ = data
    out = str(tmp_path_factory.mktemp("ood_run") / "run")
    assert cli.main(["finetune", "--base", tiny_backbone, "--weights", "none", "--image-dir", known, "--image-size",
                     "32", "--strategy", "feature_extraction", "--epochs", "3", "--augment", "none",
                     "--val-split", "0.25", "--output-dir", out]) == 0
    return out


def test_metrics_on_known_scores():
    a, b = np.array([0.9, 0.8, 0.7, 0.6]), np.array([0.5, 0.65, 0.1])
    assert ood.auroc(a, b) == pytest.approx(11 / 12)  # one pair of 12 out of order
    assert ood.auroc(b, a) == pytest.approx(1 / 12)
    # the threshold that accepts 95% of 20 scores 1..20 is 2 (19 of 20 at or above it)
    s = np.arange(1, 21, dtype=float)
    assert ood.accept_threshold(s, 0.95) == 2.0 and np.mean(s >= 2.0) == 0.95
    assert ood.fpr_at_tpr(s, np.array([1.5, 2.0, 30.0])) == pytest.approx(2 / 3)


def test_scores_energy_and_mahalanobis_by_hand():
    scorer = ood.Scorer.__new__(ood.Scorer)  # the arithmetic alone, no model
    feats = np.array([[0.0, 0.0], [0.2, 0.0], [4.0, 4.0], [4.2, 4.0]])
    scorer.fit(feats, np.array([0, 0, 1, 1]))
    np.testing.assert_allclose(scorer.means * scorer.scale + scorer.center, [[0.1, 0.0], [4.1, 4.0]])
    logits = np.array([[2.0, 0.0], [0.0, 0.0]])
    out = {"probs": np.exp(logits) / np.exp(logits).sum(-1, keepdims=True), "logits": logits,
           "features": np.array([[0.1, 0.0], [2.0, 2.0], [0.0, 3.0]])}
    out["probs"] = np.r_[out["probs"], [[0.5, 0.5]]]
    out["logits"] = np.r_[logits, [[0.0, 0.0]]]
    s = scorer.scores(out)
    np.testing.assert_allclose(s["energy"], np.log(np.exp(out["logits"]).sum(-1)))
    np.testing.assert_allclose(s["msp"], out["probs"].max(-1))
    assert s["mahalanobis"][0] == pytest.approx(0.0) and s["mahalanobis"][1] < -1.0  # at a mean vs between
    # knn: unit vectors; (0.1, 0) points like the training (0.2, 0); (2, 2) like (4, 4); (0, 3) is 45 degrees off
    np.testing.assert_allclose(s["knn"], [0.0, 0.0, -np.sqrt(2 - 2 * np.cos(np.pi / 4))], atol=1e-7)


def test_evaluate_ood_reports_scores_and_stores_the_threshold(run, data, capsys):
    known, unknown = data
    capsys.readouterr()
    assert cli.main(["evaluate", run, "--ood", unknown, "--split", "val"]) == 0
    printed = capsys.readouterr().out
    assert "AUROC" in printed and "FPR@95%TPR" in printed and "mahalanobis" in printed and "energy" in printed
    with open(os.path.join(run, "eval-val", "metrics.json"), encoding="utf-8") as f:
        m = json.load(f)["ood"]
    assert set(m["scores"]) == {"msp", "energy", "mahalanobis", "knn"} and m["num_unknown"] == 12
    for v in m["scores"].values():
        assert 0.0 <= v["auroc"] <= 1.0 and 0.0 <= v["fpr_at_95_tpr"] <= 1.0
    # grey gradients are unlike every colour-cast class: the scores tell them apart (measured with the first
    # version: msp 0.99, energy 1.0, mahalanobis 0.89 on 64 random-backbone features of 36 training images)
    assert m["scores"]["msp"]["auroc"] > 0.8 and m["scores"]["mahalanobis"]["auroc"] > 0.7, m["scores"]
    assert m["scores"]["energy"]["auroc"] > 0.95, m["scores"]
    with open(os.path.join(run, "ood.json"), encoding="utf-8") as f:
        stored = json.load(f)
    assert stored["score"] == "msp" and "95%" in stored["rule"]
    # the threshold accepts 95% of the validation images: recompute it from the loaded model
    clf = tlkit.load(run)
    assert clf.reject_below == pytest.approx(stored["reject_below"])
    val_probs = _val_probs(run, known)
    assert np.mean(val_probs.max(-1) >= clf.reject_below) >= 0.95
    assert np.mean(val_probs.max(-1) > clf.reject_below) < 0.95 + 1.0 / len(val_probs)


def _val_probs(run, known):
    from tlkit.core import config_io
    from tlkit.data import load_sources, make_dataset

    cfg = config_io.load_config(os.path.join(run, "config.yaml"))
    src = load_sources(cfg.data, 32, cfg.seed)
    clf = tlkit.load(run)
    xs = np.concatenate([np.asarray(x) for x, _ in make_dataset(src.val, 32, 16, src.num_classes, cache="none")])
    return clf.predict_resized(xs)


def test_predict_answers_unknown_below_the_stored_threshold(run, data, tmp_path, capsys):
    known, unknown = data
    files = sorted(os.path.join(d, n) for d, _, ns in os.walk(known) for n in ns)[::5] + [
        os.path.join(unknown, "grey0.png")]
    probs = tlkit.load(run).predict(files).max(-1)
    p = float(np.median(probs))  # half above, half below: both answers occur
    assert cli.main(["evaluate", run, "--reject-below", str(p), "--split", "val"]) == 0
    clf = tlkit.load(run)
    assert clf.reject_below == pytest.approx(p)
    labels = clf.predict_classes(files)
    for label, pr in zip(labels, probs):
        assert (label == "unknown") == (pr < p)
    assert "unknown" in labels and any(lab != "unknown" for lab in labels)
    capsys.readouterr()
    assert cli.main(["predict", run, *files, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert [x["label"] for x in r["predictions"]] == labels and r["reject_below"] == pytest.approx(p)
    assert cli.main(["predict", run, files[0], "--reject-below", "0.999"]) == 0
    assert "unknown" in capsys.readouterr().out
    # an export carries the threshold (ood.json sidecar) and answers the same
    out = str(tmp_path / "exp" / "m.keras")
    tlkit.export(run, format="keras", output=out, num_check=4, verbose=False)
    assert tlkit.load(out).reject_below == pytest.approx(p) and tlkit.load(out).predict_classes(files) == labels


@pytest.mark.parametrize("argv, needle", [
    (["--ood", "EMPTY"], "no readable image"),
    (["--ood", "CORRUPT"], "no readable image"),
    (["--ood", "MISSING"], "is not a folder"),
    (["--reject-below", "0"], "between 0 and 1"),
    (["--reject-below", "1.5"], "between 0 and 1"),
])
def test_bad_ood_input_is_one_line_exit_2(run, tmp_path, capsys, argv, needle):
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "x.jpg").write_bytes(b"not an image")
    sub = {"EMPTY": str(tmp_path / "empty"), "CORRUPT": str(tmp_path / "corrupt"), "MISSING": str(tmp_path / "nope")}
    argv = [sub.get(a, a) for a in argv]
    capsys.readouterr()
    assert cli.main(["evaluate", run, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    if argv[0] == "--reject-below":
        assert cli.main(["predict", run, str(tmp_path / "corrupt"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
