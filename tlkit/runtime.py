"""Precision policy, XLA and tf.distribute, decided once per run (`setup`)."""
from __future__ import annotations

import contextlib
import dataclasses

import keras
import tensorflow as tf

from tlkit.config import RuntimeConfig
from tlkit.errors import ConfigError


@dataclasses.dataclass
class Runtime:
    """What `setup` decided.

    Attributes:
        strategy: The `tf.distribute.Strategy` (the default strategy when not distributed).
        precision: The Keras dtype policy name in force.
        jit_compile: Whether `compile(jit_compile=...)` is on.
        device: `gpu`, `tpu` or `cpu`.
        replicas: Number of replicas in sync.
    """

    strategy: tf.distribute.Strategy
    precision: str
    jit_compile: bool
    device: str
    replicas: int

    def scope(self):
        return self.strategy.scope() if self.replicas > 1 or self.device == "tpu" else contextlib.nullcontext()

    def describe(self) -> str:
        return (f"device={self.device} replicas={self.replicas} precision={self.precision} "
                f"xla={'on' if self.jit_compile else 'off'}")


def _gpu_capability() -> tuple[int, int] | None:
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return None
    details = tf.config.experimental.get_device_details(gpus[0])
    return details.get("compute_capability", (0, 0))


def setup(cfg: RuntimeConfig) -> Runtime:
    """Sets the precision policy and picks the distribution strategy and XLA; call before building models.

    Example:
        >>> rt = setup(RuntimeConfig(precision="float32", xla="off"))
    """
    cap = _gpu_capability()
    n_gpus = len(tf.config.list_physical_devices("GPU"))
    strategy: tf.distribute.Strategy = tf.distribute.get_strategy()
    device = "gpu" if n_gpus else "cpu"
    dist = cfg.distribute
    if dist == "auto":
        dist = "mirrored" if n_gpus > 1 else "none"
    if dist == "mirrored":
        strategy = tf.distribute.MirroredStrategy()
    elif dist == "multiworker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif dist == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except Exception as e:
            raise ConfigError(f"--distribute tpu: no TPU found ({str(e).splitlines()[0][:200]}).") from None
        strategy = tf.distribute.TPUStrategy(resolver)
        device = "tpu"
    precision = cfg.precision
    if precision == "auto":
        if device == "tpu":
            precision = "mixed_bfloat16"
        elif cap is not None and cap >= (7, 0):
            precision = "mixed_float16"
        else:
            precision = "float32"
    keras.mixed_precision.set_dtype_policy(precision)
    replicas = strategy.num_replicas_in_sync
    if cfg.xla == "on":
        jit = True
    elif cfg.xla == "off":
        jit = False
    else:
        jit = device == "gpu" and replicas == 1
    if jit and precision == "mixed_float16" and replicas > 1:
        raise ConfigError("--xla on with mixed_float16 under MirroredStrategy is not supported "
                          "(LossScaleOptimizer + XLA + MirroredStrategy crash, keras-team/keras#21366); "
                          "use --xla off or --precision mixed_bfloat16.")
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    return Runtime(strategy, precision, jit, device, replicas)
