"""The classifier: preprocessing -> backbone (inference-mode BatchNorm) -> pooling -> standardisation -> dropout
-> dense, and the `Classifier` record that names its parts once.

There is one way to build a model, `build_classifier` (`Classifier.build`); `finetune`, `tune`, `distill` and
`lr-find` all use it. The model takes raw RGB images, float32 in 0..255, so that it carries its own preprocessing
into every export. It is made of built-in Keras layers only, so `keras.models.load_model` reloads it without
tlkit; `Classifier` is what tlkit knows about it (backbone, head, stage of each backbone layer, class names).
"""
from __future__ import annotations

import dataclasses
import os


import numpy as np
import keras

from tlkit.core import rundir
from tlkit.core.config import ModelConfig, TrainConfig
from tlkit.core.errors import ConfigError, DataError, first_line
from tlkit.models import param_groups
from tlkit.models.backbones import BackboneSpec

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
                     feature_stats: tuple[np.ndarray, np.ndarray] | None = None,
                     multi_label: bool = False) -> keras.Model:
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
        multi_label: A sigmoid per class (independent probabilities, several labels an image) in place of the
            softmax. Defaults to `False`.

    Returns:
        A functional `keras.Model` from float32 images [B, S, S, 3] in 0..255 to float32 class
        probabilities. Its layer `"backbone"` is the base, `"logits"` the pre-softmax (pre-sigmoid) outputs,
        `"probs"` the float32 softmax (sigmoid) that `is_multi_label` reads.

    Example:
        m = build_classifier(get_backbone("resnet50"), 5, ModelConfig(weights="none"), 32)
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
    probs = keras.layers.Activation(output_activation(multi_label), dtype="float32", name="probs")(logits)
    model = keras.Model(inputs, probs, name=f"tlkit_{spec.name}")
    for layer in model.layers:
        if layer.name == "preprocess":
            layer.trainable = False
    return model


def output_activation(multi_label: bool) -> str:
    """The activation of the `probs` layer: `sigmoid` for multi-label, else `softmax`."""
    return "sigmoid" if multi_label else "softmax"


def is_multi_label(model: keras.Model) -> bool:
    """Whether a classifier is multi-label: its float32 `probs` layer (or, for another model, its last layer) is a
    sigmoid. The saved model itself records it, so every loader knows without a side file.

    Example:
        >>> is_multi_label(keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="sigmoid")]))
        True
    """
    try:
        layer = model.get_layer("probs")
    except ValueError:
        layer = model.layers[-1]
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", str(activation)) == "sigmoid"


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


def set_trainable(model: keras.Model, spec: BackboneSpec, stages: set[int] | None, train_bn: bool = False,
                  assignment: list[int] | tuple[int, ...] | None = None) -> int:
    """Freezes the backbone except the given stages; the head always trains.

    Args:
        model: A classifier from `build_classifier`.
        spec: Its backbone's spec (for the stage of each layer).
        stages: Stage indices to train, `None` for all, an empty set for none.
        train_bn: Let BatchNormalization layers of trained stages train. Defaults to `False`.
        assignment: The stage of each backbone layer when already known (`Classifier.stage_of_layer`). Defaults
            to `None` (`spec.stages`).

    Returns:
        The number of trainable weights of the model (recompile after calling this).
    """
    base = get_base(model)
    if assignment is None:
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
        plain = fold_feature_norm(keras.models.load_model("runs/x/model.keras"))
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
    probs = keras.layers.Activation(output_activation(is_multi_label(model)), dtype="float32", name="probs")(logits)
    return keras.Model(model.inputs, probs, name=model.name)


