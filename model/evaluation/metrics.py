"""Image-quality and quantitative metrics for enhanced PET, exactly as this project reports them.

All volumes are ``(z, y, x)`` arrays in Bq/ml (any common scale works for every metric here except
:func:`suv`, which needs Bq/ml). ``ref`` is the reference volume: the standard-dose PET (SPET, itself
noisy, as the paper scores) or the noiseless expectation the simulator gives (scores against it
are free of the reference's own noise).

Two families of PSNR/SSIM are computed, and they are *not* interchangeable:

* **Paper** (:func:`paper_psnr_ssim`): both volumes are min-max normalised with the *reference's*
  minimum and maximum inside the body, ``v' = (v - min_body(ref)) / (max_body(ref) - min_body(ref))``,
  so the reference spans [0, 1] in the body; the data range is 1. PSNR = 10·log10(1 / MSE) with the MSE
  over body voxels only; SSIM is the mean of the 3D SSIM map over body voxels only. Air outside the body
  (trivially easy, and most of a PET volume) does not count.
* **UDPET** (:func:`udpet_psnr_ssim_nrmse`, the low-dose PET challenge's way): no normalisation, the
  whole volume in Bq/ml. PSNR = 20·log10(max(ref) / RMSE); NRMSE = RMSE / (max(ref) − min(ref));
  SSIM is the mean of the 3D SSIM map over every voxel with data range max(ref) − min(ref).

SSIM (:func:`ssim_map`) is Wang et al.'s with a 3D isotropic Gaussian window of σ = 1.5 voxels
truncated at 3.5 σ (the 11-voxel window of the 2D original, in 3D), K1 = 0.01, K2 = 0.03, population
(not sample) covariances, and ``mode="reflect"`` at the volume's edges so every voxel has a value.
SSIM is invariant to a common *scaling* of both volumes and the data range, but not to a shift (its
luminance term compares means against C1), so the paper's normalisation matters through its offset
(the reference's minimum in the body), its data range and the averaging region.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "LesionBias",
    "body_mask",
    "gap_closed",
    "lesion_suv_bias",
    "liver_cov",
    "nrmse",
    "paper_psnr_ssim",
    "psnr",
    "ssim3d",
    "ssim_map",
    "suv",
    "udpet_psnr_ssim_nrmse",
]

SSIM_SIGMA_VOX = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_same_shape(x: np.ndarray, ref: np.ndarray) -> None:
    if x.shape != ref.shape:
        raise ValueError(f"volume and reference must have the same shape, found {x.shape} and {ref.shape}")


def _check_mask(mask: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if mask is None:
        return None
    if mask.shape != shape:
        raise ValueError(f"mask shape {mask.shape} does not match volume shape {shape}")
    mask = mask.astype(bool, copy=False)
    if not mask.any():
        raise ValueError("mask is empty: no voxel to score")
    return mask


def body_mask(
    organ_labels: np.ndarray | None = None,
    ct_hu: np.ndarray | None = None,
    *,
    air_threshold_hu: float = -500.0,
) -> np.ndarray:
    """Boolean ``(z, y, x)`` mask of the body.

    With ``organ_labels`` (0 = outside the body, any other label = a tissue) the body is every labelled
    voxel. Without labels it comes from the CT: voxels above ``air_threshold_hu``, holes filled slice by
    slice so the lungs (about -800 HU, but inside the body) are included.
    """
    if organ_labels is not None:
        return np.asarray(organ_labels) > 0
    if ct_hu is None:
        raise ValueError("body_mask needs organ_labels or ct_hu")
    tissue = np.asarray(ct_hu) > air_threshold_hu
    # Fill holes per axial slice: a 3D fill would leave lungs open where they touch the volume's ends.
    return np.stack([ndimage.binary_fill_holes(s) for s in tissue])


def psnr(x: np.ndarray, ref: np.ndarray, *, data_range: float, mask: np.ndarray | None = None) -> float:
    """PSNR in dB = 20·log10(data_range / RMSE), RMSE over ``mask`` (all voxels if None); inf if equal."""
    _check_same_shape(x, ref)
    mask = _check_mask(mask, ref.shape)
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, found {data_range}")
    diff = x.astype(np.float64) - ref.astype(np.float64)
    mse = float(np.mean(diff[mask] ** 2 if mask is not None else diff**2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def nrmse(x: np.ndarray, ref: np.ndarray, *, mask: np.ndarray | None = None) -> float:
    """RMSE / (max(ref) − min(ref)), both over ``mask`` (all voxels if None): the UDPET NRMSE."""
    _check_same_shape(x, ref)
    mask = _check_mask(mask, ref.shape)
    r = ref[mask] if mask is not None else ref
    v = x[mask] if mask is not None else x
    span = float(r.max()) - float(r.min())
    if span <= 0:
        raise ValueError("reference is constant: NRMSE is undefined")
    rmse = math.sqrt(float(np.mean((v.astype(np.float64) - r.astype(np.float64)) ** 2)))
    return rmse / span


def ssim_map(
    x: np.ndarray,
    ref: np.ndarray,
    *,
    data_range: float,
    offset: float = 0.0,
    sigma_vox: float = SSIM_SIGMA_VOX,
) -> np.ndarray:
    """Voxel-wise 3D SSIM map (same shape; float64, computed in float32), Gaussian window of ``sigma_vox``.

    Wang et al. 2004, eq. 13, with local statistics from a Gaussian window (truncated at 3.5 σ),
    C1 = (0.01·L)², C2 = (0.03·L)², L = ``data_range``, population covariances, computed on
    ``(v − offset)`` (the offset is part of the normalisation: SSIM is not shift-invariant).
    """
    _check_same_shape(x, ref)
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, found {data_range}")
    # Work on values divided by L: the statistics are then O(1), so float32 keeps E[x²] − μ² to ~1e-7,
    # far below C2 = 9e-4, at half the cost of float64.
    a = (x.astype(np.float32) - np.float32(offset)) / np.float32(data_range)
    b = (ref.astype(np.float32) - np.float32(offset)) / np.float32(data_range)

    def smooth(v: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(v, sigma=sigma_vox, truncate=SSIM_TRUNCATE, mode="reflect")

    mu_a, mu_b = smooth(a), smooth(b)
    var_a = smooth(a * a)
    var_a -= mu_a * mu_a
    var_b = smooth(b * b)
    var_b -= mu_b * mu_b
    cov = smooth(a * b)
    cov -= mu_a * mu_b
    c1, c2 = np.float32(SSIM_K1**2), np.float32(SSIM_K2**2)  # (K·L)² with L = 1 after the scaling above
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    return (num / den).astype(np.float64)


def ssim3d(
    x: np.ndarray,
    ref: np.ndarray,
    *,
    data_range: float,
    offset: float = 0.0,
    mask: np.ndarray | None = None,
    sigma_vox: float = SSIM_SIGMA_VOX,
) -> float:
    """Mean of :func:`ssim_map` over ``mask`` (every voxel if None). 1.0 for identical volumes."""
    mask = _check_mask(mask, ref.shape)
    smap = ssim_map(x, ref, data_range=data_range, offset=offset, sigma_vox=sigma_vox)
    return float(np.mean(smap[mask] if mask is not None else smap))


def paper_psnr_ssim(x: np.ndarray, ref: np.ndarray, body: np.ndarray) -> tuple[float, float]:
    """(PSNR dB, SSIM) as in the paper: reference min-max normalised inside ``body``, data range 1.

    Computed without copying: PSNR on the raw volumes with data range ``max_body(ref) − min_body(ref)``
    over body voxels equals 10·log10(1/MSE) on the normalised ones, and SSIM with that data range and
    offset ``min_body(ref)`` equals SSIM with data range 1 on the normalised ones.
    """
    _check_same_shape(x, ref)
    body = _check_mask(body, ref.shape)
    lo, hi = float(ref[body].min()), float(ref[body].max())
    if hi <= lo:
        raise ValueError("reference is constant inside the body: paper PSNR/SSIM are undefined")
    return (
        psnr(x, ref, data_range=hi - lo, mask=body),
        ssim3d(x, ref, data_range=hi - lo, offset=lo, mask=body),
    )


def udpet_psnr_ssim_nrmse(x: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    """(PSNR dB, SSIM, NRMSE) as the UDPET challenge scores: whole volume in Bq/ml, no normalisation.

    PSNR = 20·log10(max(ref) / RMSE), SSIM with data range max(ref) − min(ref), NRMSE = RMSE / that range.
    """
    _check_same_shape(x, ref)
    peak, span = float(ref.max()), float(ref.max()) - float(ref.min())
    if peak <= 0 or span <= 0:
        raise ValueError("reference has no positive peak or is constant: UDPET metrics are undefined")
    return psnr(x, ref, data_range=peak), ssim3d(x, ref, data_range=span), nrmse(x, ref)


def suv(bqml: np.ndarray | float, *, weight_kg: float, injected_bq: float) -> np.ndarray | float:
    """Body-weight SUV = activity [Bq/ml] × weight [g] / injected activity [Bq] (1 ml of tissue = 1 g)."""
    if weight_kg <= 0 or injected_bq <= 0:
        raise ValueError(f"weight_kg and injected_bq must be positive, found {weight_kg} and {injected_bq}")
    return bqml * (weight_kg * 1000.0) / injected_bq


@dataclass(frozen=True)
class LesionBias:
    """One lesion's SUV in the scored volume and the reference; biases are signed fractions (−0.1 = −10 %)."""

    label: int
    n_voxels: int
    suvmax_ref: float
    suvmax: float
    suvmax_bias: float
    suvmean_ref: float
    suvmean: float
    suvmean_bias: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def lesion_suv_bias(
    x: np.ndarray,
    ref: np.ndarray,
    lesion_labels: np.ndarray,
    *,
    weight_kg: float,
    injected_bq: float,
) -> list[LesionBias]:
    """Per-lesion SUVmax and SUVmean of ``x`` against ``ref`` over each lesion's mask.

    ``lesion_labels`` is ``(z, y, x)`` integer, 0 = no lesion, k = lesion k. SUVmax is the hottest voxel in
    the mask, SUVmean the mask's mean. Bias = (SUV(x) − SUV(ref)) / SUV(ref): positive when noise pushes
    the value up, negative when smoothing pulls it down. Lesions whose mask is empty are skipped.
    """
    _check_same_shape(x, ref)
    _check_same_shape(lesion_labels, ref)
    labels = np.asarray(lesion_labels)
    found = [int(k) for k in np.unique(labels) if k != 0]
    if not found:
        return []
    scale = float(suv(1.0, weight_kg=weight_kg, injected_bq=injected_bq))
    index = np.array(found)
    n_vox = ndimage.sum_labels(np.ones_like(labels, dtype=np.int64), labels, index)
    max_x = ndimage.maximum(x, labels, index) * scale
    max_r = ndimage.maximum(ref, labels, index) * scale
    mean_x = ndimage.mean(x, labels, index) * scale
    mean_r = ndimage.mean(ref, labels, index) * scale
    out = []
    for i, k in enumerate(found):
        out.append(
            LesionBias(
                label=k,
                n_voxels=int(n_vox[i]),
                suvmax_ref=float(max_r[i]),
                suvmax=float(max_x[i]),
                suvmax_bias=_relative(float(max_x[i]), float(max_r[i])),
                suvmean_ref=float(mean_r[i]),
                suvmean=float(mean_x[i]),
                suvmean_bias=_relative(float(mean_x[i]), float(mean_r[i])),
            )
        )
    return out


