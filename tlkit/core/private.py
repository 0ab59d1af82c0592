"""Every private API tlkit touches, named in one place per library.

Keras, KerasTuner and TensorFlow have no public equivalent of these (tlkit's ceilings in setup.cfg say which
versions they were tested with). `tests/test_dependencies.py` checks each name below against the installed
libraries, so an upgrade that drops one fails one clear test instead of a user's run. The modules of the
libraries are imported only when an accessor is called: importing this module costs nothing.

Example:
    lib = keras_saving_lib()           # None where this Keras lacks the weights walk tlkit uses
    layers = all_layers(model)         # every nested layer
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Any, Iterator

# ---------------------------------------------------------------- Keras (3.15; setup.cfg: keras < 3.16)

# Private modules: {module: the names tlkit uses in it}.
KERAS_MODULES: dict[str, tuple[str, ...]] = {
    # engine/weights_format.py: the weights-file walk, for head-only checkpoints
    "keras.src.saving.saving_lib": ("_save_state", "H5IOStore"),
    # engine/weights_format.py: the weights store's conversions
    "keras.src.backend": ("convert_to_numpy", "standardize_dtype"),
}
# Private attributes of Keras classes: {public class path: the names tlkit reads, calls or overrides}.
KERAS_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    # weights_format, export_formats, core/runtime: every nested layer
    "keras.Model": ("_flatten_layers",),
    # models/param_groups.py (per-variable learning-rate factors, pruning masks) and engine/ema.py (the decay in
    # steps): overridden optimizer hooks
    "keras.optimizers.Optimizer": ("update_step", "_apply_weight_decay", "_get_variable_index",
                                   "_update_model_variables_moving_average"),
    # engine/ema.py: SwapEMAWeights finished after early stopping
    "keras.callbacks.SwapEMAWeights": ("_swap_variables", "_finalize_ema_values"),
}
# Private attributes of Keras objects that exist only on instances (checked on a small built model and optimizer).
KERAS_INSTANCE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "KerasTensor": ("_keras_history",),  # models/backbones.py: the operation that made a tensor
    # engine/predictors.py: the input structure; engine/export_formats.py: whether it ran once
    "functional Model": ("_inputs_struct", "_called"),
    "Layer in a functional Model": ("_inbound_nodes",),  # models/classifier.py: where the head starts
    "Optimizer(use_ema=True)": ("_model_variables_moving_average",),  # engine/ema.py
}

# ---------------------------------------------------------------- KerasTuner (1.4.x; setup.cfg: keras-tuner < 1.5)

KERAS_TUNER_MODULES: dict[str, tuple[str, ...]] = {
    "keras_tuner.src.config": ("DEBUG",),  # a failed trial prints one line, not its traceback
    "keras_tuner.src.engine.tuner_utils": ("SaveBestEpoch",),  # the per-trial checkpoint, kept for Hyperband
    "keras_tuner.src.distribute.utils": ("has_chief_oracle", "is_chief_oracle"),  # the process's role
    "keras_tuner.src.distribute.oracle_chief": ("OracleServicer", "exit_chief"),  # the chief serves the oracle
    "keras_tuner.src.protos": ("get_service_grpc",),
}
# engine/tuner.py: hooks of `keras_tuner.Tuner` that TlkitTuner overrides or calls.
KERAS_TUNER_TUNER_HOOKS = ("_populate_initial_space", "_configure_tensorboard_dir", "_build_hypermodel",
                           "_get_checkpoint_fname")

# ---------------------------------------------------------------- TensorFlow (2.21)

TENSORFLOW_MODULES: dict[str, tuple[str, ...]] = {
    # core/runtime.py: op determinism has no public off switch
    "tensorflow.python.framework.config": ("is_op_determinism_enabled", "disable_op_determinism"),
}


def _module(name: str):
    return importlib.import_module(name)


# ---------------------------------------------------------------- accessors: Keras


def keras_saving_lib():
    """Keras's weights-file walk (`_save_state`, `H5IOStore`), or `None` where this Keras lacks it."""
    try:
        lib = _module("keras.src.saving.saving_lib")
    except ImportError:
        return None
    if not all(hasattr(lib, n) for n in KERAS_MODULES["keras.src.saving.saving_lib"]):
        return None
    return lib


def keras_backend():
    """Keras's backend module (`convert_to_numpy`, `standardize_dtype`), as its weights store uses it."""
    return _module("keras.src.backend")


def all_layers(model: Any, include_self: bool = False) -> list:
    """Every layer of `model`, nested ones included (and `model` itself first with `include_self`)."""
    return list(model._flatten_layers(include_self=include_self, recursive=True))


# ---------------------------------------------------------------- accessors: KerasTuner


def kt_save_best_epoch() -> type:
    """KerasTuner's per-trial checkpoint callback class."""
    return _module("keras_tuner.src.engine.tuner_utils").SaveBestEpoch


@contextlib.contextmanager
def kt_quiet_failures() -> Iterator[None]:
    """KerasTuner prints a failed trial's traceback unless its `DEBUG` is off: off inside the block."""
    config = _module("keras_tuner.src.config")
    debug = config.DEBUG
    config.DEBUG = False
    try:
        yield
    finally:
        config.DEBUG = debug


def kt_has_chief_oracle() -> bool:
    """Whether KerasTuner's environment variables name a chief (distributed tuning)."""
    return bool(_module("keras_tuner.src.distribute.utils").has_chief_oracle())


def kt_is_chief_oracle() -> bool:
    """Whether this process is KerasTuner's chief."""
    return bool(_module("keras_tuner.src.distribute.utils").is_chief_oracle())


def kt_oracle_servicing():
    """`(protos, oracle_chief)`: KerasTuner's gRPC service definitions and its oracle servicer module."""
    return _module("keras_tuner.src.protos"), _module("keras_tuner.src.distribute.oracle_chief")


def kt_checkpoint_fname(tuner: Any, trial_id: str) -> str:
    """The weights file of a trial's best epoch (Hyperband continues a promoted trial from it)."""
    return tuner._get_checkpoint_fname(trial_id)


# ---------------------------------------------------------------- accessors: TensorFlow


def tf_framework_config():
    """TensorFlow's framework config module (`is_op_determinism_enabled`, `disable_op_determinism`)."""
    return _module("tensorflow.python.framework.config")
