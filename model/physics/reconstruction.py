"""Reconstruction from parallel-beam count sinograms: FBP (ramp × Hann) and OSEM (non-negative).

Both take the measured counts ``y (..., n_angles, n_bins)`` and a linear data model
``E[y] = gain · A x + background``: ``gain`` (counts per unit line integral, e.g. counts per Bq/ml·mm,
including dose fraction and attenuation) and ``background`` (expected randoms + scatter counts) are
sinograms broadcastable to ``y``. The image ``x`` comes back in the units ``gain`` was given for
(Bq/ml for the physics module). :mod:`model.physics` builds ``gain`` and ``background`` from a
:class:`~model.physics.ScannerModel`; nothing here knows about doses or scanners.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import Enum

import torch

from model.physics.filters import gaussian_filter_inplane
from model.physics.projector import ParallelBeamProjector

__all__ = ["ReconAlgorithm", "ReconSettings", "fbp", "osem", "ramp_hann_filter"]

# Guards divisions in OSEM; counts and gains are O(1e-3 … 1e3), so this never biases a real value.
_EPS = 1e-12


class ReconAlgorithm(str, Enum):
    OSEM = "osem"
    FBP = "fbp"


@dataclass(frozen=True)
class ReconSettings:
    """How a scanner reconstructs: the knobs that set the noise texture.

    ``iterations``/``subsets`` apply to OSEM; ``psf_fwhm_mm`` > 0 models an in-plane Gaussian
    resolution kernel inside OSEM (resolution recovery); ``postfilter_fwhm_mm`` > 0 is a Gaussian
    post-filter (in-plane, and along z when a whole volume is reconstructed); ``fbp_cutoff`` is the
    Hann window's cut-off as a fraction of the Nyquist frequency.
    Defaults: a clinical-like OSEM, 3 iterations × 8 subsets, 4 mm post-filter.
    """

    algorithm: ReconAlgorithm = ReconAlgorithm.OSEM
    iterations: int = 3
    subsets: int = 8
    psf_fwhm_mm: float = 0.0
    postfilter_fwhm_mm: float = 4.0
    fbp_cutoff: float = 1.0

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "algorithm", ReconAlgorithm(self.algorithm))
        except ValueError:
            known = ", ".join(a.value for a in ReconAlgorithm)
            raise ValueError(
                f"ReconSettings.algorithm must be one of {known}, found {self.algorithm!r}"
            ) from None
        if self.iterations < 1:
            raise ValueError(f"ReconSettings.iterations must be ≥ 1, found {self.iterations}")
        if self.subsets < 1:
            raise ValueError(f"ReconSettings.subsets must be ≥ 1, found {self.subsets}")
        if self.psf_fwhm_mm < 0 or self.postfilter_fwhm_mm < 0:
            raise ValueError(
                f"ReconSettings FWHMs must be ≥ 0 mm, found psf {self.psf_fwhm_mm}, "
                f"post-filter {self.postfilter_fwhm_mm}"
            )
        if not 0 < self.fbp_cutoff <= 1:
            raise ValueError(f"ReconSettings.fbp_cutoff must be in (0, 1], found {self.fbp_cutoff}")

    @property
    def name(self) -> str:
        """A short stable label, e.g. ``osem-i3s8-psf0-pf4`` or ``fbp-hann1-pf5``."""
        if self.algorithm is ReconAlgorithm.FBP:
            return f"fbp-hann{self.fbp_cutoff:g}-pf{self.postfilter_fwhm_mm:g}"
        return f"osem-i{self.iterations}s{self.subsets}-psf{self.psf_fwhm_mm:g}-pf{self.postfilter_fwhm_mm:g}"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["algorithm"] = self.algorithm.value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> ReconSettings:
        return cls(**data)


# -- FBP ---------------------------------------------------------------------------------------------
def ramp_hann_filter(n_bins: int, bin_size_mm: float, cutoff: float = 1.0, *, device=None) -> torch.Tensor:
    """Frequency response (rfft layout, length ``n_pad//2 + 1``) of ramp × Hann for zero-padded rows.

    The ramp is the FFT of the band-limited spatial kernel (Kak & Slaney eq. 61: ``h(0) = 1/4τ²``,
    ``h(nτ) = −1/(nπτ)²`` for odd n, 0 for even), which has no DC error, unlike a sampled ``|f|``.
    """
    n_pad = max(64, 2 ** math.ceil(math.log2(2 * n_bins)))
    n = torch.cat([torch.arange(0, n_pad // 2 + 1), torch.arange(-(n_pad // 2) + 1, 0)]).to(torch.float64)
    tau = bin_size_mm
    kernel = torch.zeros(n_pad, dtype=torch.float64)
    kernel[0] = 1.0 / (4 * tau * tau)
    odd = (n.abs() % 2) == 1
    kernel[odd] = -1.0 / (math.pi * n[odd] * tau) ** 2
    ramp = torch.fft.rfft(kernel).real * tau  # ∫ … ds ≈ τ Σ
    freq = torch.fft.rfftfreq(n_pad)  # cycles per bin, Nyquist = 0.5
    f_c = 0.5 * cutoff
    window = torch.where(freq <= f_c, 0.5 * (1 + torch.cos(math.pi * freq / f_c)), torch.zeros_like(freq))
    return (ramp * window).to(device=device, dtype=torch.float32)


def fbp(
    counts: torch.Tensor,
    *,
    projector: ParallelBeamProjector,
    gain: torch.Tensor | float,
    background: torch.Tensor | float = 0.0,
    cutoff: float = 1.0,
) -> torch.Tensor:
    """Filtered back-projection of ``counts (..., A, S)`` → ``(..., N, N)``; may be negative.

    Corrects for background and gain (attenuation, dose) in the sinogram, filters each row with
    ramp × Hann and back-projects with ``Aᵀ`` normalised to ``∫₀^π q(θ, x cos θ + y sin θ) dθ``.
    """
    line_integrals = (counts - background) / gain
    n_bins = projector.n_bins
    response = ramp_hann_filter(n_bins, projector.bin_size_mm, cutoff, device=line_integrals.device)
    n_pad = 2 * (response.numel() - 1)
    spectrum = torch.fft.rfft(line_integrals.to(torch.float32), n=n_pad, dim=-1)
    filtered = torch.fft.irfft(spectrum * response, n=n_pad, dim=-1)[..., :n_bins]
    # Aᵀ spreads each bin over pixels with weights summing to pixel²/bin per angle; the Riemann sum
    # over angles has step π/A.
    weight_per_angle = projector.pixel_size_mm**2 / projector.bin_size_mm
    return projector.adjoint(filtered) * (math.pi / projector.n_angles / weight_per_angle)


# -- OSEM --------------------------------------------------------------------------------------------
def _angles(t: torch.Tensor | float, idx: torch.Tensor, n_angles: int) -> torch.Tensor | float:
    """The rows of a sinogram-shaped factor for a subset; factors constant over angles pass through."""
    if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-2] == n_angles and n_angles > 1:
        return t.index_select(-2, idx.to(t.device))
    return t


def osem(
    counts: torch.Tensor,
    *,
    projector: ParallelBeamProjector,
    gain: torch.Tensor | float,
    background: torch.Tensor | float = 0.0,
    iterations: int = 3,
    subsets: int = 8,
    psf_fwhm_mm: float = 0.0,
) -> torch.Tensor:
    """Ordered-subsets EM (Hudson & Larkin 1994) of ``counts (..., A, S)`` → ``(..., N, N)`` ≥ 0.

    Update per subset s: ``x ← x / (G A_sᵀ g_s) · G A_sᵀ(g_s · y_s / (g_s A_s G x + b_s))``, with ``G``
    the in-plane Gaussian of ``psf_fwhm_mm`` (identity when 0, zero-padded so ``Gᵀ = G``). Starts from
    a uniform image holding the measured trues, so early iterations are not scaled wrongly.
    """
    if subsets > projector.n_angles:
        subsets = projector.n_angles  # a tiny patch has fewer angles than the clinical subset count
    n_angles = projector.n_angles
    y = counts.to(device=projector.device, dtype=torch.float32)
    gain_t = torch.as_tensor(gain, dtype=torch.float32, device=y.device)
    background_t = torch.as_tensor(background, dtype=torch.float32, device=y.device)
    pixel = projector.pixel_size_mm

    def blur(img: torch.Tensor) -> torch.Tensor:
        return gaussian_filter_inplane(img, psf_fwhm_mm, pixel, mode="zeros")

    subset_idx = projector.subset_angles(subsets)
    lead = y.shape[:-2]
    # Split data and factors by subset once; store 1 / sensitivity so the update multiplies only.
    parts = []
    total_norm = torch.zeros((), device=y.device)
    for s, idx in enumerate(subset_idx):
        idx = idx.to(y.device)
        g_s = _angles(gain_t, idx, n_angles)
        norm = blur(
            projector.adjoint_subset(torch.broadcast_to(g_s, (*lead, len(idx), projector.n_bins)), s, subsets)
        )
        total_norm = total_norm + norm
        parts.append(
            (y.index_select(-2, idx), g_s, _angles(background_t, idx, n_angles), 1.0 / norm.clamp_min(_EPS))
        )
    trues = (y - background_t).sum(dim=(-2, -1)).clamp_min(0.0)
    start = trues / total_norm.sum(dim=(-2, -1)).clamp_min(_EPS)
    x = start[..., None, None].expand(*lead, projector.image_size, projector.image_size).clone()
    for _ in range(iterations):
        for s, (y_s, g_s, b_s, inv_norm) in enumerate(parts):
            expected = g_s * projector.forward_subset(blur(x), s, subsets) + b_s
            ratio = y_s / expected.clamp_min(_EPS)
            x = x * blur(projector.adjoint_subset(g_s * ratio, s, subsets)) * inv_norm
    return x
