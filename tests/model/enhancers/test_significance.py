"""The LPET's significant lesion-scale differences are put back: a lost lesion returns, noise does not."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from model.enhancers.significance import restore_significant, restore_significant_by_dose
from model.units import FWHM_PER_SIGMA

SPACING = (2.0, 2.0, 2.0)


def _ball(shape: tuple[int, int, int], centre: tuple[int, int, int], radius: float) -> np.ndarray:
    grids = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True)) <= radius**2


def _case(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A flat background, a 12 mm lesion of 4× contrast, and an LPET with 10 % noise per voxel."""
    shape = (40, 64, 64)
    background = np.full(shape, 1000.0, dtype=np.float32)
    lesion = _ball(shape, (20, 32, 32), 3.0)
    truth = background + 3000.0 * lesion
    lpet = truth + np.random.default_rng(seed).normal(0.0, 100.0, shape).astype(np.float32)
    return background, truth, lpet  # the background: a denoiser that flattened the lesion


def test_a_flattened_lesion_comes_back_and_noise_stays_out() -> None:
    flattened, truth, lpet = _case()
    out = restore_significant(
        flattened, lpet, fwhm_mm=5.0, threshold=4.0, window_fwhm_mm=40.0, spacing_mm=SPACING
    )
    lesion = truth > 2000
    # The lesion's mean was the background's; now it is the truth's as seen at 5 mm (the scale at which
    # the difference is put back), within 5 %.
    seen = ndimage.gaussian_filter(truth, 5.0 / FWHM_PER_SIGMA / 2.0, mode="nearest", truncate=3.0)
    assert out[lesion].mean() == pytest.approx(seen[lesion].mean(), rel=0.05)
    # Away from it, noise alone rarely stands out by 3 σ (where the ramp begins): under 1 % of voxels
    # change, and little.
    far = ~_ball(truth.shape, (20, 32, 32), 12.0)
    changed = np.abs(out - flattened)[far]
    assert (changed > 0).mean() < 0.01 and changed.mean() < 1e-3 * flattened.max()
    assert out.dtype == np.float32


def test_an_output_that_agrees_with_the_lpet_is_left_alone() -> None:
    _, truth, lpet = _case(1)
    out = restore_significant(
        truth, lpet, fwhm_mm=5.0, threshold=4.0, window_fwhm_mm=40.0, spacing_mm=SPACING
    )
    # The truth differs from the LPET by noise only: (almost) nothing crosses 3 σ at 5 mm.
    assert np.abs(out - truth).mean() < 0.01 * np.abs(lpet - truth).mean()


def test_a_higher_threshold_puts_back_less() -> None:
    flattened, truth, lpet = _case(2)
    lesion = truth > 2000
    def restored(threshold: float) -> float:
        out = restore_significant(
            flattened, lpet, fwhm_mm=5.0, threshold=threshold, window_fwhm_mm=40.0, spacing_mm=SPACING
        )
        return float(out[lesion].mean())

    means = [restored(k) for k in (3.0, 6.0, 30.0)]
    assert means[0] >= means[1] > means[2]
    assert means[2] == pytest.approx(flattened[lesion].mean(), rel=1e-6)  # beyond any difference: nothing


def test_arguments_are_checked() -> None:
    flattened, _, lpet = _case()
    settings = {"fwhm_mm": 5.0, "window_fwhm_mm": 40.0, "spacing_mm": SPACING}
    with pytest.raises(ValueError, match="shapes differ"):
        restore_significant(flattened[1:], lpet, threshold=4.0, **settings)
    with pytest.raises(ValueError, match="threshold"):
        restore_significant(flattened, lpet, threshold=1.0, **settings)


def test_the_weight_scales_what_is_put_back() -> None:
    flattened, _, lpet = _case(3)
    settings = {"fwhm_mm": 5.0, "threshold": 4.0, "window_fwhm_mm": 40.0, "spacing_mm": SPACING}
    full = restore_significant(flattened, lpet, **settings) - flattened
    half = restore_significant(flattened, lpet, weight=0.5, **settings) - flattened
    np.testing.assert_allclose(half, 0.5 * full, rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(restore_significant(flattened, lpet, weight=0.0, **settings), flattened)


def test_the_low_dose_setting_takes_the_rest_of_the_weight() -> None:
    flattened, _, lpet = _case(4)
    common = {"window_fwhm_mm": 40.0, "spacing_mm": SPACING}

    def by_dose(weight: float, low: tuple[float, float] | None) -> np.ndarray:
        return restore_significant_by_dose(
            flattened, lpet, setting=(5.0, 4.0), low_setting=low, weight=weight, **common
        )

    fine = restore_significant(flattened, lpet, fwhm_mm=5.0, threshold=4.0, **common)
    coarse = restore_significant(flattened, lpet, fwhm_mm=7.0, threshold=5.0, **common)
    np.testing.assert_array_equal(by_dose(1.0, (7.0, 5.0)), fine)  # above the ramp: the low one is idle
    np.testing.assert_array_equal(by_dose(0.0, None), flattened)  # no low setting: nothing below the ramp
    np.testing.assert_array_equal(by_dose(0.0, (7.0, 5.0)), coarse)  # below it: the low one alone
