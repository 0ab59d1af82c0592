"""Precision policy, XLA and tf.distribute, decided once per run (`setup`), before any model is built.

What each setting means:

- precision: `auto` picks `mixed_float16` on a GPU of compute capability >= 7.0, `mixed_bfloat16` on a TPU and
  `float32` otherwise. Under a mixed policy the variables stay float32, the layers compute in 16 bits, and the
  classifier's last `Activation` is float32 (see `models.classifier.build_classifier`); with `mixed_float16` Keras's `compile`
  wraps the optimizer in a `LossScaleOptimizer` (dynamic loss scaling).
- xla: `on` means `compile(jit_compile=True)` even where Keras's own `"auto"` would turn it off (a CPU, any
  `tf.distribute` strategy); `auto` turns it on only on a single GPU. After compiling, `Runtime.verify_compiled`
  checks that Keras kept it on (a layer with `supports_jit=False` makes Keras silently fall back).
- distribute: `mirrored` uses every local GPU (or, without a GPU, every logical CPU device, which is how the tests
  exercise it); `multiworker` reads `TF_CONFIG` (one entry per host); `tpu` resolves the TPU.

Batch size and learning rate: `--batch-size` is the GLOBAL batch (each of N replicas gets batch/N), and `--lr` is
the rate for that global batch. tlkit never rescales the learning rate behind your back, so the same flags give
the same optimisation on 1 or 8 devices. When you change the global batch by a factor k, scale the learning
rate by k as well (the linear scaling rule of Goyal et al. 2017, "Accurate, Large Minibatch SGD"), with a
warm-up (`--warmup-epochs`) for large k; `scaled_lr` computes it.

Refused combinations (each raises `ConfigError` with the reason):
- `mixed_float16` + XLA on + a `mirrored`/`multiworker` strategy (LossScaleOptimizer + jit_compile +
  MirroredStrategy crash, keras-team/keras#21366);
- XLA on + `multiworker` with more than one worker (cross-worker all-reduce under XLA fails, tensorflow#58961);
- XLA on + `--deterministic` (Keras turns XLA off under op determinism);
- XLA on + a strategy over several CPU devices (XLA places every replica's step on the first CPU);
- `mixed_float16` on a TPU (TPUs compute in bfloat16), `--xla off` on a TPU (TPU programs are always XLA);
- a global batch that does not divide evenly over the replicas (`Runtime.per_replica_batch`).

Example:
    rt = setup(RuntimeConfig(precision="float32", xla="off"))
    with rt.scope():
        model = build_classifier(...)
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os

import keras
import tensorflow as tf

from tlkit.core import private
from tlkit.core.config import DISTRIBUTE_CHOICES, PRECISIONS, XLA_CHOICES, RuntimeConfig
from tlkit.core.errors import ConfigError, first_line

log = logging.getLogger("tlkit")


@dataclasses.dataclass
class Runtime:
    """What `setup` decided.

    Attributes:
        strategy: The `tf.distribute.Strategy` (the default strategy when not distributed).
        precision: The Keras dtype policy name in force.
        jit_compile: Whether `compile(jit_compile=...)` is on.
        device: `gpu`, `tpu` or `cpu`.
        replicas: Number of replicas in sync.
        distribute: The strategy kind resolved from `auto`: `none`, `mirrored`, `multiworker` or `tpu`.
        workers: Number of workers (hosts) in the cluster (1 unless `multiworker` with a `TF_CONFIG`).
    """

    strategy: tf.distribute.Strategy
    precision: str
    jit_compile: bool
    device: str
    replicas: int
    distribute: str = "none"
    workers: int = 1

    def scope(self):
        """The strategy's scope (build and compile models in it); a no-op context when not distributed."""
        return self.strategy.scope() if self.distribute != "none" else contextlib.nullcontext()

    def describe(self) -> str:
        return (f"device={self.device} distribute={self.distribute} replicas={self.replicas} "
                f"precision={self.precision} xla={'on' if self.jit_compile else 'off'}")

    def per_replica_batch(self, global_batch: int) -> int:
        """The batch each replica gets from a global batch; raises `ConfigError` if it does not divide evenly.

        Example:
            rt.per_replica_batch(64)   # with 2 replicas
            # -> 32
        """
        if global_batch % self.replicas:
            raise ConfigError(f"batch_size {global_batch} is the global batch and must divide evenly over the "
                              f"{self.replicas} replicas; use a multiple of {self.replicas}.")
        return global_batch // self.replicas

    def verify_compiled(self, model: keras.Model) -> None:
        """Raises `ConfigError` when XLA was asked for but Keras compiled the model without it.

        Keras falls back to `jit_compile=False` with only a warning when a layer has `supports_jit=False`
        (e.g. `RandomRotation` inside a user's backbone); `--xla on` must not silently mean off.
        """
        if self.jit_compile and not model.jit_compile:
            bad = [layer.name for layer in private.all_layers(model, include_self=True)
                   if not getattr(layer, "supports_jit", True)]
            why = f"layer(s) {', '.join(bad[:5])} do not support XLA" if bad else "Keras turned XLA off"
            raise ConfigError(f"--xla on, but {why}; use --xla off (or auto), or remove those layers from the "
                              "backbone (augment in the input pipeline instead).")


