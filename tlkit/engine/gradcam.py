"""Grad-CAM: where in the image the classifier looked for the class it predicted (Selvaraju et al., 2017).

The keras.io recipe (fchollet's "Grad-CAM class activation visualization"): the gradient of the class's logit
with respect to the feature map of the last convolutional stage, averaged over the map's positions, weights the
map's channels; their weighted sum, through a ReLU and scaled to 0..1, is the heat map, upsampled to the image
and laid over it with the jet colour map.

For a `build_classifier` model the last backbone stage's feature map is the output of the backbone's last layer
with a spatial [H, W, C] output: the backbone's output itself for `keras.applications` and keras-hub backbones (the
input of the head's global pooling), the last map before its own pooling for a user's `.keras` backbone that pools
(the glyph CNN of the benchmarks). The rest of the backbone and the head (pooling, standardisation, dropout, logits)
map it to the logits. A backbone without any spatial layer has no Grad-CAM (`GradCamError`).

Example:
    cam = GradCam(model)
    heat, classes = cam.heatmaps(images)              # [N, h, w] in 0..1, predicted class of each image
    overlay(images[0], heat[0])                       # uint8 RGB, the heat map over the image
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from tlkit.core.errors import ConfigError

ALPHA = 0.4  # keras.io's weight of the heat map over the image


class GradCamError(ConfigError):
    """The model has no spatial feature map to explain (or is not a Keras model)."""


def _rank(layer) -> int:
    """The rank of a layer's (single) output, 0 when it has none or several."""
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError, TypeError):
        return 0


