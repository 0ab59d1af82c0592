"""`tlkit lr-find`: the learning-rate range test on the stage you are about to train (`engine/lr_range.py`).

Example:
    result = tlkit.lr_find(FinetuneConfig(data=DataConfig(dataset="shapes", image_size=32),
                                          model=ModelConfig(weights="none")), num_steps=50)
    result.suggestion
"""
from __future__ import annotations

import dataclasses
import os

import keras

from tlkit.core import rundir
from tlkit.core.config import FinetuneConfig
from tlkit.core.verb_configs import LRFindConfig as L
from tlkit.core.errors import ConfigError
from tlkit.data import make_dataset
from tlkit.engine import setup as engine_setup
from tlkit.engine.lr_range import LRFindResult, check_range, find_lr
from tlkit.models.classifier import Classifier

__all__ = ["LRFindResult", "lr_find"]


def lr_find(cfg: FinetuneConfig, *, model: keras.Model | None = None, start_lr: float = L.start_lr, end_lr: float = L.end_lr,
            num_steps: int = L.num_steps, stage: str | None = None, output_dir: str | None = None,
            diverge_factor: float = 4.0, verbose: int | None = None) -> LRFindResult:
    """Finds a learning rate for the stage you are about to train (fastai's `lr_find`).

    Loads the data and builds the classifier exactly as `finetune` does (or takes your `model`), runs the range
    test (see `find_lr`), restores the model's weights, writes `lr_find.png` and `lr_find.json`, and prints
    the suggestion. `tlkit finetune --lr auto` does this first and trains with the suggestion.

    Args:
        cfg: A `FinetuneConfig` (its `train.lr` is ignored; it may be `"auto"`).
        model: A classifier from `build_classifier` to search on as it is now (e.g. after its head was
            trained). Defaults to `None` (a fresh one from `cfg`).
        start_lr: First learning rate. Defaults to `1e-7`.
        end_lr: Last learning rate. Defaults to `10.0`.
        num_steps: Batches to run at most. Defaults to `100`.
        stage: Stage of the plan to search, by name (`head`, `finetune`, ...). Defaults to `None` (the first).
        output_dir: Where to write `lr_find.png` and `lr_find.json`. Defaults to `None`: `cfg.output_dir`, else
            `runs/<base>-<dataset>-<timestamp>-lr-find`.
        diverge_factor: Stop when the smoothed loss exceeds this times its lowest value. Defaults to `4.0`.
        verbose: 1 progress bar, 2 one line, 0 silent. Defaults to `None` (1 on a terminal, else 2).

    Returns:
        An `LRFindResult`; `result.suggestion` is the learning rate to pass as that stage's peak (`--lr` for
        the first stage).

    Example:
        r = lr_find(FinetuneConfig(data=DataConfig(dataset="shapes", image_size=32),
                                   model=ModelConfig(weights="none")), num_steps=50)
        r.suggestion
    """
    cfg.validate()
    check_range(start_lr, end_lr, num_steps)
    if model is not None and model.input_shape[1]:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=int(model.input_shape[1])))
    run = engine_setup.setup_run(cfg, build_base=model is None)
    cfg, spec, rt, size, data = run.cfg, run.spec, run.rt, run.size, run.data
    if model is None:  # as finetune builds it: the head standardises the features of the training images
        plain = make_dataset(data.train, size, cfg.data.batch_size, data.num_classes, cache="none", seed=cfg.seed)
        clf, _ = engine_setup.build_model(spec, run.base, data.num_classes, cfg, size, rt, plain, None,
                                          multi_label=data.multi_label, keep_features=False)
    elif model.output_shape[-1] != data.num_classes:
        raise ConfigError(f"The model predicts {model.output_shape[-1]} classes but the data has {data.num_classes}.")
    else:
        clf = Classifier(model, spec)
    out = output_dir or cfg.output_dir or (rundir.default_run_dir(spec.name, data.name) + "-lr-find")
    ds = make_dataset(data.train, size, cfg.data.batch_size, data.num_classes, training=True,
                      augment=cfg.data.augment, cache="none", seed=cfg.seed)
    result = find_lr(clf, cfg, ds, data.num_classes, start_lr=start_lr, end_lr=end_lr, num_steps=num_steps,
                     stage=stage, diverge_factor=diverge_factor, jit_compile=rt.jit_compile, scope=rt.scope,
                     output_dir=out, verbose=verbose)
    print(f"[tlkit] {result.describe()}", flush=True)
    print(f"[tlkit] wrote {os.path.join(out, 'lr_find.png')} and lr_find.json", flush=True)
    return result
