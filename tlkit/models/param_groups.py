"""Per-variable learning-rate multipliers and weight masks inside a Keras 3 optimizer.

Discriminative learning rates (fastai's `slice(lo, hi)`, ULMFiT) give lower backbone stages smaller
learning rates; magnitude pruning keeps pruned weights at exactly zero while the model fine-tunes. Both
are done the same way: a subclass of the configured Keras optimizer (Adam, AdamW, SGD, RMSprop) whose
`update_step(gradient, variable, learning_rate)` multiplies the learning rate by the variable's factor
and, after the update, multiplies the variable by its mask. Scaling the learning rate (not the gradient)
keeps the factors exact for adaptive optimizers such as Adam, whose step does not depend on the gradient's
scale. The factors are Python floats fixed at trace time, so the step compiles with XLA; the mixed
precision `LossScaleOptimizer` wraps this optimizer and calls its `update_step` with unscaled gradients.
Decoupled weight decay is scaled by the same factor. The optimizer is never saved with `model.keras`
(`classifier.save_model` stores the model without its optimizer), so plain `keras.models.load_model` reads it.

Example:
    opt = scaled_optimizer(keras.optimizers.SGD(0.1), multipliers={id(v): 0.1 for v in base.weights})
    model.compile(optimizer=opt, loss="categorical_crossentropy")
"""
from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf
from keras import ops


from tlkit.core.config import TrainConfig, parse_stage_lrs
from tlkit.core.errors import ConfigError


class _ScaledUpdates:
    """Mixin over a Keras optimizer class: per-variable LR factors and post-update masks."""

    _tl_mult_by_id: dict[int, float]
    _tl_mask_by_id: dict[int, Any]

    def build(self, var_list):
        super().build(var_list)
        mults = getattr(self, "_tl_mult_by_id", {})
        masks = getattr(self, "_tl_mask_by_id", {})
        self._tl_mults = [float(mults.get(id(v), 1.0)) for v in var_list]
        self._tl_masks = [masks.get(id(v)) for v in var_list]

    def _tl_index(self, variable) -> int | None:
        try:
            return self._get_variable_index(variable)
        except KeyError:
            return None

    def update_step(self, gradient, variable, learning_rate):
        i = self._tl_index(variable)
        mult = self._tl_mults[i] if i is not None else 1.0
        if mult != 1.0:
            learning_rate = ops.multiply(ops.cast(learning_rate, "float32"), mult)
        super().update_step(gradient, variable, learning_rate)
        mask = self._tl_masks[i] if i is not None else None
        if mask is not None:
            self.assign(variable, ops.multiply(variable, ops.cast(mask, variable.dtype)))

    def _apply_weight_decay(self, variables):
        # tensorflow backend's version, with each variable's decay scaled by its learning-rate factor
        if self.weight_decay is None:
            return

        def apply(distribution, variables, **kwargs):
            def decay(variable, mult):
                if self._use_weight_decay(variable):
                    lr = tf.cast(self.learning_rate, variable.dtype) * mult
                    wd = tf.cast(self.weight_decay, variable.dtype)
                    variable.assign_sub(variable * wd * lr)

            for variable in variables:
                i = self._tl_index(variable)
                mult = self._tl_mults[i] if i is not None else 1.0
                if isinstance(variable, keras.Variable):
                    variable = variable.value
                distribution.extended.update(variable, decay, args=(mult,), group=False)

        tf.__internal__.distribute.interim.maybe_merge_call(apply, self._distribution_strategy, variables)


_CLASSES: dict[tuple[type, type], type] = {}


def with_mixin(mixin: type, cls: type, prefix: str) -> type:
    """`class <prefix><cls>(mixin, cls)`, made once per pair (an optimizer class with overridden update hooks:
    here the scaled updates, in `tlkit.engine.ema` the warmed-up average); `cls` itself when it has the mixin."""
    if issubclass(cls, mixin):
        return cls
    if (mixin, cls) not in _CLASSES:
        _CLASSES[(mixin, cls)] = type(f"{prefix}{cls.__name__}", (mixin, cls), {})
    return _CLASSES[(mixin, cls)]