class GradCam:
    """Grad-CAM heat maps of a `build_classifier` model.

    Args:
        model: The classifier (a Keras model: raw RGB 0..255 in, probabilities out, with a `logits` layer).

    Attributes:
        layer: The name of the layer whose output is explained (`backbone` when it is the backbone's output).
    """

    def __init__(self, model):
        import keras

        from tlkit.models.classifier import get_base, head_layers

        try:
            base = get_base(model)
            layers = head_layers(model)
            logits_layer = model.get_layer("logits")
        except (ValueError, AttributeError):
            raise GradCamError("Grad-CAM needs a tlkit classifier (a backbone, then a head ending in a 'logits' "
                               "layer).") from None
        # The last layer of the backbone with a spatial output: the end of its last stage (the backbone's output
        # itself for keras.applications; the last map before the backbone's own pooling for others).
        spatial = [layer for layer in getattr(base, "layers", []) if _rank(layer) == 4]
        if not spatial:
            raise GradCamError(f"Grad-CAM needs a spatial feature map; the backbone {base.name!r} has no layer with "
                               f"a [H, W, C] output.")
        target = spatial[-1]
        self.layer = target.name if target.output is not base.output else base.name
        base_in = base._inbound_nodes[0].input_tensors[0]  # what the classifier feeds the backbone (preprocessed)
        self._pre = keras.Model(model.inputs, base_in)
        self._to_map = keras.Model(base.inputs, target.output)
        self._from_map = None if target.output is base.output else keras.Model(target.output, base.output)
        base_out = layers[0]._inbound_nodes[0].input_tensors[0]
        inputs = keras.Input(tuple(base_out.shape[1:]), dtype="float32")
        x = inputs
        for layer in layers:  # pooling, feature_norm, dropout, logits (not the softmax)
            x = layer(x)
            if layer is logits_layer:
                break
        self.head = keras.Model(inputs, x)

    def _features(self, x):
        from tlkit.engine.predictors import call_model

        return call_model(self._to_map, call_model(self._pre, x))

    def _logits(self, feats):
        from tlkit.engine.predictors import call_model

        out = feats if self._from_map is None else call_model(self._from_map, feats)
        return call_model(self.head, out)

    def heatmaps(self, images: np.ndarray, classes: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Heat maps of float32 images [N, S, S, 3] (0..255, the model's size).

        Args:
            images: The batch.
            classes: The class explained for each image. Defaults to `None` (the predicted class).

        Returns:
            `(heat [N, h, w] in 0..1 at the feature map's resolution, classes [N])`.
        """
        import tensorflow as tf

        x = tf.convert_to_tensor(np.asarray(images, np.float32))
        feats = tf.cast(self._features(x), tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(feats)
            logits = tf.cast(self._logits(feats), tf.float32)
            chosen = tf.argmax(logits, -1, output_type=tf.int32) if classes is None else \
                tf.constant(np.asarray(classes, np.int32))
            score = tf.gather(logits, chosen, axis=1, batch_dims=1)
        grads = tape.gradient(score, feats)  # each image's score depends on its own map only
        weights = tf.reduce_mean(grads, axis=(1, 2))  # [N, C]
        cam = tf.nn.relu(tf.einsum("nhwc,nc->nhw", feats, weights))
        peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
        cam = tf.math.divide_no_nan(cam, peak)
        return cam.numpy(), chosen.numpy()


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """The heat map (0..1, any resolution), jet-coloured and upsampled, over a uint8 RGB image [H, W, 3]."""
    from matplotlib import colormaps
    from PIL import Image

    image = np.asarray(image)
    h, w = image.shape[:2]
    heat8 = Image.fromarray(np.uint8(np.clip(heat, 0, 1) * 255)).resize((w, h), Image.BILINEAR)
    colour = colormaps["jet"](np.asarray(heat8) / 255.0)[..., :3] * 255.0
    out = colour * alpha + image.astype(np.float32)
    return np.uint8(np.clip(out * (255.0 / max(out.max(), 1.0)), 0, 255))  # keras.io rescales the sum to 0..255


def explain_files(model, files: Sequence[str], images: Sequence[np.ndarray], out_dir: str,
                  class_names: Sequence[str]) -> list[str]:
    """Writes one overlay PNG per image into `out_dir` (`<name>_gradcam.png`, at the image's own size).

    Args:
        model: The Keras classifier.
        files: The images' file names (name the PNGs).
        images: The decoded uint8 RGB images, any sizes.
        out_dir: The folder to write (created).
        class_names: Class names (the predicted class is written into `gradcam.csv`).

    Returns:
        The written PNG paths.
    """
    from PIL import Image

    from tlkit.core import rundir
    from tlkit.engine.predictors import resize_batch

    cam = GradCam(model)
    size = int(model.input_shape[1])
    os.makedirs(out_dir, exist_ok=True)
    written, rows, used = [], [], set()
    for start in range(0, len(images), 16):
        chunk = list(images[start:start + 16])
        heat, cls = cam.heatmaps(resize_batch(chunk, size))
        for k, img in enumerate(chunk):
            f = files[start + k]
            stem = os.path.splitext(os.path.basename(f))[0]
            name, i = f"{stem}_gradcam.png", 1
            while name in used:  # the same file name in two folders
                i += 1
                name = f"{stem}_{i}_gradcam.png"
            used.add(name)
            path = os.path.join(out_dir, name)
            Image.fromarray(overlay(img, heat[k])).save(path)
            written.append(path)
            rows.append({"file": f, "overlay": name, "class": class_names[int(cls[k])]})
    rundir.write_csv(os.path.join(out_dir, "gradcam.csv"), rows)
    return written




def draw_worst(model, worst: Sequence[dict], class_names: Sequence[str], path: str, title: str) -> dict:
    """`tlkit evaluate`'s picture of its worst errors under Grad-CAM heat maps of the predicted class.

    Args:
        model: The Keras classifier.
        worst: The worst errors as `engine.metrics.predict_with_errors` keeps them (`image` at the model's size).
        class_names: Class names.
        path: The PNG to write.
        title: The figure's title.

    Returns:
        What metrics.json records: `{"file", "layer"}`, or `{"skipped": reason}` when the model has no feature map.
    """
    from tlkit.engine import plots

    try:
        cam = GradCam(model)
    except GradCamError as e:
        return {"skipped": str(e)}
    shown = list(worst)
    if shown:
        heat, _ = cam.heatmaps(np.stack([np.asarray(e["image"], np.float32) for e in shown]),
                               [int(e["pred"]) for e in shown])
        shown = [{**e, "image": overlay(np.asarray(e["image"], np.uint8), h)} for e, h in zip(shown, heat)]
    plots.plot_misclassified(shown, class_names, path, title=title)
    return {"file": os.path.basename(path), "layer": cam.layer, "class": "predicted"}


__all__ = ["GradCam", "GradCamError", "overlay", "explain_files", "draw_worst"]
