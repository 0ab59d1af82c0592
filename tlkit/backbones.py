"""Registry of pretrained backbones: name -> constructor, preprocessing, input size and stages.

Thin named entries over one generic builder (the keras.applications habit). Each spec knows how the
backbone's layers group into stages (for ResNet50: conv1, conv2 ... conv5) so that strategies can
unfreeze the top stages. A user's own `.keras` backbone gets its stages from where the feature map's
resolution drops.

Example:
    >>> spec = get_backbone("resnet50")
    >>> base = spec.build(image_size=64, weights="none")
"""
from __future__ import annotations

import dataclasses
import os
import re
import warnings
from typing import Callable

import keras

from tlkit.errors import BackboneError, ConfigError, OfflineError, suggest

# How raw 0-255 RGB is turned into what the backbone expects (keras.applications' preprocess_input modes).
PREPROCESS_MODES = ("caffe", "tf", "torch", "none")


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
    """

    name: str
    constructor: Callable[..., keras.Model] | None
    preprocess: str
    default_size: int = 224
    min_size: int = 32
    stage_names: tuple[str, ...] = ()
    stage_of: Callable[[str], int | None] | None = None
    path: str | None = None

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
                    f"Could not download the ImageNet weights of {self.name} ({_first_line(e)}). "
                    f"To work offline, {place} or pass --weights PATH (a local weights file) or --weights none."
                ) from None
            if w not in ("imagenet", None):
                raise BackboneError(f"Could not load weights file {weights!r} into {self.name}: {_first_line(e)}") from None
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def _resnet_stage(name: str) -> int | None:
    m = re.match(r"conv(\d)_", name)
    if m:
        return int(m.group(1)) - 1
    if name.startswith("pool1"):
        return 0
    if name.startswith("post_"):
        return -1
    return None


def _vgg_stage(name: str) -> int | None:
    m = re.match(r"block(\d)_", name)
    return int(m.group(1)) - 1 if m else None


def _efficientnet_stage(name: str) -> int | None:
    if name.startswith("stem_"):
        return 0
    m = re.match(r"block(\d)", name)
    if m:
        return int(m.group(1))
    if name.startswith("top_"):
        return -1
    return None


_MOBILENETV2_BLOCKS = {**{b: 1 for b in (1, 2)}, **{b: 2 for b in (3, 4, 5)},
                       **{b: 3 for b in range(6, 13)}, **{b: 4 for b in range(13, 17)}}


def _mobilenetv2_stage(name: str) -> int | None:
    if name in ("Conv1", "bn_Conv1", "Conv1_relu") or name.startswith("expanded_conv"):
        return 0
    m = re.match(r"block_(\d+)_", name)
    if m:
        return _MOBILENETV2_BLOCKS[int(m.group(1))]
    if name in ("Conv_1", "Conv_1_bn", "out_relu"):
        return -1
    return None


def stages_by_resolution(base: keras.Model) -> list[int]:
    """Infers stages of any functional backbone: a new stage starts where the spatial resolution drops.

    Layers before the first downsampling form stage 0. Layers whose output is not a feature map (e.g. a
    final pooling) stay in the stage before them. Without static shapes, layers are cut into 5 equal runs.
    """
    out, stage, res = [], 0, None
    for layer in base.layers:
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):
            shape = None
        if shape is not None and len(shape) == 4 and shape[1] is not None:
            if res is None:
                res = shape[1]
            elif shape[1] < res:
                res = shape[1]
                stage += 1
        out.append(stage)
    if res is None or stage == 0:
        n = len(base.layers)
        return [min(4, i * 5 // max(n, 1)) for i in range(n)]
    return out


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
    register_backbone(BackboneSpec(_name, _app(_ctor), "caffe", stage_names=_RESNET_STAGES, stage_of=_resnet_stage))
for _name, _ctor in (("resnet50v2", "ResNet50V2"), ("resnet101v2", "ResNet101V2"), ("resnet152v2", "ResNet152V2")):
    register_backbone(BackboneSpec(_name, _app(_ctor), "tf", stage_names=_RESNET_STAGES, stage_of=_resnet_stage))
register_backbone(BackboneSpec("mobilenetv2", _app("MobileNetV2"), "tf",
                               stage_names=("stem", "block1-2", "block3-5", "block6-12", "block13-16"),
                               stage_of=_mobilenetv2_stage))
for _i, _size in enumerate((224, 240, 260, 300)):
    register_backbone(BackboneSpec(f"efficientnetb{_i}", _app(f"EfficientNetB{_i}"), "none", default_size=_size,
                                   stage_names=("stem",) + tuple(f"block{j}" for j in range(1, 8)),
                                   stage_of=_efficientnet_stage))
for _name, _ctor in (("vgg16", "VGG16"), ("vgg19", "VGG19")):
    register_backbone(BackboneSpec(_name, _app(_ctor), "caffe",
                                   stage_names=tuple(f"block{j}" for j in range(1, 6)), stage_of=_vgg_stage))
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
    if name.endswith(".keras") or os.sep in name:
        if not os.path.isfile(name):
            raise ConfigError(f"Backbone file not found: {name!r}.")
        return BackboneSpec(name=os.path.splitext(os.path.basename(name))[0], constructor=None, preprocess="none",
                            path=os.path.abspath(name))
    key = name.lower()
    if key not in _REGISTRY:
        raise ConfigError(f"Unknown backbone {name!r}.{suggest(key, _REGISTRY)} Available: {', '.join(list_backbones())}, "
                          "or the path of a .keras backbone.")
    return _REGISTRY[key]


def _load_user_backbone(spec: BackboneSpec, size: int | None, weights: str | None) -> keras.Model:
    try:
        base = keras.models.load_model(spec.path, compile=False, safe_mode=True)
    except Exception as e:
        raise BackboneError(f"Could not load backbone {spec.path!r}: {_first_line(e)}") from None
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
            raise BackboneError(f"Could not load weights file {w!r} into {spec.path!r}: {_first_line(e)}") from None
    return base


def user_backbone_default_size(spec: BackboneSpec) -> int:
    """The input size a `.keras` backbone fixes, or the spec default."""
    return spec.default_size
