"""Label volumes from a :class:`Phantom` on a voxel grid, with sub-voxel sampling for partial volume."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.evaluation.transfer.phantom import Phantom

__all__ = ["Grid", "block_mean", "rasterise"]


@dataclass(frozen=True)
class Grid:
    """A (z, y, x) voxel grid: ``shape``, ``spacing_mm`` (z, y, x) and ``origin_mm`` = the patient
    position (x, y, z) of voxel [0, 0, 0]'s centre."""

    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]

    @classmethod
    def centred(cls, matrix: int, pixel_mm: float, n_slices: int, slice_mm: float, z_low_mm: float) -> Grid:
        """A square in-plane grid centred on x = y = 0 whose first slice is centred at ``z_low_mm``."""
        half = (matrix - 1) / 2.0 * pixel_mm
        return cls((n_slices, matrix, matrix), (slice_mm, pixel_mm, pixel_mm), (-half, -half, z_low_mm))

    def axis_mm(self, axis: int, supersample: int = 1) -> np.ndarray:
        """Sample positions along ``axis`` (0 = z, 1 = y, 2 = x), ``supersample`` per voxel, centred in it."""
        n, d = self.shape[axis], self.spacing_mm[axis]
        start = self.origin_mm[2 - axis]
        offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
        return (start + (np.arange(n)[:, None] + offsets[None, :]) * d).ravel()


def rasterise(phantom: Phantom, grid: Grid, supersample: tuple[int, int, int]) -> np.ndarray:
    """Label volume of shape ``grid.shape × supersample`` (int16): each solid painted in order."""
    z, y, x = (grid.axis_mm(axis, s) for axis, s in enumerate(supersample))
    labels = np.zeros((len(z), len(y), len(x)), dtype=np.int16)
    for label, shape in phantom.solids:
        (x0, x1), (y0, y1), (z0, z1) = shape.bounds()
        iz = slice(*np.searchsorted(z, [z0, z1]))
        iy = slice(*np.searchsorted(y, [y0, y1]))
        ix = slice(*np.searchsorted(x, [x0, x1]))
        if iz.start == iz.stop or iy.start == iy.stop or ix.start == ix.stop:
            continue
        inside = shape.inside(x[None, None, ix], y[None, iy, None], z[iz, None, None])
        labels[iz, iy, ix][inside] = label
    return labels


def block_mean(volume: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Mean over non-overlapping ``factors`` blocks (float32): fine samples back to voxels."""
    fz, fy, fx = factors
    nz, ny, nx = (n // f for n, f in zip(volume.shape, factors, strict=True))
    blocks = volume.reshape(nz, fz, ny, fy, nx, fx).astype(np.float32)
    return blocks.mean(axis=(1, 3, 5))
