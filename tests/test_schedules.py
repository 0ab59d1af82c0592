"""tlkit/schedules.py: the cosine StageSchedule (now keras's CosineDecay) draws the same curve as its formula."""
import math

import numpy as np
import keras
import pytest

from tlkit.core.config import TrainConfig
from tlkit.models.schedules import StageSchedule, make_schedule


def formula(step, peak, total, warmup, min_ratio=0.01):
    """The curve tlkit promises: linear warm-up from peak/100, then cosine down to peak * min_ratio."""
    if warmup > 0 and step < warmup:
        start = peak / 100
        return start + (peak - start) * step / warmup
    frac = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


@pytest.mark.parametrize("total,warmup", [(100, 0), (100, 10), (7, 3), (1, 0), (5, 5)])
def test_cosine_is_the_formula_at_every_step(total, warmup):
    s = StageSchedule("cosine", 2e-3, total_steps=total, warmup_steps=warmup)
    got = np.array([float(s(i)) for i in range(total + 5)])  # past the end it stays at the floor
    want = np.array([formula(i, 2e-3, total, warmup) for i in range(total + 5)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-10)
    assert float(s(warmup)) == pytest.approx(2e-3, rel=1e-6)  # the peak right after the warm-up


def test_cosine_schedule_trains_inside_a_compiled_model_and_round_trips_its_config():
    s = make_schedule(TrainConfig(schedule="cosine", warmup_epochs=1.0), 1e-2, epochs=3, steps_per_epoch=4)
    assert isinstance(s, StageSchedule) and s.warmup_steps == 4 and s.total_steps == 12
    again = StageSchedule(**s.get_config())
    np.testing.assert_allclose([float(again(i)) for i in range(14)], [float(s(i)) for i in range(14)])
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    opt = keras.optimizers.SGD(s)
    model.compile(optimizer=opt, loss="mse")
    model.fit(np.ones((8, 3)), np.ones((8, 1)), batch_size=2, epochs=2, verbose=0)  # 8 steps
    assert float(opt.learning_rate) == pytest.approx(formula(8, 1e-2, 12, 4), rel=1e-5)


def test_other_kinds_keep_their_curves():
    step = StageSchedule("step", 1.0, total_steps=10, decay_rate=0.5, decay_steps=3)
    assert [float(step(i)) for i in (0, 2, 3, 6)] == pytest.approx([1.0, 1.0, 0.5, 0.25])
    exp = StageSchedule("exponential", 1.0, total_steps=10, decay_rate=0.5, decay_steps=2)
    assert float(exp(1)) == pytest.approx(0.5 ** 0.5)
    const = StageSchedule("constant", 0.3, total_steps=10, warmup_steps=2)
    assert [float(const(i)) for i in (0, 1, 2, 9)] == pytest.approx([0.003, 0.1515, 0.3, 0.3])