def scaled_lr(lr: float, batch_size: int, reference_batch_size: int) -> float:
    """The linear scaling rule: the learning rate for `batch_size` given one tuned at `reference_batch_size`.

    Args:
        lr: Learning rate that worked at `reference_batch_size`.
        batch_size: The new global batch size.
        reference_batch_size: The global batch size `lr` was tuned for.

    Example:
        >>> scaled_lr(1e-3, 256, 32)
        0.008
    """
    if batch_size < 1 or reference_batch_size < 1:
        raise ConfigError(f"Batch sizes must be >= 1, got {batch_size} and {reference_batch_size}.")
    return lr * batch_size / reference_batch_size


def gpu_capability() -> tuple[int, int] | None:
    """The compute capability of the first GPU, or `None` without a GPU."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return None
    details = tf.config.experimental.get_device_details(gpus[0])
    return tuple(details.get("compute_capability", (0, 0)))


def auto_precision(device: str, capability: tuple[int, int] | None) -> str:
    """The precision `auto` resolves to on a device.

    Example:
        >>> auto_precision("gpu", (8, 0)), auto_precision("cpu", None)
        ('mixed_float16', 'float32')
    """
    if device == "tpu":
        return "mixed_bfloat16"
    if device == "gpu" and capability is not None and tuple(capability) >= (7, 0):
        return "mixed_float16"
    return "float32"


def read_tf_config() -> dict | None:
    """Parses and checks the `TF_CONFIG` environment variable of a multi-worker run (`None` when unset)."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        conf = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"TF_CONFIG is not valid JSON ({e.msg} at position {e.pos}): {raw[:120]!r}.") from None
    if not isinstance(conf, dict) or not isinstance(conf.get("cluster"), dict) or not isinstance(conf.get("task"), dict):
        raise ConfigError(f"TF_CONFIG must be a JSON object with 'cluster' and 'task' entries, got {raw[:120]!r}. "
                          'Example: {"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                          '"task": {"type": "worker", "index": 0}}.')
    workers = conf["cluster"].get("worker", [])
    task = conf["task"]
    if task.get("type") not in ("worker", "chief") or not isinstance(task.get("index"), int):
        raise ConfigError(f"TF_CONFIG task must be {{'type': 'worker', 'index': N}}, got {task!r}.")
    if task["type"] == "worker" and not 0 <= task["index"] < len(workers):
        raise ConfigError(f"TF_CONFIG task index {task['index']} is out of range for {len(workers)} worker(s).")
    return conf


def _local_devices() -> tuple[str, list[str]]:
    """(`gpu`|`cpu`, device names a MirroredStrategy should use)."""
    gpus = tf.config.list_logical_devices("GPU")
    if gpus:
        return "gpu", [d.name for d in gpus]
    return "cpu", [d.name for d in tf.config.list_logical_devices("CPU")]


