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

from dataclasses import asdict, dataclass, replace

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
    "inject_dose_noise",
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


# -- forward processes of training: shared geometry ----------------------------------------------------
@dataclass(frozen=True)
class _Geometry:
    """A volume ``x (..., Z, H, W)`` set up for the projector: square-padded activity in Bq/ml, the
    projector, the per-volume dose tensor and the crop back to ``(H, W)``."""

    activity: torch.Tensor
    projector: ParallelBeamProjector
    dose: torch.Tensor
    top: int
    left: int
    height: int
    width: int

    def physics(self, attenuation: torch.Tensor | None, slice_thickness_mm: float | None) -> dict:
        """The keyword arguments that counting and reconstruction of this geometry share."""
        return {
            "projector": self.projector,
            "attenuation": attenuation,
            "slice_thickness_mm": slice_thickness_mm,
        }

    def to_units(self, image: torch.Tensor, bqml_per_unit: float, dtype: torch.dtype) -> torch.Tensor:
        """``image (..., Z, N, N)`` in Bq/ml → cropped to ``(H, W)``, in the input's units and dtype."""
        image = image[..., self.top : self.top + self.height, self.left : self.left + self.width]
        return (image / bqml_per_unit).to(dtype)


def _geometry(
    x: torch.Tensor,
    dose_fraction: float | torch.Tensor,
    *,
    pixel_size_mm: float,
    bqml_per_unit: float,
    n_angles: int | None,
) -> _Geometry:
    if x.dim() < 3:
        raise ValueError(f"expected x of shape (..., Z, H, W), found {tuple(x.shape)}")
    if bqml_per_unit <= 0:
        raise ValueError(f"bqml_per_unit must be positive, found {bqml_per_unit}")
    *lead, _, h, w = x.shape
    size = max(h, w)
    device = x.device
    projector = get_projector(size, pixel_size_mm=pixel_size_mm, n_angles=n_angles, device=device)
    activity = x.detach().to(torch.float32).clamp_min(0.0) * bqml_per_unit
    top, left = (size - h) // 2, (size - w) // 2
    if h != w:
        activity = torch.nn.functional.pad(activity, (left, size - w - left, top, size - h - top))
    # One dose per volume: aligned with x's leading dims, broadcast over Z by _dose_shape's padding.
    dose = torch.as_tensor(dose_fraction, dtype=torch.float32, device=device)
    if dose.dim() > len(lead):
        raise ValueError(
            f"dose_fraction of shape {tuple(dose.shape)} does not match x's leading {tuple(lead)}"
        )
    _dose_shape(dose, len(lead) + 1, device)  # validates (0, 1] with a message naming the value
    return _Geometry(activity, projector, dose, top, left, h, w)


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

    Given a *reconstructed* ``x`` this reconstructs its mean a second time (lower lesion contrast) and
    adds noise on top of noise; :func:`inject_dose_noise` is the lower-dose acquisition of the same
    patient that training should use.
    """
    geo = _geometry(
        x, dose_fraction, pixel_size_mm=pixel_size_mm, bqml_per_unit=bqml_per_unit, n_angles=n_angles
    )
    physics = geo.physics(attenuation, slice_thickness_mm)
    full = acquire_counts(geo.activity, scanner=scanner, generator=generator, **physics)
    counts = thin_counts(full, geo.dose, generator=generator)
    image = reconstruct(
        counts, recon=recon, scanner=scanner, dose_fraction=geo.dose, stack_is_volume=True, **physics
    )
    return geo.to_units(image, bqml_per_unit, x.dtype)


# -- mean-preserving noise injection -----------------------------------------------------------------
def inject_dose_noise(
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
    """A ``dose_fraction`` acquisition of the patient whose standard-dose image is ``x``, in ``x``'s units.

    ``x_d = x + [R(thin(Poisson(A·x), d′)) / d′ − R(A·x)]`` with ``d′ = d / (1 − d)``: ``A·x`` the
    expected prompt counts of a standard-dose acquisition of ``x`` (:func:`expected_counts`), ``R`` the
    same ``recon`` as :func:`perturb` (``/d′`` is its dose gain), applied once to counts at level ``d′``
    and once to the noiseless expected counts. Arguments, shapes and dtypes as :func:`perturb`.

    Why this is a dose-``d`` image. A standard-dose reconstruction ``x = μ + n₁`` carries noise ``n₁`` of
    covariance ``Σ`` (Poisson counts at the standard level, through ``R``). A real dose-``d`` image of
    the same patient is ``μ + n_d`` with covariance ``Σ/d`` (``d`` times fewer counts, rescaled by
    ``1/d``). The bracket has mean ≈ 0 (``R`` of the counts' mean minus ``R`` of the same mean: exact
    for FBP, to first order for OSEM) and covariance ``Σ/d′ = Σ·(1/d − 1)``, independent of ``n₁``,
    so ``x_d`` has mean ``μ`` and covariance ``Σ + Σ(1/d − 1) = Σ/d``: the SPET's own noise plus what a
    real dose-``d`` acquisition adds on top of it. Unlike :func:`perturb` the mean is never
    reconstructed a second time, so lesion and organ means stay those of ``x``. ``Σ`` is evaluated at
    ``A·x`` rather than at the unknown true counts, a first-order approximation (the SPET's noise is
    small beside the injected noise at the doses that matter). ``x_d`` is not clipped: clipping
    would bias the mean; negative voxels occur where the noise exceeds the activity. Negative voxels
    of ``x`` itself (FBP) count as no activity for ``A·x`` and are kept as they are in ``x_d``.

    At ``d ≥ 0.5``, ``d′ ≥ 1`` and thinning cannot keep more than every count: the acquisition is then
    made ``k = ⌈d′⌉`` times longer (a frame of ``k`` × the scanner's duration, i.e. the sum of ``k``
    independent standard-dose Poisson draws) and thinned by ``d′/k ≤ 1``, which is again Poisson at
    ``d′ ×`` the standard level. ``d = 1`` returns ``x`` (nothing to add); ``d → 1`` adds vanishing
    noise.

    Training uses this as its forward process (:class:`model.training.patches.PerturbedPool`).
    """
    geo = _geometry(
        x, dose_fraction, pixel_size_mm=pixel_size_mm, bqml_per_unit=bqml_per_unit, n_angles=n_angles
    )
    if bool((geo.dose == 1).all()):
        return x.clone()
    physics = geo.physics(attenuation, slice_thickness_mm)
    # d = 1 has d′ = ∞ (no noise to add): its volumes get the bracket at an arbitrary d′ and are masked.
    full_dose = geo.dose == 1
    d = torch.where(full_dose, torch.full_like(geo.dose, 0.5), geo.dose)
    d_prime = d / (1.0 - d)
    # Count-level multiple k (one scanner for the whole batch, so the largest needed): the frame is
    # k × longer and each volume thinned by d′/k ∈ (0, 1].
    k = max(1, int(torch.ceil(d_prime.max()).item()))
    longer = replace(scanner, frame_duration_s=scanner.frame_duration_s * k)
    counts = thin_counts(
        acquire_counts(geo.activity, scanner=longer, generator=generator, **physics),
        d_prime / k,
        generator=generator,
    )
    noisy = reconstruct(
        counts, recon=recon, scanner=longer, dose_fraction=d_prime / k, stack_is_volume=True, **physics
    )
    mean = reconstruct(
        expected_counts(geo.activity, scanner=scanner, **physics),
        recon=recon,
        scanner=scanner,
        stack_is_volume=True,
        **physics,
    )
    noise = geo.to_units(noisy - mean, bqml_per_unit, torch.float32)
    keep = (~full_dose).to(noise.dtype)
    noise = noise * keep.reshape(*keep.shape, *([1] * (noise.dim() - keep.dim())))
    return (x.to(torch.float32) + noise).to(x.dtype)
