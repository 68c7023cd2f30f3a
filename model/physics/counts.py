"""PET physics for simulation and the Poisson diffusion: counts, dose, reconstruction.

The chain, per axial slice (2D; slices are independent, batched over any leading dimensions):

    activity x [Bq/ml] ──A──▶ line integrals [Bq/ml·mm] ──× κ · a──▶ expected trues [counts]
        + background (randoms + scatter) ──Poisson──▶ standard-dose counts ──Binomial(n, d)──▶
        dose-d counts ──FBP / OSEM with gain κ·d·a──▶ activity [Bq/ml]

``κ`` (counts per Bq/ml·mm per sinogram bin) follows from a :class:`ScannerModel` — sensitivity,
frame duration, slice thickness — and ``a ∈ (0, 1]`` is the attenuation survival of each line of
response. Binomial thinning of Poisson counts with probability ``d`` is again Poisson with mean ``d``
times as large, so thinned counts are exactly what a ``d``-fraction acquisition would record (e.g. a
list-mode stream sampled for ``d`` of the frame time, as the paper made its LPET), and thinning is a
Markov chain: ``thin(thin(n, d₁), d₂/d₁) ~ thin(n, d₂)``.

Count level (defaults, documented choice): a digital whole-body PET/CT with 16 cps/kBq NEMA
sensitivity (Biograph Vision class), 180 s per bed position with 50 % bed overlap (each slice is
counted by two beds whose triangular axial profiles sum to twice the NEMA mean), 2 mm slices,
records on our chest-abdomen phantoms (≈ 3–4.5 MBq/kg FDG, 50–75 min uptake) about 2.5·10⁵ true
counts per axial slice through the liver with the CT μ-map — the middle of the 10⁵–10⁶ a clinical
frame gives. Without a μ-map a uniform survival of 0.12 (the liver-level mean of those phantoms)
keeps counts at that level. At 10 % dose (2.5·10⁴ counts a slice) OSEM images are clearly noisy but
readable; at 2 % very noisy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from model.physics.filters import gaussian_filter_axial, gaussian_filter_inplane
from model.physics.projector import ParallelBeamProjector, default_n_angles, get_projector
from model.physics.reconstruction import ReconAlgorithm, ReconSettings, fbp, osem

__all__ = [
    "ParallelBeamProjector",
    "ReconAlgorithm",
    "ReconSettings",
    "ScannerModel",
    "acquire_counts",
    "attenuation_factors",
    "default_n_angles",
    "expected_counts",
    "get_projector",
    "mu_map_from_ct",
    "perturb",
    "reconstruct",
    "thin_counts",
]

# Carney et al., Med. Phys. 33 (2006) 976, bilinear CT → 511 keV for 120 kVp, in 1/cm:
# μ = 9.6e-5·(HU + 1000) below the break point, 5.10e-5·(HU + 1000) + 4.71e-2 above it.
_MU_WATER_PER_CM_PER_HU = 9.6e-5
_MU_BONE_SLOPE_PER_CM = 5.10e-5
_MU_BONE_INTERCEPT_PER_CM = 4.71e-2
_BREAK_HU = 47.0


@dataclass(frozen=True)
class ScannerModel:
    """A PET scanner and protocol as far as count statistics go. All values physical, units in names.

    ``sensitivity_cps_per_bq``: true coincidences recorded per decay in the slice (no attenuation),
    after rebinning to 2D, averaged over the axial field of view (NEMA) — 0.016 is 16 cps/kBq.
    ``frame_duration_s``: acquisition time per bed at standard dose. ``axial_overlap_gain``: the
    summed axial sensitivity of the bed positions that see a slice, relative to that mean (2 for
    50 % overlap of triangular profiles, 1 for a single bed's mean). ``background_fraction``:
    expected randoms + scatter counts per true count (uniform over the sinogram, known to the
    reconstruction as a scanner's correction would be).
    ``survival_without_mumap``: the mean attenuation survival of lines of response through a
    chest-abdomen, applied uniformly when no μ-map is given, so counts stay at the clinical level.
    ``resolution_fwhm_mm``: the system's intrinsic resolution, applied to a noiseless phantom before
    projection by the data simulator (a reconstructed image given to :func:`perturb` already has it).
    """

    sensitivity_cps_per_bq: float = 0.016
    frame_duration_s: float = 180.0
    axial_overlap_gain: float = 2.0
    background_fraction: float = 0.3
    survival_without_mumap: float = 0.12
    resolution_fwhm_mm: float = 4.0

    def __post_init__(self) -> None:
        for name in (
            "sensitivity_cps_per_bq",
            "frame_duration_s",
            "axial_overlap_gain",
            "survival_without_mumap",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"ScannerModel.{name} must be positive, found {getattr(self, name)}")
        if self.survival_without_mumap > 1 or self.sensitivity_cps_per_bq > 1:
            raise ValueError(
                "ScannerModel.survival_without_mumap and sensitivity_cps_per_bq are probabilities (≤ 1), "
                f"found {self.survival_without_mumap} and {self.sensitivity_cps_per_bq}"
            )
        if self.background_fraction < 0 or self.resolution_fwhm_mm < 0:
            raise ValueError(
                f"ScannerModel.background_fraction and resolution_fwhm_mm must be ≥ 0, found "
                f"{self.background_fraction} and {self.resolution_fwhm_mm}"
            )

    def counts_per_bqml_mm(self, *, slice_thickness_mm: float, bin_size_mm: float, n_angles: int) -> float:
        """``κ``: expected true counts in one sinogram bin per Bq/ml·mm of (bin-averaged) line integral.

        A voxel of ``c`` Bq/ml and volume ``V`` ml decays ``c·V`` times a second; each recorded pair
        lands in exactly one angle (uniform over ``n_angles``) and its footprint integrates to
        ``pixel²/bin`` mm per angle, so ``κ = sensitivity · overlap · duration · slice · bin / (1000 · A)``.
        """
        return (
            self.sensitivity_cps_per_bq
            * self.axial_overlap_gain
            * self.frame_duration_s
            * slice_thickness_mm
            * bin_size_mm
            / (1000.0 * n_angles)
        )

    def to_dict(self) -> dict:
        return asdict(self)


# -- attenuation -------------------------------------------------------------------------------------
def mu_map_from_ct(ct_hu: torch.Tensor) -> torch.Tensor:
    """Linear attenuation at 511 keV in 1/mm from CT in HU (bilinear, Carney 2006, 120 kVp); ≥ 0."""
    hu = torch.as_tensor(ct_hu, dtype=torch.float32)
    soft = _MU_WATER_PER_CM_PER_HU * (hu + 1000.0)
    bone = _MU_BONE_SLOPE_PER_CM * (hu + 1000.0) + _MU_BONE_INTERCEPT_PER_CM
    mu_per_cm = torch.where(hu <= _BREAK_HU, soft, bone).clamp_min(0.0)
    return mu_per_cm / 10.0


def attenuation_factors(projector: ParallelBeamProjector, mu_per_mm: torch.Tensor) -> torch.Tensor:
    """Survival probability ``exp(−∫μ dl)`` of each line of response: ``(..., N, N)`` → ``(..., A, S)``,
    in (0, 1] (exactly 1 where the line misses the object)."""
    line_integral = projector(mu_per_mm.clamp_min(0.0))
    return torch.exp(-line_integral.clamp_min(0.0))


# -- counts ------------------------------------------------------------------------------------------
def _dose_shape(dose_fraction: float | torch.Tensor, lead_dims: int, device) -> torch.Tensor:
    """Dose fraction(s) in (0, 1] as a tensor broadcastable over ``(*lead, A, S)``.

    A tensor ``d`` of shape ``(B,)`` (or any shape) is aligned with the leading dimensions of the data
    and padded with singleton trailing dimensions.
    """
    d = torch.as_tensor(dose_fraction, dtype=torch.float32, device=device)
    if d.numel() == 0 or bool((d <= 0).any()) or bool((d > 1).any()):
        raise ValueError(f"dose_fraction must be in (0, 1], found {dose_fraction}")
    if d.dim() == 0:
        return d
    if d.dim() > lead_dims:
        raise ValueError(f"dose_fraction has {d.dim()} dimensions, the data only {lead_dims} leading ones")
    return d.reshape(*d.shape, *([1] * (lead_dims - d.dim() + 2)))


def _survival(attenuation: torch.Tensor | None, scanner: ScannerModel, device) -> torch.Tensor:
    if attenuation is None:
        return torch.tensor(scanner.survival_without_mumap, dtype=torch.float32, device=device)
    a = torch.as_tensor(attenuation, dtype=torch.float32, device=device)
    if bool((a <= 0).any()) or bool((a > 1).any()):
        raise ValueError("attenuation factors must lie in (0, 1]")
    return a


def _gain(
    projector: ParallelBeamProjector,
    scanner: ScannerModel,
    slice_thickness_mm: float | None,
    dose: torch.Tensor,
    survival: torch.Tensor,
) -> torch.Tensor:
    kappa = scanner.counts_per_bqml_mm(
        slice_thickness_mm=slice_thickness_mm or projector.pixel_size_mm,
        bin_size_mm=projector.bin_size_mm,
        n_angles=projector.n_angles,
    )
    return kappa * dose * survival


def expected_counts(
    activity_bqml: torch.Tensor,
    *,
    projector: ParallelBeamProjector,
    scanner: ScannerModel,
    dose_fraction: float | torch.Tensor = 1.0,
    attenuation: torch.Tensor | None = None,
    slice_thickness_mm: float | None = None,
) -> torch.Tensor:
    """Mean prompt counts ``(..., A, S)`` (trues + randoms/scatter) of ``activity_bqml (..., N, N)``.

    ``slice_thickness_mm`` defaults to the pixel size (isotropic voxels). The background is
    ``background_fraction`` × the slice's mean true counts per bin, uniform over the sinogram.
    """
    activity = activity_bqml.to(device=projector.device, dtype=torch.float32)
    if bool((activity < 0).any()):
        raise ValueError("activity must be non-negative (Bq/ml)")
    lead = activity.dim() - 2
    dose = _dose_shape(dose_fraction, lead, projector.device)
    gain = _gain(
        projector, scanner, slice_thickness_mm, dose, _survival(attenuation, scanner, projector.device)
    )
    trues = gain * projector(activity)
    background = scanner.background_fraction * trues.mean(dim=(-2, -1), keepdim=True)
    return trues + background


def acquire_counts(
    activity_bqml: torch.Tensor,
    *,
    projector: ParallelBeamProjector,
    scanner: ScannerModel,
    dose_fraction: float | torch.Tensor = 1.0,
    attenuation: torch.Tensor | None = None,
    slice_thickness_mm: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Poisson prompt counts (float32 holding integers) of a ``dose_fraction`` acquisition."""
    mean = expected_counts(
        activity_bqml,
        projector=projector,
        scanner=scanner,
        dose_fraction=dose_fraction,
        attenuation=attenuation,
        slice_thickness_mm=slice_thickness_mm,
    )
    return torch.poisson(mean, generator=generator)


def thin_counts(
    counts: torch.Tensor, dose_fraction: float | torch.Tensor, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Keep each recorded count with probability ``dose_fraction``: ``Binomial(n, d)``, exact.

    ``dose_fraction`` is a float or a tensor aligned with the leading dimensions of ``counts
    (..., A, S)`` (one fraction per batch element, say). Poisson(λ) in → Poisson(d·λ) out.
    """
    d = _dose_shape(dose_fraction, max(counts.dim() - 2, 0), counts.device)
    if bool((counts < 0).any()):
        raise ValueError("counts must be non-negative")
    probs = torch.broadcast_to(d, counts.shape).contiguous()
    return torch.binomial(counts.to(torch.float32), probs, generator=generator)


# -- reconstruction ----------------------------------------------------------------------------------
def reconstruct(
    counts: torch.Tensor,
    *,
    projector: ParallelBeamProjector,
    recon: ReconSettings,
    scanner: ScannerModel,
    dose_fraction: float | torch.Tensor = 1.0,
    attenuation: torch.Tensor | None = None,
    slice_thickness_mm: float | None = None,
    stack_is_volume: bool = False,
) -> torch.Tensor:
    """Activity in Bq/ml ``(..., N, N)`` from prompt counts ``(..., A, S)`` of a ``dose_fraction`` scan.

    The gain includes ``dose_fraction`` (the ``1/d`` rescale) and attenuation (correction). The
    randoms/scatter background is estimated from the data as ``f/(1+f)`` of the mean prompts per bin
    (``f`` = ``scanner.background_fraction``), as a scanner's correction would. With
    ``stack_is_volume``, axis -3 of ``counts`` is z of one volume (spacing ``slice_thickness_mm``) and
    the post-filter also acts along z; otherwise slices are unrelated and filtered in-plane only.
    """
    y = counts.to(device=projector.device, dtype=torch.float32)
    lead = y.dim() - 2
    dose = _dose_shape(dose_fraction, lead, projector.device)
    gain = _gain(
        projector, scanner, slice_thickness_mm, dose, _survival(attenuation, scanner, projector.device)
    )
    f = scanner.background_fraction
    background = f / (1.0 + f) * y.mean(dim=(-2, -1), keepdim=True)
    if recon.algorithm is ReconAlgorithm.FBP:
        image = fbp(y, projector=projector, gain=gain, background=background, cutoff=recon.fbp_cutoff)
    else:
        image = osem(
            y,
            projector=projector,
            gain=gain,
            background=background,
            iterations=recon.iterations,
            subsets=recon.subsets,
            psf_fwhm_mm=recon.psf_fwhm_mm,
        )
    image = gaussian_filter_inplane(image, recon.postfilter_fwhm_mm, projector.pixel_size_mm)
    if stack_is_volume:
        spacing = slice_thickness_mm or projector.pixel_size_mm
        image = gaussian_filter_axial(image, recon.postfilter_fwhm_mm, spacing)
    return image


# -- the Poisson diffusion's perturbation ------------------------------------------------------------
def perturb(
    x: torch.Tensor,
    dose_fraction: float | torch.Tensor,
    *,
    scanner: ScannerModel = ScannerModel(),  # noqa: B008 - frozen dataclass, immutable default
    recon: ReconSettings = ReconSettings(),  # noqa: B008
    pixel_size_mm: float,
    attenuation: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    bqml_per_unit: float = 1.0,
    slice_thickness_mm: float | None = None,
    n_angles: int | None = None,
) -> torch.Tensor:
    """What a ``dose_fraction`` acquisition of ``x`` reconstructs to, in the units of ``x``.

    ``x (..., Z, H, W)``: non-negative activity, ``x · bqml_per_unit`` in Bq/ml (so a network's fixed
    intensity scale keeps physical count levels). ``dose_fraction``: a float or a tensor of the leading
    shape ``x.shape[:-3]`` (one fraction per patch) in (0, 1]. Slices are projected with one batched
    sparse product, counted at standard dose, thinned binomially to ``d``, reconstructed with
    ``recon`` (OSEM by default; the post-filter also acts along Z) and returned in ``x``'s units and
    dtype. Non-square slices are zero-padded to a square for the projector and cropped back.
    ``attenuation``: survival factors ``(..., Z, A, S)`` from :func:`attenuation_factors` of the same
    padded geometry, or ``None`` for the scanner's uniform survival.
    """
    if x.dim() < 3:
        raise ValueError(f"expected x of shape (..., Z, H, W), found {tuple(x.shape)}")
    if bqml_per_unit <= 0:
        raise ValueError(f"bqml_per_unit must be positive, found {bqml_per_unit}")
    *lead, z, h, w = x.shape
    size = max(h, w)
    device = x.device
    projector = get_projector(size, pixel_size_mm=pixel_size_mm, n_angles=n_angles, device=device)
    activity = x.detach().to(torch.float32).clamp_min(0.0) * bqml_per_unit
    if h != w:
        top, left = (size - h) // 2, (size - w) // 2
        activity = torch.nn.functional.pad(activity, (left, size - w - left, top, size - h - top))
    # One dose per volume: aligned with x's leading dims, broadcast over Z by _dose_shape's padding.
    dose = torch.as_tensor(dose_fraction, dtype=torch.float32, device=device)
    if dose.dim() > len(lead):
        raise ValueError(
            f"dose_fraction of shape {tuple(dose.shape)} does not match x's leading {tuple(lead)}"
        )
    full = acquire_counts(
        activity,
        projector=projector,
        scanner=scanner,
        attenuation=attenuation,
        slice_thickness_mm=slice_thickness_mm,
        generator=generator,
    )
    counts = thin_counts(full, dose, generator=generator)
    image = reconstruct(
        counts,
        projector=projector,
        recon=recon,
        scanner=scanner,
        dose_fraction=dose,
        attenuation=attenuation,
        slice_thickness_mm=slice_thickness_mm,
        stack_is_volume=True,
    )
    if h != w:
        image = image[..., top : top + h, left : left + w]
    return (image / bqml_per_unit).to(x.dtype)
