"""The classifier: preprocessing -> backbone (inference-mode BatchNorm) -> pooling -> dropout -> dense.

There is one way to build a model, `build_classifier`; `finetune`, `tune` and `distill` all use it. The
model takes raw RGB images, float32 in 0..255, so that it carries its own preprocessing into every
export. It is made of built-in Keras layers only, so `keras.models.load_model` reloads it without tlkit.
"""
from __future__ import annotations

import numpy as np
import keras

from tlkit.backbones import BackboneSpec
from tlkit.config import ModelConfig

# ImageNet channel statistics on the 0-255 scale, as keras.applications.imagenet_utils uses them.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_TORCH_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def preprocessing(mode: str, x: keras.KerasTensor, scale: float | tuple[float, ...] | None = None,
                  offset: float | tuple[float, ...] | None = None) -> keras.KerasTensor:
    """Applies a `keras.applications` preprocess_input mode with built-in, frozen layers.

    Args:
        mode: `none`, `tf`, `torch`, `caffe`, or `scale_offset`: `x * scale + offset` per channel, the
            normalisation of a keras-hub `ImageConverter` (its resize is the data pipeline's).
        x: Raw RGB images, float32 in 0..255.
        scale: For `scale_offset`: one factor or one per channel. Defaults to `None` (1).
        offset: For `scale_offset`: one offset or one per channel. Defaults to `None` (0).
    """
    if mode == "none":
        return x
    if mode == "scale_offset":
        s = 1.0 if scale is None else (list(scale) if isinstance(scale, (list, tuple)) else float(scale))
        o = 0.0 if offset is None else (list(offset) if isinstance(offset, (list, tuple)) else float(offset))
        return keras.layers.Rescaling(s, offset=o, name="preprocess")(x)
    if mode == "tf":
        return keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocess")(x)
    if mode == "torch":
        return keras.layers.Normalization(mean=list(_TORCH_MEAN), variance=[s * s for s in _TORCH_STD],
                                          name="preprocess")(x)
    if mode == "caffe":
        # RGB -> BGR and mean subtraction as one frozen 1x1 convolution (a permutation plus a bias).
        conv = keras.layers.Conv2D(3, 1, use_bias=True, trainable=False, name="preprocess")
        y = conv(x)
        kernel = np.zeros((1, 1, 3, 3), np.float32)
        for out_c, in_c in enumerate((2, 1, 0)):
            kernel[0, 0, in_c, out_c] = 1.0
        conv.set_weights([kernel, -np.array(_CAFFE_MEAN_BGR, np.float32)])
        return y
    raise ValueError(f"Unknown preprocessing mode {mode!r}.")


def build_classifier(spec: BackboneSpec, num_classes: int, cfg: ModelConfig, image_size: int,
                     base: keras.Model | None = None,
                     feature_stats: tuple[np.ndarray, np.ndarray] | None = None) -> keras.Model:
    """Builds backbone + classification head.

    Args:
        spec: The backbone's `BackboneSpec`.
        num_classes: Number of classes.
        cfg: The `ModelConfig` (weights, dropout, l2, train_bn).
        image_size: Input side in pixels.
        base: An already built backbone. Defaults to `None` (built from `spec` with `cfg.weights`).
        feature_stats: `(mean, variance)` of the pooled backbone features over the training images
            (`engine.setup.feature_stats`): the head standardises the features with them (a frozen
            `Normalization` layer, constants in the saved model). Defaults to `None` (mean 0, variance 1).

    Returns:
        A functional `keras.Model` from float32 images [B, S, S, 3] in 0..255 to float32 class
        probabilities. Its layer `"backbone"` is the base, `"logits"` the pre-softmax outputs.

    Example:
        >>> m = build_classifier(get_backbone("resnet50"), 5, ModelConfig(weights="none"), 32)
    """
    if base is None:
        base = spec.build(image_size, cfg.weights)
    base.name = "backbone"  # a stable name to find it by, whatever the architecture
    inputs = keras.Input((image_size, image_size, 3), name="image", dtype="float32")
    x = preprocessing(spec.preprocess, inputs, spec.scale, spec.offset)
    # training=False keeps BatchNorm in inference mode even when the base is unfrozen (Keras's transfer-
    # learning guide); with train_bn the base follows the fit/predict phase instead.
    x = base(x) if cfg.bn_trains else base(x, training=False)
    if len(x.shape) == 4:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif len(x.shape) != 2:
        raise ValueError(f"The backbone's output has shape {x.shape}; expected a feature map or vector.")
    # The head starts from standardised features (per-feature mean and variance of the training images, fixed
    # constants of the model) and zero logits (loss ln C at the first step): its start no longer depends on the
    # scale of the backbone's features, which for a ReLU backbone without normalisation can be anything.
    dim = int(x.shape[-1])
    mean, var = feature_stats if feature_stats is not None else (np.zeros(dim), np.ones(dim))
    var = np.asarray(var, np.float64)
    # A feature that never fired on the training images (a dead ReLU) must not be divided by ~0 later, when
    # fine-tuning wakes it up: its variance is floored at a small fraction of the typical one.
    var = np.maximum(var, 1e-3 * float(np.mean(var)) + 1e-6)
    x = keras.layers.Normalization(axis=-1, mean=np.asarray(mean, np.float32).tolist(),
                                   variance=var.astype(np.float32).tolist(),
                                   name="feature_norm")(x)
    x = keras.layers.Dropout(cfg.dropout, name="head_dropout")(x)
    reg = keras.regularizers.L2(cfg.l2) if cfg.l2 else None
    logits = keras.layers.Dense(num_classes, kernel_regularizer=reg, kernel_initializer="zeros", name="logits")(x)
    probs = keras.layers.Activation("softmax", dtype="float32", name="probs")(logits)
    model = keras.Model(inputs, probs, name=f"tlkit_{spec.name}")
    for layer in model.layers:
        if layer.name == "preprocess":
            layer.trainable = False
    return model