def split_model(model: keras.Model) -> tuple[keras.Model, keras.Model]:
    """Splits a classifier into a feature extractor and a head model that share the classifier's layers.

    The cut is after the last weightless layer that follows the backbone (the global pooling of
    `build_classifier`), so the cached features are pooled vectors, not feature maps.

    Returns:
        `(extractor, head)`: `extractor` maps images to features; `head` maps features to probabilities with
        the classifier's own head layers (training the head trains the classifier).

    Example:
        extractor, head = split_model(model)
        [l.name for l in head.layers]
        # -> ['features', 'feature_norm', 'head_dropout', 'logits', 'probs']
    """
    layers = head_layers(model)
    for layer in layers:
        node_inputs = layer._inbound_nodes[0].input_tensors if layer._inbound_nodes else []
        if len(node_inputs) != 1:
            raise ValueError(f"Layer {layer.name!r} of the head does not take exactly one input; the head of a "
                             "build_classifier model is a chain of single-input layers.")
    cut = 0
    while cut < len(layers) - 1 and not layers[cut].weights and isinstance(
            layers[cut], (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D, keras.layers.Flatten)):
        cut += 1
    # The input of the first head layer as the classifier calls it (its first node): the cached features.
    feat_tensor = layers[cut]._inbound_nodes[0].input_tensors[0]
    extractor = keras.Model(model.inputs, feat_tensor, name=f"{model.name}_features")
    inputs = keras.Input(tuple(feat_tensor.shape[1:]), dtype="float32", name="features")
    x = inputs
    for layer in layers[cut:]:
        x = layer(x)
    head = keras.Model(inputs, x, name=f"{model.name}_head")
    return extractor, head


def save_model(model: keras.Model, path: str) -> None:
    """Saves the classifier atomically, without optimizer state, so it reloads with plain Keras."""
    plain = keras.Model(model.input, model.output, name=model.name)  # one tensor in, one out (not lists)
    with rundir.atomic_path(path, suffix=".keras") as tmp:
        plain.save(tmp)


def read_labels(path: str) -> list[str]:
    """The class names of a `labels.txt` (one per line, index = label)."""
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def load_model_and_labels(path: str) -> tuple[keras.Model, list[str] | None, str | None]:
    """Loads a run folder (its model.keras, labels.txt) or a .keras file (labels.txt beside it, if any).

    Returns:
        `(model, class_names or None, run_dir or None)`.
    """
    run_dir = None
    if os.path.isdir(path):
        run_dir = path
        model_path = os.path.join(path, "model.keras")
    else:
        model_path = path
    if not os.path.isfile(model_path):
        raise ConfigError(f"No model found at {path!r} (expected a run folder with model.keras or a .keras file).")
    import tlkit.models.schedules  # noqa: F401  registers tlkit's serializable objects
    try:
        model = keras.models.load_model(model_path, compile=False, safe_mode=True)
    except Exception as e:
        raise ConfigError(f"Could not load model {model_path!r}: {first_line(e)}") from None
    from tlkit.core.sidecars import find_sidecar

    labels_path = find_sidecar(model_path, "labels.txt")  # NAME.labels.txt beside NAME.keras, else labels.txt
    labels = read_labels(labels_path) if labels_path else None
    if labels is not None and len(labels) != model.output_shape[-1]:
        raise DataError(f"{labels_path} lists {len(labels)} classes but the model predicts {model.output_shape[-1]}.")
    return model, labels, run_dir


