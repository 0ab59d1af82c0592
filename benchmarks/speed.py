"""Speed benchmark of issue 4: tlkit against the plain Keras way, same data, same process, ratios tlkit / baseline.

1. input pipeline images/s on real JPEG files (500x375) at 224 px with the `standard` augmentation, against
   `keras.utils.image_dataset_from_directory` with the same Keras augmentation layers run as model layers;
2. time of 10 epochs of the frozen (feature-extraction) stage with and without the feature cache;
3. full fine-tuning train-step images/s, tlkit (`finetune`, strategy `full`) against a hand-written
   `model.fit` of the same model (tlkit's overhead);
4. XLA on/off and precision float32/mixed on the device present, with peak memory.

Targets: (1) >= 2x, (2) >= 5x, (3) overhead <= 5%. Prints a table and writes JSON (`--out`).

Usage:
    python benchmarks/speed.py --backbone ~/.cache/imagenet-backbone/efficientnet_lite0_backbone.keras

`--backbone` is any `.keras` backbone taking raw 0-255 RGB (e.g. the EfficientNet-Lite0 that
`../shared/tools/make-imagenet-backbone` writes); without it a small conv net is used.
"""
from __future__ import annotations

import argparse
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

    from tlkit.config import DataConfig
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
    from tlkit.config import DataConfig, FinetuneConfig, ModelConfig, RuntimeConfig, TrainConfig

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
    from tlkit.backbones import get_backbone
    from tlkit.config import DataConfig, FinetuneConfig, ModelConfig, RuntimeConfig, TrainConfig
    from tlkit.data import load_sources, make_dataset
    from tlkit.model import build_classifier

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

    from tlkit import runtime
    from tlkit.backbones import get_backbone
    from tlkit.config import ModelConfig, RuntimeConfig
    from tlkit.model import build_classifier

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", help="a .keras backbone (raw 0-255 RGB in) for (2); default: a small conv net")
    p.add_argument("--train-backbone", help="a .keras backbone for (3) and (4) (full training, slow on a CPU); "
                   "default: a small conv net")
    p.add_argument("--train-size", type=int, default=96, help="image size for (3) and (4). Defaults to 96.")
    p.add_argument("--train-epochs", type=int, default=4, help="epochs of (3) and (4), the first not timed. "
                   "Defaults to 4.")
    p.add_argument("--jpegs", type=int, default=300, help="JPEG files for (1). Defaults to 300.")
    p.add_argument("--fc-images", type=int, default=150, help="images for (2) and (3). Defaults to 150.")
    p.add_argument("--fc-size", type=int, default=160, help="image size for (2), (3), (4). Defaults to 160.")
    p.add_argument("--batch", type=int, default=32, help="batch size. Defaults to 32.")
    p.add_argument("--epochs", type=int, default=10, help="epochs of (2). Defaults to 10.")
    p.add_argument("--out", default="benchmarks/results/speed.json", help="JSON output.")
    p.add_argument("--parts", default="1,2,3,4", help="figures to (re)measure; the others are kept from --out. "
                   "Defaults to 1,2,3,4.")
    args = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="tlkit-bench-")
    small = small_backbone(os.path.join(work, "small.keras"))
    backbone = os.path.abspath(os.path.expanduser(args.backbone)) if args.backbone else small
    train_backbone = os.path.abspath(os.path.expanduser(args.train_backbone)) if args.train_backbone else small
    import tensorflow as tf

    device = "gpu" if tf.config.list_physical_devices("GPU") else "cpu"
    parts = {int(v) for v in args.parts.split(",") if v.strip()}
    results: dict = {}
    if parts != {1, 2, 3, 4} and os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)
    results.update({"device": device, "cpus": os.cpu_count(), "platform": platform.platform(),
                    "backbone": os.path.basename(backbone),
                    "train_backbone": os.path.basename(train_backbone), "tensorflow": tf.__version__})
    if 1 in parts:
        t = time.perf_counter()
        jpeg_root = write_jpegs(os.path.join(work, "jpegs"), args.jpegs)
        results["pipeline"] = bench_pipeline(jpeg_root, 224, args.batch)
        print(f"[bench] (1) done in {time.perf_counter() - t:.0f}s: {results['pipeline']}", flush=True)
    small_root = write_jpegs(os.path.join(work, "fc"), args.fc_images, seed=1) if parts & {2, 3} else None
    if 2 in parts:
        t = time.perf_counter()
        results["feature_cache"] = bench_feature_cache(small_root, backbone, args.fc_size, args.batch, args.epochs)
        results["feature_cache"]["images"] = args.fc_images
        print(f"[bench] (2) done in {time.perf_counter() - t:.0f}s: {results['feature_cache']}", flush=True)
    if 3 in parts:
        t = time.perf_counter()
        results["overhead"] = bench_overhead(small_root, train_backbone, args.train_size, args.batch, args.train_epochs)
        print(f"[bench] (3) done in {time.perf_counter() - t:.0f}s: {results['overhead']}", flush=True)
    if 4 in parts:
        t = time.perf_counter()
        results["xla_precision"] = bench_xla_precision(train_backbone, args.train_size, args.batch, 4, args.train_epochs)
        print(f"[bench] (4) done in {time.perf_counter() - t:.0f}s", flush=True)

    pl, fc, oh = results["pipeline"], results["feature_cache"], results["overhead"]
    rows = [
        ("(1) input pipeline, 224 px standard aug, img/s", f"{pl['tlkit_cache_memory']:.0f} (cache memory) / "
         f"{pl['tlkit_cache_none']:.0f} (cache none)", f"{pl['baseline']:.0f}",
         pl["tlkit_cache_memory"] / pl["baseline"], ">= 2x"),
        ("(1b) same, tlkit --cache none (decode_and_crop)", f"{pl['tlkit_cache_none']:.0f}", f"{pl['baseline']:.0f}",
         pl["tlkit_cache_none"] / pl["baseline"], ""),
        (f"(2) {args.epochs} epochs frozen stage, s", f"{fc['cached']['seconds']:.1f}",
         f"{fc['uncached']['seconds']:.1f}", fc["uncached"]["seconds"] / fc["cached"]["seconds"], ">= 5x"),
        ("(3) full fine-tuning train step, img/s", f"{oh['tlkit_images_per_s']:.1f}",
         f"{oh['baseline_images_per_s']:.1f}", oh["tlkit_images_per_s"] / oh["baseline_images_per_s"],
         "overhead <= 5%"),
    ]
    ref = results["xla_precision"].get("float32/xla_off", {}).get("images_per_s")
    for k, v in results["xla_precision"].items():
        rows.append((f"(4) train step {k}, img/s (peak MiB {v['peak_mib']})", f"{v['images_per_s']:.1f}",
                     f"{ref:.1f}", v["images_per_s"] / ref, "vs float32/xla_off"))
    results["table"] = [dict(zip(("figure", "tlkit", "baseline", "ratio", "target"), r)) for r in rows]
    print(f"\n{device} x{os.cpu_count()} cores, (2) backbone {results['backbone']}, (3)/(4) backbone "
          f"{results['train_backbone']}")
    print(f"| figure | tlkit | baseline | ratio | target |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f}x | {r[4]} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"[bench] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
