"""Where the decoded images of a run are cached: `--cache auto` (the default) decides from their size.

The cache of the training pipeline holds every decoded, resized image as uint8: `S * S * 3` bytes an image (150 KB at
224 px), so 100,000 images need about 15 GB. `auto` decides once, at the start, from that estimate:

- `memory` when the train and validation images fit in `MEMORY_SHARE` (a quarter) of the memory available now (the
  smaller of the kernel's `MemAvailable` and what the process's cgroup limit leaves);
- else `disk`, in the run folder, when its file system has the estimate plus `DISK_MARGIN` free;
- else `none`: every epoch decodes from the files (training decodes only its random crop of each JPEG).

`--cache memory` on images that cannot fit in the memory available is refused at once, with the estimate, instead of
the kernel killing the run hours later.

The head stage's cached base features (N x D float32: 1.28 million ImageNet images through ResNet50's 2,048 features
are about 10 GB) are bounded the same way (`decide_features`): in memory when they fit in `MEMORY_SHARE` of the
memory available, else memory-mapped from `.npy` files in the run folder's `cache/`.

Example:
    >>> d = decide("auto", counts=[1000, 100], image_size=224, cache_dir=None, available=8 * 2**30)
    >>> d.mode, round(d.estimate_bytes / 2**20)
    ('memory', 158)
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Iterable

from tlkit.core.errors import ConfigError

MEMORY_SHARE = 0.25  # auto caches in memory up to this share of the memory available at the start
DISK_MARGIN = 2**30  # and on disk when the disk keeps this much free beyond the estimate
_GB = 1e9


@dataclasses.dataclass(frozen=True)
class CacheDecision:
    """The cache a run uses.

    Attributes:
        mode: `memory`, `disk` or `none`.
        estimate_bytes: The decoded size of the images to cache (uint8).
        reason: One line for the run log.
    """

    mode: str
    estimate_bytes: int
    reason: str


def decoded_bytes(counts: Iterable[int], image_size: int) -> int:
    """Bytes of the decoded, resized uint8 images of splits of `counts` images at `image_size` px."""
    return int(sum(max(int(c), 0) for c in counts)) * int(image_size) ** 2 * 3


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory() -> int | None:
    """Bytes of memory available to this process now, or `None` when the system does not say.

    The smaller of the kernel's `MemAvailable` (`/proc/meminfo`) and the room left under the cgroup's memory limit
    (v2 `memory.max`, v1 `memory.limit_in_bytes`), since a container sees the host's memory in `/proc/meminfo`.
    """
    found: list[int] = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    if not found:
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            pass
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        if limit is not None and limit < 2**60 and usage is not None:  # v1 "no limit" is a huge number
            found.append(max(limit - usage, 0))
            break
    return min(found) if found else None


def free_disk(folder: str) -> int | None:
    """Free bytes on the file system that will hold `folder` (its nearest existing parent), or `None`."""
    path = os.path.abspath(folder)
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def decide(requested: str, counts: Iterable[int], image_size: int, cache_dir: str | None, *,
           available: int | None = -1, disk_free: int | None = -1) -> CacheDecision:
    """The cache for `requested` (`auto`, `memory`, `disk` or `none`) of splits of `counts` images.

    Args:
        requested: The `--cache` value.
        counts: Images of each cached split (train and validation).
        image_size: Side in pixels of the cached images.
        cache_dir: Folder of a disk cache (the run folder's `cache/`), or `None` when there is no run folder.
        available: Memory available in bytes; `-1` measures it (`available_memory`), `None` means unknown.
        disk_free: Free bytes where `cache_dir` is; `-1` measures it (`free_disk`), `None` means unknown.

    Raises:
        ConfigError: `memory` requested for images larger than the memory available.
    """
    counts = list(counts)
    est = decoded_bytes(counts, image_size)
    size = f"{sum(counts)} images at {image_size} px decode to about {est / _GB:.2f} GB"
    if requested == "none":
        return CacheDecision("none", est, f"cache none: {size}, decoded again every epoch")
    if available == -1:
        available = available_memory()
    if requested == "memory":
        if available is not None and est > available:
            raise ConfigError(f"--cache memory: {size}, more than the {available / _GB:.2f} GB of memory available; "
                              f"use --cache auto, disk or none.")
        return CacheDecision("memory", est, f"cache memory: {size}")
    if requested == "disk":
        return CacheDecision("disk" if cache_dir else "memory", est,
                             f"cache disk: {size}" if cache_dir else f"cache memory (no run folder for a disk cache): "
                                                                     f"{size}")
    if requested != "auto":
        raise ConfigError(f"Unknown cache {requested!r}. Choose one of: auto, memory, disk, none.")
    budget = None if available is None else int(MEMORY_SHARE * available)
    if budget is None or est <= budget:
        room = "memory available unknown" if budget is None else \
            f"within {MEMORY_SHARE:.0%} of the {available / _GB:.2f} GB available"
        return CacheDecision("memory", est, f"cache auto -> memory: {size}, {room}")
    over = f"more than {MEMORY_SHARE:.0%} of the {available / _GB:.2f} GB of memory available"
    if cache_dir:
        if disk_free == -1:
            disk_free = free_disk(cache_dir)
        if disk_free is not None and disk_free >= est + DISK_MARGIN:
            return CacheDecision("disk", est, f"cache auto -> disk ({cache_dir}): {size}, {over}; "
                                              f"{disk_free / _GB:.1f} GB free there")
        where = f"and the disk has {disk_free / _GB:.1f} GB free" if disk_free is not None else "and the disk's room is unknown"
    else:
        where = "and there is no run folder for a disk cache"
    return CacheDecision("none", est, f"cache auto -> none: {size}, {over} {where}; every epoch decodes from the files")


def decide_features(rows: int, dim: int, cache_dir: str | None, *, available: int | None = -1) -> CacheDecision:
    """Where the head's cached features of `rows` examples of `dim` float32 go: `memory`, or `memmap` (`.npy` files
    in `cache_dir`, read back by the batch) when they exceed `MEMORY_SHARE` of the memory available.

    Args:
        rows: Examples whose features are cached (train and validation).
        dim: Features per example.
        cache_dir: Folder for the memory-mapped files, or `None` (no run folder: memory).
        available: Memory available in bytes; `-1` measures it (`available_memory`), `None` means unknown.

    Example:
        >>> decide_features(1_281_167, 2048, "run/cache", available=16 * 2**30).mode
        'memmap'
    """
    est = int(rows) * int(dim) * 4
    size = f"head features of {rows} examples x {dim} float32: about {est / _GB:.2f} GB"
    if available == -1:
        available = available_memory()
    budget = None if available is None else int(MEMORY_SHARE * available)
    if budget is None or est <= budget or not cache_dir:
        room = ("memory available unknown" if budget is None else
                f"within {MEMORY_SHARE:.0%} of the {available / _GB:.2f} GB available" if est <= budget else
                "no run folder to map them from")
        return CacheDecision("memory", est, f"feature cache -> memory: {size}, {room}")
    return CacheDecision("memmap", est, f"feature cache -> memory-mapped files in {cache_dir}: {size}, more than "
                                        f"{MEMORY_SHARE:.0%} of the {available / _GB:.2f} GB of memory available")
