"""How the layers of a backbone group into stages (stem first), for the strategies that unfreeze the top ones:
by layer name for the registered keras.applications families, by where the feature map's resolution drops for
any other functional backbone.

Example:
    resnet_stage("conv4_block1_out")
    # -> 3
"""
from __future__ import annotations

import re

import keras


def resnet_stage(name: str) -> int | None:
    """ResNet (v1 and v2): conv1 .. conv5; -1 (the top stage) for the layers after the last block."""
    m = re.match(r"conv(\d)_", name)
    if m:
        return int(m.group(1)) - 1
    if name.startswith("pool1"):
        return 0
    if name.startswith("post_"):
        return -1
    return None


def vgg_stage(name: str) -> int | None:
    """VGG: block1 .. block5."""
    m = re.match(r"block(\d)_", name)
    return int(m.group(1)) - 1 if m else None


def efficientnet_stage(name: str) -> int | None:
    """EfficientNet B0-B3: the stem, block1 .. block7; -1 for the top."""
    if name.startswith("stem_"):
        return 0
    m = re.match(r"block(\d)", name)
    if m:
        return int(m.group(1))
    if name.startswith("top_"):
        return -1
    return None


MOBILENETV2_BLOCKS = {**{b: 1 for b in (1, 2)}, **{b: 2 for b in (3, 4, 5)},
                       **{b: 3 for b in range(6, 13)}, **{b: 4 for b in range(13, 17)}}


def mobilenetv2_stage(name: str) -> int | None:
    """MobileNetV2: the stem and four groups of its 16 inverted-residual blocks; -1 for the top."""
    if name in ("Conv1", "bn_Conv1", "Conv1_relu") or name.startswith("expanded_conv"):
        return 0
    m = re.match(r"block_(\d+)_", name)
    if m:
        return MOBILENETV2_BLOCKS[int(m.group(1))]
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
