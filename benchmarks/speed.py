"""Speed benchmark (issues 4 and 13): tlkit against the plain Keras way, same data, same run, as ratios.

Issue 13 (the default, `--parts a,b,c,d,scan,startup`), on real photos (crops of the photos scikit-image,
scikit-learn and matplotlib ship, 3 classes, 500x375 JPEG):

(a) the frozen stage end to end, as a user times it: whole processes, one after the other, alternating,
    `--repeats` times: `python -m tlkit finetune --base resnet50 --weights none --image-dir PHOTOS --image-size 96
    --strategy feature_extraction --augment none --batch-size 32 --epochs 10` against
    `python benchmarks/plain_keras_frozen.py PHOTOS` (the keras.io guide's way: `image_dataset_from_directory`,
    frozen base, `fit` for 10 epochs); also the bytes in the run's `checkpoints/`;
(b) the same frozen stage in one process: the plain `fit` of (a)'s baseline against tlkit's stage (its
    `train_seconds`: feature extraction, 10 head epochs, checkpoints);
(c) `tlkit prune`'s train step (masks, the sparsity schedule) against a plain `fit` step of the same ResNet50 at
    32 px, batch 16, 640 images, in one process (the epochs after the first, which traces);
(d) on a GPU only: ResNet50 at 224 px, batch 128, mixed_float16 + XLA, training images/s (NVIDIA's Deep
    Learning Examples report 2,375 img/s on one A100 for TensorFlow);
scan: the image-folder check (`check_images`) against reading every file's header with PIL;
startup: `python -m tlkit --help` and `python -c "import tensorflow, keras"`, whole processes.

Issue 4 (`--parts 1,2,3,4`): (1) input pipeline images/s against `image_dataset_from_directory` + Keras
augmentation layers, (2) the frozen stage with and without the feature cache, (3) full fine-tuning step overhead,
(4) XLA on/off and precision on the device present.

Timings on a shared machine are noisy: every ratio here is taken between runs made in the same invocation, and
(a), (b) and startup are repeated (`--repeats`, medians reported). Prints a table and writes JSON (`--out`).

Usage:
    python benchmarks/speed.py                         # issue 13's figures, about 15 minutes on 2 CPU cores
    python benchmarks/speed.py --parts d               # the GPU figure alone
    python benchmarks/speed.py --parts 1,2,3,4 --backbone ~/.cache/imagenet-backbone/efficientnet_lite0_backbone.keras
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def write_jpegs(root: str, n: int, classes: int = 3, size=(500, 375), seed: int = 0) -> str:
    """Real JPEG photos-like files: smooth colour fields plus noise, one class colour each."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    for i in range(n):
        c = i % classes
        d = os.path.join(root, f"class{c}")
        os.makedirs(d, exist_ok=True)
        base = np.stack([np.sin(xx / (20 + 7 * k) + rng.uniform(0, 6)) * 60 + 120 for k in range(3)], -1)
        base[..., c] += 60
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(d, f"{i:04d}.jpg"), quality=90)
    return root


def small_backbone(path: str) -> str:
    import keras
    from keras import layers

    inp = keras.Input((None, None, 3))
    x = layers.Rescaling(1 / 127.5, offset=-1)(inp)
    for i, ch in enumerate((16, 32, 64, 128)):
        x = layers.Conv2D(ch, 3, strides=2, padding="same", use_bias=False, name=f"s{i}_conv")(x)
        x = layers.BatchNormalization(name=f"s{i}_bn")(x)
        x = layers.ReLU(name=f"s{i}_relu")(x)
    keras.Model(inp, x, name="small").save(path)
    return path


def images_per_second(ds, epochs: int = 1, warmup_epochs: int = 1) -> float:
    for _ in range(warmup_epochs):
        for _ in ds:
            pass
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for x, _ in ds:
            n += int(x.shape[0])
    return n / (time.perf_counter() - t0)