def scaled_optimizer(optimizer: keras.optimizers.Optimizer, multipliers: dict[int, float] | None = None,
                     masks: dict[int, Any] | None = None) -> keras.optimizers.Optimizer:
    """A copy of `optimizer` that scales each variable's learning rate and masks it after each update.

    Args:
        optimizer: An unbuilt Keras optimizer (its config, learning-rate schedule included, is copied).
        multipliers: `{id(variable): factor}`; other variables keep factor 1. Defaults to `None`.
        masks: `{id(variable): tensor or tf.Variable of 0/1 of the variable's shape}`; after each update
            the variable is multiplied by it (a `tf.Variable` may change between steps). Defaults to `None`.

    Returns:
        An optimizer of a subclass of `type(optimizer)`.

    Example:
        opt = scaled_optimizer(keras.optimizers.Adam(1e-3), {id(model.layers[1].kernel): 0.1})
    """
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        raise ValueError("Pass the inner optimizer; compile() adds the LossScaleOptimizer itself.")
    new = with_mixin(_ScaledUpdates, type(optimizer), "Scaled").from_config(optimizer.get_config())
    new._tl_mult_by_id = dict(multipliers or {})
    new._tl_mask_by_id = dict(masks or {})
    return new


def stage_factors(num_stages: int, cfg: TrainConfig) -> list[float] | None:
    """The learning-rate factor of each backbone stage (bottom first), or `None` when all are 1.

    Stage `s` of `n` has depth `n - s` (the top stage 1): its factor is `lr_mult ** depth`, unless
    `stage_lrs` lists the factors.

    Example:
        >>> stage_factors(3, TrainConfig(lr_mult=0.5))
        [0.125, 0.25, 0.5]
    """
    if cfg.stage_lrs:
        factors = parse_stage_lrs(cfg.stage_lrs)
        if len(factors) != num_stages:
            raise ConfigError(f"stage_lrs lists {len(factors)} factors ({cfg.stage_lrs!r}) but the backbone has "
                              f"{num_stages} stages; give one per stage, bottom first.")
        return factors
    if cfg.lr_mult == 1.0:
        return None
    return [float(cfg.lr_mult ** (num_stages - s)) for s in range(num_stages)]


def stage_multipliers(layers, assignment, cfg: TrainConfig) -> dict[int, float]:
    """`{id(variable): factor}` for every variable of the backbone `layers`, whose stages are `assignment`.

    Empty when the discriminative rates are off. `Classifier.lr_factors` calls this with its backbone.

    Example:
        mults = stage_multipliers(clf.backbone.layers, clf.stage_of_layer, TrainConfig(lr_mult=0.1))
    """
    factors = stage_factors(max(assignment) + 1, cfg)
    if factors is None:
        return {}
    out: dict[int, float] = {}
    for layer, stage in zip(layers, assignment):
        for v in layer.weights:
            out[id(v)] = factors[stage]
    return out


def discriminative_optimizer(optimizer: keras.optimizers.Optimizer,
                             multipliers: dict[int, float]) -> keras.optimizers.Optimizer:
    """`optimizer` with a learning-rate factor per variable (`Classifier.lr_factors`), or itself when empty.

    Example:
        opt = discriminative_optimizer(make_optimizer(cfg.train, 1e-3), clf.lr_factors(cfg.train))
    """
    if not multipliers:
        return optimizer
    return scaled_optimizer(optimizer, multipliers=multipliers)


def describe_factors(num_stages: int, cfg: TrainConfig, lr: float) -> str:
    """One line naming each stage's learning rate, for the log."""
    factors = stage_factors(num_stages, cfg)
    if factors is None:
        return ""
    return "stage lrs (bottom first): " + ", ".join(f"{lr * f:.3g}" for f in factors) + f"; head {lr:.3g}"
