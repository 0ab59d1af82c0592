"""Scale (issue 23): does a default run's memory stay bounded on a folder of 100,000 images, and at what speed?

Builds a folder of real-photo JPEGs (random 256x256 crops, flipped half the time, of 9 photos that scikit-image,
scikit-learn and matplotlib ship: one class a photo), with subsets of it as hard links, and measures, each in its
own process (peak resident memory from `os.wait4`, which reports the child's own `ru_maxrss`):

- `tlkit`: `python -m tlkit finetune --base TINY.keras --image-dir DIR --image-size 224 --strategy full --epochs 1`,
  every other flag at its default (`--cache auto`), on each folder size: peak memory, the cache it chose, training
  images a second (the epoch's seconds in history.csv), wall seconds;
- `plain`: the same model (the tiny backbone, global average pooling, Dense) fitted one epoch the plain Keras way,
  `image_dataset_from_directory` + `fit`, batch 32, on the same folders: peak memory and images a second;
- `scan`: tlkit's folder scan (`load_sources`: list, check every file's header, split), seconds per 10,000 files.

The baseline of "bounded" is the same command on the smallest folder: the growth from it to the largest is what the
folder's size costs. A benchmark, not a test: on a 2-core CPU the 100,000-image epoch takes tens of minutes.

Usage:
    python benchmarks/scale.py                                  # 1,000 / 27,000 / 100,000 images
    python benchmarks/scale.py --sizes 1000,5000 --out /tmp/scale.json   # a quick look
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CACHE = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
PHOTOS = ("china", "coffee", "chelsea", "astronaut", "flower", "rocket", "grace_hopper", "brick", "gravel")


def _photo(name: str):
    from PIL import Image

    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image(name + ".jpg")).convert("RGB")
    if name == "grace_hopper":
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            return Image.open(f).convert("RGB")
    import skimage.data as sk

    return Image.fromarray(getattr(sk, name)()).convert("RGB")


def _write_class(args) -> int:
    from PIL import Image

    root, c, indices, side = args
    img = _photo(PHOTOS[c])
    w, h = img.size
    d = os.path.join(root, f"{c}_{PHOTOS[c]}")
    os.makedirs(d, exist_ok=True)
    for i in indices:
        path = os.path.join(d, f"{i:06d}.jpg")
        if os.path.exists(path):
            continue
        rng = np.random.default_rng(i)
        s = int(min(w, h) * rng.uniform(0.3, 1.0))
        x0, y0 = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
        crop = img.crop((x0, y0, x0 + s, y0 + s)).resize((side, side), Image.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        crop.save(path, quality=90)
    return len(indices)


def build_folder(root: str, n: int, side: int = 256) -> str:
    """`n` JPEGs in 9 class folders under `root` (made once; files already there are kept)."""
    from multiprocessing import Pool

    jobs = [(root, c, list(range(c, n, len(PHOTOS))), side) for c in range(len(PHOTOS))]
    t0 = time.time()
    with Pool(os.cpu_count() or 1) as pool:
        done = 0
        for k in pool.imap_unordered(_write_class, jobs):
            done += k
            print(f"  folder {root}: {done}/{n} images ({time.time() - t0:.0f} s)", flush=True)
    return root


def subset(full: str, dest: str, n: int) -> str:
    """The first `n` images of `full` (round-robin over the classes), as hard links under `dest`."""
    classes = sorted(os.listdir(full))
    files = {c: sorted(os.listdir(os.path.join(full, c))) for c in classes}
    per = -(-n // len(classes))
    for c in classes:
        os.makedirs(os.path.join(dest, c), exist_ok=True)
        for f in files[c][:per]:
            target = os.path.join(dest, c, f)
            if not os.path.exists(target):
                os.link(os.path.join(full, c, f), target)
    return dest


def _run(cmd: list[str], log_path: str) -> dict:
    """Runs `cmd` (output to `log_path`); returns its wall seconds and its own peak resident memory (MB)."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT))
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        with open(log_path) as f:
            raise RuntimeError(f"{' '.join(cmd)} failed ({code}):\n{f.read()[-3000:]}")
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def bench_tlkit(folder: str, backbone: str, work: str, size: int) -> dict:
    out = os.path.join(work, "run-" + os.path.basename(folder))
    log = out + ".log"
    r = _run([sys.executable, "-m", "tlkit", "finetune", "--base", backbone, "--image-dir", folder,
              "--image-size", str(size), "--strategy", "full", "--epochs", "1", "--output-dir", out, "--overwrite"],
             log)
    with open(log) as f:
        text = f.read()
    r["cache"] = next((line.split("] ", 1)[1].strip() for line in text.splitlines() if "[tlkit] cache" in line), "?")
    found = re.search(r": (\d+) train / ", text)  # "[tlkit] BASE on DATA: N train / M val / ..."
    train = int(found.group(1)) if found else None
    with open(os.path.join(out, "history.csv")) as f:
        rows = list(csv.DictReader(f))
    r["epoch_seconds"] = float(rows[-1]["seconds"])
    r["train_images"] = train
    r["images_per_second"] = round(train / r["epoch_seconds"], 1) if train else None
    return r


