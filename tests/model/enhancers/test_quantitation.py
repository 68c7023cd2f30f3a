"""preserve_local_mean: the enhanced volume keeps the reference's local mean, detail below the scale."""

from __future__ import annotations

import numpy as np
import pytest

from model.enhancers.quantitation import preserve_local_mean

SPACING = (2.0, 2.0, 2.0)


def test_a_regional_drift_is_removed_and_detail_is_kept() -> None:
    rng = np.random.default_rng(0)
    truth = np.full((24, 48, 48), 5000.0, dtype=np.float32)
    truth[4:20, 8:40, 8:40] = 20000.0  # a hot block of 32 × 64 × 64 mm
    lpet = (truth * rng.gamma(25.0, 1 / 25.0, truth.shape)).astype(np.float32)  # noisy, unbiased
    hot = truth > 10000
    drifted = truth * np.where(hot, 1.2, 1.0).astype(np.float32)  # the hot region 20 % high
    out = preserve_local_mean(drifted, lpet, fwhm_mm=20.0, spacing_mm=SPACING)
    core = np.zeros_like(hot)
    core[8:16, 16:32, 16:32] = True
    assert abs(out[core].mean() / truth[core].mean() - 1) < 0.05
    assert abs(out[~hot].mean() / truth[~hot].mean() - 1) < 0.1
    # Detail below the scale stays the estimate's, not the LPET's noise.
    assert np.std(out[0:3, 0:6, 0:6]) < 0.3 * np.std(lpet[0:3, 0:6, 0:6])


def test_air_is_left_alone_and_bad_input_is_refused() -> None:
    x = np.zeros((8, 16, 16), dtype=np.float32)
    assert np.array_equal(preserve_local_mean(x, x, fwhm_mm=10.0, spacing_mm=SPACING), x)
    with pytest.raises(ValueError, match="shapes differ"):
        preserve_local_mean(x, x[:4], fwhm_mm=10.0, spacing_mm=SPACING)
    with pytest.raises(ValueError, match="fwhm_mm must be positive"):
        preserve_local_mean(x, x, fwhm_mm=0.0, spacing_mm=SPACING)


def test_an_fbp_lpet_s_negative_noise_does_not_raise_the_activity() -> None:
    rng = np.random.default_rng(1)
    truth = np.full((16, 48, 48), 300.0, dtype=np.float32)  # a cold organ at a very low dose
    lpet = (truth + rng.normal(0.0, 900.0, truth.shape)).astype(np.float32)  # FBP: zero-mean, often < 0
    assert (lpet < 0).mean() > 0.3
    smooth = np.full_like(truth, 300.0)  # a denoiser that got the mean right
    out = preserve_local_mean(smooth, lpet, fwhm_mm=25.0, spacing_mm=SPACING)
    # Clipping the LPET before its local mean would make this +100 % and more; the mean is kept.
    assert abs(out.mean() / truth.mean() - 1) < 0.05