def _relative(value: float, ref: float) -> float:
    return (value - ref) / ref if ref != 0 else math.nan


def liver_cov(
    x: np.ndarray,
    liver: np.ndarray,
    *,
    exclude: np.ndarray | None = None,
    erode_vox: int = 2,
) -> float:
    """Coefficient of variation std/mean of ``x`` in the liver: a noise measure in a uniform-ish organ.

    ``liver`` is a boolean mask; it is eroded by ``erode_vox`` voxels (2 voxels = 4 mm on the 2 mm grid,
    about the PSF's half width) so partial-volume edges do not count as noise, and voxels in ``exclude``
    (lesions, dilated by the same amount) are removed. Population std (ddof = 0).
    """
    _check_same_shape(liver, x)
    region = liver.astype(bool)
    if erode_vox > 0:
        region = ndimage.binary_erosion(region, iterations=erode_vox)
    if exclude is not None:
        _check_same_shape(exclude, x)
        bad = exclude.astype(bool)
        if erode_vox > 0 and bad.any():
            bad = ndimage.binary_dilation(bad, iterations=erode_vox)
        region &= ~bad
    if not region.any():
        raise ValueError("liver region is empty after erosion and lesion exclusion")
    values = x[region].astype(np.float64)
    mean = float(values.mean())
    return float(values.std()) / mean if mean != 0 else math.nan


def gap_closed(value: float, lpet_value: float, ceiling_value: float) -> float:
    """Fraction of the LPET → ceiling gap a method closes: 0 = no better than LPET, 1 = at the ceiling.

    Works for higher-is-better (PSNR, SSIM) and lower-is-better (NRMSE) metrics alike, since it is a
    ratio of differences. Negative when the method is worse than LPET; above 1 past the ceiling, which
    happens against a noisy reference whose noise the method's input shares (an LPET thinned from the
    SPET's counts). NaN when LPET is already at the ceiling.
    """
    gap = ceiling_value - lpet_value
    if not all(math.isfinite(v) for v in (value, lpet_value, ceiling_value)) or gap == 0:
        return math.nan
    return (value - lpet_value) / gap
