"""`--cache auto` (tlkit/data/cache_policy.py): memory when the decoded images fit a share of the memory available,
else disk in the run folder when it has room, else no cache; `--cache memory` that cannot fit is refused at once."""
from __future__ import annotations

import os

import pytest

from conftest import write_image_folder
from tlkit import cli
from tlkit.core.errors import ConfigError
from tlkit.data import cache_policy

GB = 10**9
MB = 10**6


def test_the_estimate_is_the_decoded_uint8_images():
    assert cache_policy.decoded_bytes([100, 10], 224) == 110 * 224 * 224 * 3
    assert cache_policy.decoded_bytes([], 224) == 0


def test_auto_memory_then_disk_then_none():
    counts, size = [100_000], 224  # 15.05 GB decoded
    est = cache_policy.decoded_bytes(counts, size)
    big = cache_policy.decide("auto", counts, size, "/runs/r/cache", available=128 * GB, disk_free=0)
    assert big.mode == "memory" and "15.05 GB" in big.reason and "memory" in big.reason
    # more than a quarter of 32 GB: disk when the disk holds it with its margin, else none
    d = cache_policy.decide("auto", counts, size, "/runs/r/cache", available=32 * GB,
                            disk_free=est + cache_policy.DISK_MARGIN)
    assert d.mode == "disk" and "/runs/r/cache" in d.reason
    n = cache_policy.decide("auto", counts, size, "/runs/r/cache", available=32 * GB,
                            disk_free=est + cache_policy.DISK_MARGIN - 1)
    assert n.mode == "none" and "decodes from the files" in n.reason
    assert cache_policy.decide("auto", counts, size, None, available=32 * GB).mode == "none"  # no run folder
    # the boundary is the share of the memory available
    assert cache_policy.decide("auto", counts, size, None, available=4 * est).mode == "memory"
    assert cache_policy.decide("auto", counts, size, None, available=4 * est - 4).mode == "none"
    assert cache_policy.decide("auto", counts, size, None, available=None).mode == "memory"  # unknown: as before


def test_explicit_choices_are_kept_and_memory_that_cannot_fit_is_refused_with_the_estimate():
    counts, size = [100_000], 224
    assert cache_policy.decide("none", counts, size, None, available=1).mode == "none"
    assert cache_policy.decide("disk", counts, size, "/c", available=1).mode == "disk"
    assert cache_policy.decide("disk", counts, size, None, available=1).mode == "memory"  # no folder: as before
    assert cache_policy.decide("memory", counts, size, None, available=16 * GB).mode == "memory"
    with pytest.raises(ConfigError, match=r"15\.05 GB.*8\.00 GB"):
        cache_policy.decide("memory", counts, size, None, available=8 * GB)
    with pytest.raises(ConfigError, match="Unknown cache"):
        cache_policy.decide("ram", counts, size, None, available=8 * GB)


def test_this_machine_reports_its_memory_and_disk(tmp_path):
    avail = cache_policy.available_memory()
    assert avail is not None and 0 < avail < 2**50
    assert cache_policy.free_disk(str(tmp_path / "not" / "yet")) > 0  # the nearest existing parent's disk


def _argv(tiny_backbone, images, out, cache):
    return ["finetune", "--base", tiny_backbone, "--image-dir", images, "--image-size", "32", "--batch-size", "4",
            "--augment", "none", "--strategy", "full", "--epochs", "1", "--cache", cache, "--output-dir", out]


def test_cache_memory_too_large_is_refused_before_anything_is_written(capsys, monkeypatch, tiny_backbone, tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=8)  # 16 images: 14 train + 2 val at 32 px: 49 KB
    monkeypatch.setattr(cache_policy, "available_memory", lambda: 20_000)
    out = str(tmp_path / "run")
    capsys.readouterr()
    code = cli.main(_argv(tiny_backbone, images, out, "memory"))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert "--cache memory" in err[0] and "GB" in err[0] and "--cache auto" in err[0]
    assert not os.path.exists(out)


@pytest.mark.parametrize("disk_free, mode", [(10**15, "disk"), (0, "none")])
def test_auto_falls_back_to_disk_or_no_cache_and_the_run_says_so(capsys, monkeypatch, tiny_backbone, tmp_path,
                                                                  disk_free, mode):
    images = write_image_folder(tmp_path / "images", per_class=8)
    monkeypatch.setattr(cache_policy, "available_memory", lambda: 20_000)  # a quarter: 5 KB, less than 49 KB
    monkeypatch.setattr(cache_policy, "free_disk", lambda folder: disk_free)
    out = str(tmp_path / "run")
    capsys.readouterr()
    assert cli.main(_argv(tiny_backbone, images, out, "auto")) == 0
    log = capsys.readouterr().out
    assert f"cache auto -> {mode}" in log
    # the disk cache served the run (its files were written), then went with the finished run
    assert ("removed the decoded-image disk cache" in log) == (mode == "disk"), log
    assert not os.path.isdir(os.path.join(out, "cache"))
    assert os.path.isfile(os.path.join(out, "model.keras"))


def test_auto_caches_a_small_folder_in_memory(capsys, tiny_backbone, tmp_path):
    images = write_image_folder(tmp_path / "images", per_class=8)
    out = str(tmp_path / "run")
    capsys.readouterr()
    assert cli.main(_argv(tiny_backbone, images, out, "auto")) == 0
    assert "cache auto -> memory" in capsys.readouterr().out
    assert not os.path.isdir(os.path.join(out, "cache"))
