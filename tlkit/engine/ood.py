""""Unknown" as an answer: how well a classifier tells images of its classes from images of none of them.

Three scores, each higher for an image the model knows (in-distribution, ID) than for an unknown one (OOD):

- `msp`: the maximum softmax probability (Hendrycks & Gimpel, 2017), the baseline; every export gives it.
- `energy`: the negative free energy `logsumexp(logits)` (Liu et al., 2020), from the pre-softmax `logits` layer.
- `mahalanobis`: minus the smallest Mahalanobis distance of the pooled backbone features to the class means of the
  training features, with one shared covariance (Lee et al., 2018), estimated with Ledoit-Wolf shrinkage (there
  are often fewer training images than feature dimensions) on features standardised by the training images' own
  per-feature scale (so that the shrinkage target, a multiple of the identity, fits).
- `knn`: minus the distance of the L2-normalised pooled features to the nearest L2-normalised training feature
  (Sun et al., 2022, with k = 1).

`ood_metrics` reports, per score, the AUROC (ID against OOD) and the false-positive rate at 95% true positives
(the fraction of unknown images accepted when 95% of the known ones are). The rejection that `predict` applies is a
threshold on `msp` (what every format computes): the probability that accepts 95% of the validation images, or
one the user gives (`--reject-below P`); it is stored in the run folder as `ood.json` and travels with exports as
a sidecar (`core/sidecars.py`).

Example:
    scores = Scorer(model).fit(train_images).scores(images)   # {"msp": [N], "energy": [N], "mahalanobis": [N]}
    ood_metrics(id_scores, ood_scores)["msp"]["auroc"]
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Iterable

import numpy as np

from tlkit.core.errors import ConfigError

from tlkit.core.rejection import OOD_FILE, UNKNOWN, check_reject_below, label_of, read_rejection

SCORES = ("msp", "energy", "mahalanobis", "knn")
KNN_K = 1  # the nearest training image: with a few labelled images a class, the k-th of more is another class
DEFAULT_ACCEPT = 0.95


# ---------------------------------------------------------------- scores

class Scorer:
    """Computes the three scores of images with one pass of a `build_classifier` model.

    Args:
        model: The classifier (its `logits` layer and pooled features are read; a model without a `logits`
            layer gets `msp` only).
    """

    def __init__(self, model):
        import keras
        import tensorflow as tf

        from tlkit.engine.predictors import call_model
        from tlkit.models.classifier import split_model

        self.model = model
        try:
            extractor, _ = split_model(model)
            logits = model.get_layer("logits").output
            self._multi = keras.Model(model.inputs, [extractor.output, logits, model.output])
        except (ValueError, AttributeError):
            self._multi = None
        net = self._multi
        self._fn = tf.function(lambda x: call_model(net, x) if net is not None else call_model(model, x),
                               reduce_retracing=True)
        self.means: np.ndarray | None = None
        self.precision: np.ndarray | None = None
        self.center: np.ndarray | None = None
        self.scale: np.ndarray | None = None
        self.bank: np.ndarray | None = None

    @property
    def available(self) -> tuple[str, ...]:
        return SCORES if self._multi is not None else ("msp",)

    def outputs(self, batches: Iterable[np.ndarray]) -> dict[str, np.ndarray]:
        """`{"features", "logits", "probs"}` of batches of float32 [B, S, S, 3] images in 0..255."""
        feats, logits, probs = [], [], []
        for x in batches:
            out = self._fn(x)
            if self._multi is not None:
                f, lg, p = (np.asarray(o, np.float64) for o in out)
                feats.append(f.reshape(len(f), -1))
                logits.append(lg)
            else:
                p = np.asarray(out, np.float64)
            probs.append(p)
        result = {"probs": np.concatenate(probs) if probs else np.zeros((0, 0))}
        if self._multi is not None and feats:
            result["features"], result["logits"] = np.concatenate(feats), np.concatenate(logits)
        return result

    def fit(self, features: np.ndarray, labels: np.ndarray) -> "Scorer":
        """Class means and shared (Ledoit-Wolf) precision matrix of the standardised training features, and the
        normalised training features for `knn`."""
        from sklearn.covariance import LedoitWolf

        features, labels = np.asarray(features, np.float64), np.asarray(labels)
        self.bank = _unit(features)
        self.center = features.mean(0)
        std = features.std(0)
        self.scale = np.maximum(std, 1e-3 * float(std.mean()) + 1e-12)
        features = (features - self.center) / self.scale
        classes = np.unique(labels)
        self.means = np.stack([features[labels == c].mean(0) for c in classes])
        centred = features - self.means[np.searchsorted(classes, labels)]
        self.precision = LedoitWolf(assume_centered=True).fit(centred).precision_
        return self

    def scores(self, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The scores (higher: more like the training classes) of `outputs(...)`."""
        result = {"msp": out["probs"].max(-1)}
        if "logits" in out:
            lg = out["logits"]
            m = lg.max(-1, keepdims=True)
            result["energy"] = (m + np.log(np.exp(lg - m).sum(-1, keepdims=True)))[:, 0]
        if "features" in out and self.means is not None:
            f = (out["features"] - self.center) / self.scale
            d = f[:, None, :] - self.means[None]  # [N, C, D]
            maha = np.einsum("ncd,de,nce->nc", d, self.precision, d)
            result["mahalanobis"] = -maha.min(-1)
        if "features" in out and self.bank is not None:
            sim = _unit(out["features"]) @ self.bank.T  # cosine similarity; |a - b|^2 = 2 - 2 cos
            kth = -np.sort(-sim, axis=1)[:, min(KNN_K, sim.shape[1]) - 1]
            result["knn"] = -np.sqrt(np.maximum(2.0 - 2.0 * kth, 0.0))
        return result


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


