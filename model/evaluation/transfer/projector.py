"""A 2D parallel-beam rotate-and-sum projector applied slice by slice to a (z, y, x) stack.

The view at angle θ rotates each slice by θ about its centre with bilinear interpolation and sums
the rotated slice along y: a sinogram ``(z, angle, bin)`` whose bins are the image's x pixels, values
in mm × image units (line integrals). Rotating hundreds of slices per view is slow, so each view's
rotate-then-sum is written out once as its bilinear weights (a sparse operator over the slice's
pixels); :meth:`RotateSumProjector.back` multiplies by the transpose of the very same weights, so it
is the exact adjoint. Only the field of view's inscribed circle is imaged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

__all__ = ["RotateSumProjector"]


class RotateSumProjector:
    """Rotate-and-sum projector for square ``matrix`` × ``matrix`` slices of ``pixel_mm`` pixels."""

    def __init__(self, matrix: int, pixel_mm: float, n_angles: int) -> None:
        if matrix < 2 or pixel_mm <= 0 or n_angles < 1:
            raise ValueError(f"need matrix >= 2, pixel_mm > 0, n_angles >= 1; found {matrix}, {pixel_mm}, "
                             f"{n_angles}")
        self.matrix = matrix
        self.pixel_mm = float(pixel_mm)
        self.angles_deg = np.arange(n_angles) * (180.0 / n_angles)
        centre = (matrix - 1) / 2.0
        yy, xx = np.mgrid[:matrix, :matrix]
        self.fov_mask = (yy - centre) ** 2 + (xx - centre) ** 2 <= (matrix / 2.0) ** 2
        self._all = self._build()
        self._subsets: dict[tuple[int, ...], sp.csr_matrix] = {}

    @property
    def n_angles(self) -> int:
        return len(self.angles_deg)

    def _build(self) -> sp.csr_matrix:
        """Rows (view, bin), columns input pixels y·N + x: the bilinear weights of rotate-then-sum."""
        n = self.matrix
        centre = (n - 1) / 2.0
        yo, xo = np.nonzero(self.fov_mask)  # outputs outside the circle only ever see zeros
        dy, dx = yo - centre, xo - centre
        rows, cols, weights = [], [], []
        for view, theta in enumerate(np.radians(self.angles_deg)):
            # The rotated slice at (yo, xo) samples the input at the point rotated back by θ.
            yi = centre + np.cos(theta) * dy - np.sin(theta) * dx
            xi = centre + np.sin(theta) * dy + np.cos(theta) * dx
            y0, x0 = np.floor(yi).astype(np.int64), np.floor(xi).astype(np.int64)
            fy, fx = yi - y0, xi - x0
            for oy, ox, w in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx),
                              (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
                py, px = y0 + oy, x0 + ox
                ok = (py >= 0) & (py < n) & (px >= 0) & (px < n) & (w > 0)
                ok[ok] &= self.fov_mask[py[ok], px[ok]]
                rows.append(view * n + xo[ok])
                cols.append(py[ok] * n + px[ok])
                weights.append(w[ok])
        matrix = sp.coo_matrix((np.concatenate(weights).astype(np.float32),
                                (np.concatenate(rows), np.concatenate(cols))),
                               shape=(self.n_angles * n, n * n))
        return matrix.tocsr()

    def _operator(self, views: Sequence[int] | None) -> tuple[sp.csr_matrix, int]:
        if views is None:
            return self._all, self.n_angles
        key = tuple(int(v) for v in views)
        if key not in self._subsets:
            rows = (np.asarray(key)[:, None] * self.matrix + np.arange(self.matrix)[None, :]).ravel()
            self._subsets[key] = self._all[rows]
        return self._subsets[key], len(key)

    def forward(self, image: np.ndarray, views: Sequence[int] | None = None) -> np.ndarray:
        """Line integrals of ``image`` (z, y, x) at ``views`` (indices into the angles; all if None)."""
        n = self.matrix
        if image.ndim != 3 or image.shape[1:] != (n, n):
            raise ValueError(f"image must be (z, {n}, {n}), found {image.shape}")
        op, count = self._operator(views)
        flat = np.ascontiguousarray(image.reshape(image.shape[0], n * n).T, dtype=np.float32)
        sino = (op @ flat).reshape(count, n, image.shape[0]).transpose(2, 0, 1)
        return np.ascontiguousarray(sino, dtype=np.float32) * np.float32(self.pixel_mm)

    def back(self, sino: np.ndarray, views: Sequence[int] | None = None) -> np.ndarray:
        """The exact adjoint of :meth:`forward`: ``sino`` (z, len(views), bins) back into (z, y, x)."""
        n = self.matrix
        op, count = self._operator(views)
        if sino.ndim != 3 or sino.shape[1:] != (count, n):
            raise ValueError(f"sinogram must be (z, {count}, {n}), found {sino.shape}")
        flat = sino.transpose(1, 2, 0).reshape(count * n, sino.shape[0])
        flat = np.ascontiguousarray(flat, dtype=np.float32)
        image = (op.T @ flat).T.reshape(sino.shape[0], n, n)
        return np.ascontiguousarray(image, dtype=np.float32) * np.float32(self.pixel_mm)
