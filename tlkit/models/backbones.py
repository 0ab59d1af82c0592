"""Registry of pretrained backbones: name -> constructor, preprocessing, input size and stages.

Thin named entries over one generic builder (the keras.applications habit). Each spec knows how the
backbone's layers group into stages (for ResNet50: conv1, conv2 ... conv5) so that strategies can
unfreeze the top stages. A user's own `.keras` backbone gets its stages from where the feature map's
resolution drops.

Example:
    spec = get_backbone("resnet50")
    base = spec.build(image_size=64, weights="none")
"""
from __future__ import annotations

import dataclasses
import os
import re
import warnings
from typing import Callable

import keras

from tlkit.core.errors import BackboneError, ConfigError, OfflineError, TlkitError, first_line, suggest
from tlkit.models.stage_maps import (efficientnet_stage, mobilenetv2_stage, resnet_stage, stages_by_resolution,
                                     vgg_stage)

# How raw 0-255 RGB is turned into what the backbone expects (keras.applications' preprocess_input modes, and
# `scale_offset`: x * scale + offset per channel, what a keras-hub ImageConverter does after its resize).
PREPROCESS_MODES = ("caffe", "tf", "torch", "none", "scale_offset")
HUB_PREFIX = "hub:"


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """What tlkit knows about one backbone.

    Attributes:
        name: Registry name, e.g. `resnet50`.
        constructor: A `keras.applications` style function
            `(include_top, weights, input_shape) -> keras.Model`.
        preprocess: Preprocessing mode of `keras.applications.<family>.preprocess_input`: `caffe` (BGR,
            ImageNet mean subtracted), `tf` (scaled to [-1, 1]), `torch` (scaled, ImageNet mean/std) or
            `none` (the network does it itself).
        default_size: Default square input size. Defaults to `224`.
        min_size: Smallest input size the network accepts. Defaults to `32`.
        stage_names: Names of the stages, bottom (stem) first.
        stage_of: Maps a layer name to its stage index, or `None` to infer stages from resolution.
        path: For a user's `.keras` backbone, its file.
        hub_preset: For a keras-hub backbone (`hub:NAME` or `hub:PATH`), the preset name or folder.
        scale: With preprocess `scale_offset` (a keras-hub image converter): the factor of `x * scale +
            offset`, one number or one per channel. Defaults to `None` (1).
        offset: With preprocess `scale_offset`: the offset, one number or one per channel. Defaults to
            `None` (0).
    """

    name: str
    constructor: Callable[..., keras.Model] | None
    preprocess: str
    default_size: int = 224
    min_size: int = 32
    stage_names: tuple[str, ...] = ()
    stage_of: Callable[[str], int | None] | None = None
    path: str | None = None
    hub_preset: str | None = None
    scale: float | tuple[float, ...] | None = None
    offset: float | tuple[float, ...] | None = None

    def build(self, image_size: int | None = None, weights: str | None = "imagenet") -> keras.Model:
        """Builds the backbone without its top, for square inputs of `image_size` pixels.

        Args:
            image_size: Input side. Defaults to `None` (the spec's default size).
            weights: `imagenet`, `none` or the path of a weights file. Defaults to `"imagenet"`.

        Returns:
            A `keras.Model` from images (as its preprocessing expects) to a feature map or vector.
        """
        if self.path is not None:  # a user's backbone may fix its own size
            return _load_user_backbone(self, image_size, weights)
        if self.hub_preset is not None:
            size = image_size or self.default_size
            if size < self.min_size:
                raise ConfigError(f"image_size {size} is too small for {self.name}: it needs at least {self.min_size} px.")
            return _build_hub_backbone(self, size, weights)
        size = image_size or self.default_size
        if size < self.min_size:
            raise ConfigError(f"image_size {size} is too small for {self.name}: it needs at least {self.min_size} px.")
        w = _weights_arg(weights)
        try:
            with warnings.catch_warnings():  # keras.applications warns about non-default sizes; they work
                warnings.filterwarnings("ignore", message=".*input_shape.*", category=UserWarning)
                return self.constructor(include_top=False, weights=w, input_shape=(size, size, 3))
        except Exception as e:  # keras raises plain Exception for a failed download
            if w == "imagenet" and _looks_like_download_failure(e):
                fname = _weights_file_name(str(e))
                cache = os.path.join(os.path.expanduser(os.environ.get("KERAS_HOME", "~/.keras")), "models")
                place = f"place {fname} in {cache}/" if fname else f"place the weights file in {cache}/"
                raise OfflineError(
                    f"Could not download the ImageNet weights of {self.name} ({first_line(e)}). "
                    f"To work offline, {place} or pass --weights PATH (a local weights file) or --weights none."
                ) from None
            if w not in ("imagenet", None):
                raise BackboneError(f"Could not load weights file {weights!r} into {self.name}: {first_line(e)}") from None
            raise

    def stages(self, base: keras.Model) -> list[int]:
        """The stage index of each layer of `base.layers`, in order (0 = stem)."""
        if self.stage_of is None:
            return stages_by_resolution(base)
        out, current = [], 0
        last = len(self.stage_names) - 1
        for layer in base.layers:
            s = self.stage_of(layer.name)
            if s is None:
                s = current  # a layer between named ones (padding, input) joins the stage before it
            elif s < 0:
                s = last
            current = s
            out.append(min(s, last))
        return out

    def num_stages(self, base: keras.Model) -> int:
        return max(self.stages(base)) + 1


