"""Overlapping tiles of a volume and their Gaussian blending, shared by the model-based enhancers.

Networks with GroupNorm see different statistics on a whole volume than on a training patch
(DESIGN.md §4), so enhancers run on tiles of the training patch size and blend them back with
weights that fall off towards each tile's edge.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "Blender",
    "Window",
    "gaussian_weights",
    "pad_to_shape",
    "split_air",
    "split_air_by_ct",
    "tile_starts",
    "tile_windows",
]


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


Window = tuple[slice, slice, slice]


def tile_windows(corners: list[tuple[int, int, int]], size: tuple[int, int, int]) -> list[Window]:
    """The index windows of tiles of ``size`` starting at ``corners``."""
    return [tuple(slice(c, c + s) for c, s in zip(corner, size, strict=True)) for corner in corners]  # type: ignore[misc]


def split_air(x: np.ndarray, windows: list[Window]) -> tuple[list[Window], list[Window]]:
    """``(busy, air)``: the windows of ``x`` holding any non-zero voxel, and those of pure air.

    A tile of pure air (no activity at all) has nothing to enhance, and a whole-body FOV is mostly air
    around the patient: enhancers keep such tiles as they are instead of running the network on them.
    """
    busy: list[Window] = []
    air: list[Window] = []
    for w in windows:
        (busy if np.any(x[w]) else air).append(w)
    return busy, air


class Blender:
    """Accumulates weighted tiles into a volume of ``shape``; :meth:`result` is their weighted mean."""

    def __init__(self, shape: tuple[int, ...], weights: np.ndarray) -> None:
        self.weights = weights
        self.acc = np.zeros(shape, dtype=np.float32)
        self.norm = np.zeros(shape, dtype=np.float32)

    def add(self, window: Window, tile: np.ndarray) -> None:
        self.acc[window] += tile * self.weights
        self.norm[window] += self.weights

    def result(self) -> np.ndarray:
        return self.acc / np.maximum(self.norm, 1e-12)


def split_air_by_ct(
    ct_hu: np.ndarray,
    windows: list[Window],
    *,
    air_hu: float = -900.0,
    pet: np.ndarray | None = None,
    pet_limit: float | None = None,
) -> tuple[list[Window], list[Window]]:
    """``(busy, air)`` by the CT: a window whose CT is ≤ ``air_hu`` everywhere holds no patient.

    Its PET is scatter and reconstruction noise outside the body (never exactly zero after MLEM), so
    :func:`split_air` alone skips nothing on a real study; the CT says where the patient is. Where the
    CT's field of view is smaller than the PET's, the PET grid is filled with air beyond it although
    the patient (an arm) may be there: with ``pet`` and ``pet_limit`` a window also needs its PET below
    ``pet_limit`` everywhere to count as air.
    """
    busy: list[Window] = []
    air: list[Window] = []
    for w in windows:
        empty = float(ct_hu[w].max()) <= air_hu
        if empty and pet is not None and pet_limit is not None:
            empty = float(pet[w].max()) < pet_limit
        (air if empty else busy).append(w)
    return busy, air
