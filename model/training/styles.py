"""Scanner styles the training forward process draws from, and the native grid each one implies.

A site's LPET is not reconstructed on the model's 2 mm grid: scanners ship 2–5.5 mm pixels and
2–4 mm slices, FBP or OSEM with or without PSF, post-filters of 0–7 mm, at count levels that differ by
a factor of ten between protocols, and the node resamples that image linearly onto the model grid
(:func:`model.grid.resample_onto`). A denoiser trained only on 2 mm noise meets a grain 2–3× coarser
there than anything it has seen. So each training slab is made the way a site's image is:

1. the 2 mm SPET slab is brought to a **native grid** of the style (:func:`to_native`: box-integrated,
   as a coarser reconstruction sees the activity);
2. the dose-``d`` acquisition is made **on that grid** (projector of that pixel size, that slice
   thickness, reconstruction and count level);
3. clean and noisy native slabs go back onto the model grid by **linear interpolation**
   (:func:`to_model_grid`), as inference does; the clean one is the training target, so the model
   restores what that scanner's standard dose would show, not a 2 mm image it never had.

Nothing here depends on the transfer set's generator (``model/evaluation/transfer``), which must stay
apart from training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["ScannerStyle", "draw_style", "native_shape", "to_model_grid", "to_native"]

#: In-plane pixels (mm) scanners reconstruct at; a short list so projectors are built once each.
PIXELS_MM = (2.0, 2.7, 3.3, 4.0, 4.7, 5.5)
#: Slice thicknesses (mm).
SLICES_MM = (2.0, 3.0, 4.0)


@dataclass(frozen=True)
class ScannerStyle:
    """How one training slab is acquired and reconstructed.

    ``recon`` is a :class:`model.physics.ReconSettings`; ``count_scale`` multiplies the case's frame
    duration (the standard-dose count level of the protocol).
    """

    pixel_mm: float
    slice_mm: float
    recon: object
    count_scale: float

    @property
    def name(self) -> str:
        return f"{self.pixel_mm:g}x{self.slice_mm:g}mm-{self.recon.name}-c{self.count_scale:.2g}"


def draw_style(rng: np.random.Generator) -> ScannerStyle:
    """A random style: grid, FBP (Hann 0.5–1) or OSEM (2–4 iterations, PSF or not), post-filter 0–7 mm,
    count level log-uniform over a factor of 10 around the case's own."""
    from model.physics import ReconAlgorithm, ReconSettings

    postfilter = float(rng.uniform(0.0, 7.0))
    if rng.random() < 0.5:
        recon = ReconSettings(
            algorithm=ReconAlgorithm.FBP,
            fbp_cutoff=float(rng.uniform(0.5, 1.0)),
            postfilter_fwhm_mm=postfilter,
        )
    else:
        recon = ReconSettings(
            algorithm=ReconAlgorithm.OSEM,
            iterations=int(rng.integers(2, 5)),
            subsets=8,
            psf_fwhm_mm=float(rng.choice((0.0, 4.0))),
            postfilter_fwhm_mm=postfilter,
        )
    return ScannerStyle(
        pixel_mm=float(rng.choice(PIXELS_MM)),
        slice_mm=float(rng.choice(SLICES_MM)),
        recon=recon,
        count_scale=float(math.exp(rng.uniform(math.log(1 / 3.3), math.log(3.3)))),
    )


def _factors(grid_mm: float, style: ScannerStyle) -> tuple[float, float, float]:
    """Native voxel size over model voxel size, per axis (z, y, x)."""
    return (style.slice_mm / grid_mm, style.pixel_mm / grid_mm, style.pixel_mm / grid_mm)


def native_shape(shape: tuple[int, ...], grid_mm: float, style: ScannerStyle) -> tuple[int, int, int]:
    """The native grid covering the same extent as ``shape`` model voxels (at least 1 per axis)."""
    return tuple(max(1, int(round(n / f))) for n, f in zip(shape, _factors(grid_mm, style), strict=True))


def _coordinates(out_shape: tuple[int, ...], step: tuple[float, ...]) -> np.ndarray:
    """Index coordinates, in the input grid, of the centres of ``out_shape`` voxels ``step`` times
    the input's size, both grids starting at the same edge."""
    axes = [(np.arange(n) + 0.5) * s - 0.5 for n, s in zip(out_shape, step, strict=True)]
    return np.stack(np.meshgrid(*axes, indexing="ij"))


def to_native(slab: np.ndarray, grid_mm: float, style: ScannerStyle) -> np.ndarray:
    """``slab (z, y, x)`` on the model grid → the style's native grid.

    A native voxel integrates a box ``f`` model voxels wide: beyond the model voxel's own box that is
    an extra blur of variance (f² − 1)/12 voxels² per axis (a Gaussian of that variance), then the
    native centres are sampled linearly.
    """
    factors = _factors(grid_mm, style)
    sigma = [math.sqrt(max(f * f - 1.0, 0.0) / 12.0) for f in factors]
    smooth = ndimage.gaussian_filter(slab.astype(np.float32), sigma, mode="nearest")
    coords = _coordinates(native_shape(slab.shape, grid_mm, style), factors)
    return ndimage.map_coordinates(smooth, coords, order=1, mode="nearest").astype(np.float32)


def to_model_grid(
    native: np.ndarray, shape: tuple[int, ...], grid_mm: float, style: ScannerStyle
) -> np.ndarray:
    """A native-grid slab back onto ``shape`` model voxels by linear interpolation, as inference's
    resampling does (edges held, where inference would see the neighbouring slices)."""
    inverse = tuple(1.0 / f for f in _factors(grid_mm, style))
    coords = _coordinates(tuple(shape), inverse)
    return ndimage.map_coordinates(native.astype(np.float32), coords, order=1, mode="nearest")
