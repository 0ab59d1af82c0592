"""Fine-tuning strategies as plans of `Stage`s: which backbone stages train, for how long, at which LR.

fastai's `fine_tune` is freeze -> fit -> unfreeze -> fit at a lower rate; here every strategy is a list
of stages that `train.run_stages` runs in order, recompiling at each change.
"""
from __future__ import annotations

import dataclasses

from tlkit.config import TrainConfig
from tlkit.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of training.

    Attributes:
        name: `head`, `finetune`, `full`, `top_k` or `unfreeze_N` (gradual).
        epochs: Epochs of this stage.
        lr: Peak learning rate.
        trainable: Backbone stage indices that train; `None` means all, an empty set means none.
    """

    name: str
    epochs: int
    lr: float
    trainable: frozenset[int] | None

    def describe(self, num_stages: int) -> str:
        if self.trainable is None:
            what = "all stages"
        elif not self.trainable:
            what = "backbone frozen"
        else:
            what = f"top {len(self.trainable)} of {num_stages} stages"
        return f"{self.name}: {self.epochs} epoch(s) at lr {self.lr:g}, {what}"


def top_stages(num_stages: int, k: int) -> frozenset[int]:
    """The indices of the top `k` stages (all of them when k >= num_stages)."""
    k = max(0, min(k, num_stages))
    return frozenset(range(num_stages - k, num_stages))


def plan(cfg: TrainConfig, num_stages: int) -> list[Stage]:
    """The stages of `cfg.strategy` for a backbone of `num_stages` stages.

    Example:
        >>> [s.name for s in plan(TrainConfig(strategy="two_stage", head_epochs=2, epochs=3), 5)]
        ['head', 'finetune']
    """
    s, lr = cfg.strategy, cfg.lr
    if isinstance(lr, str):  # "auto" is resolved by tlkit.lr_find.resolve_auto_lr before any plan is made
        raise ConfigError(f"lr {lr!r} must be resolved to a number before planning (finetune does it with lr_find).")
    if s == "feature_extraction":
        stages = [Stage("head", cfg.epochs, lr, frozenset())]
    elif s == "full":
        stages = [Stage("full", cfg.epochs, lr, None)]
    elif s == "top_k":
        stages = [Stage("top_k", cfg.epochs, lr, top_stages(num_stages, cfg.unfreeze_stages))]
    elif s == "two_stage":
        stages = [Stage("head", cfg.head_epochs, lr, frozenset()),
                  Stage("finetune", cfg.epochs, lr * cfg.finetune_lr_scale, top_stages(num_stages, cfg.unfreeze_stages))]
    elif s == "gradual":
        stages, left, k = [], cfg.epochs, 0
        while left > 0:
            n = left if k >= num_stages else min(cfg.gradual_every, left)
            name = "head" if k == 0 else f"unfreeze_{k}"
            stages.append(Stage(name, n, lr if k == 0 else lr * cfg.finetune_lr_scale, top_stages(num_stages, k)))
            left -= n
            k += 1
    else:
        raise ValueError(f"Unknown strategy {s!r}")
    return [st for st in stages if st.epochs > 0]
