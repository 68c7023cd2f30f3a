"""Put back what the LPET shows beyond its noise: a small lesion the denoiser flattened.

A denoiser trained for the least error over a whole volume flattens what it cannot tell from noise,
and a lesion of 10–14 mm at a 4–5 mm reconstruction's resolution is such a thing: on validation
phantoms with such lesions added (``model/evaluation/lesion_insertion.py``) the sampler's output lost
about a quarter of their SUVmax at 10 % dose, as much as the best Gaussian filter, and the transfer
set's lesions lost more. The LPET still holds the lesion, under its noise. At a lesion's scale (a
Gaussian of ``fwhm_mm``) the difference r = G(LPET) − G(output) is noise where the output is right,
and noise plus the lost contrast where it is not. Its local spread σ (the RMS of r over a window of
several centimetres, so that a lesion raises it little) says how large noise alone makes it. Where
|r| exceeds ``threshold`` · σ, r is put back in full, with a linear ramp from threshold − 1 to
threshold + 1 so that the output stays continuous: a lesion comes back with its contrast, noise
almost never crosses the threshold, and the output then agrees with the LPET at that scale to within
its noise. Cold spots are treated alike (a hot spot the model invented is taken out again).

Only where the LPET is clean enough: placed below a ≈ 10 % dose equivalent, what stands out of the
noise at 5 mm is as often the model's rightful smoothing of structure as a lesion, and putting it
back cost 0.2–2.8 dB on validation style-cases; above ≈ 12 % no style-case lost more than 0.06 dB.
The caller weights the step by the dose equivalent (:func:`model.enhancers.detail.dose_weight`).
Chosen on validation (benchmarks/results/validate_significance_*.md).
"""

from __future__ import annotations

import numpy as np

from model.enhancers.quantitation import smooth_fwhm

__all__ = ["restore_significant", "restore_significant_by_dose"]

_RAMP = 1.0  # half-width, in units of σ, of the ramp around the threshold


def restore_significant(
    output: np.ndarray,
    lpet: np.ndarray,
    *,
    fwhm_mm: float,
    threshold: float,
    window_fwhm_mm: float,
    spacing_mm: tuple[float, float, float],
    weight: float = 1.0,
) -> np.ndarray:
    """``output + weight · w · r`` with r = G(lpet) − G(output) at ``fwhm_mm``, w = 0 for |r| ≤
    (threshold − 1) σ rising linearly to 1 at (threshold + 1) σ; σ² = r² smoothed over
    ``window_fwhm_mm`` (float32 out).

    Both ``(z, y, x)`` in the same units on the same grid of ``spacing_mm``.
    """
    if output.shape != lpet.shape:
        raise ValueError(f"shapes differ: output {output.shape}, lpet {lpet.shape}")
    if fwhm_mm <= 0 or window_fwhm_mm <= 0 or threshold <= _RAMP:
        raise ValueError(
            f"fwhm_mm ({fwhm_mm}) and window_fwhm_mm ({window_fwhm_mm}) must be positive and threshold "
            f"({threshold}) above {_RAMP}"
        )

    out = output.astype(np.float32, copy=False)
    r = smooth_fwhm(lpet, fwhm_mm, spacing_mm)
    r -= smooth_fwhm(out, fwhm_mm, spacing_mm)
    spread = np.sqrt(smooth_fwhm(r * r, window_fwhm_mm, spacing_mm))
    # |r| / σ, with σ held above zero (air: r and σ both vanish, and so does the weight).
    ratio = np.abs(r) / np.maximum(spread, np.float32(1e-12) + np.float32(1e-6) * float(spread.max()))
    w = np.clip((ratio - (threshold - _RAMP)) / (2 * _RAMP), 0.0, 1.0, out=ratio)
    if weight != 1.0:
        w *= np.float32(weight)
    return (out + w * r).astype(np.float32, copy=False)


def restore_significant_by_dose(
    output: np.ndarray,
    lpet: np.ndarray,
    *,
    setting: tuple[float, float],
    low_setting: tuple[float, float] | None,
    weight: float,
    window_fwhm_mm: float,
    spacing_mm: tuple[float, float, float],
) -> np.ndarray:
    """The step at ``setting`` (FWHM mm, threshold σ) with ``weight`` (the dose ramp's), and the rest of
    the weight to ``low_setting`` where one is given: a noisy LPET is tested at a coarser scale instead
    of not at all. A part whose weight is 0 is not computed."""
    out = output
    for part, w in ((setting, weight), (low_setting, 1.0 - weight)):
        if part is not None and w > 0:
            fwhm, threshold = part
            out = restore_significant(out, lpet, fwhm_mm=fwhm, threshold=threshold,
                                      window_fwhm_mm=window_fwhm_mm, spacing_mm=spacing_mm, weight=w)
    return out
