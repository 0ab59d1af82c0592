"""The model card of an export (`model_card.md`) and the input description of `export.json`."""
from __future__ import annotations

import os
from typing import Any

from tlkit.engine.export_formats import human_size


def describe_preprocessing(model) -> str:
    """What the model's own preprocessing layer does, read from the model."""
    import keras

    try:
        layer = model.get_layer("preprocess")
    except ValueError:
        return "none in the classifier (the backbone takes raw 0..255 RGB and scales it itself)"
    if isinstance(layer, keras.layers.Rescaling):
        if isinstance(layer.scale, (list, tuple)) or isinstance(layer.offset, (list, tuple)):
            fmt = lambda v: "(" + ", ".join(f"{float(x):.4g}" for x in v) + ")" if isinstance(v, (list, tuple)) \
                else f"{float(v):.4g}"
            return (f"inside the model: x * {fmt(layer.scale)} + {fmt(layer.offset)} per channel (the keras-hub "
                    "preset's image converter)")
        return f"inside the model: x * {layer.scale:g} + {layer.offset:g} (mode `tf`, to [-1, 1])"
    if isinstance(layer, keras.layers.Normalization):
        return "inside the model: (x - ImageNet mean) / ImageNet std on the 0..255 scale (mode `torch`)"
    if isinstance(layer, keras.layers.Conv2D):
        return "inside the model: RGB -> BGR and ImageNet mean subtraction (mode `caffe`)"
    return f"inside the model: layer {layer.__class__.__name__}"


def input_description(fmt: str, quantize: str, int8_input: str, size: int) -> dict[str, Any]:
    """The artifact's input, as written to export.json and the model card."""
    if fmt == "savedmodel":
        return {"serving_default": "images: uint8 RGB [batch, height, width, 3], any height and width "
                                   f"(resized inside to {size}x{size})",
                "serve_bytes": "image_bytes: string [batch], encoded JPEG/PNG/BMP/GIF (decoded and resized inside)",
                "outputs": "probabilities float32 [batch, classes], top_classes string [batch, k], "
                           "top_scores float32 [batch, k]"}
    if fmt == "tflite" and quantize == "int8":
        return {"shape": [1, size, size, 3], "dtype": int8_input,
                "values": "RGB pixels quantized with the input tensor's scale and zero point (uint8: scale ~1, "
                          "the raw 0..255 pixels)" if int8_input != "float32" else "RGB 0..255 float32",
                "output": f"{int8_input} class probabilities (dequantize with the output scale/zero point)"}
    return {"shape": [None if fmt != "tflite" else 1, size, size, 3], "dtype": "float32",
            "values": f"RGB 0..255, resized to {size}x{size} by the caller (tlkit.load does it)",
            "output": "float32 class probabilities"}


def _multi_label_rows(metrics: dict[str, Any]) -> list[str]:
    """The metrics table of a multi-label run (mAP, micro/macro F1 at the thresholds, exact match, loss)."""
    rows = ["| split | examples | mAP | micro F1 | macro F1 | exact match | loss |", "|---|---|---|---|---|---|---|"]
    for split in ("val", "test"):
        m = metrics.get(split)
        if isinstance(m, dict) and m.get("num_examples"):
            cells = [m.get(k) for k in ("mean_average_precision", "micro_f1", "macro_f1", "exact_match", "loss")]
            rows.append(f"| {split} | {m['num_examples']} | "
                        + " | ".join("-" if v is None else f"{v:.4f}" for v in cells) + " |")
    rows += ["", "Multi-label: a sigmoid per class; a class is predicted at or above its threshold (thresholds.json)."]
    return rows


