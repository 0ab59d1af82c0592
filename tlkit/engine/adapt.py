"""The `auto` recipe's decisions, read from the data of this run instead of fixed numbers.

`strategy: auto` plans a head stage (a linear probe trained to convergence on the frozen backbone's cached
features) and a fine-tuning stage whose budget is counted in optimizer steps (`strategies.finetune_budget`). When
the fine-tuning stage starts, the `Adapter` decides, on the validation split:

1. **Augmentation** (`augment: auto`): the strongest of `standard`, `light` and `none` whose augmented training
   images the converged probe still classifies at least as well as it classifies the validation images, which it
   has never seen (an augmentation should make images that are still within the natural variation of their class);
   the horizontal flip only if flipped training images pass the same check. Letters through a letters backbone
   lose their flip and half their crop; photo textures through ImageNet features keep `standard`.
   (`choose_augment`.)
2. **What trains and how fast**: short trials from the probe, each a fifth of the budget at a constant rate —
   the top `unfreeze_stages` stages at `lr * finetune_lr_scale`, the whole backbone at that rate, the whole
   backbone at `lr` — compared by validation accuracy (for multi-label data its `val_map`, the run's objective:
   `loop.monitor_metric`), ties by validation loss. The best continues for the rest of
   the budget (its cosine schedule from its rate); when none beats the probe on validation, there is no
   fine-tuning and the probe is the model. (`Adapter.__call__`.)

The selection of the kept epoch then gives the probe a margin of one validation image
(`checkpoints.Checkpointer(head_margin=...)`): fine-tuning replaces it only when it beats it clearly.

The decision and its evidence are printed, written to `checkpoints/adapt.json` (a resumed run continues with it)
and returned for `metrics.json` (`recipe`).

Example:
    adapter = Adapter(clf, cfg, rt, features, val_ds, make_train, out_dir, on_resolved=write_config)
    run_stages(clf, plan, train_ds, val_ds, cfg, rt, ..., adapt=adapter)
    adapter.decision  # {"augment": ..., "trials": [...], "chosen": ...}
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable

import keras
import numpy as np

from tlkit.core import rundir
from tlkit.engine import features as F
from tlkit.engine.metrics import forward_fn
from tlkit.models.schedules import StageSchedule

TRIAL_SHARE = 0.2  # of the fine-tuning budget, for each trial
AUGMENT_LADDER = ("standard", "light", "none")  # strongest first
DECISION_FILE = "adapt.json"


class _Score:
    """The probe's accuracy (a multi-label probe's `map`) accumulated batch by batch: memory does not grow with the
    number of examples scored."""

    def __init__(self, predict, multi_label: bool):
        self.predict, self.multi_label = predict, multi_label  # predict: `metrics.forward_fn(head)`
        self.correct = self.n = 0
        self.metric = None

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        p = np.asarray(self.predict(np.asarray(x, np.float32)))
        y = np.asarray(y)
        if self.multi_label:
            if self.metric is None:
                from tlkit.engine.loop import classifier_metrics

                self.metric = classifier_metrics(y.shape[-1], multi_label=True)[0]
            self.metric.update_state(y, p)
        else:
            self.correct += int(np.sum(p.argmax(-1) == y.argmax(-1)))
        self.n += len(y)

    def result(self) -> float:
        if self.multi_label:
            return float(self.metric.result()) if self.metric is not None else 0.0
        return self.correct / max(self.n, 1)


def _probe_accuracy(head: keras.Model, x: np.ndarray, y: np.ndarray, multi_label: bool = False,
                    rows: int = 4096) -> float:
    """The probe's accuracy on features `x`; for a multi-label head its `map`, by the very metric the trials and the
    checkpoints are compared by (`loop.classifier_metrics`), so that the figures are comparable. `x` is read `rows`
    rows at a time (memory-mapped features stay on disk)."""
    score = _Score(forward_fn(head), multi_label)
    for i in range(0, len(x), rows):
        score.add(x[i:i + rows], y[i:i + rows])
    return score.result()


def choose_augment(model: keras.Model, split, size: int, num_classes: int, batch_size: int, probe_val: float,
                   seed: int, jit_compile: bool = False, verbose: bool = True,
                   multi_label: bool = False) -> tuple[str, bool, dict[str, Any]]:
    """The augmentation the converged probe says the images tolerate: `(preset, flip, evidence)`.

    For each candidate the training images are augmented once (seeded), passed through the frozen backbone, and
    classified by the probe (the head of `model`); a candidate passes when that accuracy is at least `probe_val`,
    the probe's accuracy on the validation images. The flip is tested alone first; the presets are then tested
    with the flip decided, strongest first, and the first that passes is taken.

    Args:
        model: The classifier, its head the converged probe.
        split: The training `Split` (files, bytes or decoded images).
        size, num_classes, batch_size: As the run's.
        probe_val: The probe's validation accuracy.
        seed: Seed of the augmentation draws.
        jit_compile: Compile the forward pass with XLA. Defaults to `False`.
        verbose: Print the evidence. Defaults to `True`.
        multi_label: The probe is multi-label: its mean average precision stands for its accuracy. Defaults to
            `False`.
    """
    from tlkit.data.pipeline import make_dataset

    extractor, head = F.split_model(model)
    forward = F.compiled_forward(extractor, jit_compile)
    predict = forward_fn(head)

    def accuracy(augment: str, flip: bool | None) -> float:
        ds = make_dataset(split, size, batch_size, num_classes, training=True, augment=augment, cache="none",
                          seed=seed, flip=flip)
        score = _Score(predict, multi_label)  # streamed: no feature is kept
        F.stream_features(extractor, ds, jit_compile, f"augmented ({augment}, flip {flip}) train", forward, score)
        return score.result()

    evidence: dict[str, Any] = {"probe_val_accuracy": round(probe_val, 4)}
    flip_acc = accuracy("none", True)
    flip = flip_acc >= probe_val
    evidence["flip"] = round(flip_acc, 4)
    chosen = "none"
    for preset in AUGMENT_LADDER[:-1]:
        acc = accuracy(preset, flip)
        evidence[preset] = round(acc, 4)
        if acc >= probe_val:
            chosen = preset
            break
    if verbose:
        shown = ", ".join(f"{k} {v:.3f}" for k, v in evidence.items() if k != "probe_val_accuracy")
        print(f"[tlkit] augment auto: {chosen}, flip {'on' if flip else 'off'} (the probe's accuracy on augmented "
              f"training images: {shown}; it must reach its validation accuracy {probe_val:.3f})", flush=True)
    return chosen, flip, evidence


@dataclasses.dataclass
class Candidate:
    name: str
    trainable: frozenset[int] | None
    lr: float

    def describe(self, num_stages: int) -> str:
        what = "the whole backbone" if self.trainable is None else f"the top {len(self.trainable)} of {num_stages} stages"
        return f"{what} at lr {self.lr:g}"


def candidates(stage, cfg, num_stages: int) -> list[Candidate]:
    """The trials of an adaptive stage: from gentle to the whole net at the head's rate."""
    from tlkit.models.strategies import top_stages

    out = []
    k = min(cfg.train.unfreeze_stages, num_stages)
    if 0 < k < num_stages:
        out.append(Candidate(f"top{k}", top_stages(num_stages, k), stage.lr))
    out.append(Candidate("all", None, stage.lr))
    if cfg.train.lr != stage.lr:
        out.append(Candidate("all_fast", None, float(cfg.train.lr)))
    return out


