"""Shared fixtures: a tiny real backbone (.keras) and folders of real encoded image files."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

from tlkit import testing
from tlkit.testing import make_tiny_backbone  # noqa: F401  (tests import it from here)


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> str:
    """Path of a tiny 32 px `.keras` backbone (raw 0-255 RGB in, 4x4x64 feature map out, 3 stages + input)."""
    return make_tiny_backbone(str(tmp_path_factory.mktemp("backbone") / "tiny.keras"))


@pytest.fixture(scope="module")
def run_dir(tiny_backbone, tmp_path_factory) -> str:
    """A run folder of one short `tlkit finetune` of the tiny backbone on `shapes` (one per test module)."""
    from tlkit import cli

    out = str(tmp_path_factory.mktemp("run") / "run")
    rc = cli.main(["finetune", "--base", tiny_backbone, "--weights", "none", "--dataset", "shapes", "--image-size", "32",
                   "--epochs", "1", "--head-steps", "0", "--shapes-per-class", "8", "--augment", "none",
                   "--output-dir", out])
    assert rc == 0
    return out


def write_image_folder(root, classes=("cat", "dog"), per_class=6, size=(40, 30), seed=0) -> str:
    """`tlkit.testing.write_image_folder` with every kind of file (JPEG, PNG, grayscale, RGBA) and the tests'
    defaults."""
    return testing.write_image_folder(str(root), classes, per_class, size, seed, kinds=("jpeg", "png", "gray", "rgba"))


@pytest.fixture
def image_folder(tmp_path) -> str:
    return write_image_folder(tmp_path / "images")
