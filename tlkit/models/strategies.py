"""Fine-tuning strategies as plans of `Stage`s: which backbone stages train, for how long, at which LR.

fastai's `fine_tune` is freeze -> fit -> unfreeze -> fit at a lower rate; here every strategy is a list
of stages that `engine.loop.run_stages` runs in order, recompiling at each change.
"""
from __future__ import annotations

import dataclasses
import math

from tlkit.core.config import TrainConfig
from tlkit.core.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of training.

    Attributes:
        name: `head`, `finetune`, `full`, `top_k` or `unfreeze_N` (gradual).
        epochs: Epochs of this stage (passes over the training split; for a `head` stage on cached features,
            passes over the features).
        lr: Peak learning rate.
        trainable: Backbone stage indices that train; `None` means all, an empty set means none.
        passes: For a head stage trained on cached features: its passes over the features; the stage then counts
            as one epoch of the run (one history row, one checkpoint). `0`: the stage trains on the images for
            `epochs` epochs. Defaults to `0`.
        steps: Optimizer steps of each of its epochs (the training split is repeated; one validation, history row
            and checkpoint per epoch). `0`: an epoch is one pass over the training split. Defaults to `0`.
        adaptive: What trains and how fast is decided when the stage starts (`strategy: auto`, by
            `tlkit.engine.adapt` from trials on the validation split); `trainable` and `lr` are the fallback when
            nothing decides (`tune` trials, `distill`). Defaults to `False`.
    """

    name: str
    epochs: int
    lr: float
    trainable: frozenset[int] | None
    passes: int = 0
    steps: int = 0
    adaptive: bool = False

    def describe(self, num_stages: int) -> str:
        if self.trainable is None:
            what = "all stages"
        elif not self.trainable:
            what = "backbone frozen"
        else:
            what = f"top {len(self.trainable)} of {num_stages} stages"
        if self.passes:
            return f"{self.name}: {self.passes} passes over cached features at lr {self.lr:g}, {what}"
        if self.steps:
            return (f"{self.name}: {self.epochs} rounds of {self.steps} steps ({self.epochs * self.steps} steps) at lr "
                    f"{self.lr:g}, {what}")
        return f"{self.name}: {self.epochs} epoch(s) at lr {self.lr:g}, {what}"


def top_stages(num_stages: int, k: int) -> frozenset[int]:
    """The indices of the top `k` stages (all of them when k >= num_stages)."""
    k = max(0, min(k, num_stages))
    return frozenset(range(num_stages - k, num_stages))


def head_epochs(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Epochs of the head stage: `head_steps` optimizer steps, rounded up to whole passes (0 when off).

    Example:
        >>> head_epochs(TrainConfig(head_steps=300), steps_per_epoch=2)
        150
    """
    if cfg.head_steps <= 0:
        return 0
    return max(1, math.ceil(cfg.head_steps / max(1, steps_per_epoch)))


MAX_ROUNDS = 20  # validations (history rows, checkpoints) of a budgeted stage
AUTO_PASSES = 30  # auto without epochs: at least this many passes over the training split (the 30 epochs users write)


def finetune_budget(cfg: TrainConfig, steps_per_epoch: int) -> tuple[int, int]:
    """`(rounds, steps per round)` of the fine-tuning stage of `auto`.

    Without `epochs` the budget is `max(finetune_steps, 30 * steps_per_epoch)` optimizer steps: a floor in steps, so
    that 50 images get as many updates as 1,000 (the whole net of a user's small CNN needs a few hundred steps to
    move), and 30 passes on more data (measured: 10 passes left 100-a-class textures through a letters backbone
    4 points below plain Keras's 30 epochs); with `epochs` it is that many passes. It is validated in at most `MAX_ROUNDS` rounds: a round is one pass over
    the training split when that gives at most `MAX_ROUNDS`, else `ceil(budget / MAX_ROUNDS)` steps.

    Example:
        >>> finetune_budget(TrainConfig(finetune_steps=500), steps_per_epoch=3)
        (20, 25)
        >>> finetune_budget(TrainConfig(finetune_steps=500), steps_per_epoch=47)
        (20, 71)
        >>> finetune_budget(TrainConfig(epochs=2), steps_per_epoch=3)
        (2, 3)
    """
    spe = max(1, steps_per_epoch)
    total = max(cfg.finetune_steps, AUTO_PASSES * spe) if cfg.epochs is None else cfg.epochs * spe
    if total <= 0:
        return 0, spe
    if math.ceil(total / spe) <= MAX_ROUNDS:
        return math.ceil(total / spe), spe
    return MAX_ROUNDS, math.ceil(total / MAX_ROUNDS)