def _weights_arg(weights: str | None) -> str | None:
    if weights is None or str(weights).lower() == "none":
        return None
    if weights == "imagenet":
        return "imagenet"
    if not os.path.exists(weights):
        raise ConfigError(f"Weights file not found: {weights!r} (use --weights imagenet, none or an existing PATH).")
    return str(weights)


def _looks_like_download_failure(e: Exception) -> bool:
    text = str(e).lower()
    return any(k in text for k in ("url fetch failure", "urlopen", "http", "name resolution", "network", "connection"))


def _weights_file_name(message: str) -> str | None:
    m = re.search(r"https?://\S*/([^/\s:]+\.(?:h5|keras|weights\.h5))", message)
    return m.group(1) if m else None


def _app(name: str) -> Callable[..., keras.Model]:
    return getattr(keras.applications, name)


_RESNET_STAGES = ("conv1", "conv2", "conv3", "conv4", "conv5")
_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Adds a spec to the registry (its name must be new) and returns it."""
    if spec.name in _REGISTRY:
        raise ValueError(f"Backbone {spec.name!r} is already registered.")
    _REGISTRY[spec.name] = spec
    return spec


for _name, _ctor in (("resnet50", "ResNet50"), ("resnet101", "ResNet101"), ("resnet152", "ResNet152")):
    register_backbone(BackboneSpec(_name, _app(_ctor), "caffe", stage_names=_RESNET_STAGES, stage_of=resnet_stage))
for _name, _ctor in (("resnet50v2", "ResNet50V2"), ("resnet101v2", "ResNet101V2"), ("resnet152v2", "ResNet152V2")):
    register_backbone(BackboneSpec(_name, _app(_ctor), "tf", stage_names=_RESNET_STAGES, stage_of=resnet_stage))
register_backbone(BackboneSpec("mobilenetv2", _app("MobileNetV2"), "tf",
                               stage_names=("stem", "block1-2", "block3-5", "block6-12", "block13-16"),
                               stage_of=mobilenetv2_stage))
for _i, _size in enumerate((224, 240, 260, 300)):
    register_backbone(BackboneSpec(f"efficientnetb{_i}", _app(f"EfficientNetB{_i}"), "none", default_size=_size,
                                   stage_names=("stem",) + tuple(f"block{j}" for j in range(1, 8)),
                                   stage_of=efficientnet_stage))
for _name, _ctor in (("vgg16", "VGG16"), ("vgg19", "VGG19")):
    register_backbone(BackboneSpec(_name, _app(_ctor), "caffe",
                                   stage_names=tuple(f"block{j}" for j in range(1, 6)), stage_of=vgg_stage))
register_backbone(BackboneSpec("densenet121", _app("DenseNet121"), "torch"))
register_backbone(BackboneSpec("efficientnetv2b0", _app("EfficientNetV2B0"), "none"))
register_backbone(BackboneSpec("convnext_tiny", _app("ConvNeXtTiny"), "none"))


def list_backbones() -> list[str]:
    """Names of the registered backbones, sorted.

    Example:
        >>> "resnet50" in list_backbones()
        True
    """
    return sorted(_REGISTRY)


def get_backbone(name: str) -> BackboneSpec:
    """The spec of a registered name, or of a user's `.keras` backbone file.

    Raises:
        ConfigError: unknown name (with the closest names), or a missing `.keras` file.
    """
    if name.startswith(HUB_PREFIX):
        return hub_backbone(name[len(HUB_PREFIX):])
    if name.endswith(".keras") or os.sep in name:
        if not os.path.isfile(name):
            raise ConfigError(f"Backbone file not found: {name!r}.")
        return BackboneSpec(name=os.path.splitext(os.path.basename(name))[0], constructor=None, preprocess="none",
                            path=os.path.abspath(name))
    key = name.lower()
    if key not in _REGISTRY:
        raise ConfigError(f"Unknown backbone {name!r}.{suggest(key, _REGISTRY)} Available: {', '.join(list_backbones())}, "
                          "hub:PRESET (a keras-hub preset name or folder), or the path of a .keras backbone.")
    return _REGISTRY[key]


def _load_user_backbone(spec: BackboneSpec, size: int | None, weights: str | None) -> keras.Model:
    try:
        base = keras.models.load_model(spec.path, compile=False, safe_mode=True)
    except Exception as e:
        raise BackboneError(f"Could not load backbone {spec.path!r}: {first_line(e)}") from None
    shape = base.input_shape
    if isinstance(shape, list):
        raise BackboneError(f"Backbone {spec.path!r} has {len(shape)} inputs; a backbone takes one image input.")
    if len(shape) != 4 or (shape[-1] not in (None, 3)):
        raise BackboneError(f"Backbone {spec.path!r} takes inputs of shape {shape}; expected (height, width, 3) images.")
    if size is not None and shape[1] is not None and shape[1] != size:
        raise ConfigError(f"Backbone {spec.path!r} takes {shape[1]}x{shape[2]} images; pass --image-size {shape[1]}.")
    w = _weights_arg(weights)
    if w not in (None, "imagenet"):
        try:
            base.load_weights(w)
        except Exception as e:
            raise BackboneError(f"Could not load weights file {w!r} into {spec.path!r}: {first_line(e)}") from None
    return base


def user_backbone_default_size(spec: BackboneSpec) -> int:
    """The input size a `.keras` backbone fixes, or the spec default."""
    return spec.default_size


# ---------------------------------------------------------------- keras-hub presets (`--base hub:NAME|PATH`)

# keras-hub backbone classes that work as a tlkit base: one image input, a feature map out (pooled by the head),
# built-in Keras layers only (so model.keras reloads with plain Keras, without keras-hub). Each was built small
# and random, saved as a preset, loaded through `--base hub:DIR`, given a head, saved and run (ResNet end to end
# in tests/test_backbones.py and tests/test_finetune.py). Stages: ResNet and DenseNet from their pyramid outputs,
# VGG (no pyramid) where the resolution drops. Not listed: MobileNetV3 (builds, but model.keras then holds
# keras-hub layers and needs `import keras_hub` to reload), EfficientNet (not verified: a small preset did not
# reload in keras-hub 0.32), and the families whose output is a token sequence (ViT, DeiT, DINOv2, Swin).
HUB_FAMILIES: dict[str, str] = {
    "ResNetBackbone": "resnet_18_imagenet, resnet_50_imagenet (from timm's resnet50.a1_in1k, 80.4% ImageNet "
                      "top-1), resnet_101_imagenet, resnet_v2_50_imagenet, resnet_vd_50_ssld_v2_imagenet, ...",
    "DenseNetBackbone": "densenet_121_imagenet, densenet_169_imagenet, densenet_201_imagenet",
    "VGGBackbone": "vgg_11_imagenet, vgg_13_imagenet, vgg_16_imagenet, vgg_19_imagenet",
}
_HUB_SPECS: dict[str, BackboneSpec] = {}


def require_keras_hub():
    """Imports keras-hub (the optional extra `hub`), or raises one `ConfigError` line saying what to install."""
    try:
        import keras_hub
    except ImportError:
        raise ConfigError("--base hub:... needs keras-hub, an optional extra: pip install 'tlkit[hub]' "
                          "(or pip install keras-hub).") from None
    return keras_hub


def list_hub_families() -> dict[str, str]:
    """The keras-hub backbone classes tlkit builds classifiers from, with example preset names.

    Example:
        "ResNetBackbone" in list_hub_families()
        # -> True
    """
    return dict(HUB_FAMILIES)


def _hub_preset_arg(preset: str) -> str:
    if not preset:
        raise ConfigError("--base hub: needs a keras-hub preset name or folder, e.g. hub:resnet_50_imagenet.")
    if "://" in preset:
        return preset
    path = os.path.expanduser(preset)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ConfigError(f"{preset!r} is not a keras-hub preset folder: it has no config.json "
                              "(write one with Backbone.save_to_preset(DIR)).")
        return os.path.abspath(path)
    if os.sep in preset or preset.startswith((".", "~")):
        raise ConfigError(f"keras-hub preset folder not found: {preset!r}.")
    return preset


def _hub_load(preset: str, load_weights: bool, image_size: int | None = None):
    """`keras_hub.models.Backbone.from_preset` with tlkit's one-line errors, at `image_size` when given."""
    kh = require_keras_hub()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hub = kh.models.Backbone.from_preset(preset, load_weights=load_weights)
            shape = tuple(hub.inputs[0].shape[1:3]) if hub.inputs else ()
            if image_size is not None and shape and shape != (image_size, image_size):
                # The same architecture at our size, with the preset's weights: static shapes for the stages
                # and the exports, and a preset fixed to another size works too.
                config = hub.get_config()
                key = next((k for k in ("image_shape", "input_shape") if k in config), None)
                if key is None:
                    raise BackboneError(f"keras-hub preset {preset!r} takes {shape[0]}x{shape[1]} images; pass "
                                        f"--image-size {shape[0]}.")
                resized = type(hub).from_config({**config, key: (image_size, image_size, 3)})
                resized.set_weights(hub.get_weights())
                hub = resized
            return hub
    except TlkitError:
        raise
    except Exception as e:
        if isinstance(e, OSError) or _looks_like_download_failure(e):
            cache = os.environ.get("KAGGLEHUB_CACHE", os.path.join("~", ".cache", "kagglehub"))
            raise OfflineError(
                f"Could not download the keras-hub preset {preset!r} ({first_line(e)}). To work offline, on a "
                f"machine with internet run keras_hub.models.Backbone.from_preset({preset!r}).save_to_preset(DIR) "
                f"and keras_hub.layers.ImageConverter.from_preset({preset!r}).save_to_preset(DIR), copy DIR here "
                f"and pass --base hub:DIR (or copy the kagglehub cache, {cache})."
            ) from None
        if "Unknown preset" in str(e):
            names = [n for cls in HUB_FAMILIES for n in getattr(kh.models, cls).presets]
            raise ConfigError(f"Unknown keras-hub preset {preset!r}.{suggest(preset, names)} Image backbones: "
                              f"{', '.join(sorted(names)[:12])}, ... (tlkit info lists the families), or "
                              "hub:PATH of a preset folder.") from None
        raise BackboneError(f"Could not load the keras-hub preset {preset!r}: {first_line(e)}") from None


