"""Separable Gaussian filters in torch, specified by FWHM in mm (PSF modelling and post-filters)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["FWHM_PER_SIGMA", "gaussian_kernel1d", "gaussian_filter_axial", "gaussian_filter_inplane"]

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))  # ≈ 2.3548


def gaussian_kernel1d(fwhm_mm: float, spacing_mm: float, *, device=None) -> torch.Tensor:
    """Normalised 1D Gaussian taps (float32) of ``fwhm_mm`` sampled every ``spacing_mm``, ±3σ wide."""
    if fwhm_mm <= 0 or spacing_mm <= 0:
        raise ValueError(f"fwhm_mm and spacing_mm must be positive, found {fwhm_mm} and {spacing_mm}")
    sigma = fwhm_mm / FWHM_PER_SIGMA / spacing_mm
    radius = max(1, math.ceil(3.0 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    return (kernel / kernel.sum()).to(device=device, dtype=torch.float32)


def _filter_last(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Convolve along the last axis of ``x`` (any shape) with a symmetric ``kernel``."""
    shape = x.shape
    flat = x.reshape(-1, 1, shape[-1])
    radius = kernel.numel() // 2
    if mode == "zeros":
        out = F.conv1d(flat, kernel.view(1, 1, -1), padding=radius)
    else:
        # Replicate padding needs at least one sample; reflect would need radius < length.
        out = F.conv1d(F.pad(flat, (radius, radius), mode="replicate"), kernel.view(1, 1, -1))
    return out.reshape(shape)


def gaussian_filter_inplane(
    image: torch.Tensor, fwhm_mm: float, pixel_size_mm: float, *, mode: str = "replicate"
) -> torch.Tensor:
    """Gaussian blur over the last two axes of ``image (..., H, W)``.

    ``mode="zeros"`` gives a symmetric (self-adjoint) operator, as PSF modelling inside OSEM needs;
    ``"replicate"`` keeps edge values of a patch from being dragged towards zero (post-filters).
    A non-positive ``fwhm_mm`` returns the image unchanged.
    """
    if fwhm_mm <= 0:
        return image
    if mode not in ("zeros", "replicate"):
        raise ValueError(f"mode must be 'zeros' or 'replicate', found {mode!r}")
    kernel = gaussian_kernel1d(fwhm_mm, pixel_size_mm, device=image.device).to(image.dtype)
    out = _filter_last(image, kernel, mode)
    return _filter_last(out.transpose(-1, -2), kernel, mode).transpose(-1, -2)


def gaussian_filter_axial(
    volume: torch.Tensor, fwhm_mm: float, spacing_mm: float, *, mode: str = "replicate"
) -> torch.Tensor:
    """Gaussian blur along axis -3 (z) of ``volume (..., Z, H, W)``; non-positive FWHM: unchanged."""
    if fwhm_mm <= 0 or volume.shape[-3] < 2:
        return volume
    kernel = gaussian_kernel1d(fwhm_mm, spacing_mm, device=volume.device).to(volume.dtype)
    moved = volume.movedim(-3, -1)
    return _filter_last(moved.contiguous(), kernel, mode).movedim(-1, -3)
