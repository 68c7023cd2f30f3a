"""Classical baselines for low-dose PET enhancement, each an :class:`~model.enhance.Enhancer`.

* ``lpet``: the low-dose PET as is (the floor every method must beat).
* ``gaussian``: isotropic Gaussian filter, parameter ``fwhm_mm``.
* ``nlm``: 3D non-local means (scikit-image, fast mode, 3³ patches, ±3 voxel search), parameter
  ``h_factor``: the filtering strength h as a multiple of the noise σ estimated from the volume.
* ``bm4d``: BM4D (the ``bm4d`` package, Mäkinen et al. 2020) on the square root of the activity (a
  variance-stabilising transform: reconstructed PET noise variance grows about linearly with activity,
  BM4D assumes one σ), parameter ``sigma_factor`` times the σ estimated in that domain; profile
  ``"fast"`` (hard-thresholding stage only, 4-voxel steps, ±4 voxel search) or ``"np"`` (both stages,
  the package's defaults, several times slower).
* ``bilateral``: CT-guided (joint) bilateral filter: a spatial Gaussian of ``spatial_fwhm_mm`` times a
  range kernel on CT differences with ``range_sigma_hu``, so activity is averaged within, not across,
  CT-visible tissue boundaries (computed piecewise-linearly over HU levels, Durand & Dorsey 2002).

NLM and BM4D are blind to the noise level, so σ is estimated per volume (:func:`estimate_noise_sigma`,
a robust std of the high-pass residual in flat body regions) and the tuned parameter is a multiple of
it, which carries over between patients of different size and activity. The costly filters run on the
bounding box of the body (a smoothed PET threshold) and leave the air around it as is.

Parameters are tuned per dose on validation cases by :func:`model.evaluation.tuning.tune`; :data:`METHODS`
lists each method's default parameters and search grid.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from model.enhancers.base import Enhancer, EnhancerInfo, Progress
from model.units import FWHM_PER_SIGMA

__all__ = [
    "METHODS",
    "BM4DEnhancer",
    "CTBilateralEnhancer",
    "GaussianEnhancer",
    "LPETEnhancer",
    "MethodSpec",
    "NLMEnhancer",
    "body_box",
    "estimate_noise_sigma",
    "make_baseline",
]

def _float32(pet_bqml: np.ndarray) -> np.ndarray:
    if pet_bqml.ndim != 3:
        raise ValueError(f"expected a (z, y, x) PET volume, found {pet_bqml.ndim} dimensions")
    return np.asarray(pet_bqml, dtype=np.float32)


def _report(progress: Progress | None, fraction: float, stage: str) -> None:
    if progress is not None:
        progress(fraction, stage)


def body_box(pet_bqml: np.ndarray, *, margin_vox: int = 4, threshold: float = 0.05) -> tuple[slice, ...]:
    """Bounding box (slices) of the body in a PET volume, with ``margin_vox`` voxels around it.

    The body is where the PET, smoothed with σ = 2 voxels so noise and streaks in the air do not count,
    exceeds ``threshold`` × its 99.9th percentile. The whole volume if nothing passes.
    """
    smooth = ndimage.gaussian_filter(pet_bqml.astype(np.float32), sigma=2.0)
    level = threshold * float(np.percentile(smooth, 99.9))
    inside = smooth > level
    if level <= 0 or not inside.any():
        return tuple(slice(0, n) for n in pet_bqml.shape)
    box = []
    for axis, n in enumerate(pet_bqml.shape):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(inside.any(axis=other))
        box.append(slice(max(0, int(hit[0]) - margin_vox), min(n, int(hit[-1]) + 1 + margin_vox)))
    return tuple(box)


def estimate_noise_sigma(pet_bqml: np.ndarray) -> float:
    """Noise σ in Bq/ml: robust (MAD) std of the high-pass residual ``x − G_σ=2(x)`` in flat body regions.

    Reconstructed PET noise is spatially correlated (OSEM post-filters, PSF), which hides it from the
    finest-wavelet MAD estimate (:func:`skimage.restoration.estimate_sigma` reads 6× low on 0.6-voxel
    correlated noise); a residual against a 2-voxel Gaussian keeps nearly all of it. Organ edges would
    count as noise, so only the flatter half of the body (smoothed gradient below its median, 2 voxels
    in from the skin) is used. PET noise grows with activity, so this is a body-wide typical level; the
    tuned factors absorb what remains.
    """
    pet = pet_bqml.astype(np.float32)
    smooth = ndimage.gaussian_filter(pet, sigma=2.0)
    body = smooth > 0.05 * float(np.percentile(smooth, 99.9))
    body = ndimage.binary_erosion(body, iterations=2) if body.sum() > 1000 else body
    if not body.any():
        return 1e-6 * (float(np.abs(pet).max()) + 1.0)
    grad = ndimage.gaussian_gradient_magnitude(pet, sigma=2.0)
    flat = body & (grad <= np.median(grad[body]))
    residual = (pet - smooth)[flat]
    sigma = 1.4826 * float(np.median(np.abs(residual - np.median(residual))))
    return sigma if sigma > 0 else 1e-6 * (float(np.abs(pet).max()) + 1.0)


class LPETEnhancer(Enhancer):
    """The low-dose PET unchanged: the floor of every comparison."""

    method = "lpet"

    def __init__(self) -> None:
        self.params: dict[str, float] = {}
        self.info = EnhancerInfo(
            name="LPET", version="identity", description="low-dose PET as acquired (no enhancement)",
            uses_ct=False, requires_ct=False,
        )

    def enhance_array(self, pet_bqml, ct_hu=None, *, spacing_mm, progress=None):
        out = _float32(pet_bqml).copy()
        _report(progress, 0.0, "lpet")
        _report(progress, 1.0, "lpet")
        return out


class GaussianEnhancer(Enhancer):
    """Isotropic Gaussian filter of ``fwhm_mm``: the node's classical fallback and the ``gaussian`` baseline.

    ``mode="nearest"`` at the volume's edges keeps the total activity close (``"constant"`` would
    leak it out).
    """

    method = "gaussian"

    def __init__(self, *, fwhm_mm: float = 6.0) -> None:
        if fwhm_mm <= 0:
            raise ValueError(f"fwhm_mm must be positive, found {fwhm_mm}")
        self.params = {"fwhm_mm": float(fwhm_mm)}
        self.info = EnhancerInfo(
            name="Gaussian filter",
            version=f"fwhm{fwhm_mm:g}mm",
            description=f"Gaussian filter, FWHM {fwhm_mm:g} mm (classical fallback, not uPETe)",
            uses_ct=False,
            requires_ct=False,
        )

    @property
    def fwhm_mm(self) -> float:
        return self.params["fwhm_mm"]

    def enhance_array(self, pet_bqml, ct_hu=None, *, spacing_mm, progress=None):
        pet = _float32(pet_bqml)
        sigma_vox = [self.fwhm_mm / FWHM_PER_SIGMA / s for s in spacing_mm]
        _report(progress, 0.0, "gaussian")
        out = ndimage.gaussian_filter(pet, sigma=sigma_vox, mode="nearest").astype(np.float32)
        _report(progress, 1.0, "gaussian")
        return out


class NLMEnhancer(Enhancer):
    """3D non-local means with h = ``h_factor`` × estimated noise σ (scikit-image, fast mode).

    Cost grows with (2·patch_distance + 1)³: ±3 voxels (343 shifts) takes ~4 s for the body box of a
    64×192×192 volume on one core here; ±2 is 2.5× cheaper but at 2–10 % dose ~1 dB worse (it cannot
    average widely enough).
    """

    method = "nlm"

    def __init__(self, *, h_factor: float, patch_size: int = 3, patch_distance: int = 3) -> None:
        if h_factor <= 0:
            raise ValueError(f"h_factor must be positive, found {h_factor}")
        if patch_size < 1 or patch_distance < 1:
            raise ValueError(
                f"patch_size and patch_distance must be ≥ 1, found {patch_size}, {patch_distance}"
            )
        self.params = {
            "h_factor": float(h_factor), "patch_size": patch_size, "patch_distance": patch_distance,
        }
        self.info = EnhancerInfo(
            name="Non-local means", version=f"h{h_factor:g}sigma-p{patch_size}-d{patch_distance}",
            description=f"3D non-local means, h = {h_factor:g} x noise sigma, {patch_size}^3 patches",
            uses_ct=False, requires_ct=False,
        )

    def enhance_array(self, pet_bqml, ct_hu=None, *, spacing_mm, progress=None):
        from skimage.restoration import denoise_nl_means

        pet = _float32(pet_bqml)
        box = body_box(pet)
        sigma = estimate_noise_sigma(pet)
        _report(progress, 0.0, "nlm")
        out = pet.copy()
        out[box] = denoise_nl_means(
            pet[box].astype(np.float64),
            patch_size=self.params["patch_size"],
            patch_distance=self.params["patch_distance"],
            h=self.params["h_factor"] * sigma,
            sigma=sigma,
            fast_mode=True,
            preserve_range=True,
            channel_axis=None,
        )
        _report(progress, 1.0, "nlm")
        return out


def _bm4d_profile(name: str) -> Any:
    from bm4d.profiles import BM4DProfile

    profile = BM4DProfile()  # the package's "np" defaults
    if name == "fast":
        # Measured here on 48×128×128: np hard-thresholding 15–26 s, this 5.7 s, RMSE within 2 %.
        profile.search_window_ht = (4, 4, 4)
        profile.step_ht = (4, 4, 4)  # must not exceed the 4-voxel block, or voxels go uncovered (NaN)
    elif name != "np":
        raise ValueError(f"unknown BM4D profile {name!r}; known: fast, np")
    return profile


class BM4DEnhancer(Enhancer):
    """BM4D on √activity with σ = ``sigma_factor`` × the σ estimated there; profile "fast" or "np".

    The inverse transform adds the stabilised variance back, ``x̂ = ŷ² + σ²`` where ŷ > 0, since
    E[√x]² ≈ E[x] − Var[√x]: without it the output would be biased low by about σ² everywhere.
    """

    method = "bm4d"

    def __init__(self, *, sigma_factor: float, profile: str = "fast") -> None:
        if sigma_factor <= 0:
            raise ValueError(f"sigma_factor must be positive, found {sigma_factor}")
        _bm4d_profile(profile)  # validate the name now, not at the first volume
        self.params = {"sigma_factor": float(sigma_factor), "profile": profile}
        self.info = EnhancerInfo(
            name="BM4D", version=f"s{sigma_factor:g}sigma-{profile}-sqrt",
            description=f"BM4D ({profile} profile) on sqrt(activity), sigma = {sigma_factor:g} x noise sigma",
            uses_ct=False, requires_ct=False,
        )

    def enhance_array(self, pet_bqml, ct_hu=None, *, spacing_mm, progress=None):
        import bm4d

        pet = _float32(pet_bqml)
        box = body_box(pet)
        # FBP images have negative noise; clipping it before the root would bias cold regions up, so
        # shift by the 0.1th percentile's magnitude first (0 for OSEM) and take it off again after.
        shift = max(0.0, -float(np.percentile(pet[box], 0.1)))
        root = np.sqrt(np.maximum(pet[box] + np.float32(shift), 0.0))
        sigma = estimate_noise_sigma(root)
        profile = _bm4d_profile(self.params["profile"])
        fast = self.params["profile"] == "fast"
        stages = bm4d.BM4DStages.HARD_THRESHOLDING if fast else bm4d.BM4DStages.ALL_STAGES
        _report(progress, 0.0, "bm4d")
        denoised = bm4d.bm4d(root, self.params["sigma_factor"] * sigma, profile=profile, stage_arg=stages)
        denoised = np.maximum(np.asarray(denoised, dtype=np.float32).reshape(root.shape), 0.0)
        out = pet.copy()
        out[box] = denoised**2 + np.float32(sigma**2) * (denoised > 0) - np.float32(shift)
        _report(progress, 1.0, "bm4d")
        return out


class CTBilateralEnhancer(Enhancer):
    """Joint bilateral filter guided by the CT.

    out(p) = Σ_q G_s(p − q) · G_r(CT(p) − CT(q)) · PET(q) / Σ_q G_s(p − q) · G_r(CT(p) − CT(q)),
    G_s a Gaussian of ``spatial_fwhm_mm`` (sums over voxels inside the volume), G_r a Gaussian of
    ``range_sigma_hu`` on HU differences.

    Computed by the piecewise-linear method of Durand & Dorsey (2002), as a cross bilateral: at CT
    levels ℓ spaced σ_r / 2 apart, N_ℓ = G_s ∗ (G_r(ℓ − CT)·PET) and D_ℓ = G_s ∗ G_r(ℓ − CT) are plain
    Gaussian filters, and each voxel takes N/D interpolated linearly between the two levels around its
    own CT value — exact where a voxel's HU is a level; elsewhere within ~1 % even for CT texture as
    wide as σ_r (tests/model/enhancers/test_classical.py), far closer on tissue-constant CT. Only
    levels some voxel needs are filtered, and the cost does not grow with the spatial width (a direct
    sum over a 2σ ball at 18 mm FWHM costs ~20× more here).
    """

    method = "bilateral"

    def __init__(self, *, spatial_fwhm_mm: float, range_sigma_hu: float) -> None:
        if spatial_fwhm_mm <= 0 or range_sigma_hu <= 0:
            raise ValueError(
                "spatial_fwhm_mm and range_sigma_hu must be positive, "
                f"found {spatial_fwhm_mm}, {range_sigma_hu}"
            )
        self.params = {"spatial_fwhm_mm": float(spatial_fwhm_mm), "range_sigma_hu": float(range_sigma_hu)}
        self.info = EnhancerInfo(
            name="CT-guided bilateral", version=f"s{spatial_fwhm_mm:g}mm-r{range_sigma_hu:g}HU-pl",
            description=f"CT-guided bilateral filter, {spatial_fwhm_mm:g} mm FWHM, {range_sigma_hu:g} HU",
            uses_ct=True, requires_ct=True,
        )

    def enhance_array(self, pet_bqml, ct_hu=None, *, spacing_mm, progress=None):
        if ct_hu is None:
            raise ValueError("the CT-guided bilateral filter needs a CT on the PET grid")
        pet = _float32(pet_bqml)
        if ct_hu.shape != pet.shape:
            raise ValueError(f"CT shape {ct_hu.shape} does not match PET shape {pet.shape}")
        box = body_box(pet)
        x = pet[box]
        ct = np.asarray(ct_hu[box], dtype=np.float32)
        sigma_r = self.params["range_sigma_hu"]
        sigma_vox = [self.params["spatial_fwhm_mm"] / FWHM_PER_SIGMA / s for s in spacing_mm]
        step = sigma_r / 2.0
        lowest = float(ct.min())
        position = (ct - np.float32(lowest)) / np.float32(step)
        below = np.floor(position).astype(np.int32)  # each voxel lies between levels `below` and `below + 1`
        upper_weight = position - below
        levels = np.union1d(np.unique(below), np.unique(below) + 1)

        def smooth(v: np.ndarray) -> np.ndarray:
            # Zero outside: the sums then run over voxels inside the volume only, in N and D alike.
            return ndimage.gaussian_filter(v, sigma=sigma_vox, mode="constant", cval=0.0)

        out = np.zeros_like(x)
        for i, level in enumerate(levels):
            lower_side, upper_side = below == level, below == level - 1
            if not (lower_side.any() or upper_side.any()):
                continue
            w = np.exp(-0.5 * ((ct - np.float32(lowest + level * step)) / np.float32(sigma_r)) ** 2)
            ratio = smooth(w * x) / np.maximum(smooth(w), np.float32(1e-30))
            out[lower_side] += (1.0 - upper_weight[lower_side]) * ratio[lower_side]
            out[upper_side] += upper_weight[upper_side] * ratio[upper_side]
            if progress is not None:
                progress(i / len(levels), "bilateral")
        result = pet.copy()
        result[box] = out
        _report(progress, 1.0, "bilateral")
        return result


@dataclass(frozen=True)
class MethodSpec:
    """A baseline: how to build it, its untuned defaults, and the grid that
    :func:`model.evaluation.tuning.tune` searches."""

    factory: Callable[..., Enhancer]
    defaults: Mapping[str, Any]
    grid: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    uses_ct: bool = False


#: Every baseline by name. Grids are small on purpose: tuning runs on a 2-core machine (see
#: benchmarks/quality.py). They bracket the PSNR optima seen on the simulated validation phantoms at
#: 2–50 % dose: Gaussian 5 → 20 mm, NLM h 2 → 25 σ, BM4D 2 → 16 σ; the bilateral's spatial width
#: follows the Gaussian's, while its CT range width hardly matters there, since PET edges are blurred
#: by the scanner's resolution and CT edges are not.
METHODS: dict[str, MethodSpec] = {
    "lpet": MethodSpec(LPETEnhancer, {}),
    "gaussian": MethodSpec(
        GaussianEnhancer, {"fwhm_mm": 8.0},
        {"fwhm_mm": (3.0, 5.0, 7.0, 9.0, 11.0, 13.0, 16.0, 20.0, 25.0, 30.0)},
    ),
    "nlm": MethodSpec(NLMEnhancer, {"h_factor": 3.5}, {"h_factor": (2.0, 3.5, 6.0, 10.0, 16.0, 25.0)}),
    "bm4d": MethodSpec(BM4DEnhancer, {"sigma_factor": 4.0}, {"sigma_factor": (2.0, 4.0, 8.0, 16.0)}),
    "bilateral": MethodSpec(
        CTBilateralEnhancer,
        {"spatial_fwhm_mm": 11.0, "range_sigma_hu": 150.0},
        {"spatial_fwhm_mm": (5.0, 7.0, 9.0, 11.0, 13.0, 16.0, 20.0), "range_sigma_hu": (30.0, 150.0)},
        uses_ct=True,
    ),
}


def make_baseline(method: str, **params: Any) -> Enhancer:
    """Build baseline ``method`` (a key of :data:`METHODS`) with ``params`` over its defaults."""
    if method not in METHODS:
        raise ValueError(f"unknown baseline {method!r}; known: {', '.join(METHODS)}")
    spec = METHODS[method]
    return spec.factory(**{**spec.defaults, **params})
