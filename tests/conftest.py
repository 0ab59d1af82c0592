"""Shared fixtures: a tiny real backbone (.keras) and folders of real encoded image files."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from tlkit.testing import make_tiny_backbone  # noqa: F401  (tests import it from here)


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> str:
    """Path of a tiny 32 px `.keras` backbone (raw 0-255 RGB in, 4x4x64 feature map out, 3 stages + input)."""
    return make_tiny_backbone(str(tmp_path_factory.mktemp("backbone") / "tiny.keras"))


def write_image_folder(root, classes=("cat", "dog"), per_class=6, size=(40, 30), seed=0) -> str:
    """Writes real JPEG and PNG files (RGB, grayscale, RGBA) into one sub-folder per class."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for ci, cname in enumerate(classes):
        d = os.path.join(root, cname)
        os.makedirs(d, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            arr[..., ci % 3] = 220  # a class-dependent colour cast, learnable
            img = Image.fromarray(arr)
            kind = i % 4
            if kind == 0:
                img.save(os.path.join(d, f"img{i}.jpg"), quality=90)
            elif kind == 1:
                img.save(os.path.join(d, f"img{i}.png"))
            elif kind == 2:
                img.convert("L").save(os.path.join(d, f"img{i}_gray.png"))
            else:
                img.convert("RGBA").save(os.path.join(d, f"img{i}_rgba.png"))
    return str(root)


@pytest.fixture
def image_folder(tmp_path) -> str:
    return write_image_folder(tmp_path / "images")
