"""`shapes`: a built-in, procedurally drawn image-classification dataset that needs no download.

Each image shows one shape (circle, square, triangle, cross) of random colour, size and position on a
noisy random background. It is an easy but real task: a model has to look at the image to solve it.
"""
from __future__ import annotations

import numpy as np

CLASS_NAMES = ("circle", "square", "triangle", "cross")


def _draw(rng: np.random.Generator, kind: int, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    # a dark background and a bright shape, each of a random colour: the shape's outline is what tells
    # the classes apart
    bg = rng.uniform(0, 100, 3)
    fg = rng.uniform(60, 255, 3)
    fg[rng.integers(0, 3)] = rng.uniform(200, 255)
    r = rng.uniform(0.25, 0.42) * size
    cx, cy = rng.uniform(r, size - r, 2)
    dx, dy = xx - cx, yy - cy
    if kind == 0:
        mask = dx ** 2 + dy ** 2 <= r ** 2
    elif kind == 1:
        a = rng.uniform(0, np.pi / 2)
        u, v = dx * np.cos(a) + dy * np.sin(a), -dx * np.sin(a) + dy * np.cos(a)
        mask = (np.abs(u) <= r * 0.8) & (np.abs(v) <= r * 0.8)
    elif kind == 2:
        a = rng.uniform(0, 2 * np.pi)
        pts = [(cx + r * np.cos(a + k * 2 * np.pi / 3), cy + r * np.sin(a + k * 2 * np.pi / 3)) for k in range(3)]
        mask = np.ones_like(xx, dtype=bool)
        for k in range(3):
            (x1, y1), (x2, y2) = pts[k], pts[(k + 1) % 3]
            ox, oy = pts[(k + 2) % 3]
            side = (x2 - x1) * (yy - y1) - (y2 - y1) * (xx - x1)
            ref = (x2 - x1) * (oy - y1) - (y2 - y1) * (ox - x1)
            mask &= side * ref >= 0
    else:
        a = rng.uniform(0, np.pi / 2)
        u, v = dx * np.cos(a) + dy * np.sin(a), -dx * np.sin(a) + dy * np.cos(a)
        w = r * 0.3
        mask = ((np.abs(u) <= r) & (np.abs(v) <= w)) | ((np.abs(v) <= r) & (np.abs(u) <= w))
    img = np.empty((size, size, 3), np.float32)
    img[:] = bg
    img[mask] = fg
    img += rng.normal(0, 8, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_shapes(num_per_class: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Draws `num_per_class` images of each class at `size` x `size`.

    Returns:
        `(images uint8 [N, size, size, 3], labels int64 [N])`, classes interleaved.

    Example:
        >>> x, y = make_shapes(2, 32, seed=0)
        >>> x.shape, y.tolist()
        ((8, 32, 32, 3), [0, 1, 2, 3, 0, 1, 2, 3])
    """
    rng = np.random.default_rng(seed)
    n = len(CLASS_NAMES)
    images = np.empty((num_per_class * n, size, size, 3), np.uint8)
    labels = np.tile(np.arange(n, dtype=np.int64), num_per_class)
    for i, kind in enumerate(labels):
        images[i] = _draw(rng, int(kind), size)
    return images, labels