# ---------------------------------------------------------------- metrics

def auroc(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Area under the ROC curve of telling ID (positive, higher score) from OOD; 0.5 is chance."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    return float(roc_auc_score(y, np.r_[id_scores, ood_scores]))


def fpr_at_tpr(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = DEFAULT_ACCEPT) -> float:
    """The fraction of OOD images accepted by the threshold that accepts `tpr` of the ID images."""
    threshold = accept_threshold(id_scores, tpr)
    return float(np.mean(np.asarray(ood_scores) >= threshold))


def accept_threshold(scores: np.ndarray, accept: float = DEFAULT_ACCEPT) -> float:
    """The largest threshold `t` with `mean(scores >= t) >= accept` (the lower `1 - accept` quantile)."""
    s = np.sort(np.asarray(scores, np.float64))
    if not len(s):
        raise ConfigError("No scores to choose a threshold from.")
    k = int(np.floor((1.0 - accept) * len(s) + 1e-9))  # at most this many below the threshold
    return float(s[min(k, len(s) - 1)])


def ood_metrics(id_scores: dict[str, np.ndarray], ood_scores: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """`{score: {"auroc", "fpr_at_95_tpr"}}` for each score both dicts hold."""
    return {name: {"auroc": auroc(id_scores[name], ood_scores[name]),
                   "fpr_at_95_tpr": fpr_at_tpr(id_scores[name], ood_scores[name])}
            for name in SCORES if name in id_scores and name in ood_scores}


# ---------------------------------------------------------------- evaluate --ood

def read_ood_images(folder: str, size: int) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """The readable images of an OOD folder (recursively), resized like the pipeline: `(x, files, skipped)`.

    Raises:
        ConfigError: not a folder. DataError: no readable image in it.
    """
    from tlkit.core.errors import DataError
    from tlkit.engine.predictors import IMAGE_EXTENSIONS, list_images, read_image, resize_batch

    if not os.path.isdir(folder):
        raise ConfigError(f"--ood {folder!r} is not a folder (expected a folder of images of none of the classes).")
    files, _ = list_images([folder])
    imgs, kept, skipped = [], [], []
    for f in files:
        try:
            imgs.append(read_image(f))
            kept.append(f)
        except DataError as e:
            skipped.append((f, str(e)))
    if not imgs:
        raise DataError(f"--ood {folder}: no readable image (expected {', '.join(IMAGE_EXTENSIONS)} files, "
                        f"{len(files)} found, none decodable).")
    return resize_batch(imgs, size), kept, skipped


def check_ood_dir(folder: str | None) -> str | None:
    """Fails fast (before any model work) unless `folder` is a folder holding at least one readable image."""
    from tlkit.core.errors import DataError
    from tlkit.engine.predictors import IMAGE_EXTENSIONS, list_images, read_image

    if folder is None:
        return None
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ConfigError(f"--ood {folder!r} is not a folder (expected a folder of images of none of the classes).")
    files, _ = list_images([folder])
    for f in files:
        try:
            read_image(f)
            return folder
        except DataError:
            continue
    raise DataError(f"--ood {folder}: no readable image ({len(files)} image files found, none decodable; expected "
                    f"{', '.join(IMAGE_EXTENSIONS)}).")


def _batches(x: np.ndarray, batch_size: int):
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size]


def _split_outputs(scorer: Scorer, split, size: int, batch_size: int, num_classes: int):
    from tlkit.data import make_dataset

    ys, batches = [], []
    ds = make_dataset(split, size, batch_size, num_classes, cache="none")

    def gen():
        for x, y in ds:
            ys.append(np.argmax(np.asarray(y), -1))
            yield np.asarray(x)

    out = scorer.outputs(gen())
    return out, (np.concatenate(ys) if ys else np.zeros(0, int))


def evaluate_ood(model, sources, split, ood_dir: str | None, size: int, batch_size: int,
                 reject_below: float | None = None) -> dict[str, Any]:
    """`tlkit evaluate --ood`: the scores' AUROC and FPR@95%TPR, and the rejection threshold to store.

    Args:
        model: The classifier.
        sources: The `Datasets` of the run's data (training features for `mahalanobis`, validation for the threshold).
        split: The evaluated `Split` (the known images).
        ood_dir: A folder of images of none of the classes, or `None` (only the threshold is chosen).
        size: The model's input side.
        batch_size: Images per call.
        reject_below: A given threshold on `msp`, else the one that accepts 95% of the validation images.

    Returns:
        The `ood` entry of metrics.json: `scores` (per score: auroc, fpr_at_95_tpr), counts, `reject_below`,
        `rule`, and at that threshold the accepted fraction of the known images and the rejected fraction of
        the unknown ones.
    """
    n = sources.num_classes
    scorer = Scorer(model)
    result: dict[str, Any] = {}
    known_out, _ = _split_outputs(scorer, split, size, batch_size, n)
    known = scorer.scores(known_out)
    if reject_below is None:
        val = sources.val if sources.val is not None else split
        val_out, _ = _split_outputs(scorer, val, size, batch_size, n) if val is not split else (known_out, None)
        threshold = accept_threshold(scorer.scores(val_out)["msp"], DEFAULT_ACCEPT)
        rule = (f"accepts {DEFAULT_ACCEPT:.0%} of the {'validation' if sources.val is not None else 'evaluated'} "
                f"images ({len(val_out['probs'])})")
    else:
        threshold, rule = float(reject_below), "--reject-below"
    result.update(reject_below=threshold, rule=rule, score="msp", num_known=int(len(known["msp"])),
                  known_accepted=float(np.mean(known["msp"] >= threshold)))
    if ood_dir is not None:
        x_ood, files, skipped = read_ood_images(ood_dir, size)
        if "mahalanobis" in scorer.available and sources.train is not None:
            train_out, train_y = _split_outputs(scorer, sources.train, size, batch_size, n)
            scorer.fit(train_out["features"], train_y)
            known = scorer.scores(known_out)
        unknown = scorer.scores(scorer.outputs(_batches(x_ood, batch_size)))
        result.update(ood_dir=os.fspath(ood_dir), num_unknown=len(files), unknown_skipped=len(skipped),
                      scores=ood_metrics(known, unknown),
                      unknown_rejected=float(np.mean(unknown["msp"] < threshold)))
    return result


def ood_table(ood: dict[str, Any]) -> str:
    """The plain-text table `tlkit evaluate --ood` prints."""
    lines = []
    if "scores" in ood:
        lines.append(f"unknown-input detection: {ood['num_known']} known images vs {ood['num_unknown']} unknown "
                     f"({ood['ood_dir']})")
        lines.append(f"{'score':12s}  {'AUROC':>6s}  {'FPR@95%TPR':>10s}")
        for name, m in ood["scores"].items():
            lines.append(f"{name:12s}  {m['auroc']:6.3f}  {m['fpr_at_95_tpr']:10.3f}")
    line = (f"reject below p={ood['reject_below']:.4f} ({ood['rule']}): accepts {ood['known_accepted']:.1%} of the "
            f"known images")
    if "unknown_rejected" in ood:
        line += f", answers 'unknown' for {ood['unknown_rejected']:.1%} of the unknown ones"
    lines.append(line)
    return "\n".join(lines)


# ---------------------------------------------------------------- the stored rejection

def write_rejection(folder: str, threshold: float, rule: str, **extra: Any) -> str:
    """Writes `ood.json` (score `msp`, threshold, how it was chosen) into a run folder; returns its path."""
    from tlkit.core import rundir

    path = os.path.join(folder, OOD_FILE)
    rundir.write_json(path, {"score": "msp", "reject_below": float(threshold), "rule": rule,
                             "created": datetime.datetime.now().isoformat(timespec="seconds"), **extra})
    return path


__all__ = ["Scorer", "SCORES", "UNKNOWN", "auroc", "fpr_at_tpr", "accept_threshold", "ood_metrics",
           "write_rejection", "read_rejection", "label_of", "check_reject_below"]