@dataclasses.dataclass(eq=False)
class Classifier:
    """A classifier and what tlkit knows about it, computed once (in the spirit of fastai's `Learner`).

    The Keras model inside is a plain functional model (`keras.models.load_model` reads it without tlkit); the
    record names its parts so that no caller has to take it apart again.

    Attributes:
        model: The functional `keras.Model` (raw RGB 0..255 in, probabilities out).
        spec: The backbone's `BackboneSpec`, or `None` for a model whose backbone tlkit cannot name (a loaded
            `.keras` file without its run's `config.yaml`): then it has no stages.
        class_names: Class names, index = label, or `None`.
        run_dir: The run folder it was loaded from, or `None`.
        backbone: The backbone layer (`"backbone"`).
        head_layers: The layers after the backbone (pooling, standardisation, dropout, logits, probs).
        stage_of_layer: The stage index of each backbone layer (empty without `spec`).
        num_stages: Number of backbone stages (0 without `spec`).

    Example:
        clf = Classifier.build(get_backbone("resnet50"), 5, ModelConfig(weights="none"), 64)
        clf.set_trainable({clf.num_stages - 1})   # the top stage and the head
        clf = Classifier.from_run("runs/resnet50-shapes-1")
    """

    model: keras.Model
    spec: BackboneSpec | None = None
    class_names: list[str] | None = None
    run_dir: str | None = None

    def __post_init__(self):
        self.backbone = get_base(self.model)
        self.head_layers = head_layers(self.model)
        self.stage_of_layer = tuple(self.spec.stages(self.backbone)) if self.spec is not None else ()
        self.num_stages = (max(self.stage_of_layer) + 1) if self.stage_of_layer else 0

    @classmethod
    def build(cls, spec: BackboneSpec, num_classes: int, cfg: ModelConfig, image_size: int,
              base: keras.Model | None = None, feature_stats: tuple[np.ndarray, np.ndarray] | None = None,
              class_names: list[str] | None = None, multi_label: bool = False) -> "Classifier":
        """`build_classifier` wrapped in its record (same arguments)."""
        return cls(build_classifier(spec, num_classes, cfg, image_size, base=base, feature_stats=feature_stats,
                                    multi_label=multi_label),
                   spec, list(class_names) if class_names is not None else None)

    @classmethod
    def from_run(cls, path: str) -> "Classifier":
        """Loads a run folder (`model.keras`, `labels.txt`, and the backbone named in `config.yaml` when it still
        resolves) or a `.keras` file.

        Raises:
            ConfigError: nothing loadable at `path`.
        """
        model, labels, run_dir = load_model_and_labels(path)
        spec = None
        config = os.path.join(run_dir, "config.yaml") if run_dir else None
        if config and os.path.isfile(config):
            try:
                from tlkit.core.config_io import config_from_dict, load_yaml
                from tlkit.models.backbones import get_backbone

                spec = get_backbone(config_from_dict(load_yaml(config)).model.base)
            except Exception:  # noqa: BLE001  (a backbone file moved, a registry changed): no stages then
                spec = None
        return cls(model, spec, labels, run_dir)

    @property
    def image_size(self) -> int:
        """The square input side in pixels."""
        return int(self.model.input_shape[1])

    @property
    def num_classes(self) -> int:
        return int(self.model.output_shape[-1])

    @property
    def multi_label(self) -> bool:
        """Whether the model is multi-label (a sigmoid per class; `is_multi_label`)."""
        return is_multi_label(self.model)

    def set_trainable(self, stages: set[int] | None, train_bn: bool = False) -> int:
        """Freezes the backbone except `stages` (`None`: all, empty: none); the head always trains.

        Returns:
            The number of trainable weight tensors (recompile after calling this).
        """
        if self.spec is None:
            raise ConfigError("This classifier's backbone has no known stages (no spec): it can only train whole.")
        return set_trainable(self.model, self.spec, stages, train_bn, assignment=self.stage_of_layer)

    def lr_factors(self, cfg: TrainConfig) -> dict[int, float]:
        """`{id(variable): factor}` of the discriminative learning rates of `cfg` (`lr_mult`, `stage_lrs`) for
        every backbone variable; empty when they are off (every variable at the stage's rate)."""
        if not self.num_stages:
            return {}
        return param_groups.stage_multipliers(self.backbone.layers, self.stage_of_layer, cfg)

    def split(self) -> tuple[keras.Model, keras.Model]:
        """`(extractor, head)` sharing this model's layers: images -> pooled features, features -> probabilities
        (the feature cache trains the head on the extractor's outputs)."""
        return split_model(self.model)

    def save(self, path: str) -> None:
        """Saves the model atomically as a plain `.keras` file (no optimizer state)."""
        save_model(self.model, path)