def model_card(info: dict[str, Any], run_cfg: Any, metrics: dict[str, Any] | None, preprocessing: str) -> str:
    """The model_card.md text of an export."""
    def cfg(section: str, key: str, default: str = "unknown") -> Any:
        if run_cfg is None:
            return default
        return getattr(getattr(run_cfg, section), key)

    data = "unknown"
    if run_cfg is not None:
        d = run_cfg.data
        data = (f"`{d.dataset}`" if d.dataset else f"table `{d.labels}`" if getattr(d, "labels", None)
                else f"image folder `{d.image_dir}`")
    lines = [f"# Model card: {os.path.basename(info['source'].rstrip('/')) or info['source']} "
             f"({info['format']}{'' if info['quantize'] == 'none' else ', ' + info['quantize']})", "",
             "| | |", "|---|---|",
             f"| base | `{cfg('model', 'base')}` |", f"| weights | `{cfg('model', 'weights')}` |",
             f"| data | {data} |",
             f"| classes | {len(info['class_names'])}: {', '.join(info['class_names'][:10])}"
             f"{' ...' if len(info['class_names']) > 10 else ''} |",
             f"| strategy | `{cfg('train', 'strategy')}` (epochs {cfg('train', 'epochs')}, "
             f"{cfg('train', 'head_steps')} head steps, lr {cfg('train', 'lr')}) |",
             f"| input size | {info['image_size']}x{info['image_size']} RGB |",
             f"| preprocessing | {preprocessing} |",
             f"| export format | {info['format']}{'' if info['quantize'] == 'none' else ' (' + info['quantize'] + ')'}"
             f"{' input ' + info['int8_input'] if info['quantize'] == 'int8' else ''} |",
             f"| compute precision | {info['export_precision']} (source model: {info['source_precision']}) |",
             f"| artifact | `{info['artifact']}` |",
             f"| size on disk | {human_size(info['size_bytes'])} ({info['size_bytes']} bytes) |",
             f"| source model | `{info['source']}` |", f"| exported | {info['created']} (tlkit {info['versions']['tlkit']}, "
             f"TensorFlow {info['versions']['tensorflow']}, Keras {info['versions']['keras']}) |", "",
             "## Input", ""]
    for k, v in info["input"].items():
        lines.append(f"- {k}: {v}")
    lines += ["", "## Metrics of the Keras model (from the run's metrics.json)", ""]
    if metrics and any(isinstance(m, dict) and "mean_average_precision" in m for m in metrics.values()):
        lines += _multi_label_rows(metrics)
    elif metrics:
        lines += ["| split | examples | accuracy | top-5 | mean per-class accuracy | loss |", "|---|---|---|---|---|---|"]
        for split in ("val", "test"):
            m = metrics.get(split)
            if isinstance(m, dict) and m.get("num_examples"):
                top5 = next((v for k, v in m.items() if k.startswith("top") and k.endswith("_accuracy")), None)
                lines.append(f"| {split} | {m['num_examples']} | {m.get('accuracy', float('nan')):.4f} | "
                             f"{'-' if top5 is None else f'{top5:.4f}'} | "
                             f"{m.get('mean_per_class_accuracy', float('nan')):.4f} | {m.get('loss', float('nan')):.4f} |")
    else:
        lines.append("No metrics.json (the export was made from a bare .keras file).")
    c = info["check"]
    lines += ["", "## Parity with the Keras model", "",
              f"{c['num_images']} images ({c['source']}): "
              f"{'label-set agreement at the thresholds' if 'label_agreement' in c else 'top-1 agreement'} "
              f"{c.get('label_agreement', c['top1_agreement']):.2%} "
              f"(threshold {c['min_agreement']:.0%}), max |Δp| {c['max_abs_diff']:.2e}"
              f"{'' if c['max_abs_diff_allowed'] is None else ' (bound %g)' % c['max_abs_diff_allowed']}, mean |Δp| "
              f"{c['mean_abs_diff']:.2e}: **{'passed' if c['passed'] else 'FAILED'}**."]
    if "bytes_signature" in c:
        b = c["bytes_signature"]
        lines.append(f"Bytes signature (PNG): agreement {b['top1_agreement']:.2%}, max |Δp| {b['max_abs_diff']:.2e}.")
    if "runtime" in c:
        lines.append(f"Run with {c['runtime']}.")
    if "export_accuracy" in c:
        lines.append(f"Accuracy on these images: Keras {c['keras_accuracy']:.2%}, export {c['export_accuracy']:.2%}.")
    lines += ["", "## Use", "", "```python", "import tlkit", f"clf = tlkit.load({info['load_path']!r})",
              "probs = clf.predict(['image.jpg'])  # [N, classes]; clf.class_names", "```", ""]
    return "\n".join(lines)