def plan(cfg: TrainConfig, num_stages: int, steps_per_epoch: int = 1, head_on_features: bool = False) -> list[Stage]:
    """The stages of `cfg.strategy` for a backbone of `num_stages` stages.

    The head stage (`two_stage`, `gradual`, `feature_extraction`) is budgeted in optimizer steps
    (`head_steps`), so that it means the same on 50 images and on 50,000: its epochs are
    `ceil(head_steps / steps_per_epoch)` (at least `epochs` for `feature_extraction`). The stages that train the
    backbone are budgeted in `epochs`, at `lr * finetune_lr_scale` for the head and the backbone alike (measured in
    `benchmarks/transfer.py`: a head kept at `lr` while the backbone moves at a tenth of it undoes the converged
    head, and lost 2 points on textures-5).

    With `head_on_features` (the engine has the head's cached features), the head stage is one epoch of the run
    whose `passes` are those epochs over the features.

    Example:
        >>> [s.name for s in plan(TrainConfig(strategy="two_stage", head_steps=20, epochs=3), 5, 4)]
        ['head', 'finetune']
    """
    s, lr = cfg.strategy, cfg.lr
    if isinstance(lr, str):  # "auto" is resolved by tlkit.verbs.lr_find.resolve_auto_lr before any plan is made
        raise ConfigError(f"lr {lr!r} must be resolved to a number before planning (finetune does it with lr_find).")
    head = head_epochs(cfg, steps_per_epoch)
    scale = cfg.finetune_lr_scale
    if s == "auto":
        rounds, per_round = finetune_budget(cfg, steps_per_epoch)
        stages = [Stage("head", head, lr, frozenset()),
                  Stage("finetune", rounds, lr * scale, top_stages(num_stages, cfg.unfreeze_stages),
                        steps=0 if per_round == steps_per_epoch else per_round, adaptive=True)]
    elif s == "feature_extraction":
        stages = [Stage("head", max(cfg.num_epochs, head), lr, frozenset())]
    elif s == "full":
        stages = [Stage("full", cfg.num_epochs, lr, None)]
    elif s == "top_k":
        stages = [Stage("top_k", cfg.num_epochs, lr, top_stages(num_stages, cfg.unfreeze_stages))]
    elif s == "two_stage":
        stages = [Stage("head", head, lr, frozenset()),
                  Stage("finetune", cfg.num_epochs, lr * scale, top_stages(num_stages, cfg.unfreeze_stages))]
    elif s == "gradual":
        stages, left, k = [Stage("head", head, lr, frozenset())], cfg.num_epochs, 1
        while left > 0:
            n = left if k >= num_stages else min(cfg.gradual_every, left)
            stages.append(Stage(f"unfreeze_{k}", n, lr * scale, top_stages(num_stages, k)))
            left -= n
            k += 1
    else:
        raise ValueError(f"Unknown strategy {s!r}")
    stages = [st for st in stages if st.epochs > 0]
    if head_on_features:
        stages = [dataclasses.replace(st, epochs=1, passes=st.epochs) if st.trainable == frozenset() else st
                  for st in stages]
    return stages

