"""Overlapping tiles of a volume and their Gaussian blending, shared by the model-based enhancers.

Networks with GroupNorm see different statistics on a whole volume than on a training patch (its
per-sample mean and variance would mix air, body and hot spots that no patch held together), so
enhancers run on tiles of the training patch size and blend them back with weights that fall off
towards each tile's edge. :func:`run_tiled` is that loop, shared by every model-based enhancer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from model.grid import AIR_HU

__all__ = [
    "Blender",
    "CTAir",
    "Tiled",
    "Window",
    "body_mask",
    "gaussian_weights",
    "pad_to_shape",
    "run_tiled",
    "split_air",
    "split_air_by_ct",
    "split_by_mask",
    "tile_starts",
    "tile_stride",
    "tile_windows",
]


def tile_stride(patch: int, overlap: float) -> int:
    """How far apart neighbouring tiles of ``patch`` start when they share ``overlap`` of it."""
    return max(1, int(patch * (1.0 - overlap)))


def tile_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of tiles of ``patch`` covering ``size`` (≥ patch), neighbours sharing ≥ ``overlap``.

    Tiles start at multiples of :func:`tile_stride`, the last one flush with the far end. Anchored
    at 0, the grid of a volume cropped at a multiple of the stride is the same grid (see
    :class:`model.grid.ModelGrid`), so the crop leaves every tile that reaches the body as it was.
    """
    if size <= patch:
        return [0]
    stride = tile_stride(patch, overlap)
    return [*range(0, size - patch, stride), size - patch]


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
    """``array`` padded at the far ends with ``value`` to at least ``shape``, and the crop that undoes it.

    ``array`` itself (no copy: a total-body volume is large) when it already has that size.
    """
    pads = [(0, max(m - n, 0)) for n, m in zip(array.shape, shape, strict=True)]
    crop = tuple(slice(0, n) for n in array.shape)
    if not any(after for _, after in pads):
        return array, crop
    return np.pad(array, pads, constant_values=value), crop


Window = tuple[slice, slice, slice]


def tile_windows(corners: list[tuple[int, int, int]], size: tuple[int, int, int]) -> list[Window]:
    """The index windows of tiles of ``size`` starting at ``corners``."""
    return [tuple(slice(c, c + s) for c, s in zip(corner, size, strict=True)) for corner in corners]  # type: ignore[misc]


def body_mask(
    pet: np.ndarray | None,
    ct_hu: np.ndarray | None = None,
    *,
    air_hu: float = -900.0,
    pet_limit: float | None = None,
) -> np.ndarray:
    """The voxels a tile needs to hold for :func:`run_tiled` to run it, voxel by voxel: the one rule
    that :func:`split_air`, :func:`split_air_by_ct` and the crop to the body all follow.

    Without a CT (or ``air_hu``'s rule off: pass no CT) that is any non-zero PET (:func:`split_air`);
    with one, CT above ``air_hu`` or, with ``pet`` and ``pet_limit``, PET at or above it
    (:func:`split_air_by_ct`). A tile holding none of these voxels is kept as it is, so cropping a
    volume to their bounding box (plus a tile's margin) changes no tile that runs.
    """
    if ct_hu is None:
        if pet is None:
            raise ValueError("body_mask needs a PET or a CT")
        return pet != 0
    body = ct_hu > air_hu
    if pet is not None and pet_limit is not None:
        body |= pet >= pet_limit
    return body


def split_by_mask(mask: np.ndarray, windows: list[Window]) -> tuple[list[Window], list[Window]]:
    """``(busy, air)``: the windows holding any voxel of ``mask`` (a :func:`body_mask`), and the others."""
    busy: list[Window] = []
    air: list[Window] = []
    for w in windows:
        (busy if mask[w].any() else air).append(w)
    return busy, air


