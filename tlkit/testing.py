"""Small, real stand-ins for smoke runs: a tiny `.keras` backbone and a folder of real image files.

The notebooks and examples use these in smoke mode (`TLKIT_SMOKE=1`) so that the same code path as a
real run (a `.keras` backbone through `--base PATH`, a folder of encoded images through `--image-dir`)
runs in seconds on a CPU, without downloading anything.

Example:
    from tlkit.testing import make_tiny_backbone, write_image_folder
    base = make_tiny_backbone("/tmp/tiny.keras")          # use as ModelConfig(base=base, weights="none")
    root = write_image_folder("/tmp/pets", ("cat", "dog"))  # use as DataConfig(image_dir=root)
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np


def is_smoke() -> bool:
    """Whether smoke mode is asked for: the environment variable `TLKIT_SMOKE` is `1`, `true` or `yes`.

    Example:
        os.environ["TLKIT_SMOKE"] = "1"; is_smoke()
        # -> True
    """
    return os.environ.get("TLKIT_SMOKE", "").strip().lower() in ("1", "true", "yes")


def make_tiny_backbone(path: str, size: int = 32, width: int = 16, seed: int | None = 0) -> str:
    """Writes a small conv net (three downsampling stages with BatchNorm) as a `.keras` backbone.

    The same network as the test suite's `tiny_backbone` fixture (tests/conftest.py); it learns `shapes`.

    Its input is raw 0-255 RGB (it rescales itself), its output a feature map, so it plugs into
    `ModelConfig(base=path, weights="none")` like any user backbone; tlkit infers its stages from where
    the resolution drops.

    Args:
        path: Where to write the `.keras` file (its folder must exist).
        size: Square input side in pixels. Defaults to `32`.
        width: Channels of the first stage (doubled per stage). Defaults to `16`.
        seed: Seeds Keras's global random state before the weights are drawn, so every call writes the same
            network; `None` leaves the random state alone. Defaults to `0`.

    Returns:
        `path`.

    Example:
        make_tiny_backbone("/tmp/tiny.keras")
        # -> '/tmp/tiny.keras'
    """
    import keras
    from keras import layers

    if seed is not None:
        keras.utils.set_random_seed(seed)
    inp = keras.Input((size, size, 3))
    x = layers.Rescaling(1 / 127.5, offset=-1, name="scale")(inp)
    for i, ch in enumerate((width, width * 2, width * 4)):
        x = layers.Conv2D(ch, 3, padding="same", use_bias=False, name=f"s{i}_conv")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"s{i}_bn")(x)
        x = layers.ReLU(name=f"s{i}_relu")(x)
        x = layers.Conv2D(ch, 3, strides=2, padding="same", name=f"s{i}_down")(x)
        x = layers.ReLU(name=f"s{i}_relu2")(x)
    keras.Model(inp, x, name="tiny").save(path)
    return path


def write_image_folder(root: str, classes: Sequence[str] = ("red", "green", "blue"), per_class: int = 8,
                       size: tuple[int, int] = (48, 40), seed: int = 0,
                       kinds: Sequence[str] = ("jpeg", "png")) -> str:
    """Writes real JPEG and PNG files, one sub-folder per class, each class with its own colour cast.

    Args:
        root: Folder to write into (created if missing).
        classes: Class (sub-folder) names. Defaults to `("red", "green", "blue")`.
        per_class: Images per class. Defaults to `8`.
        size: `(width, height)` of the images. Defaults to `(48, 40)`.
        seed: Seed of the pixel noise. Defaults to `0`.
        kinds: The files written in turn: `jpeg`, `png` (RGB), `gray` (grayscale PNG), `rgba` (RGBA PNG), named
            `img{i}.jpg`, `img{i}.png`, `img{i}_gray.png`, `img{i}_rgba.png`. Defaults to `("jpeg", "png")`.

    Returns:
        `root`, ready for `DataConfig(image_dir=root)`.

    Example:
        write_image_folder("/tmp/pets", ("cat", "dog"), per_class=4)
        # -> '/tmp/pets'
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for ci, name in enumerate(classes):
        folder = os.path.join(root, name)
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            arr[..., ci % 3] = 220  # a learnable colour cast per class
            img = Image.fromarray(arr)
            kind = kinds[i % len(kinds)]
            if kind == "jpeg":
                img.save(os.path.join(folder, f"img{i}.jpg"), quality=90)
            elif kind == "png":
                img.save(os.path.join(folder, f"img{i}.png"))
            elif kind == "gray":
                img.convert("L").save(os.path.join(folder, f"img{i}_gray.png"))
            elif kind == "rgba":
                img.convert("RGBA").save(os.path.join(folder, f"img{i}_rgba.png"))
            else:
                raise ValueError(f"Unknown image kind {kind!r}. Choose from: jpeg, png, gray, rgba.")
    return str(root)