def setup(cfg: RuntimeConfig) -> Runtime:
    """Sets the precision policy and picks the distribution strategy and XLA; call before building models.

    Args:
        cfg: The `RuntimeConfig`.

    Returns:
        A `Runtime`; build and compile models inside `runtime.scope()`.

    Raises:
        ConfigError: an unknown value, an unsupported combination (see the module docstring), a malformed
            `TF_CONFIG`, or `tpu` without a TPU.

    Example:
        rt = setup(RuntimeConfig(precision="mixed_float16", xla="on", distribute="none"))
        rt.describe()
        # -> 'device=cpu distribute=none replicas=1 precision=mixed_float16 xla=on'
    """
    for name, value, choices in (("precision", cfg.precision, PRECISIONS), ("xla", cfg.xla, XLA_CHOICES),
                                 ("distribute", cfg.distribute, DISTRIBUTE_CHOICES)):
        if value not in choices:
            raise ConfigError(f"Unknown {name} {value!r}. Choose one of: {', '.join(choices)}.")
    device, devices = _local_devices()
    dist = cfg.distribute
    if dist == "auto":
        dist = "mirrored" if device == "gpu" and len(devices) > 1 else "none"
    precision = cfg.precision
    if dist == "tpu":
        if precision == "mixed_float16":
            raise ConfigError("--precision mixed_float16 is not supported on TPU (TPUs compute in bfloat16); use "
                              "--precision mixed_bfloat16 or auto.")
        if cfg.xla == "off":
            raise ConfigError("--xla off is not possible on TPU: TPU programs are always compiled with XLA; use "
                              "--xla auto.")
    if precision == "auto":
        precision = auto_precision("tpu" if dist == "tpu" else device, gpu_capability())
    # Checks that need no devices come first, so a refused combination fails before anything starts.
    workers = 1
    conf = read_tf_config() if dist == "multiworker" else None
    if conf is not None:
        workers = len(conf["cluster"].get("worker", [])) + len(conf["cluster"].get("chief", []))
    if cfg.xla == "on":
        if cfg.deterministic:
            raise ConfigError("--xla on with --deterministic is not supported: Keras turns XLA off under op "
                              "determinism; use --xla off (or auto) or drop --deterministic.")
        if precision == "mixed_float16" and dist in ("mirrored", "multiworker"):
            raise ConfigError(f"--xla on with mixed_float16 under --distribute {dist} is not supported "
                              "(LossScaleOptimizer + XLA + MirroredStrategy crash, keras-team/keras#21366); "
                              "use --xla off or --precision mixed_bfloat16.")
        if dist == "multiworker" and workers > 1:
            raise ConfigError(f"--xla on with --distribute multiworker over {workers} workers is not supported "
                              "(XLA with cross-worker all-reduce fails, tensorflow#58961); use --xla off or auto.")
    if precision == "mixed_float16" and device == "cpu" and dist != "tpu":
        log.warning("mixed_float16 on a CPU is slower than float32 (it is meant for GPUs with tensor cores).")
    cap = gpu_capability()
    if precision == "mixed_float16" and device == "gpu" and cap is not None and tuple(cap) < (7, 0):
        log.warning("mixed_float16 on a GPU of compute capability %s.%s gives little speed-up (no tensor cores).",
                    *cap)

    strategy: tf.distribute.Strategy = tf.distribute.get_strategy()
    if dist == "mirrored":
        strategy = tf.distribute.MirroredStrategy(devices=devices)
    elif dist == "multiworker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif dist == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except Exception as e:
            raise ConfigError(f"--distribute tpu: no TPU found ({first_line(e, 200)}).") from None
        strategy = tf.distribute.TPUStrategy(resolver)
        device = "tpu"
    keras.mixed_precision.set_dtype_policy(precision)
    replicas = strategy.num_replicas_in_sync
    if cfg.xla == "on" and device == "cpu" and replicas > 1:
        raise ConfigError(f"--xla on with --distribute {dist} over {replicas} CPU devices is not supported: XLA runs "
                          "every replica's step on the first CPU and cannot reach the other replicas' variables "
                          "(tensorflow.org/xla/known_issues#tfvariable_on_a_different_device); use --xla off.")
    if cfg.xla == "on":
        jit = device != "tpu"  # TPUStrategy compiles with XLA itself
    elif cfg.xla == "off":
        jit = False
    else:
        jit = device == "gpu" and dist == "none" and not cfg.deterministic
    tf_config = private.tf_framework_config()  # enable_op_determinism has no public off switch

    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    elif tf_config.is_op_determinism_enabled():
        tf_config.disable_op_determinism()  # a previous run in this process asked for it; this one did not
    return Runtime(strategy, precision, jit, device, replicas, dist, workers)