def _hub_converter(preset: str):
    """The preset's ImageConverter, or `None` when the preset has none."""
    kh = require_keras_hub()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return kh.layers.ImageConverter.from_preset(preset)
    except Exception:  # no image_converter.json: the backbone takes raw pixels
        return None


def _as_tuple(v) -> float | tuple[float, ...] | None:
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        return tuple(float(x) for x in v)
    return float(v)


def _check_image_backbone(backbone: keras.Model, preset: str) -> None:
    cls = type(backbone).__name__
    inputs = backbone.inputs
    if len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].shape[-1] != 3:
        raise BackboneError(f"keras-hub preset {preset!r} ({cls}) is not an image backbone with one RGB input "
                            f"(inputs: {[tuple(t.shape) for t in inputs]}).")
    out = backbone.outputs
    if len(out) != 1 or len(out[0].shape) not in (2, 4):
        raise BackboneError(f"keras-hub preset {preset!r} ({cls}) gives outputs of shape "
                            f"{[tuple(t.shape) for t in out]}; tlkit needs a feature map or vector "
                            f"(families that work: {', '.join(HUB_FAMILIES)}).")


def hub_stage_map(backbone: keras.Model) -> tuple[tuple[str, ...], dict[str, int]]:
    """Stage names and the stage of every layer of a keras-hub backbone, from its pyramid outputs.

    Stage k holds the layers after the producer of pyramid level k-1 up to the producer of level k (the stem
    is in the first level's stage); layers after the last level join the last stage. A backbone without
    pyramid outputs is cut where the resolution drops (`stages_by_resolution`).

    Example:
        names, stage_of = hub_stage_map(keras_hub.models.Backbone.from_preset("hub_folder"))
        names
        # -> ('P2', 'P3', 'P4', 'P5')
    """
    layers = backbone.layers
    pyramid = getattr(backbone, "pyramid_outputs", None) or {}
    index = {id(layer): i for i, layer in enumerate(layers)}
    ends = []
    for level, tensor in pyramid.items():
        op = tensor._keras_history.operation
        if id(op) in index:
            ends.append((index[id(op)], str(level)))
    ends.sort()
    if len(ends) < 2:
        stages = stages_by_resolution(backbone)
        return tuple(f"stage{i}" for i in range(max(stages) + 1)), {l.name: s for l, s in zip(layers, stages)}
    mapping, stage = {}, 0
    for i, layer in enumerate(layers):
        while stage < len(ends) - 1 and i > ends[stage][0]:
            stage += 1
        mapping[layer.name] = stage
    return tuple(name for _, name in ends), mapping