def bench_pipeline(root: str, size: int, batch: int) -> dict:
    import keras
    import tensorflow as tf

    from tlkit.core.config import DataConfig
    from tlkit.data import load_sources, make_dataset

    data = load_sources(DataConfig(image_dir=root, val_split=0.0), size)
    out = {}
    for cache in ("memory", "none"):
        ds = make_dataset(data.train, size, batch, data.num_classes, training=True, augment="standard", cache=cache)
        out[f"tlkit_cache_{cache}"] = images_per_second(ds)
    base = keras.utils.image_dataset_from_directory(root, image_size=(size, size), batch_size=batch, seed=0,
                                                    label_mode="categorical", verbose=False)
    aug = keras.Sequential([keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.05),
                            keras.layers.RandomZoom(0.1), keras.layers.RandomContrast(0.2, value_range=(0, 255))])
    step = tf.function(lambda x: aug(x, training=True))  # what the layers cost inside a compiled model
    base = base.prefetch(tf.data.AUTOTUNE)

    class Wrapped:
        def __iter__(self):
            for x, y in base:
                yield step(x), y

    out["baseline"] = images_per_second(Wrapped())
    return out


def bench_feature_cache(root: str, backbone: str, size: int, batch: int, epochs: int) -> dict:
    import tlkit
    from tlkit.core.config import DataConfig, FinetuneConfig, ModelConfig, RuntimeConfig, TrainConfig

    out = {}
    for cache in (False, True):
        cfg = FinetuneConfig(
            data=DataConfig(image_dir=root, image_size=size, batch_size=batch, augment="none", val_split=0.1),
            model=ModelConfig(base=backbone, weights="imagenet"),
            train=TrainConfig(strategy="feature_extraction", epochs=epochs),
            runtime=RuntimeConfig(precision="float32", xla="off", cache_features=cache),
            output_dir=tempfile.mkdtemp(prefix="tlkit-bench-fc-"), overwrite=True)
        t0 = time.perf_counter()
        r = tlkit.finetune(cfg)
        out["cached" if cache else "uncached"] = {"seconds": r.metrics.get("train_seconds", time.perf_counter() - t0),
                                                  "val_accuracy": r.metrics["val"]["accuracy"]}
    return out


class _EpochTimer:
    def __init__(self):
        import keras

        class T(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.times = []

            def on_epoch_begin(self, epoch, logs=None):
                self.t0 = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                self.times.append(time.perf_counter() - self.t0)

        self.cb = T()


def bench_overhead(root: str, backbone: str, size: int, batch: int, epochs: int) -> dict:
    import keras
    import tensorflow as tf

    import tlkit
    from tlkit.models.backbones import get_backbone
    from tlkit.core.config import DataConfig, FinetuneConfig, ModelConfig, RuntimeConfig, TrainConfig
    from tlkit.data import load_sources, make_dataset
    from tlkit.models.classifier import build_classifier

    data_cfg = DataConfig(image_dir=root, image_size=size, batch_size=batch, augment="none", val_split=0.0)
    cfg = FinetuneConfig(data=data_cfg, model=ModelConfig(base=backbone, weights="imagenet", dropout=0.2),
                         train=TrainConfig(strategy="full", epochs=epochs, schedule="constant", label_smoothing=0.0),
                         runtime=RuntimeConfig(precision="float32", xla="off", cache_features=False),
                         output_dir=tempfile.mkdtemp(prefix="tlkit-bench-oh-"), overwrite=True)
    r = tlkit.finetune(cfg)
    n = r.metrics.get("train_images") or None
    data = load_sources(data_cfg, size)
    n = data.train.count
    tl_secs = [row["seconds"] for row in r.history][1:]  # the first epoch traces and fills the cache
    # The plain Keras way: same model, images decoded once into memory, model.fit.
    x = np.concatenate([b.numpy() for b, _ in make_dataset(data.train, size, batch, data.num_classes)])
    y = np.concatenate([l.numpy() for _, l in make_dataset(data.train, size, batch, data.num_classes)])
    spec = get_backbone(backbone)
    keras.utils.set_random_seed(0)
    model = build_classifier(spec, data.num_classes, ModelConfig(base=backbone, weights="imagenet", dropout=0.2), size,
                             base=spec.build(size, "imagenet"))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy", metrics=["accuracy"],
                  jit_compile=False)
    timer = _EpochTimer()
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=0).batch(batch).prefetch(tf.data.AUTOTUNE)
    model.fit(ds, epochs=epochs, verbose=0, callbacks=[timer.cb])
    base_secs = timer.cb.times[1:]
    return {"tlkit_images_per_s": n / float(np.median(tl_secs)), "baseline_images_per_s": n / float(np.median(base_secs)),
            "images": n}


