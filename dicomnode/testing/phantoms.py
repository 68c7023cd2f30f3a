"""Small synthetic PET/CT volumes for the tests and the benchmarks (benchmarks/latency.py).

:func:`tiny_phantom`: a body ellipse with a warmer "liver", cold "lungs" and two hot spheres; activity
in Bq/ml, CT in HU, on a 2 mm grid. Small enough for the diffusion-model tests to run in seconds on
two CPU cores.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["tiny_phantom"]


def tiny_phantom(seed: int = 0, shape: tuple[int, int, int] = (24, 48, 48)) -> tuple[np.ndarray, np.ndarray]:
    """``(pet_bqml, ct_hu)`` float32 ``(z, y, x)`` arrays on a 2 mm grid."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    z, y, x = np.mgrid[:nz, :ny, :nx].astype(np.float32)
    cy, cx = ny / 2 + rng.uniform(-2, 2), nx / 2 + rng.uniform(-2, 2)
    ry, rx = ny * rng.uniform(0.32, 0.4), nx * rng.uniform(0.4, 0.46)
    body = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1
    lungs = body & (np.abs(x - cx) > 0.2 * rx) & (np.abs(x - cx) < 0.7 * rx) & (y < cy) & (z < nz / 2)
    liver = body & (x > cx) & (y > cy) & (z >= nz / 2)
    pet = np.where(body, 4000.0, 0.0)
    pet[lungs] = 800.0
    pet[liver] = 7000.0
    ct = np.where(body, 40.0, -1000.0)
    ct[lungs] = -800.0
    ct[liver] = 60.0
    for _ in range(2):
        c = (
            rng.uniform(4, nz - 4),
            rng.uniform(cy - ry / 2, cy + ry / 2),
            rng.uniform(cx - rx / 2, cx + rx / 2),
        )
        r = rng.uniform(1.5, 3.0)
        pet[(z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 < r**2] = rng.uniform(15000, 30000)
    pet = ndimage.gaussian_filter(pet, 1.0)
    return pet.astype(np.float32), ct.astype(np.float32)
