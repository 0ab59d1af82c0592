"""Where int8 loses agreement on a real fine-tuned model: calibration size, the preprocessing layer, the head.

Needs a run folder (e.g. EfficientNet-Lite0 with ImageNet weights from ../shared/tools/make-imagenet-backbone,
fine-tuned on textures-5 of ../shared/tools/make-transfer-tasks); never part of the tests. For each variant it
converts the run's model to full-integer TFLite and reports, on the 32 check images (the validation split first,
as `tlkit export` picks them) and on the whole test split: float top-1, int8 top-1, top-1 agreement, max |dp|.
The diagnostic variants keep some ops in float with TensorFlow's QuantizationDebugger (selective quantization) to
locate the error; they are not what `tlkit export` writes.

    python benchmarks/int8_parity.py RUN_DIR [--out benchmarks/results/int8_parity.json]
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="A run folder (model.keras, config.yaml).")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "int8_parity.json"), help="JSON output.")
    args = ap.parse_args()

    import numpy as np
    import keras
    import tensorflow as tf

    from tlkit.core import config_io
    from tlkit.data import load_sources
    from tlkit.models.classifier import load_model_and_labels
    from tlkit.verbs.export import split_images, tflite_bytes
    from tlkit.engine.predictors import TFLitePredictor, call_model, resize_batch

    model, _, _ = load_model_and_labels(args.run)
    cfg = config_io.load_config(os.path.join(args.run, "config.yaml"))
    size = int(model.input_shape[1])
    ds = load_sources(cfg.data, size, cfg.seed)
    split = {}
    for name in ("train", "val", "test"):
        imgs, ys = split_images(getattr(ds, name), 100000)
        split[name] = (resize_batch(imgs, size), np.asarray(ys))
    ref = {k: model.predict(x, verbose=0, batch_size=64) for k, (x, _) in split.items()}
    check = (split["val"][0][:32], split["val"][1][:32], ref["val"][:32])
    test = (split["test"][0], split["test"][1], ref["test"])
    calib_all = np.concatenate([split["train"][0], split["val"][0]])

    def rep(x):
        return lambda: ([x[i:i + 1]] for i in range(len(x)))

    def figures(flat):
        with tempfile.NamedTemporaryFile(suffix=".tflite") as f:
            f.write(flat)
            f.flush()
            pred = TFLitePredictor(f.name, None)
            out = {"runtime": pred.runtime}
            for name, (x, y, r) in (("check32", check), ("test", test)):
                p = pred.predict_resized(x.astype(np.float32)) if len(x) == 1 else np.concatenate(
                    [pred.predict_resized(x[i:i + 1]) for i in range(len(x))])
                out[name] = {"n": int(len(x)), "float_top1": float((r.argmax(-1) == y).mean()),
                             "int8_top1": float((p.argmax(-1) == y).mean()),
                             "agreement": float((p.argmax(-1) == r.argmax(-1)).mean()),
                             "max_abs_dp": float(np.abs(p - r).max())}
        return out

    def converter(calib):
        d = tempfile.mkdtemp()
        archive = keras.export.ExportArchive()
        archive.add_endpoint("serving_default", lambda image: call_model(model, image),
                             input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="image")])
        archive.write_out(d, verbose=False)
        conv = tf.lite.TFLiteConverter.from_saved_model(d)
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = rep(calib)
        return conv

    results = {}
    for n in (100, len(calib_all)):
        results[f"int8, {n} calibration images"] = figures(tflite_bytes(model, size, "int8", "uint8",
                                                                        rep(calib_all[:n])))
    flips = np.concatenate([calib_all, calib_all[:, :, ::-1]])
    results[f"int8, {len(flips)} calibration images (with mirrored copies)"] = figures(
        tflite_bytes(model, size, "int8", "uint8", rep(flips)))
    dbg = tf.lite.experimental.QuantizationDebugger(converter=converter(calib_all[:100]),
                                                    debug_dataset=rep(check[0][:8]))
    dbg.run()
    buf = io.StringIO()
    dbg.layer_statistics_dump(buf)
    buf.seek(0)
    rows = list(csv.DictReader(buf))
    layer_error = [{"op": r["op_name"], "tensor": r["tensor_name"],
                    "rmse_over_scale": float(r["mean_squared_error"] or 0) ** 0.5 / float(r["scale"])} for r in rows]
    names = [r["tensor_name"] for r in rows]
    first = [n for n in names if n.split("/")[-2:-1] and any(k in n for k in ("stem_", "/b0_"))]
    groups = {"preprocessing (normalize)": [n for n in names if "normal" in n],
              "stem + first block": first,
              "head (logits)": [n for n in names if "logits" in n],
              "whole backbone": [n for n in names if "logits" not in n and "StatefulPartitionedCall" not in n]}
    for label, nodes in groups.items():
        if not nodes:
            continue
        opts = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=nodes)
        d = tf.lite.experimental.QuantizationDebugger(converter=converter(calib_all[:100]),
                                                      debug_dataset=rep(check[0][:8]), debug_options=opts)
        results[f"diagnostic: {label} in float ({len(nodes)} ops), the rest int8"] = figures(
            d.get_nondebug_quantized_model())
    for k, v in results.items():
        c, t = v["check32"], v["test"]
        print(f"{k:70s} check32: float {c['float_top1']:.3f} int8 {c['int8_top1']:.3f} agree {c['agreement']:.3f} | "
              f"test({t['n']}): float {t['float_top1']:.3f} int8 {t['int8_top1']:.3f} agree {t['agreement']:.3f} "
              f"max|dp| {t['max_abs_dp']:.3f}", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"run": args.run, "results": results, "layer_error": layer_error}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