def bench_xla_precision(backbone: str, size: int, batch: int, steps: int, epochs: int) -> dict:
    import keras
    import tensorflow as tf

    from tlkit.core import runtime
    from tlkit.models.backbones import get_backbone
    from tlkit.core.config import ModelConfig, RuntimeConfig
    from tlkit.models.classifier import build_classifier

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (batch * steps, size, size, 3)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 3, batch * steps), 3)
    out = {}
    gpu = bool(tf.config.list_physical_devices("GPU"))
    for precision in ("float32", "mixed_float16" if gpu else "mixed_bfloat16"):
        for xla in ("off", "on"):
            rt = runtime.setup(RuntimeConfig(precision=precision, xla=xla, distribute="none"))
            spec = get_backbone(backbone)
            with rt.scope():
                model = build_classifier(spec, 3, ModelConfig(base=backbone, weights="imagenet"), size,
                                         base=spec.build(size, "imagenet"))
                model.compile(optimizer="adam", loss="categorical_crossentropy", jit_compile=rt.jit_compile)
            if gpu:
                tf.config.experimental.reset_memory_stats("GPU:0")
            ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch).prefetch(2)
            timer = _EpochTimer()
            model.fit(ds, epochs=epochs, verbose=0, callbacks=[timer.cb])
            peak = (tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20 if gpu
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            out[f"{precision}/xla_{xla}"] = {"images_per_s": batch * steps / float(np.median(timer.cb.times[1:])),
                                             "peak_mib": round(peak, 1), "jit_compile": bool(model.jit_compile)}
    keras.mixed_precision.set_dtype_policy("float32")
    return out


# ---------------------------------------------------------------- issue 13

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PHOTO_GROUPS = (("china", "coffee", "chelsea", "astronaut"),
                ("flower", "rocket", "grace_hopper", "immunohistochemistry"),
                ("brick", "grass", "gravel", "retina"))


def _photos() -> dict:
    import matplotlib.cbook
    import skimage.data as sk
    from PIL import Image
    from sklearn.datasets import load_sample_image

    out = {}
    for group in PHOTO_GROUPS:
        for name in group:
            if name in ("china", "flower"):
                out[name] = Image.fromarray(load_sample_image(name + ".jpg")).convert("RGB")
            elif name == "grace_hopper":
                with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
                    out[name] = Image.open(f).convert("RGB")
            else:
                out[name] = Image.fromarray(getattr(sk, name)()).convert("RGB")
    return out


def write_photo_jpegs(root: str, n: int, size=(500, 375), seed: int = 0, quality: int = 90) -> str:
    """`n` real-photo JPEGs (random crops, flipped half the time, of the photos that scikit-image, scikit-learn and
    matplotlib ship), 3 classes of 4 photos each, at `size` (500x375, the Oxford pets/flowers kind)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = _photos()
    for i in range(n):
        c = i % len(PHOTO_GROUPS)
        img = photos[PHOTO_GROUPS[c][rng.integers(len(PHOTO_GROUPS[c]))]]
        w, h = img.size
        cw = int(min(w, h * 4 / 3) * rng.uniform(0.35, 1.0))
        ch = int(cw * 3 / 4)
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = img.crop((x0, y0, x0 + cw, y0 + ch)).resize(size, Image.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        d = os.path.join(root, f"class{c}")
        os.makedirs(d, exist_ok=True)
        crop.save(os.path.join(d, f"{i:05d}.jpg"), quality=quality)
    return root


def _timed(cmd: list[str], env: dict | None = None) -> float:
    import subprocess

    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}")
    return seconds


def _dir_bytes(path: str) -> int:
    seen, total = set(), 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            st = os.stat(os.path.join(dirpath, n))
            if st.st_ino not in seen:  # a hard link (best = the epoch's file) counts once, as on disk
                seen.add(st.st_ino)
                total += st.st_size
    return total


def tlkit_frozen_cmd(photos: str, out_dir: str, size: int, epochs: int, batch: int) -> list[str]:
    return [sys.executable, "-m", "tlkit", "finetune", "--base", "resnet50", "--weights", "none", "--image-dir", photos,
            "--image-size", str(size), "--strategy", "feature_extraction", "--augment", "none", "--batch-size",
            str(batch), "--epochs", str(epochs), "--output-dir", out_dir, "--overwrite"]


def bench_a_processes(photos: str, work: str, size: int, epochs: int, batch: int, repeats: int) -> dict:
    """(a): whole processes, alternating tlkit / plain Keras, `repeats` pairs."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run_dir = os.path.join(work, "a-run")
    plain = [sys.executable, os.path.join(HERE, "plain_keras_frozen.py"), photos, "--size", str(size), "--epochs",
             str(epochs), "--batch-size", str(batch)]
    tl, pk = [], []
    for i in range(repeats):
        order = [("tlkit", tlkit_frozen_cmd(photos, run_dir, size, epochs, batch)), ("plain", plain)]
        for name, cmd in (order if i % 2 == 0 else order[::-1]):
            (tl if name == "tlkit" else pk).append(_timed(cmd, env))
            print(f"[bench] (a) {name} process: {(tl if name == 'tlkit' else pk)[-1]:.1f} s", flush=True)
    return {"tlkit_s": tl, "plain_s": pk, "ratio": float(np.median(pk) / np.median(tl)),
            "pair_ratios": [p / t for p, t in zip(pk, tl)],
            "checkpoint_bytes": _dir_bytes(os.path.join(run_dir, "checkpoints")),
            "model_bytes": os.path.getsize(os.path.join(run_dir, "model.keras")),
            "command": " ".join(["tlkit"] + tlkit_frozen_cmd(photos, "RUN", size, epochs, batch)[3:])}


def bench_b_in_process(photos: str, work: str, size: int, epochs: int, batch: int, repeats: int) -> dict:
    """(b): one process; plain Keras `fit` of the frozen classifier against tlkit's frozen stage."""
    import importlib

    import keras

    import tlkit
    from tlkit.core.config import DataConfig, FinetuneConfig, ModelConfig, RuntimeConfig, TrainConfig

    sys.path.insert(0, HERE)
    plain = importlib.import_module("plain_keras_frozen")
    tl, pk, whole = [], [], []
    for i in range(repeats):
        for name in (("tlkit", "plain") if i % 2 == 0 else ("plain", "tlkit")):
            keras.backend.clear_session()
            if name == "plain":
                pk.append(plain.run(photos, size, epochs, batch, None, verbose=0))
            else:
                cfg = FinetuneConfig(
                    data=DataConfig(image_dir=photos, image_size=size, batch_size=batch, augment="none"),
                    model=ModelConfig(base="resnet50", weights="none"),
                    train=TrainConfig(strategy="feature_extraction", epochs=epochs),
                    output_dir=os.path.join(work, "b-run"), overwrite=True)
                t0 = time.perf_counter()
                r = tlkit.finetune(cfg)
                whole.append(time.perf_counter() - t0)
                tl.append(float(r.metrics["train_seconds"]))
            print(f"[bench] (b) {name}: {(tl if name == 'tlkit' else pk)[-1]:.1f} s", flush=True)
    return {"tlkit_stage_s": tl, "tlkit_finetune_call_s": whole, "plain_fit_s": pk,
            "ratio": float(np.median(pk) / np.median(tl)), "pair_ratios": [p / t for p, t in zip(pk, tl)]}


def bench_c_prune(photos: str, work: str, size: int = 32, batch: int = 16, epochs: int = 1) -> dict:
    """(c): `tlkit prune`'s fine-tuning step (its `_finetune`: masks in the optimizer, the sparsity schedule
    callback with its mask updates, tlkit's epoch log and NaN guard) against a plain `fit` step of the same
    ResNet50, same data, same optimizer and trainable weights: one epoch each (the issue's case; with one epoch
    the polynomial schedule updates the masks every other step over the first 70%), tracing included in both."""
    import keras

    from tlkit.core import runtime
    from tlkit.models import schedules
    from tlkit.models.backbones import get_backbone
    from tlkit.core.config import DataConfig, FinetuneConfig, ModelConfig, RuntimeConfig
    from tlkit.core.verb_configs import PruneConfig
    from tlkit.data import load_sources, make_dataset
    from tlkit.models.classifier import build_classifier
    import tlkit.verbs.prune  # noqa: F401
    P = sys.modules["tlkit.verbs.prune"]

    data = load_sources(DataConfig(image_dir=photos, val_split=0.0), size)
    steps = int(np.ceil(data.train.count / batch))
    train_ds = make_dataset(data.train, size, batch, data.num_classes, cache="memory")
    run_cfg = FinetuneConfig(data=DataConfig(image_dir=photos, image_size=size, batch_size=batch, augment="none"),
                             runtime=RuntimeConfig(precision="float32", xla="off"))
    rt = runtime.setup(run_cfg.runtime)
    spec = get_backbone("resnet50")

    def fresh():
        keras.utils.set_random_seed(0)
        return build_classifier(spec, data.num_classes, ModelConfig(base="resnet50", weights="none"), size,
                                base=spec.build(size, "none"))

    lr = 1e-4
    timer = _EpochTimer()
    model = fresh()
    P._unfreeze(model, False)
    train_cfg = dataclasses.replace(run_cfg.train, lr=lr, lr_mult=1.0, stage_lrs=None)  # as prune's _finetune
    opt = schedules.make_optimizer(train_cfg, schedules.make_schedule(train_cfg, lr, epochs, steps))
    model.compile(optimizer=opt, loss=keras.losses.CategoricalCrossentropy(label_smoothing=train_cfg.label_smoothing),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")], jit_compile=rt.jit_compile)
    model.fit(train_ds, epochs=epochs, verbose=0, callbacks=[timer.cb])
    plain = timer.cb.times
    print(f"[bench] (c) plain fit epochs: {[round(t, 1) for t in plain]}", flush=True)
    model = fresh()
    out_dir = os.path.join(work, "c-prune")
    os.makedirs(out_dir, exist_ok=True)
    cfg = PruneConfig(run_dir=work, sparsity=0.5, schedule="polynomial", epochs=epochs)
    pruner = P.Pruner(P.prunable_kernels(model, False))
    rows = P._finetune(model, pruner, cfg, run_cfg, rt, lr, train_ds, None, out_dir, steps)
    pruned = [float(r["seconds"]) for r in rows]
    print(f"[bench] (c) prune epochs: {[round(t, 1) for t in pruned]}", flush=True)
    plain_step, prune_step = float(np.median(plain[1:] or plain)) / steps, float(np.median(pruned[1:] or pruned)) / steps
    return {"plain_epoch_s": plain, "prune_epoch_s": pruned, "steps_per_epoch": steps, "plain_step_s": plain_step,
            "prune_step_s": prune_step, "ratio": prune_step / plain_step,
            "sparsity": pruner.report()["sparsity"], "images": data.train.count, "size": size, "batch": batch}


def bench_d_gpu(batch: int = 128, size: int = 224, steps: int = 30, epochs: int = 3) -> dict:
    """(d): ResNet50 training images/s at 224 px, mixed_float16 + XLA, on the GPU; skipped without one."""
    import keras
    import tensorflow as tf

    from tlkit.core import runtime
    from tlkit.models.backbones import get_backbone
    from tlkit.core.config import ModelConfig, RuntimeConfig
    from tlkit.models.classifier import build_classifier

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return {"skipped": "no GPU"}
    rt = runtime.setup(RuntimeConfig(precision="mixed_float16", xla="on", distribute="none"))
    spec = get_backbone("resnet50")
    with rt.scope():
        model = build_classifier(spec, 1000, ModelConfig(base="resnet50", weights="none"), size,
                                 base=spec.build(size, "none"))
        model.trainable = True
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="categorical_crossentropy",
                      jit_compile=True)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.uniform(0, 255, (batch, size, size, 3)).astype("float32"))
    y = tf.one_hot(rng.integers(0, 1000, batch), 1000)
    ds = tf.data.Dataset.from_tensors((x, y)).repeat(steps).prefetch(tf.data.AUTOTUNE)
    timer = _EpochTimer()
    model.fit(ds, epochs=epochs, verbose=0, callbacks=[timer.cb])
    secs = float(np.median(timer.cb.times[1:]))
    keras.mixed_precision.set_dtype_policy("float32")
    return {"images_per_s": batch * steps / secs, "batch": batch, "size": size, "epoch_s": timer.cb.times,
            "gpu": tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU"),
            "jit_compile": bool(model.jit_compile), "reference_a100_images_per_s": 2375}


