"""Building blocks of the PET/CT phantom: smooth random fields and implicit shapes on a voxel grid.

Shapes are evaluated only inside their bounding box (a slice of the grid), so painting a small organ
into a 160×256×256 volume costs what the organ's box costs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["BodyGrid", "smooth_field"]


def smooth_field(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    spacing_mm: tuple[float, float, float],
    corr_mm: float,
) -> np.ndarray:
    """A smooth random field of zero mean and unit standard deviation, correlated over ``corr_mm``.

    White noise on a coarse grid of step ``corr_mm``, blurred by one coarse cell and interpolated
    trilinearly onto ``shape``: cheap (one interpolation) and free of per-voxel loops.
    """
    coarse = [max(2, math.ceil(n * s / corr_mm) + 3) for n, s in zip(shape, spacing_mm, strict=True)]
    noise = torch.from_numpy(rng.standard_normal(coarse).astype(np.float32))[None, None]
    kernel = torch.tensor([0.25, 0.5, 0.25])
    for axis in range(3):  # separable [1 2 1]/4 blur on the coarse grid
        view = [1, 1, 1]
        view[axis] = 3
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = 1
        noise = F.conv3d(F.pad(noise, pad, mode="replicate"), kernel.view(1, 1, *view))
    # Drop the border cells (their blur saw replicated values), then interpolate onto the grid.
    field = F.interpolate(noise[:, :, 1:-1, 1:-1, 1:-1], size=shape, mode="trilinear", align_corners=False)[
        0, 0
    ]
    field = field.numpy()
    field -= field.mean()
    field /= max(float(field.std()), 1e-6)
    return field.astype(np.float32)


@dataclass
class BodyGrid:
    """Voxel grid with 1D body coordinates (mm) per axis.

    ``x``: patient right → left (+), ``y``: anterior → posterior (+), both from the body axis;
    ``z``: height above the pubic symphysis in reference-anatomy mm (superior +). ``scale`` maps body
    mm to grid mm (< 1 when a small grid holds a shrunken body).
    """

    z: np.ndarray
    y: np.ndarray
    x: np.ndarray
    scale: float

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.z), len(self.y), len(self.x))

    def box(
        self, center: tuple[float, float, float], radius: tuple[float, float, float]
    ) -> tuple[slice, ...] | None:
        """The grid slices covering ``center ± radius`` (z, y, x) in body mm, or None if outside."""
        out = []
        for coords, c, r in zip((self.z, self.y, self.x), center, radius, strict=True):
            lo = int(np.searchsorted(coords, c - r, side="left"))
            hi = int(np.searchsorted(coords, c + r, side="right"))
            if hi <= lo:
                return None
            out.append(slice(lo, hi))
        return tuple(out)

    def local(self, box: tuple[slice, ...], center: tuple[float, float, float]) -> tuple[np.ndarray, ...]:
        """Broadcastable offsets ``(dz, dy, dx)`` from ``center`` inside ``box``."""
        dz = (self.z[box[0]] - center[0])[:, None, None]
        dy = (self.y[box[1]] - center[1])[None, :, None]
        dx = (self.x[box[2]] - center[2])[None, None, :]
        return dz, dy, dx

    def ellipsoid(
        self,
        center: tuple[float, float, float],
        semi: tuple[float, float, float],
        *,
        angle_deg: float = 0.0,
        field: np.ndarray | None = None,
        roughness: float = 0.0,
    ) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray] | None:
        """An ellipsoid (semi-axes z, y, x; rotated in-plane by ``angle_deg``) with its boundary
        deformed by ``roughness × field``. Returns ``(box, mask, level)`` where ``level`` is the implicit
        value (< 1 inside, 0 at the centre), or None when the shape misses the grid."""
        reach = max(semi[1], semi[2]) * (1 + roughness)
        box = self.box(center, (semi[0] * (1 + roughness), reach, reach))
        if box is None:
            return None
        dz, dy, dx = self.local(box, center)
        phi = math.radians(angle_deg)
        u = dx * math.cos(phi) + dy * math.sin(phi)
        v = -dx * math.sin(phi) + dy * math.cos(phi)
        level = (dz / semi[0]) ** 2 + (v / semi[1]) ** 2 + (u / semi[2]) ** 2
        if field is not None and roughness > 0:
            level = level + roughness * field[box]
        mask = level < 1.0
        return box, mask, level

    def elliptic_cylinder(
        self,
        center_yx: tuple[float, float],
        semi_yx: tuple[float, float],
        z_range: tuple[float, float],
    ) -> tuple[tuple[slice, ...], np.ndarray, np.ndarray] | None:
        """A cylinder along z between ``z_range`` (body mm); returns ``(box, mask, in-plane level)``."""
        mid = (z_range[0] + z_range[1]) / 2
        box = self.box(
            (mid, center_yx[0], center_yx[1]), ((z_range[1] - z_range[0]) / 2, semi_yx[0], semi_yx[1])
        )
        if box is None:
            return None
        _, dy, dx = self.local(box, (mid, *center_yx))
        level = (dy / semi_yx[0]) ** 2 + (dx / semi_yx[1]) ** 2
        level = np.broadcast_to(level, (box[0].stop - box[0].start, *level.shape[1:]))
        return box, level < 1.0, level
