"""Parallel-beam 2D projector and its exact adjoint, as a sparse system matrix in torch.

Geometry (one axial slice of ``N × N`` square pixels of side ``pixel_size_mm``, centred on the scanner
axis): angles ``θ_k = k·π / n_angles``; a line of response at angle θ and signed distance ``s`` from the
centre is ``x cos θ + y sin θ = s``, with ``x`` along image columns and ``y`` along rows. Detector bins
have the pixel's width and cover the image's whole diagonal, so any square image (a whole slice or a
patch cut from one) projects completely.

System model (distance-driven footprint): a pixel seen at angle θ casts a box of width
``pixel·max(|cos θ|, |sin θ|)`` on the detector carrying its area ``pixel²``; a bin's value is that box's
overlap with the bin divided by the bin width. So a sinogram value is the line integral of the image
averaged over the bin: image in Bq/ml → sinogram in Bq/ml·mm, μ in 1/mm → dimensionless ``∫μ dl``.
Each pixel touches at most 3 bins per angle.

The matrix ``A`` is built once (numpy, float64 geometry, float32 weights) and stored in CSR form both as
``A`` and as its transpose ``Aᵀ``; :meth:`ParallelBeamProjector.adjoint` multiplies by the stored
transpose of the very same matrix, so ``<Ax, y> = <x, Aᵀy>`` holds to float32 rounding. For OSEM the
rows are split into interleaved angle subsets, each with its own pair, built on first use.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch

__all__ = ["ParallelBeamProjector", "default_n_angles", "get_projector"]

# Angle blocks built at a time: bounds the float64 temporaries for a 256² image to ~100 MB.
_ANGLE_BLOCK = 16


def default_n_angles(image_size: int) -> int:
    """Angles over 180° for an ``image_size`` slice: ``ceil(π/4 · N)``.

    Clinical scanners sample roughly 0.4–0.6 angles per radial bin (e.g. 168 angles × 400 bins); with
    ``≈ √2·N`` bins this gives 0.56, enough for OSEM and FBP without angular streaks inside the body.
    """
    return max(8, math.ceil(math.pi / 4 * image_size))


def _system_matrix_block(
    image_size: int, angles: np.ndarray, pixel_size_mm: float, n_bins: int
) -> sp.csr_matrix:
    """Rows ``(angle j, bin b) → j·n_bins + b`` for the given ``angles``; columns: pixels, row-major."""
    n = image_size
    p = pixel_size_mm
    centres = (np.arange(n) - (n - 1) / 2) * p
    y, x = np.meshgrid(centres, centres, indexing="ij")  # rows are y, columns are x
    x = x.reshape(-1, 1)
    y = y.reshape(-1, 1)
    cos, sin = np.cos(angles)[None], np.sin(angles)[None]
    s = x * cos + y * sin  # (pixels, angles) in mm
    half = p * np.maximum(np.abs(cos), np.abs(sin)) / 2  # half footprint width, mm
    lo, hi = s - half, s + half
    offset = n_bins / 2  # bin b spans [(b - offset)·p, (b - offset + 1)·p)
    first = np.floor(lo / p + offset).astype(np.int64)
    rows, cols, vals = [], [], []
    pixel_index = np.broadcast_to(np.arange(n * n)[:, None], s.shape)
    angle_index = np.broadcast_to(np.arange(len(angles))[None], s.shape)
    for k in range(3):  # a footprint of ≤ √2·p spans at most 3 bins of width p
        b = first + k
        edge = (b - offset) * p
        overlap = np.clip(np.minimum(hi, edge + p) - np.maximum(lo, edge), 0.0, None)
        weight = p * p * overlap / (2 * half) / p  # pixel area spread over the box, averaged over the bin
        keep = (overlap > 0) & (b >= 0) & (b < n_bins)
        rows.append((angle_index * n_bins + b)[keep])
        cols.append(pixel_index[keep])
        vals.append(weight[keep])
    matrix = sp.coo_matrix(
        (
            np.concatenate(vals).astype(np.float32),
            (np.concatenate(rows).astype(np.int32), np.concatenate(cols).astype(np.int32)),
        ),
        shape=(len(angles) * n_bins, n * n),
    )
    return matrix.tocsr()


def _to_torch_csr(matrix: sp.csr_matrix, device: torch.device) -> torch.Tensor:
    matrix.sort_indices()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(
            torch.from_numpy(matrix.indptr.astype(np.int32)),
            torch.from_numpy(matrix.indices.astype(np.int32)),
            torch.from_numpy(matrix.data.astype(np.float32)),
            size=matrix.shape,
            dtype=torch.float32,
        ).to(device)


class ParallelBeamProjector(torch.nn.Module):
    """``A``: image ``(..., N, N)`` → sinogram ``(..., n_angles, n_bins)``; :meth:`adjoint` is ``Aᵀ``.

    Batched over any leading dimensions (slices, patches) with one sparse matrix product per call.
    Float32 in and out; inputs are moved to the projector's ``device`` (fixed at construction: build
    another projector, or use :func:`get_projector`, for another device).
    """

    def __init__(
        self,
        image_size: int,
        *,
        n_angles: int | None = None,
        pixel_size_mm: float,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if image_size < 2:
            raise ValueError(f"image_size must be at least 2 pixels, found {image_size}")
        if pixel_size_mm <= 0:
            raise ValueError(f"pixel_size_mm must be positive, found {pixel_size_mm}")
        self.image_size = int(image_size)
        self.n_angles = int(n_angles) if n_angles is not None else default_n_angles(image_size)
        if self.n_angles < 1:
            raise ValueError(f"n_angles must be positive, found {self.n_angles}")
        self.pixel_size_mm = float(pixel_size_mm)
        self.bin_size_mm = self.pixel_size_mm
        # The diagonal plus one bin each side for the footprint's half width.
        self.n_bins = math.ceil(self.image_size * math.sqrt(2)) + 2
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        # Not a buffer: the sparse operators live on ``device`` and do not follow ``Module.to``.
        self.angles_rad = torch.arange(self.n_angles, dtype=torch.float64) * math.pi / self.n_angles
        # n_subsets -> list of (A_s, A_sᵀ) CSR pairs; A_s holds angles subset_angles(n_subsets)[s].
        self._ops: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    # -- subsets -------------------------------------------------------------------------------------
    def subset_angles(self, n_subsets: int) -> list[torch.Tensor]:
        """Angle indices of each OSEM subset: interleaved (``s, s + S, s + 2S, …``) so each subset
        samples the whole half circle."""
        if not 1 <= n_subsets <= self.n_angles:
            raise ValueError(f"n_subsets must be in 1..{self.n_angles} (the angles), found {n_subsets}")
        return [torch.arange(s, self.n_angles, n_subsets) for s in range(n_subsets)]

    def _subset_ops(self, n_subsets: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if n_subsets in self._ops:
            self._ops[n_subsets] = self._ops.pop(n_subsets)  # most recently used last
        else:
            # At most two splits (the full operator counts as one): a 256² split is ~400 MB.
            while len(self._ops) >= 2:
                del self._ops[next(iter(self._ops))]
            angles = self.angles_rad.cpu().numpy()
            pairs = []
            for idx in self.subset_angles(n_subsets):
                idx_np = idx.numpy()
                blocks = [
                    _system_matrix_block(
                        self.image_size, angles[idx_np[i : i + _ANGLE_BLOCK]], self.pixel_size_mm, self.n_bins
                    )
                    for i in range(0, len(idx_np), _ANGLE_BLOCK)
                ]
                matrix = sp.vstack(blocks, format="csr")
                pairs.append(
                    (_to_torch_csr(matrix, self.device), _to_torch_csr(matrix.T.tocsr(), self.device))
                )
            self._ops[n_subsets] = pairs
        return self._ops[n_subsets]

    # -- products ------------------------------------------------------------------------------------
    def _columns(self, tensor: torch.Tensor, tail: Sequence[int], what: str) -> tuple[torch.Tensor, tuple]:
        """``(..., *tail)`` → ``(prod(tail), batch)`` float32 on our device, and the leading shape."""
        if tuple(tensor.shape[-len(tail) :]) != tuple(tail):
            raise ValueError(
                f"expected {what} of shape (..., {', '.join(map(str, tail))}), found {tuple(tensor.shape)}"
            )
        lead = tuple(tensor.shape[: -len(tail)])
        flat = tensor.to(device=self.device, dtype=torch.float32).reshape(-1, math.prod(tail))
        return flat.T.contiguous(), lead

    def _cached_split(self) -> int:
        """A subset count whose operators exist (1 if none): the full ``A`` is the union of any split,
        so OSEM-only use never builds the full matrix too."""
        if 1 in self._ops or not self._ops:
            return 1
        return next(reversed(self._ops))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Project ``image (..., N, N)`` → ``(..., n_angles, n_bins)`` (line integrals, value·mm)."""
        n = self._cached_split()
        if n == 1:
            return self.forward_subset(image, 0, 1)
        parts = [self.forward_subset(image, s, n) for s in range(n)]
        out = parts[0].new_empty(*parts[0].shape[:-2], self.n_angles, self.n_bins)
        for idx, part in zip(self.subset_angles(n), parts, strict=True):
            out[..., idx.to(out.device), :] = part
        return out

    def adjoint(self, sinogram: torch.Tensor) -> torch.Tensor:
        """Back-project ``sinogram (..., n_angles, n_bins)`` → ``(..., N, N)``: exactly ``Aᵀ``."""
        n = self._cached_split()
        if n == 1:
            return self.adjoint_subset(sinogram, 0, 1)
        if sinogram.shape[-2:] != (self.n_angles, self.n_bins):
            expected = f"(..., {self.n_angles}, {self.n_bins})"
            raise ValueError(f"expected a sinogram of shape {expected}, found {tuple(sinogram.shape)}")
        sino = sinogram.to(self.device)
        out = None
        for s, idx in enumerate(self.subset_angles(n)):
            part = self.adjoint_subset(sino.index_select(-2, idx.to(sino.device)), s, n)
            out = part if out is None else out + part
        return out

    def forward_subset(self, image: torch.Tensor, subset: int, n_subsets: int) -> torch.Tensor:
        """``A_s x``: ``(..., N, N)`` → ``(..., len(subset_angles(n_subsets)[subset]), n_bins)``."""
        matrix, _ = self._subset_ops(n_subsets)[subset]
        cols, lead = self._columns(image, (self.image_size, self.image_size), "an image")
        out = torch.sparse.mm(matrix, cols)  # (angles_s·bins, batch)
        return out.T.reshape(*lead, -1, self.n_bins)

    def adjoint_subset(self, sinogram: torch.Tensor, subset: int, n_subsets: int) -> torch.Tensor:
        """``A_sᵀ y`` for a subset sinogram ``(..., angles in subset, n_bins)`` → ``(..., N, N)``."""
        _, transpose = self._subset_ops(n_subsets)[subset]
        n_sub = transpose.shape[1] // self.n_bins
        cols, lead = self._columns(sinogram, (n_sub, self.n_bins), "a subset sinogram")
        out = torch.sparse.mm(transpose, cols)  # (pixels, batch)
        return out.T.reshape(*lead, self.image_size, self.image_size)

    def extra_repr(self) -> str:
        return (
            f"image_size={self.image_size}, n_angles={self.n_angles}, n_bins={self.n_bins}, "
            f"pixel_size_mm={self.pixel_size_mm:g}, device={self.device}"
        )


_CACHE: dict[tuple[int, int, float, str], ParallelBeamProjector] = {}
_CACHE_MAX = 4


def get_projector(
    image_size: int,
    *,
    pixel_size_mm: float,
    n_angles: int | None = None,
    device: torch.device | str | None = None,
) -> ParallelBeamProjector:
    """A shared projector for this geometry (built once per process; building a 256² one takes seconds)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    angles = n_angles if n_angles is not None else default_n_angles(image_size)
    key = (int(image_size), int(angles), float(pixel_size_mm), str(dev))
    if key not in _CACHE:
        if len(_CACHE) >= _CACHE_MAX:
            del _CACHE[next(iter(_CACHE))]
        _CACHE[key] = ParallelBeamProjector(
            image_size, n_angles=angles, pixel_size_mm=pixel_size_mm, device=dev
        )
    return _CACHE[key]