def bench_scan(photos: str, repeats: int) -> dict:
    """The image-folder check against reading the headers only (PIL `Image.open(...).size`), same thread count."""
    import concurrent.futures

    from PIL import Image

    from tlkit.data import sources

    files, _, _ = sources.scan_folder(photos)
    workers = max(1, min(8, os.cpu_count() or 1))

    def header(path):
        with Image.open(path) as im:
            return im.size

    scan, heads = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ok, bad = sources.check_images(files)
        scan.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(header, files, chunksize=16))
        heads.append(time.perf_counter() - t0)
    return {"files": len(files), "check_s": scan, "headers_s": heads, "ratio": float(np.median(scan) / np.median(heads)),
            "unusable": len(bad)}


def bench_startup(repeats: int) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    helps, imports = [], []
    for _ in range(repeats):
        helps.append(_timed([sys.executable, "-m", "tlkit", "--help"], env))
        imports.append(_timed([sys.executable, "-c", "import tensorflow, keras"], env))
    return {"help_s": helps, "import_tf_keras_s": imports}


def issue13_table(r: dict, args) -> list[tuple]:
    rows = []
    if "a" in r:
        a = r["a"]
        rows.append((f"(a) frozen stage end to end, whole processes (ResNet50 {args.size} px, {args.images} photos, "
                     f"{args.epochs} epochs), s", f"{np.median(a['tlkit_s']):.1f}", f"{np.median(a['plain_s']):.1f}",
                     f"**{a['ratio']:.2f}x**", ">= 3x"))
        rows.append(("(a) the run's `checkpoints/`, MB (`model.keras`: "
                     f"{a['model_bytes'] / 1e6:.0f} MB)", f"{a['checkpoint_bytes'] / 1e6:.1f}", "", "", ""))
    if "b" in r:
        b = r["b"]
        rows.append((f"(b) the same frozen stage in one process (tlkit: `train_seconds`; plain: `fit`), s",
                     f"{np.median(b['tlkit_stage_s']):.1f}", f"{np.median(b['plain_fit_s']):.1f}",
                     f"**{b['ratio']:.2f}x**", ">= 8x"))
    if "c" in r:
        c = r["c"]
        rows.append((f"(c) `tlkit prune` step vs a plain `fit` step (ResNet50 {c['size']} px, batch {c['batch']}), s",
                     f"{c['prune_step_s']:.3f}", f"{c['plain_step_s']:.3f}", f"**{c['ratio']:.2f}x**", "<= 1.5x"))
    if "d" in r:
        d = r["d"]
        if "skipped" in d:
            rows.append(("(d) GPU ResNet50 224 px, batch 128, mixed_float16 + XLA, img/s", "not measured (no GPU)",
                         "2,375 (A100, NVIDIA)", "", ""))
        else:
            rows.append((f"(d) {d['gpu']} ResNet50 224 px, batch {d['batch']}, mixed_float16 + XLA, img/s",
                         f"{d['images_per_s']:.0f}", "2,375 (A100, NVIDIA)", f"{d['images_per_s'] / 2375:.2f}x", ""))
    if "scan" in r:
        s = r["scan"]
        rows.append((f"scan: checking {s['files']} photo JPEGs vs reading their headers, s",
                     f"{np.median(s['check_s']):.2f}", f"{np.median(s['headers_s']):.2f}", f"{s['ratio']:.2f}x",
                     "about 1x"))
    if "startup" in r:
        st = r["startup"]
        rows.append(("startup: `tlkit --help` vs `import tensorflow, keras`, s", f"{np.median(st['help_s']):.2f}",
                     f"{np.median(st['import_tf_keras_s']):.2f}", "", ""))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="a,b,c,d,scan,startup", help="figures to (re)measure, from a,b,c,d,scan,startup "
                   "(issue 13) and 1,2,3,4 (issue 4); the others are kept from --out. Defaults to a,b,c,d,scan,startup.")
    p.add_argument("--repeats", type=int, default=3, help="repeats of (a), (b), scan and startup. Defaults to 3.")
    p.add_argument("--images", type=int, default=240, help="photos of (a) and (b). Defaults to 240.")
    p.add_argument("--size", type=int, default=96, help="image size of (a) and (b). Defaults to 96.")
    p.add_argument("--epochs", type=int, default=10, help="epochs of (a), (b) and issue 4's (2). Defaults to 10.")
    p.add_argument("--prune-images", type=int, default=640, help="photos of (c). Defaults to 640.")
    p.add_argument("--scan-images", type=int, default=3000, help="photos of the scan figure. Defaults to 3000.")
    p.add_argument("--backbone", help="issue 4 (2): a .keras backbone (raw 0-255 RGB in); default: a small conv net")
    p.add_argument("--train-backbone", help="issue 4 (3), (4): a .keras backbone; default: a small conv net")
    p.add_argument("--train-size", type=int, default=96, help="issue 4: image size of (3) and (4). Defaults to 96.")
    p.add_argument("--train-epochs", type=int, default=4, help="issue 4: epochs of (3), (4). Defaults to 4.")
    p.add_argument("--jpegs", type=int, default=300, help="issue 4: JPEG files for (1). Defaults to 300.")
    p.add_argument("--fc-images", type=int, default=150, help="issue 4: images for (2), (3). Defaults to 150.")
    p.add_argument("--fc-size", type=int, default=160, help="issue 4: image size for (2). Defaults to 160.")
    p.add_argument("--batch", type=int, default=32, help="batch size. Defaults to 32.")
    p.add_argument("--out", default="benchmarks/results/speed.json", help="JSON output.")
    args = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="tlkit-bench-")
    parts = [v.strip() for v in args.parts.split(",") if v.strip()]
    sys.path.insert(0, ROOT)
    from tlkit.core.quiet import import_tensorflow

    tf = import_tensorflow()

    device = "gpu" if tf.config.list_physical_devices("GPU") else "cpu"
    results: dict = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)
    results.update({"device": device, "cpus": os.cpu_count(), "platform": platform.platform(),
                    "tensorflow": tf.__version__, "command": "python benchmarks/speed.py " + " ".join(argv or sys.argv[1:])})
    new = results.setdefault("issue13", {})
    photos = write_photo_jpegs(os.path.join(work, "photos"), args.images) if {"a", "b"} & set(parts) else None
    for part in parts:
        t = time.perf_counter()
        if part == "a":
            new["a"] = bench_a_processes(photos, work, args.size, args.epochs, args.batch, args.repeats)
        elif part == "b":
            new["b"] = bench_b_in_process(photos, work, args.size, args.epochs, args.batch, args.repeats)
        elif part == "c":
            new["c"] = bench_c_prune(write_photo_jpegs(os.path.join(work, "prune"), args.prune_images, seed=2), work)
        elif part == "d":
            new["d"] = bench_d_gpu()
        elif part == "scan":
            new["scan"] = bench_scan(write_photo_jpegs(os.path.join(work, "scan"), args.scan_images, seed=3),
                                     args.repeats)
        elif part == "startup":
            new["startup"] = bench_startup(args.repeats)
        elif part in ("1", "2", "3", "4"):
            legacy(int(part), args, work, results)
        else:
            raise SystemExit(f"unknown part {part!r}")
        print(f"[bench] ({part}) done in {time.perf_counter() - t:.0f}s", flush=True)
    rows = issue13_table(new, args)
    results["issue13_table"] = [dict(zip(("figure", "tlkit", "baseline", "ratio", "target"), r)) for r in rows]
    print(f"\n{device} x{os.cpu_count()} cores, TensorFlow {tf.__version__}")
    print("| figure | tlkit | plain Keras | ratio | target |\n|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"[bench] wrote {args.out}")
    return 0


def legacy(part: int, args, work: str, results: dict) -> None:
    """Issue 4's figures (1)-(4)."""
    small = small_backbone(os.path.join(work, "small.keras"))
    backbone = os.path.abspath(os.path.expanduser(args.backbone)) if args.backbone else small
    train_backbone = os.path.abspath(os.path.expanduser(args.train_backbone)) if args.train_backbone else small
    results.update({"backbone": os.path.basename(backbone), "train_backbone": os.path.basename(train_backbone)})
    small_root = os.path.join(work, "fc")
    if part in (2, 3) and not os.path.isdir(small_root):
        write_jpegs(small_root, args.fc_images, seed=1)
    if part == 1:
        results["pipeline"] = bench_pipeline(write_jpegs(os.path.join(work, "jpegs"), args.jpegs), 224, args.batch)
    elif part == 2:
        results["feature_cache"] = bench_feature_cache(small_root, backbone, args.fc_size, args.batch, args.epochs)
        results["feature_cache"]["images"] = args.fc_images
    elif part == 3:
        results["overhead"] = bench_overhead(small_root, train_backbone, args.train_size, args.batch, args.train_epochs)
    elif part == 4:
        results["xla_precision"] = bench_xla_precision(train_backbone, args.train_size, args.batch, 4, args.train_epochs)


if __name__ == "__main__":
    sys.exit(main())
