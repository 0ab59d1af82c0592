"""Weight averaging (`--ema`): an exponential moving average of the trained weights, on Keras's own machinery.

Keras optimizers keep the average themselves (`use_ema=True`: after every update, inside the compiled train step,
`average = d * average + (1 - d) * weight` for each trained variable), and `keras.callbacks.SwapEMAWeights` swaps
it into the model for validation. tlkit uses both, with three changes:

- the decay is stated in steps and warmed up: `d_t = min(1 - 1/ema_steps, (1 + t) / (10 + t))` at the t-th update
  of a stage (t = 0, 1, ...; `d_0 = 0`, so the average starts at the first updated weights), the schedule of
  `tf.train.ExponentialMovingAverage(num_updates=...)`. With a fixed decay, a 40-step fine-tune of 50 images would
  average mostly its starting point; warmed up, a short stage averages its recent steps, a long one its last
  ~`ema_steps`. The counter `t` is an optimizer variable, so it is checkpointed and restored with the rest.
- `EMAWeights` (a `SwapEMAWeights`) leaves the average in the model at the end of every epoch, so the checkpoint of
  the epoch (and `best.weights.h5`, and in the end `model.keras`) holds the averaged weights, and it starts the next
  epoch from the raw weights again; it also does so after early stopping, and after a resume inside a stage (the
  checkpoint's model weights are the average, the optimizer's `average` slots the raw weights: swapped back).
- a stage compiles a fresh optimizer (`engine.loop.run_stages`), so the average restarts whenever what trains
  changes; a stage starts from the previous stage's averaged weights.

Only trainable variables are averaged (as in Keras): with pretrained weights BatchNorm is frozen (its statistics do
not move); with `--train-bn` its moving statistics are the raw ones. The head stage on cached features
(`fit_head_on_features`) trains without an average: it is trained to convergence and keeps its best pass.

Example:
    opt = with_ema(keras.optimizers.Adam(1e-3), ema_steps=1000)
    model.compile(opt, loss)
    model.fit(ds, epochs=3, callbacks=[EMAWeights()])   # model now holds the average
"""
from __future__ import annotations

import keras
from keras import ops

from tlkit.models.param_groups import with_mixin

WARMUP = 10.0  # d_t = (1 + t) / (WARMUP + t) until it reaches 1 - 1/ema_steps


def ema_decay(step: int, ema_steps: int) -> float:
    """The decay of the `step`-th update (0-based) of a stage: 0 first, then `min(1 - 1/ema_steps, (1+t)/(10+t))`.

    Example:
        >>> [round(ema_decay(t, 1000), 4) for t in range(3)]
        [0.0, 0.1818, 0.25]
    """
    if step == 0:
        return 0.0
    return min(1.0 - 1.0 / ema_steps, (1.0 + step) / (WARMUP + step))


class _WarmEMA:
    """Mixin over a Keras optimizer class: the moving average with the step-stated, warmed-up decay."""

    def build(self, var_list):
        super().build(var_list)
        self._ema_updates = self.add_variable(shape=(), dtype="int64", initializer="zeros",
                                              aggregation="only_first_replica", name="ema_updates")

    def _update_model_variables_moving_average(self, trainable_variables):
        t = ops.cast(self._ema_updates, "float32")
        decay = ops.minimum(ops.cast(self.ema_momentum, "float32"), (1.0 + t) / (WARMUP + t))
        decay = ops.where(ops.equal(self._ema_updates, 0), 0.0, decay)
        for var, average in zip(trainable_variables, self._model_variables_moving_average):
            if average is not None:
                d = ops.cast(decay, var.dtype)
                average.assign(ops.add(ops.multiply(d, average), ops.multiply(ops.subtract(1.0, d), var)))
        self._ema_updates.assign_add(1)


def with_ema(optimizer: keras.optimizers.Optimizer, ema_steps: int) -> keras.optimizers.Optimizer:
    """A copy of the unbuilt `optimizer` that keeps the moving average of its variables (`use_ema=True`).

    The copy is made from the config (learning-rate schedule included), as `param_groups.scaled_optimizer` does; a
    later `scaled_optimizer` of it keeps the average. `ema_momentum` holds the cap `1 - 1/ema_steps`.
    """
    if ema_steps < 1:
        raise ValueError(f"ema_steps must be >= 1, got {ema_steps}.")
    config = dict(optimizer.get_config(), use_ema=True, ema_momentum=1.0 - 1.0 / ema_steps,
                  ema_overwrite_frequency=None)
    return with_mixin(_WarmEMA, type(optimizer), "EMA").from_config(config)


def averaged_optimizer(optimizer) -> keras.optimizers.Optimizer | None:
    """The optimizer inside `optimizer` (a `LossScaleOptimizer` or not) that keeps an average, or `None`."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    return inner if getattr(inner, "use_ema", False) else None


class EMAWeights(keras.callbacks.SwapEMAWeights):
    """`SwapEMAWeights(swap_on_epoch=True)` that also ends a stopped fit with the average in the model, and resumes.

    Put it before the checkpointer: at the end of every epoch the model holds the average (what is saved); during
    the epoch's training the raw weights; during validation the average.

    Args:
        resumed: The model's weights were just loaded from a checkpoint of an epoch of this stage and the optimizer's
            variables restored: the model holds the average, the optimizer the raw weights. Defaults to `False`.
    """

    def __init__(self, resumed: bool = False):
        super().__init__(swap_on_epoch=True)
        self._ema_weights_in_model = bool(resumed)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if self.model.stop_training and epoch != self.params["epochs"] - 1:
            # Early stopping (or the NaN guard): fit ends now and then copies the optimizer's average into the
            # model (`finalize_variable_values`); make that the average, which the model holds now.
            self._finalize_ema_values()

    def on_predict_end(self, logs=None):  # Keras 3.15 tests the flag the wrong way round here
        if self._ema_weights_in_model:
            self._swap_variables()
            self._ema_weights_in_model = False