def hub_backbone(preset: str) -> BackboneSpec:
    """The spec of a keras-hub preset name or folder (its preprocessing and stages read from the preset).

    The preset's architecture is built once without weights to read its stages (a preset name is downloaded
    then, and an offline machine fails here, before any data is read).

    Example:
        spec = get_backbone("hub:/path/to/preset")   # or hub:resnet_50_imagenet
        spec.preprocess, spec.stage_names
        # -> ('scale_offset', ('P2', 'P3', 'P4', 'P5'))
    """
    preset = _hub_preset_arg(preset)
    if preset in _HUB_SPECS:
        return _HUB_SPECS[preset]
    conv = _hub_converter(preset)
    size, scale, offset = 224, None, None
    if conv is not None:
        c = conv.get_config()
        if c.get("image_size"):
            size = int(c["image_size"][0])
        scale, offset = _as_tuple(c.get("scale")), _as_tuple(c.get("offset"))
    probe = _hub_load(preset, load_weights=False, image_size=size)
    _check_image_backbone(probe, preset)
    names, mapping = hub_stage_map(probe)
    name = os.path.basename(os.path.normpath(preset)) if os.path.isdir(preset) else preset.split("/")[-1]
    spec = BackboneSpec(name=f"hub-{name}", constructor=None,
                        preprocess="none" if scale is None and offset is None else "scale_offset",
                        default_size=size, stage_names=names, stage_of=mapping.get, hub_preset=preset,
                        scale=scale, offset=offset)
    _HUB_SPECS[preset] = spec
    return spec


