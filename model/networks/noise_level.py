"""How noisy is a PET volume, and where does that put it on the diffusion schedule.

:func:`noise_index` is a robust, single-image estimate of the relative noise variance in a band of
spatial frequencies: the median over the body of ``band² / smooth``, where ``band`` is the difference
of two Gaussian smoothings of the image and ``smooth`` the coarser one, the local mean. Reconstructed
PET noise variance grows like activity / dose, so the index grows like 1 / dose and does not depend on
the uptake pattern. It is biased (it also sees fine structure, and each noise texture only in part),
which the :class:`NoiseCurve` calibrates away: t* is read off that curve.

Which band matters. The denoiser works in the latent, whose noise σ_t is what t means. A fine high-pass
(the first checkpoints' band: the image minus its 1-voxel smoothing) sees the grain of a 2 mm
reconstruction but almost none of a scanner's 4–5.5 mm, post-filtered one, which then looks like a
standard dose however noisy its latent is. The difference of the 0.7- and 2.5-voxel smoothings
(:data:`LATENT_BAND`) follows the latent's noise across reconstructions best of the bands tried on
validation phantoms through 12 training scanner styles at 2–50 % dose: log σ²_latent scatters by 0.33
around a power law of it, against 0.60 for the fine high-pass and 0.34–0.51 for other bands. Matched
to σ_t over scanner styles (:func:`model.training.calibration.match_noise_index`), it places an LPET
within a median factor 2^0.33 of the right dose equivalent on those styles (the fine band: 2^1.18;
``benchmarks/results/noise_index.md``). A curve records the band it was calibrated with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

__all__ = ["FINE_BAND", "LATENT_BAND", "NoiseCurve", "noise_index"]


#: The band (inner, outer Gaussian σ in model voxels) new calibrations use, and the one a curve that
#: names none was calibrated with (the first checkpoints: the image minus its 1-voxel smoothing).
LATENT_BAND: tuple[float, float] = (0.7, 2.5)
FINE_BAND: tuple[float, float] = (0.0, 1.0)


def noise_index(
    volume: np.ndarray, *, band: tuple[float, float] = LATENT_BAND, body_fraction: float = 0.1
) -> float:
    """Relative noise variance of a ``(z, y, x)`` activity volume in a fixed intensity unit.

    ``band = (inner, outer)``: Gaussian σ in voxels of the two smoothings whose difference is
    measured (inner 0 = the image itself). Voxels whose local mean (the outer smoothing) exceeds
    ``body_fraction`` × its 99th percentile count as body. Returns 0.0 for an empty volume. The unit
    of the input matters (the index scales with it): always pass Bq/ml ÷ the checkpoint's fixed scale.
    """
    inner, outer = band
    if not 0 <= inner < outer:
        raise ValueError(f"noise_index band must satisfy 0 ≤ inner < outer, found {band}")
    v = np.asarray(volume, dtype=np.float32)
    smooth = gaussian_filter(v, outer, mode="nearest")
    hp = (gaussian_filter(v, inner, mode="nearest") if inner > 0 else v) - smooth
    if not smooth.size:
        return 0.0
    top = float(np.percentile(smooth, 99.0))
    if top <= 0:  # almost no counts (a tiny dose): the few non-zero voxels are the body
        top = float(smooth.max())
        if top <= 0:
            return 0.0
    mask = smooth > body_fraction * top
    if not mask.any():
        return 0.0
    return float(np.median(hp[mask] ** 2 / smooth[mask]))


@dataclass(frozen=True)
class NoiseCurve:
    """The schedule's noise measured once on training data (stored in the checkpoint).

    For each Poisson step ``t`` (dose ``d_t``): ``latent_sigma`` is the RMS of E(perturb(x, d_t)) − E(x)
    in scaled latent units, ``noise_index`` the image-domain :func:`noise_index` (in ``index_band``) of
    an image whose latent noise is σ_t: measured on perturb(x, d_t) by the first calibrations, matched
    to σ_t over many scanner styles since (:func:`model.training.calibration.match_noise_index`).
    """

    t: tuple[float, ...]
    dose: tuple[float, ...]
    latent_sigma: tuple[float, ...]
    noise_index: tuple[float, ...]
    index_band: tuple[float, float] = FINE_BAND

    def __post_init__(self) -> None:
        n = len(self.t)
        if n < 2 or any(len(v) != n for v in (self.dose, self.latent_sigma, self.noise_index)):
            raise ValueError(
                f"NoiseCurve needs ≥ 2 points and equal lengths, found t {n}, dose {len(self.dose)}, "
                f"latent_sigma {len(self.latent_sigma)}, noise_index {len(self.noise_index)}"
            )
        if any(b <= a for a, b in zip(self.t, self.t[1:], strict=False)):
            raise ValueError(f"NoiseCurve.t must increase strictly, found {self.t}")
        if min(self.latent_sigma) <= 0 or min(self.noise_index) <= 0:
            raise ValueError("NoiseCurve: latent_sigma and noise_index must be positive")

    @staticmethod
    def _monotone(values: Sequence[float]) -> np.ndarray:
        # Measured on finite data a curve can wiggle; noise only grows with t, so take the running max.
        return np.maximum.accumulate(np.asarray(values, dtype=np.float64))

    def latent_sigma_at(self, t: float | np.ndarray) -> np.ndarray:
        """σ_t (scaled latent units) at any t, held constant outside the measured range.

        Interpolated linearly in σ² (noise variances add): a curve that starts at σ_0 = 0 (the
        mean-preserving forward process adds nothing at dose 1) then grows like √t near 0, where a
        log-linear interpolation would keep σ near 0 over the whole first interval.
        """
        return np.sqrt(np.interp(t, self.t, self._monotone(self.latent_sigma) ** 2))

    def t_from_latent_sigma(self, sigma: float) -> float:
        """The t whose σ_t is ``sigma``: the inverse of :meth:`latent_sigma_at` (linear in σ², clipped to
        the measured range)."""
        variance = self._monotone(self.latent_sigma) ** 2
        variance = variance + np.arange(variance.size) * 1e-12  # flat stretches: increasing x for interp
        return float(np.interp(float(sigma) ** 2, variance, self.t))

    def t_from_noise_index(self, value: float) -> float:
        """t* whose measured noise index matches ``value`` (clipped to the measured range)."""
        curve = np.log(self._monotone(self.noise_index))
        # np.interp needs increasing x; ties (flat stretches) are broken by a tiny ramp.
        curve = curve + np.arange(curve.size) * 1e-9
        return float(np.interp(np.log(max(value, 1e-30)), curve, self.t))

    def image_index(self, volume: np.ndarray) -> float:
        """:func:`noise_index` of ``volume`` (Bq/ml ÷ the checkpoint's scale) in this curve's band."""
        return noise_index(volume, band=self.index_band)

    def t_from_image(self, volume: np.ndarray) -> float:
        """t* of an image of unknown dose (Bq/ml ÷ the checkpoint's scale): its noise index, read off
        the curve."""
        return self.t_from_noise_index(self.image_index(volume))

    def to_json(self) -> dict[str, list[float]]:
        out = {k: [float(x) for x in getattr(self, k)] for k in ("t", "dose", "latent_sigma", "noise_index")}
        out["index_band"] = [float(x) for x in self.index_band]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Sequence[float]]) -> NoiseCurve:
        band = tuple(float(x) for x in data.get("index_band", FINE_BAND))
        if len(band) != 2:
            raise ValueError(f"NoiseCurve.index_band must hold two numbers, found {data['index_band']}")
        return cls(
            **{k: tuple(float(x) for x in data[k]) for k in ("t", "dose", "latent_sigma", "noise_index")},
            index_band=band,  # type: ignore[arg-type]
        )
