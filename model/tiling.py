"""Overlapping tiles of a volume and their Gaussian blending, shared by the model-based enhancers.

Networks with GroupNorm see different statistics on a whole volume than on a training patch
(DESIGN.md §4), so enhancers run on tiles of the training patch size and blend them back with
weights that fall off towards each tile's edge.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["gaussian_weights", "pad_to_shape", "tile_starts"]


def tile_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of tiles of ``patch`` covering ``size`` (≥ patch), neighbours sharing ≈ ``overlap``."""
    if size <= patch:
        return [0]
    stride = max(1, int(patch * (1.0 - overlap)))
    count = math.ceil((size - patch) / stride) + 1
    return sorted({int(round(v)) for v in np.linspace(0, size - patch, count)})


def gaussian_weights(patch: tuple[int, int, int]) -> np.ndarray:
    """Blending weights of one tile, 1 at its centre, never below 1e-3."""
    # σ = patch/6: smooth hand-over between tiles, and no tile edge (zero-padding artefacts) counts much.
    axes = []
    for p in patch:
        x = np.arange(p) - (p - 1) / 2
        axes.append(np.exp(-(x**2) / (2 * (p / 6) ** 2)))
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return np.maximum(w / w.max(), 1e-3).astype(np.float32)


def pad_to_shape(
    array: np.ndarray, shape: tuple[int, ...], value: float
) -> tuple[np.ndarray, tuple[slice, ...]]:
    """``array`` padded at the far ends with ``value`` to at least ``shape``, and the crop that undoes it."""
    pads = [(0, max(m - n, 0)) for n, m in zip(array.shape, shape, strict=True)]
    crop = tuple(slice(0, n) for n in array.shape)
    return np.pad(array, pads, constant_values=value), crop
