"""tlkit/runtime.py: precision policy, XLA that really compiles, MirroredStrategy over logical CPUs, refusals."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

from tlkit.core import runtime
from tlkit.core.config import DataConfig, FinetuneConfig, ModelConfig, RuntimeConfig, TrainConfig
from tlkit.core.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _float32_after():
    yield
    keras.mixed_precision.set_dtype_policy("float32")


def test_auto_on_cpu_is_float32_without_xla_or_strategy():
    rt = runtime.setup(RuntimeConfig())
    assert (rt.device, rt.precision, rt.jit_compile, rt.replicas, rt.distribute) == ("cpu", "float32", False, 1, "none")
    assert keras.config.dtype_policy().name == "float32"
    assert runtime.auto_precision("gpu", (8, 0)) == "mixed_float16"
    assert runtime.auto_precision("gpu", (6, 1)) == "float32"
    assert runtime.auto_precision("tpu", None) == "mixed_bfloat16"
    # --xla on means on, on a CPU too (Keras's "auto" would say off here).
    assert runtime.setup(RuntimeConfig(xla="on", precision="float32")).jit_compile is True


@pytest.mark.parametrize("kwargs, match", [
    (dict(distribute="tpu", precision="mixed_float16"), "not supported on TPU"),
    (dict(distribute="tpu", xla="off"), "always compiled with XLA"),
    (dict(xla="on", deterministic=True), "op determinism"),
    (dict(xla="on", precision="mixed_float16", distribute="mirrored"), "keras#21366"),
    (dict(xla="on", precision="mixed_float16", distribute="multiworker"), "keras#21366"),
    (dict(precision="float64"), "Unknown precision 'float64'"),
])
def test_unsupported_combinations_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        runtime.setup(RuntimeConfig(**kwargs))


def test_tf_config_checks_and_multiworker_xla(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        runtime.setup(RuntimeConfig(distribute="multiworker"))
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}))
    with pytest.raises(ConfigError, match="index 3 is out of range"):
        runtime.setup(RuntimeConfig(distribute="multiworker"))
    two = {"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(two))
    assert runtime.read_tf_config() == two
    with pytest.raises(ConfigError, match="tensorflow#58961"):  # refused before any connection is tried
        runtime.setup(RuntimeConfig(distribute="multiworker", xla="on", precision="float32"))


def test_global_batch_and_lr_rule():
    rt = runtime.Runtime(strategy=None, precision="float32", jit_compile=False, device="cpu", replicas=4)
    assert rt.per_replica_batch(64) == 16
    with pytest.raises(ConfigError, match="batch_size 30 .* 4 replicas"):
        rt.per_replica_batch(30)
    assert runtime.scaled_lr(1e-3, 256, 32) == pytest.approx(8e-3)


def test_verify_compiled_catches_a_silent_xla_fallback():
    inp = keras.Input((8, 8, 3))
    out = keras.layers.GlobalAveragePooling2D()(keras.layers.RandomRotation(0.1, name="rot")(inp))
    model = keras.Model(inp, out)
    rt = runtime.setup(RuntimeConfig(xla="on", precision="float32"))
    with pytest.warns(UserWarning, match="jit_compile"):
        model.compile(loss="mse", jit_compile=rt.jit_compile)
    assert model.jit_compile is False  # Keras fell back
    with pytest.raises(ConfigError, match="rot"):
        rt.verify_compiled(model)


def test_mixed_float16_run_trains_saves_and_reloads(tmp_path, tiny_backbone):
    import tlkit

    cfg = FinetuneConfig(
        data=DataConfig(dataset="shapes", image_size=32, shapes_per_class=16, batch_size=16, augment="light"),
        model=ModelConfig(base=tiny_backbone, weights="none"), train=TrainConfig(strategy="full", epochs=1),
        runtime=RuntimeConfig(precision="mixed_float16", xla="off"), output_dir=str(tmp_path / "run"))
    result = tlkit.finetune(cfg)
    model = result.model
    logits = model.get_layer("logits")
    assert logits.dtype_policy.name == "mixed_float16"
    assert logits.compute_dtype == "float16" and logits.kernel.dtype == "float32"
    assert model.get_layer("probs").compute_dtype == "float32"
    assert all(w.dtype == "float32" for w in model.weights)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert np.isfinite(result.history[-1]["loss"])
    reloaded = keras.models.load_model(os.path.join(result.run_dir, "model.keras"), safe_mode=True)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    p = keras.ops.convert_to_numpy(reloaded(x))
    assert p.dtype == np.float32 and np.allclose(p.sum(axis=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(p, keras.ops.convert_to_numpy(model(x)), atol=2e-3)


_CHILD = textwrap.dedent("""
    import json, os, sys, glob
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np
    from tlkit.core import runtime
    from tlkit.core.config import RuntimeConfig
    out = {}

    def model_and_data():
        keras.utils.set_random_seed(0)
        inp = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inp)
        x = keras.layers.GlobalAveragePooling2D()(x)
        model = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(x))
        rng = np.random.default_rng(0)
        xs = rng.normal(size=(32, 8, 8, 3)).astype("float32")
        ys = keras.utils.to_categorical(rng.integers(0, 2, 32), 2)
        return model, tf.data.Dataset.from_tensor_slices((xs, ys)).batch(8)

    # 1. --xla on, one device: the train step is an XLA cluster.
    rt = runtime.setup(RuntimeConfig(xla="on", precision="float32", distribute="none"))
    model, ds = model_and_data()
    model.compile(optimizer="sgd", loss="categorical_crossentropy", jit_compile=rt.jit_compile)
    rt.verify_compiled(model)
    model.fit(ds, epochs=1, verbose=0)
    out["jit"] = bool(model.jit_compile)
    out["xla_modules"] = sorted({".".join(os.path.basename(p).split(".")[:2])
                                 for p in glob.glob(os.path.join(sys.argv[1], "module_*"))})
    # 2. --distribute mirrored over the two logical CPUs, global batch 8 (4 per replica). XLA on is refused there.
    try:
        runtime.setup(RuntimeConfig(distribute="mirrored", xla="on", precision="float32"))
    except Exception as e:
        out["xla_refused"] = type(e).__name__ + ": " + str(e)
    rt = runtime.setup(RuntimeConfig(distribute="mirrored", xla="off", precision="float32"))
    with rt.scope():
        model, ds = model_and_data()
        model.compile(optimizer="sgd", loss="categorical_crossentropy", jit_compile=rt.jit_compile)
    before = [w.numpy().copy() for w in model.trainable_weights]
    h = model.fit(ds, epochs=2, verbose=0)
    out["changed"] = any(not np.allclose(a, w.numpy()) for a, w in zip(before, model.trainable_weights))
    out["replicas"] = rt.replicas
    out["per_replica"] = rt.per_replica_batch(8)
    out["devices"] = list(rt.strategy.extended.worker_devices)
    out["var_type"] = type(model.weights[0].value).__name__
    out["loss"] = [float(v) for v in h.history["loss"]]
    # 3. mixed_float16 under MirroredStrategy (XLA off, the supported combination).
    rt = runtime.setup(RuntimeConfig(distribute="mirrored", xla="off", precision="mixed_float16"))
    with rt.scope():
        model, ds = model_and_data()
        model.compile(optimizer="sgd", loss="categorical_crossentropy", jit_compile=rt.jit_compile)
    h = model.fit(ds, epochs=1, verbose=0)
    out["mixed_loss"] = float(h.history["loss"][0])
    out["mixed_opt"] = type(model.optimizer).__name__
    print("RESULT " + json.dumps(out))
""")


def test_xla_compiles_train_step_and_mirrored_over_two_logical_cpus(tmp_path):
    dump = tmp_path / "xla_dump"
    env = dict(os.environ, XLA_FLAGS=f"--xla_dump_to={dump}", TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TF_CONFIG", None)
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(dump)], capture_output=True, text=True, env=env,
                          timeout=300, cwd=REPO)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    out = json.loads(line[0][len("RESULT "):])
    assert out["jit"] is True
    # XLA compiled the train step itself (Keras's inner tf.function `one_step_on_data`), not just a flag.
    assert any("one_step_on_data" in name for name in out["xla_modules"]), out["xla_modules"]
    assert out["replicas"] == 2 and out["per_replica"] == 4
    assert len(out["devices"]) == 2 and all("CPU" in d for d in out["devices"])
    assert out["var_type"] == "MirroredVariable" and out["changed"] is True
    assert out["xla_refused"].startswith("ConfigError") and "CPU devices" in out["xla_refused"]
    assert all(np.isfinite(out["loss"])) and np.isfinite(out["mixed_loss"])
    assert out["mixed_opt"] == "LossScaleOptimizer"