PLAIN = r"""
import sys, time, keras
folder, backbone, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
train = keras.utils.image_dataset_from_directory(folder, validation_split=0.1, subset="training", seed=42,
                                                 image_size=(size, size), batch_size=32, label_mode="categorical")
n = sum(1 for _ in train.file_paths)
base = keras.models.load_model(backbone)
x = keras.layers.GlobalAveragePooling2D()(base.output)
model = keras.Model(base.input, keras.layers.Dense(len(train.class_names), activation="softmax")(x))
model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy", metrics=["accuracy"])
t0 = time.perf_counter()
model.fit(train.prefetch(-1), epochs=1, verbose=2)
print(f"PLAIN {n} {time.perf_counter() - t0:.3f}")
"""


def bench_plain(folder: str, backbone: str, work: str, size: int) -> dict:
    log = os.path.join(work, "plain-" + os.path.basename(folder) + ".log")
    r = _run([sys.executable, "-c", PLAIN, folder, backbone, str(size)], log)
    with open(log) as f:
        line = next(line for line in f if line.startswith("PLAIN "))
    n, seconds = int(line.split()[1]), float(line.split()[2])
    r.update(train_images=n, epoch_seconds=round(seconds, 1), images_per_second=round(n / seconds, 1))
    return r


def bench_scan(folder: str, size: int) -> dict:
    from tlkit.core.config import DataConfig
    from tlkit.data import load_sources

    t0 = time.perf_counter()
    data = load_sources(DataConfig(image_dir=folder), size)
    seconds = time.perf_counter() - t0
    n = data.train.count + (data.val.count if data.val else 0)
    return {"files": n, "seconds": round(seconds, 2), "seconds_per_10k": round(seconds * 10_000 / max(n, 1), 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,27000,100000",
                   help="Comma-separated folder sizes (images); the smallest is the baseline. Default: %(default)s.")
    p.add_argument("--work", default=os.path.join(CACHE, "tlkit-scale"),
                   help="Where the folders and runs go (about 2 GB for 100,000 images). Default: %(default)s.")
    p.add_argument("--image-size", type=int, default=224, help="Training side in pixels. Default: %(default)s.")
    p.add_argument("--parts", default="tlkit,plain,scan", help="Comma-separated parts. Default: %(default)s.")
    p.add_argument("--plain-sizes", default=None,
                   help="Folder sizes for the plain Keras epoch. Default: all but the largest (same ratio, less time).")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "scale.json"),
                   help="JSON output. Default: %(default)s.")
    a = p.parse_args(argv)
    sizes = sorted(int(s) for s in a.sizes.split(","))
    plain_sizes = [int(s) for s in a.plain_sizes.split(",")] if a.plain_sizes else sizes[:-1] or sizes
    parts = set(a.parts.split(","))
    os.makedirs(a.work, exist_ok=True)
    from tlkit.testing import make_tiny_backbone

    backbone = os.path.join(a.work, f"tiny{a.image_size}.keras")
    if not os.path.exists(backbone):
        make_tiny_backbone(backbone, size=a.image_size)
    full = build_folder(os.path.join(a.work, f"photos-{sizes[-1]}"), sizes[-1])
    folders = {n: full if n == sizes[-1] else subset(full, os.path.join(a.work, f"photos-{n}"), n) for n in sizes}
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "image_size": a.image_size,
                     "sizes": sizes, "tlkit": {}, "plain": {}, "scan": {}}
    for n in sizes:
        if "scan" in parts:
            results["scan"][n] = bench_scan(folders[n], a.image_size)
            print(f"scan {n}: {results['scan'][n]}", flush=True)
        if "tlkit" in parts:
            results["tlkit"][n] = bench_tlkit(folders[n], backbone, a.work, a.image_size)
            print(f"tlkit {n}: {results['tlkit'][n]}", flush=True)
        if "plain" in parts and n in plain_sizes:
            results["plain"][n] = bench_plain(folders[n], backbone, a.work, a.image_size)
            print(f"plain {n}: {results['plain'][n]}", flush=True)
    base = sizes[0]
    print(f"\n| images | tlkit peak MB | growth over {base} | cache | tlkit img/s | plain peak MB | plain img/s | "
          f"ratio | scan s/10k |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        t, pl, sc = results["tlkit"].get(n, {}), results["plain"].get(n, {}), results["scan"].get(n, {})
        growth = round(t.get("peak_rss_mb", 0) - results["tlkit"].get(base, {}).get("peak_rss_mb", 0), 1) if t else None
        ratio = (t["images_per_second"] / pl["images_per_second"]) if t.get("images_per_second") and pl else None
        cells = [n, t.get("peak_rss_mb"), growth, t.get("cache", "").split(":")[0], t.get("images_per_second"),
                 pl.get("peak_rss_mb"), pl.get("images_per_second"), f"{ratio:.2f}x" if ratio else None,
                 sc.get("seconds_per_10k")]
        print("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
