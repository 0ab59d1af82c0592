"""Sizes and parity figures of every export format on a tiny test model (a table and a JSON file).

Trains the tests' tiny run (tiny .keras backbone, `shapes`, 32 px) unless `--run` names a run folder, then
exports it as keras, savedmodel, tflite (none, float16, dynamic, int8) and onnx (when the extra is
installed) and prints size on disk, top-1 agreement and the largest probability difference of each.

    python benchmarks/export_parity.py [--run RUN_DIR] [--out benchmarks/results/export_parity.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="An existing run folder (default: train the tests' tiny run).")
    ap.add_argument("--epochs", type=int, default=1, help="Epochs of the tiny run. Default: 1 (as in the tests).")
    ap.add_argument("--shapes-per-class", type=int, default=8, help="Training images per class. Default: 8.")
    ap.add_argument("--lr", type=float, default=1e-3, help="Learning rate of the tiny run. Default: 1e-3.")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "export_parity.json"), help="JSON output.")
    args = ap.parse_args()

    import tlkit
    from tlkit import cli
    from tlkit.core import rundir
    from tlkit.verbs.export import ParityError, human_size

    work = tempfile.mkdtemp(prefix="tlkit-export-parity-")
    run = args.run
    if run is None:
        from conftest import make_tiny_backbone

        tiny = make_tiny_backbone(os.path.join(work, "tiny.keras"))
        run = os.path.join(work, "run")
        rc = cli.main(["finetune", "--base", tiny, "--weights", "none", "--dataset", "shapes", "--image-size", "32",
                       "--epochs", str(args.epochs), "--head-steps", "0", "--shapes-per-class",
                       str(args.shapes_per_class), "--lr", str(args.lr), "--augment", "none", "--output-dir", run])
        if rc:
            return rc
    cases = [("keras", "none"), ("savedmodel", "none"), ("tflite", "none"), ("tflite", "float16"),
             ("tflite", "dynamic"), ("tflite", "int8")]
    if all(importlib.util.find_spec(m) for m in ("tf2onnx", "onnx", "onnxruntime")):
        cases.append(("onnx", "none"))
    rows = []
    for fmt, q in cases:
        t0 = time.time()
        out = os.path.join(work, "exports", fmt if q == "none" else f"{fmt}-{q}")
        try:
            r = tlkit.export(run, format=fmt, quantize=q, output=out, verbose=False)
            check, passed = r.check, True
            size = r.size_bytes
        except ParityError:
            import json
            check = json.load(open(os.path.join(out, "export.json")))["check"]
            size, passed = None, False
        row = {"format": fmt, "quantize": q, "size_bytes": size, "top1_agreement": check["top1_agreement"],
               "strict_top1_agreement": check["strict_top1_agreement"], "tie_tolerance": check.get("tie_tolerance"),
               "max_abs_diff": check["max_abs_diff"], "mean_abs_diff": check["mean_abs_diff"],
               "num_images": check["num_images"], "keras_accuracy": check.get("keras_accuracy"),
               "export_accuracy": check.get("export_accuracy"), "passed": passed, "seconds": round(time.time() - t0, 1)}
        if "bytes_signature" in check:
            row["bytes_top1_agreement"] = check["bytes_signature"]["top1_agreement"]
        rows.append(row)
    print(f"\n{'export':22s} {'size':>10s} {'agreement':>9s} {'strict':>7s} {'max |dp|':>9s} {'mean |dp|':>9s} {'passed':>6s} "
          f"{'acc':>6s} {'s':>5s}")
    for r in rows:
        name = r["format"] + ("" if r["quantize"] == "none" else f" {r['quantize']}")
        print(f"{name:22s} {human_size(r['size_bytes'] or 0):>10s} {r['top1_agreement']:9.2%} {r['strict_top1_agreement']:7.2%} "
              f"{r['max_abs_diff']:9.2e} {r['mean_abs_diff']:9.2e} {str(r['passed']):>6s} "
              f"{'-' if r['export_accuracy'] is None else format(r['export_accuracy'], '.0%'):>6s} {r['seconds']:5.1f}")
    rundir.write_json(args.out, {"run": run, "rows": rows})
    print(f"\nwritten {args.out}")
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