def _build_hub_backbone(spec: BackboneSpec, size: int, weights: str | None) -> keras.Model:
    """The preset's backbone at `size`, unwrapped into a plain functional model of its own layers."""
    w = _weights_arg(weights)
    hub = _hub_load(spec.hub_preset, load_weights=(w == "imagenet"), image_size=size)
    if w not in (None, "imagenet"):
        try:
            hub.load_weights(w)
        except Exception as e:
            raise BackboneError(f"Could not load weights file {w!r} into {spec.name}: {first_line(e)}") from None
    # A plain keras.Model over the same layers: the classifier then saves as built-in layers (no keras-hub
    # class in model.keras), and the feature cache and exports see an ordinary functional backbone.
    return keras.Model(hub.inputs, hub.outputs[0], name=spec.name.replace("-", "_"))


def resolve_image_size(spec: BackboneSpec, requested: int | None, base: keras.Model | None = None) -> int:
    """The input size of a run, checked against what the backbone accepts: the one home of that rule.

    Args:
        spec: The backbone's spec.
        requested: The configured size (`--image-size`), or `None`.
        base: The built backbone, whose fixed input size (a user's `.keras`) is used when none was requested.
            Defaults to `None`.

    Returns:
        `requested`, else the backbone's own input size, else `spec.default_size`.

    Raises:
        ConfigError: the size is below `spec.min_size`.

    Example:
        >>> resolve_image_size(get_backbone("resnet50"), None)
        224
    """
    if requested:
        size = int(requested)
    elif base is not None and base.input_shape[1]:
        size = int(base.input_shape[1])
    else:
        size = spec.default_size
    if size < spec.min_size:
        raise ConfigError(f"image_size {size} is too small for {spec.name}: it needs at least {spec.min_size} px.")
    return size