class Adapter:
    """Decides the adaptive fine-tuning stage when it starts (`loop.run_stages(adapt=...)`).

    Args:
        clf: The `Classifier` (its head converged by the head stage).
        cfg: The resolved `FinetuneConfig`.
        rt: The `Runtime`.
        features: The run's `HeadFeatures` (the probe's validation features, and the statistics).
        val_ds: The validation pipeline (`None`: nothing to decide on; the stage runs as planned).
        make_train: `make_train(augment, flip) -> train_ds`, the training pipeline with that augmentation.
        train_split: The training `Split` (for the augmentation check).
        out_dir: The run folder (`checkpoints/adapt.json`), or `None`.
        on_resolved: Called with the configuration once `augment: auto` is resolved (to rewrite config.yaml).
        verbose: Print what is decided. Defaults to `True`.
    """

    def __init__(self, clf, cfg, rt, features, val_ds, make_train: Callable[[str, bool | None], Any], train_split,
                 out_dir: str | None, on_resolved: Callable[[Any], None] | None = None, verbose: bool = True):
        self.clf, self.cfg, self.rt, self.features, self.val_ds = clf, cfg, rt, features, val_ds
        self.make_train, self.train_split, self.out_dir = make_train, train_split, out_dir
        self.on_resolved, self.verbose = on_resolved, verbose
        self.decision: dict[str, Any] = {}
        self.stage = None  # the stage as decided (None: no fine-tuning, or not reached)

    @property
    def path(self) -> str | None:
        return os.path.join(self.out_dir, "checkpoints", DECISION_FILE) if self.out_dir else None

    def _say(self, text: str) -> None:
        if self.verbose:
            print(f"[tlkit] {text}", flush=True)

    def __call__(self, index: int, stage, train_ds, resumed: bool):
        from tlkit.engine.loop import NaNGuard, compile_classifier, monitor_metric, stage_optimizer

        if resumed and self.path and os.path.isfile(self.path):
            return self._resumed(stage), train_ds
        cfg, model, clf = self.cfg, self.clf.model, self.clf
        t0 = time.time()
        if self.val_ds is None:
            self._say("no validation split: fine-tuning as planned (the top stages at the lower rate); give "
                      "--val-split for the trials that decide it")
            self.stage = stage
            return stage, train_ds
        feats = self.features.get(model, bool(model.jit_compile))
        _, head = F.split_model(model)
        multi = clf.multi_label
        objective = monitor_metric(multi)  # val_accuracy, or val_map (multi-label)
        probe_val = _probe_accuracy(head, feats.x_val, feats.y_val, multi)
        decision: dict[str, Any] = {"probe_val_accuracy": round(probe_val, 4)}
        if multi:
            decision["objective"] = objective
        if cfg.data.augment == "auto":
            augment, flip, evidence = choose_augment(
                model, self.train_split, cfg.data.image_size, feats.y_train.shape[-1], cfg.data.batch_size,
                probe_val, cfg.seed, bool(model.jit_compile), self.verbose, multi)
            decision["augment"] = {"preset": augment, "flip": flip, "evidence": evidence}
            self.cfg = cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, augment=augment, flip=flip))
            train_ds = self.make_train(augment, flip)
            if self.on_resolved is not None:
                self.on_resolved(cfg)
        steps = stage.steps or max(1, int(train_ds.cardinality()))
        trial_steps = max(1, math.ceil(stage.epochs * steps * TRIAL_SHARE))
        rest = max(1, stage.epochs - round(stage.epochs * TRIAL_SHARE))
        warmup = int(round(cfg.train.trial_warmup * trial_steps))
        start = model.get_weights()
        results, best, best_weights = [], None, None
        for cand in candidates(stage, cfg, clf.num_stages):
            model.set_weights(start)
            clf.set_trainable(None if cand.trainable is None else set(cand.trainable), cfg.model.bn_trains)
            rate = StageSchedule("constant", cand.lr, trial_steps, warmup) if warmup else cand.lr
            with self.rt.scope():
                compile_classifier(model, stage_optimizer(cfg, rate, clf), cfg, feats.y_train.shape[-1],
                                   self.rt.jit_compile)
            guard, c0 = NaNGuard(), time.time()
            hist = model.fit(train_ds.repeat(), steps_per_epoch=trial_steps, epochs=1, validation_data=self.val_ds,
                             callbacks=[guard], verbose=0, shuffle=False)
            logs = {k: float(v[-1]) for k, v in hist.history.items()}
            ok = guard.bad_epoch is None and math.isfinite(logs.get("val_loss", math.nan))
            row = {"name": cand.name, "trainable": None if cand.trainable is None else sorted(cand.trainable),
                   "lr": cand.lr, "steps": trial_steps, **({"warmup_steps": warmup} if warmup else {}),
                   objective[4:]: round(logs.get(objective[4:], math.nan), 4),
                   objective: round(logs.get(objective, math.nan), 4) if ok else None,
                   "val_loss": round(logs.get("val_loss", math.nan), 4) if ok else None,
                   "seconds": round(time.time() - c0, 1)}
            results.append(row)
            self._say(f"trial {cand.name} ({cand.describe(clf.num_stages)}, {trial_steps} steps): "
                      + (f"{objective.replace('_', ' ')} {row[objective]:.3f}, val loss {row['val_loss']:.3f}" if ok
                         else "the loss became NaN or infinite") + f" ({row['seconds']:.0f} s)")
            if ok:
                key = (logs[objective], -logs["val_loss"])
                if best is None or key > best[0]:
                    best, best_weights = (key, cand), model.get_weights()
        decision["trials"] = results
        decision["trial_seconds"] = round(time.time() - t0, 1)
        if best is None or best[0][0] < probe_val:
            model.set_weights(start)
            shown = "no trial" if best is None else f"the best trial ({best[1].name}, {best[0][0]:.3f})"
            decision["stage"] = None
            decision["summary"] = (f"no fine-tuning: {shown} did not reach the probe's validation accuracy "
                                   f"{probe_val:.3f}; the probe is the model")
            self._finish(decision)
            return None, train_ds
        cand = best[1]
        model.set_weights(best_weights)
        decided = dataclasses.replace(stage, epochs=rest, lr=cand.lr, trainable=cand.trainable)
        decision["stage"] = {"name": cand.name, "trainable": None if cand.trainable is None else sorted(cand.trainable),
                             "lr": cand.lr, "epochs": rest, "steps_per_epoch": steps}
        decision["summary"] = (f"fine-tuning {cand.describe(clf.num_stages)} (trial {cand.name}: "
                               f"{objective.replace('_', ' ')} "
                               f"{best[0][0]:.3f} against the probe's {probe_val:.3f}), continued for {rest} more "
                               f"round(s) of {steps} steps")
        self._finish(decision)
        self.stage = decided
        return decided, train_ds

    def _resumed(self, stage):
        """The stage decided before the interruption (read back from `path`), or None: no fine-tuning."""
        with open(self.path, encoding="utf-8") as f:
            self.decision = json.load(f)
        chosen = self.decision.get("stage")
        if chosen is None:
            return None
        trainable = None if chosen["trainable"] is None else frozenset(chosen["trainable"])
        self._say(f"resumed with the decision of {self.path}: {self.decision.get('summary', '')}")
        self.stage = dataclasses.replace(stage, epochs=chosen["epochs"], lr=chosen["lr"], trainable=trainable)
        return self.stage

    def _finish(self, decision: dict[str, Any]) -> None:
        self.decision = decision
        self._say(f"recipe: {decision['summary']}")
        if self.path:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            rundir.write_json(self.path, decision)
