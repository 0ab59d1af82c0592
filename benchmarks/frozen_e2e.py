"""The frozen stage end to end, part by part (issue 23, P5): whole `tlkit finetune` processes against the keras.io
guide's script on the same photos, with the seconds of each part of the tlkit process.

The parts are read from the time each of tlkit's log lines arrives (every line is flushed as it is printed):

- start-up: from the process start to "computing base features of the train split" (imports, building the
  backbone, the folder scan, the pipelines);
- features: from there to the first "stage" line after them (the training and validation features, the head's
  statistics, the classifier);
- head: from there to "head trained on cached features" (the head's passes, its checkpoint);
- after training: from there to the process's exit (the best weights, validation/test figures, `model.keras`,
  `metrics.json`, the plots; `of_which_exit`: after the last line, the interpreter's exit).

`--code DIR` runs another checkout's tlkit (`PYTHONPATH=DIR`, from a neutral working directory), so a branch can be
measured against main in the same invocation, the runs alternating. Timings on a shared machine are noisy: medians
of `--repeats`.

Usage:
    python benchmarks/frozen_e2e.py --code before=/work/main --code after=. --repeats 3 \
        --out benchmarks/results/frozen_e2e.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from speed import write_photo_jpegs  # noqa: E402

MARKS = (("startup", "computing base features of the train split"), ("features", "] stage "),
         ("head", "head trained on cached features"))


def timed_lines(cmd: list[str], env: dict, cwd: str) -> tuple[float, list[tuple[float, str]]]:
    """Runs `cmd`; returns its seconds and `(seconds since start, line)` for each line of its output."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    lines = [(time.perf_counter() - t0, line.rstrip("\n")) for line in proc.stdout]
    rc = proc.wait()
    total = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}):\n" + "\n".join(t for _, t in lines[-40:]))
    return total, lines


def parts(total: float, lines: list[tuple[float, str]]) -> dict[str, float]:
    """The seconds of each part (`MARKS`, then `after_training`) from the arrival times of the log lines."""
    out, prev, i = {}, 0.0, 0
    for name, mark in MARKS:
        while i < len(lines) and mark not in lines[i][1]:
            i += 1
        if i == len(lines):
            raise RuntimeError(f"no line with {mark!r} in the output")
        out[name] = round(lines[i][0] - prev, 2)
        prev = lines[i][0]
    out["after_training"] = round(total - prev, 2)
    out["of_which_exit"] = round(total - lines[-1][0], 2) if lines else 0.0  # after the last line: interpreter exit
    out["total"] = round(total, 2)
    return out


def tlkit_cmd(base: str, weights: str, photos: str, out_dir: str, size: int, epochs: int, batch: int) -> list[str]:
    return [sys.executable, "-m", "tlkit", "finetune", "--base", base, "--weights", weights, "--image-dir", photos,
            "--image-size", str(size), "--strategy", "feature_extraction", "--augment", "none", "--batch-size",
            str(batch), "--epochs", str(epochs), "--output-dir", out_dir, "--overwrite"]


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(path) for n in names)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--code", action="append", required=True, help="NAME=DIR: a tlkit checkout to measure.")
    p.add_argument("--repeats", type=int, default=3, help="Runs of each. Defaults to 3.")
    p.add_argument("--images", type=int, default=240, help="Photos. Defaults to 240.")
    p.add_argument("--size", type=int, default=96, help="Image size. Defaults to 96.")
    p.add_argument("--epochs", type=int, default=10, help="Epochs. Defaults to 10.")
    p.add_argument("--batch", type=int, default=32, help="Batch size. Defaults to 32.")
    p.add_argument("--base", default="resnet50", help="Backbone. Defaults to resnet50 (random weights).")
    p.add_argument("--weights", default="none", help="Its weights. Defaults to none (no download).")
    p.add_argument("--no-plain", action="store_true", help="Skip the keras.io guide's script.")
    p.add_argument("--out", help="JSON output.")
    a = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="tlkit-e2e-")
    photos = write_photo_jpegs(os.path.join(work, "photos"), a.images)
    codes = dict(c.split("=", 1) for c in a.code)
    runs: dict[str, list] = {name: [] for name in codes}
    plain: list[float] = []
    base_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for r in range(a.repeats):
        for name, code in (list(codes.items()) if r % 2 == 0 else list(codes.items())[::-1]):
            env = dict(base_env, PYTHONPATH=os.path.abspath(code))
            out_dir = os.path.join(work, f"run-{name}")
            total, lines = timed_lines(tlkit_cmd(a.base, a.weights, photos, out_dir, a.size, a.epochs, a.batch),
                                       env, work)
            got = parts(total, lines)
            got["checkpoint_bytes"] = _dir_bytes(os.path.join(out_dir, "checkpoints"))
            with open(os.path.join(out_dir, "metrics.json")) as f:
                m = json.load(f)
            got["val_accuracy"] = m.get("val", {}).get("accuracy")
            runs[name].append(got)
            print(f"[e2e] {name}: {got}", flush=True)
        if not a.no_plain:
            cmd = [sys.executable, os.path.join(HERE, "plain_keras_frozen.py"), photos, "--size", str(a.size),
                   "--epochs", str(a.epochs), "--batch-size", str(a.batch)]
            plain.append(round(timed_lines(cmd, base_env, work)[0], 2))
            print(f"[e2e] plain keras: {plain[-1]} s", flush=True)
    summary = {name: {k: float(np.median([g[k] for g in got])) for k in got[0]} for name, got in runs.items()}
    if plain:
        for s in summary.values():
            s["ratio_vs_plain"] = round(float(np.median(plain)) / s["total"], 2)
    result = {"command": "python benchmarks/frozen_e2e.py " + " ".join(argv or sys.argv[1:]),
              "tlkit_command": " ".join(["tlkit"] + tlkit_cmd(a.base, a.weights, "PHOTOS", "RUN", a.size, a.epochs,
                                                              a.batch)[3:]),
              "cpus": os.cpu_count(), "platform": platform.platform(), "median": summary, "plain_s": plain,
              "runs": runs, "load_average_at_end": os.getloadavg()}
    print(json.dumps(summary, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