def get_base(model: keras.Model) -> keras.Model:
    """The backbone inside a classifier built by `build_classifier`."""
    try:
        return model.get_layer("backbone")
    except ValueError:
        for layer in model.layers:
            if isinstance(layer, keras.Model):
                return layer
        raise


def head_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Layers after the backbone (pooling, dropout, logits, probs)."""
    names = [layer.name for layer in model.layers]
    i = names.index(get_base(model).name)
    return model.layers[i + 1:]


def set_trainable(model: keras.Model, spec: BackboneSpec, stages: set[int] | None, train_bn: bool = False) -> int:
    """Freezes the backbone except the given stages; the head always trains.

    Args:
        model: A classifier from `build_classifier`.
        spec: Its backbone's spec (for the stage of each layer).
        stages: Stage indices to train, `None` for all, an empty set for none.
        train_bn: Let BatchNormalization layers of trained stages train. Defaults to `False`.

    Returns:
        The number of trainable weights of the model (recompile after calling this).
    """
    base = get_base(model)
    assignment = spec.stages(base)
    base.trainable = True  # children decide
    any_on = False
    for layer, stage in zip(base.layers, assignment):
        on = stages is None or stage in stages
        if isinstance(layer, keras.layers.BatchNormalization) and not train_bn:
            on = False
        layer.trainable = on
        any_on = any_on or (on and bool(layer.weights))
    if not any_on:
        base.trainable = False
    for layer in head_layers(model):
        layer.trainable = True
    return len(model.trainable_weights)


def fold_feature_norm(model: keras.Model) -> keras.Model:
    """The classifier with its `feature_norm` standardisation folded into the `logits` layer (same outputs).

    `(x - mean) / std` followed by `Dense(W, b)` is `Dense(W / std, b - (mean / std) @ W)`: one layer fewer, and
    for a full-integer (int8) TFLite export no layer that amplifies the quantisation error of low-variance features.
    A model without `feature_norm` is returned as it is.

    Example:
        >>> plain = fold_feature_norm(keras.models.load_model("runs/x/model.keras"))
    """
    try:
        norm, dense = model.get_layer("feature_norm"), model.get_layer("logits")
    except ValueError:
        return model
    mean = np.asarray(keras.ops.convert_to_numpy(norm.mean), np.float64).reshape(-1)
    std = np.maximum(np.sqrt(np.asarray(keras.ops.convert_to_numpy(norm.variance), np.float64).reshape(-1)),
                     keras.backend.epsilon())
    kernel, bias = (np.asarray(w, np.float64) for w in dense.get_weights())
    folded = keras.layers.Dense(kernel.shape[1], name="logits", dtype=dense.dtype_policy)
    x = norm.input
    logits = folded(x)
    folded.set_weights([(kernel / std[:, None]).astype(np.float32),
                        (bias - (mean / std) @ kernel).astype(np.float32)])
    probs = keras.layers.Activation("softmax", dtype="float32", name="probs")(logits)
    return keras.Model(model.inputs, probs, name=model.name)
