"""Reconstruction of the transfer set's sinograms: FBP (ramp × Hann/Butterworth) and OSEM/MLEM.

The data model is ``counts ~ Poisson(kappa · att · A·x + background)`` per sinogram bin, with ``A`` the
:class:`RotateSumProjector`, ``att`` the attenuation factors exp(−∫μ), ``kappa`` the counts per unit
line integral and ``background`` the scatter + randoms expectation (known exactly to the
reconstruction). Both algorithms return the activity in the units of ``x`` (Bq/ml here).
"""

from __future__ import annotations

import math

import numpy as np

from model.evaluation.transfer.filters import gaussian_fwhm
from model.evaluation.transfer.projector import RotateSumProjector
from model.evaluation.transfer.styles import Reconstruction

__all__ = ["SinogramModel", "fbp", "osem", "reconstruct"]


class SinogramModel:
    """What the reconstruction knows of an acquisition: projector, attenuation, scale and background."""

    def __init__(self, projector: RotateSumProjector, att: np.ndarray, kappa: float, background: np.ndarray,
                 spacing_mm: tuple[float, float, float]) -> None:
        if att.shape != background.shape:
            raise ValueError(f"attenuation {att.shape} and background {background.shape} differ in shape")
        if kappa <= 0:
            raise ValueError(f"kappa must be positive, found {kappa}")
        self.projector = projector
        self.att = att.astype(np.float32)
        self.kappa = float(kappa)
        self.background = background.astype(np.float32)
        self.spacing_mm = spacing_mm


def _window(freq: np.ndarray, recon: Reconstruction) -> np.ndarray:
    nyquist = float(np.abs(freq).max())
    cutoff = recon.cutoff * nyquist
    rel = np.abs(freq) / cutoff
    if recon.window == "ramp":
        return (rel <= 1).astype(float)
    if recon.window == "hann":
        return np.where(rel <= 1, 0.5 * (1 + np.cos(np.pi * rel)), 0.0)
    return 1.0 / (1.0 + rel ** (2 * recon.butterworth_order))


def _ramp(size: int, pixel_mm: float) -> np.ndarray:
    """The ramp |ν| as the DFT of its band-limited spatial kernel (Kak & Slaney, eq. 3.61): sampling |ν|
    directly would zero the DC term and lose a few per cent of the image's level."""
    k = np.fft.fftfreq(size, d=1.0 / size)  # integer offsets 0, 1, …, −1, circularly
    h = np.zeros(size)
    h[k == 0] = 1.0 / (4.0 * pixel_mm**2)
    odd = np.mod(k, 2) == 1
    h[odd] = -1.0 / (np.pi * k[odd] * pixel_mm) ** 2
    return np.real(np.fft.rfft(h)) * pixel_mm  # × pixel size: the discrete convolution's ds


def fbp(counts: np.ndarray, model: SinogramModel, recon: Reconstruction) -> np.ndarray:
    """Filtered back projection of background-subtracted, attenuation- and scale-corrected counts.

    Each view is zero-padded to twice its length (no wrap-around), filtered by |ν|·window(ν) and back
    projected; the π/n_angles factor makes the sum over views the integral over [0, π).
    """
    proj = model.projector
    corrected = (counts.astype(np.float32) - model.background) / (model.kappa * model.att)
    n = proj.matrix
    freq = np.fft.rfftfreq(2 * n, d=proj.pixel_mm)
    kernel = (_ramp(2 * n, proj.pixel_mm) * _window(freq, recon)).astype(np.float32)
    filtered = np.fft.irfft(np.fft.rfft(corrected, n=2 * n, axis=-1) * kernel, n=2 * n, axis=-1)[..., :n]
    # back() is the adjoint (× pixel size); FBP wants the plain sum over views, hence the division.
    image = proj.back(filtered.astype(np.float32)) * np.float32(math.pi / proj.n_angles / proj.pixel_mm)
    return gaussian_fwhm(image, recon.postfilter_fwhm_mm, model.spacing_mm)


def osem(counts: np.ndarray, model: SinogramModel, recon: Reconstruction) -> np.ndarray:
    """OSEM (MLEM when one subset) with an optional resolution model and blob-like basis.

    Subsets are interleaved views. With a PSF and/or a basis kernel the system is ``A·G`` where ``G`` is
    one Gaussian of the combined width; the unknowns are the basis coefficients and the image is
    ``B·c`` (``B`` the basis kernel alone), then post-filtered.
    """
    proj = model.projector
    spacing = model.spacing_mm
    sigma2 = (recon.psf_fwhm_mm**2 + recon.basis_fwhm_mm**2)
    system_fwhm = math.sqrt(sigma2)  # FWHMs of Gaussians add in quadrature, like their variances

    def blur(v: np.ndarray) -> np.ndarray:
        return gaussian_fwhm(v, system_fwhm, spacing) if system_fwhm > 0 else v

    subsets = [np.arange(s, proj.n_angles, recon.subsets) for s in range(recon.subsets)]
    weights = [model.kappa * model.att[:, views] for views in subsets]
    sensitivity = [blur(proj.back(w, views)) for w, views in zip(weights, subsets, strict=True)]
    start = np.where(proj.fov_mask, _initial_level(counts, model), 0.0).astype(np.float32)
    coeff = np.repeat(start[None], counts.shape[0], axis=0)
    data = counts.astype(np.float32)
    for _ in range(recon.iterations):
        for views, w, sens in zip(subsets, weights, sensitivity, strict=True):
            expected = w * proj.forward(blur(coeff), views) + model.background[:, views]
            ratio = data[:, views] / np.maximum(expected, 1e-6)
            update = blur(proj.back(w * ratio, views))
            seen = sens > 1e-6 * sens.max()
            coeff *= np.where(seen, update / np.maximum(sens, 1e-12), 0).astype(np.float32)
    image = gaussian_fwhm(coeff, recon.basis_fwhm_mm, spacing) if recon.basis_fwhm_mm else coeff
    return gaussian_fwhm(image, recon.postfilter_fwhm_mm, spacing)


def _initial_level(counts: np.ndarray, model: SinogramModel) -> float:
    """A uniform start whose projection carries the measured trues (any positive start converges)."""
    proj = model.projector
    trues = max(float(counts.sum() - model.background.sum()), 1.0)
    ones = proj.forward(np.ones((1, proj.matrix, proj.matrix), np.float32))
    per_unit = model.kappa * float((model.att * ones).sum())
    return trues / per_unit


def reconstruct(counts: np.ndarray, model: SinogramModel, recon: Reconstruction) -> np.ndarray:
    """``counts`` (z, angle, bin) reconstructed as ``recon`` says; float32 (z, y, x), zero outside the FOV."""
    if counts.shape != model.background.shape:
        raise ValueError(f"counts {counts.shape} do not match the sinogram model {model.background.shape}")
    image = fbp(counts, model, recon) if recon.algorithm == "fbp" else osem(counts, model, recon)
    image[:, ~model.projector.fov_mask] = 0
    return image.astype(np.float32)
