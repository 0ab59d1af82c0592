"""Learning-rate schedules (constant, cosine, step, exponential, each with linear warm-up) and optimizers.

The cosine schedule (the default) is `keras.optimizers.schedules.CosineDecay`, which has the warm-up; the others
are written here because Keras's `ExponentialDecay`/`PiecewiseConstantDecay` have no warm-up. `StageSchedule`
keeps its name, arguments and config (checkpoints and other modules name it).
"""
from __future__ import annotations


import keras
from keras import ops

from tlkit.core.config import TrainConfig


@keras.saving.register_keras_serializable(package="tlkit")
class StageSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Warm-up then decay, over the steps of one stage.

    Args:
        kind: `constant`, `cosine`, `step` or `exponential`.
        peak_lr: Learning rate after warm-up.
        total_steps: Steps of the stage.
        warmup_steps: Linear warm-up steps from `peak_lr / 100`. Defaults to `0`.
        decay_rate: Factor per `decay_steps` (`step`, `exponential`). Defaults to `0.1`.
        decay_steps: Steps per decay (`step`, `exponential`). Defaults to `1000`.
        min_ratio: Final learning rate of `cosine` as a fraction of the peak. Defaults to `0.01`.

    Example:
        s = StageSchedule("cosine", 1e-3, total_steps=100, warmup_steps=10)
        float(s(10))
        # -> 0.001
    """

    def __init__(self, kind: str, peak_lr: float, total_steps: int, warmup_steps: int = 0,
                 decay_rate: float = 0.1, decay_steps: int = 1000, min_ratio: float = 0.01):
        self.kind = kind
        self.peak_lr = float(peak_lr)
        self.total_steps = int(max(total_steps, 1))
        self.warmup_steps = int(max(warmup_steps, 0))
        self.decay_rate = float(decay_rate)
        self.decay_steps = int(max(decay_steps, 1))
        self.min_ratio = float(min_ratio)
        self._cosine = None
        if kind == "cosine":
            # Keras's own schedule gives the same curve: a linear warm-up from peak/100 to the peak over
            # warmup_steps, then a cosine from the peak to peak * min_ratio over the remaining steps (tested
            # against the formula in tests/test_schedules.py). step/exponential/constant below have no Keras
            # equivalent with a warm-up and stay here.
            span = max(self.total_steps - self.warmup_steps, 1)
            if self.warmup_steps > 0:
                self._cosine = keras.optimizers.schedules.CosineDecay(
                    self.peak_lr / 100.0, decay_steps=span, alpha=self.min_ratio, warmup_target=self.peak_lr,
                    warmup_steps=self.warmup_steps)
            else:
                self._cosine = keras.optimizers.schedules.CosineDecay(self.peak_lr, decay_steps=span,
                                                                      alpha=self.min_ratio)

    def __call__(self, step):
        if self._cosine is not None:
            return self._cosine(step)
        step = ops.cast(step, "float32")
        peak = self.peak_lr
        w = float(self.warmup_steps)
        t = ops.maximum(step - w, 0.0)
        if self.kind == "step":
            lr = peak * ops.power(self.decay_rate, ops.floor(t / float(self.decay_steps)))
        elif self.kind == "exponential":
            lr = peak * ops.power(self.decay_rate, t / float(self.decay_steps))
        else:
            lr = peak * ops.ones_like(step)
        if self.warmup_steps > 0:
            start = peak / 100.0
            warm = start + (peak - start) * ops.minimum(step / w, 1.0)
            lr = ops.where(step < w, warm, lr)
        return lr

    def get_config(self):
        return {"kind": self.kind, "peak_lr": self.peak_lr, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "decay_rate": self.decay_rate,
                "decay_steps": self.decay_steps, "min_ratio": self.min_ratio}


def make_schedule(cfg: TrainConfig, peak_lr: float, epochs: int, steps_per_epoch: int):
    """The learning rate of one stage: a float for a constant rate without warm-up, else a `StageSchedule`."""
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    if cfg.schedule == "constant" and warm == 0:
        return float(peak_lr)
    return StageSchedule(cfg.schedule, peak_lr, total_steps=epochs * steps_per_epoch, warmup_steps=warm,
                         decay_rate=cfg.decay_rate, decay_steps=cfg.decay_every * steps_per_epoch)


def make_optimizer(cfg: TrainConfig, learning_rate) -> keras.optimizers.Optimizer:
    """The optimizer named by `cfg.optimizer` with decoupled weight decay where asked.

    Example:
        opt = make_optimizer(TrainConfig(optimizer="sgd"), 0.01)
    """
    wd = cfg.weight_decay or None
    if cfg.optimizer == "adam":
        return keras.optimizers.Adam(learning_rate, weight_decay=wd)
    if cfg.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=cfg.momentum, nesterov=True, weight_decay=wd)
    if cfg.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate, momentum=cfg.momentum, weight_decay=wd)
    raise ValueError(f"Unknown optimizer {cfg.optimizer!r}")


def current_lr(optimizer: keras.optimizers.Optimizer) -> float:
    """The optimizer's learning rate at its current step."""
    lr = optimizer.learning_rate
    return float(keras.ops.convert_to_numpy(lr))