def split_air(x: np.ndarray, windows: list[Window]) -> tuple[list[Window], list[Window]]:
    """``(busy, air)``: the windows of ``x`` holding any non-zero voxel, and those of pure air.

    A tile of pure air (no activity at all) has nothing to enhance, and a whole-body FOV is mostly air
    around the patient: enhancers keep such tiles as they are instead of running the network on them.
    """
    return split_by_mask(body_mask(x), windows)


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
    return split_by_mask(body_mask(pet, ct_hu, air_hu=air_hu, pet_limit=pet_limit), windows)


#: ``run_batch(pet_tiles, ct_tiles)``: ``(B, *tile)`` float32 arrays (``ct_tiles`` None without a CT)
#: in, the ``(B, *tile)`` enhanced tiles out.
BatchFn = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]


@dataclass(frozen=True)
class CTAir:
    """When a tile counts as air by the CT (see :func:`split_air_by_ct`)."""

    air_hu: float
    pet_limit: float | None  # in the units of the array that is tiled


@dataclass(frozen=True)
class Tiled:
    """What :func:`run_tiled` returns: the blended volume and how many tiles ran and were skipped."""

    volume: np.ndarray
    tiles: int
    run: int
    skipped_air: int

    @property
    def counts(self) -> dict[str, int]:
        return {"tiles": self.tiles, "run": self.run, "skipped_air": self.skipped_air}


def run_tiled(
    x: np.ndarray,
    run_batch: BatchFn,
    *,
    tile: tuple[int, int, int],
    overlap: float,
    batch_size: int,
    ct: np.ndarray | None = None,
    ct_air: CTAir | None = None,
    pad_hu: float = AIR_HU,
    progress: Callable[[float, str], None] | None = None,
    stage: str = "tiles",
) -> Tiled:
    """Enhance ``x`` (``(z, y, x)``) tile by tile with ``run_batch``; returns it blended, same shape.

    ``x`` is padded with 0 (air) and ``ct`` with ``pad_hu`` up to at least one ``tile``; tiles
    overlapping by ≈ ``overlap`` are blended with :func:`gaussian_weights` (a single tile with weight 1).
    Tiles of pure air (:func:`split_air`) and, with ``ct_air`` and a CT, tiles outside the patient
    (:func:`split_air_by_ct`) are kept as they are; the others go through ``run_batch``
    ``batch_size`` at a time, in tile order, and ``progress(done / tiles, stage)`` follows each batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, found {batch_size}")
    padded_shape = tuple(max(n, t) for n, t in zip(x.shape, tile, strict=True))
    x_pad, crop = pad_to_shape(x, padded_shape, 0.0)
    ct_pad = pad_to_shape(ct, padded_shape, pad_hu)[0] if ct is not None else None
    starts = [tile_starts(n, t, overlap) for n, t in zip(padded_shape, tile, strict=True)]
    corners = [(z, y, x) for z in starts[0] for y in starts[1] for x in starts[2]]
    weights = gaussian_weights(tile) if len(corners) > 1 else np.ones(tile, dtype=np.float32)
    blend = Blender(padded_shape, weights)
    busy, air = split_air(x_pad, tile_windows(corners, tile))
    if ct_air is not None and ct_pad is not None and len(corners) > 1:
        busy, outside = split_air_by_ct(
            ct_pad, busy, air_hu=ct_air.air_hu, pet=x_pad, pet_limit=ct_air.pet_limit
        )
        air += outside
    for w in air:  # kept as they are: nothing there to enhance
        blend.add(w, x_pad[w])
    done = len(air)
    for i in range(0, len(busy), batch_size):
        windows = busy[i : i + batch_size]
        cts = np.stack([ct_pad[w] for w in windows]) if ct_pad is not None else None
        out = run_batch(np.stack([x_pad[w] for w in windows]), cts)
        for w, o in zip(windows, out, strict=True):
            blend.add(w, o)
        done += len(windows)
        if progress:
            progress(done / len(corners), stage)
    return Tiled(blend.result()[crop], tiles=len(corners), run=len(busy), skipped_air=len(air))