def write_multilabel_table(root: str, n: int = 42, colours: Sequence[str] = ("red", "green", "blue"),
                           size: tuple[int, int] = (40, 36), seed: int = 0) -> str:
    """Writes `n` real JPEG/PNG files and `labels.csv`, a multi-label table (space-separated labels, a split column).

    Image i carries the i-th non-empty subset of `colours` (in turn), and each label it carries is a bright colour
    channel over pixel noise, so that any backbone's features separate the labels. The first two thirds of the rows
    are `train`, the next sixth `val`, the rest `test`.

    Args:
        root: Folder to write into (created if missing); the CSV's file names are relative to it.
        n: Number of images. Defaults to `42`.
        colours: The labels, one per RGB channel (at most 3). Defaults to `("red", "green", "blue")`.
        size: `(width, height)` of the images. Defaults to `(40, 36)`.
        seed: Seed of the pixel noise. Defaults to `0`.

    Returns:
        The path of `root/labels.csv` (columns `file`, `label`, `split`), for
        `DataConfig(labels=path, label_delimiter=" ")`.

    Example:
        write_multilabel_table("/tmp/colours")
        # -> '/tmp/colours/labels.csv'
    """
    import csv

    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    subsets = 2 ** len(colours) - 1
    rows = []
    for i in range(n):
        arr = rng.integers(0, 50, (size[1], size[0], 3), dtype=np.uint8)
        labels = [c for j, c in enumerate(colours) if (i % subsets + 1) >> j & 1]
        for c in labels:
            arr[..., colours.index(c)] += 180
        name = f"img{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(arr).save(os.path.join(root, name), **({} if i % 2 else {"quality": 95}))
        split = "train" if i < n * 2 // 3 else ("val" if i < n * 5 // 6 else "test")
        rows.append((name, " ".join(labels), split))
    path = os.path.join(root, "labels.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("file", "label", "split"))
        w.writerows(rows)
    return path


def make_tiny_hub_preset(folder: str, size: int = 32, seed: int | None = 0) -> str:
    """Writes a small, randomly initialised keras-hub ResNet and its image converter as a preset folder.

    `--base hub:FOLDER` then runs the real keras-hub path (`Backbone.from_preset`, the converter's scale and
    offset, the pyramid outputs P2, P3 as stages) offline and in seconds. Needs the `hub` extra.

    Args:
        folder: The preset folder to write (created).
        size: The converter's image size (the backbone's default input size). Defaults to `32`.
        seed: Seeds Keras's global random state before the weights are drawn. Defaults to `0`.

    Returns:
        `folder`.

    Example:
        make_tiny_hub_preset("/tmp/tiny-hub")     # then ModelConfig(base="hub:/tmp/tiny-hub")
        # -> '/tmp/tiny-hub'
    """
    import keras
    import keras_hub

    if seed is not None:
        keras.utils.set_random_seed(seed)
    # ResNetBackbone wants the first stack as wide as the stem (64) for its identity shortcut.
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 16, 16],
        stackwise_num_blocks=[1, 1, 1], stackwise_num_strides=[1, 2, 2], block_type="basic_block",
        use_pre_activation=False, image_shape=(None, None, 3))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the ImageNet statistics of keras-hub's ResNets
    converter = keras_hub.layers.ResNetImageConverter(
        image_size=(size, size), scale=[1 / (255 * s) for s in std], offset=[-m / s for m, s in zip(mean, std)])
    os.makedirs(folder, exist_ok=True)
    backbone.save_to_preset(folder)
    converter.save_to_preset(folder)
    return folder
