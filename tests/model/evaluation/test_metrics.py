"""Metrics on toy volumes whose values are known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from model.evaluation import metrics


def _blobs(shape=(12, 20, 22), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    vol = 1000.0 + 4000.0 * np.exp(-((z - 6) ** 2 + (y - 9) ** 2 + (x - 11) ** 2) / 12.0)
    return (vol + rng.normal(0, 50, shape)).astype(np.float32)


def test_identical_volumes_score_perfectly() -> None:
    ref = _blobs()
    body = np.ones(ref.shape, bool)
    assert metrics.psnr(ref, ref, data_range=1.0) == math.inf
    assert metrics.ssim3d(ref, ref, data_range=float(ref.max() - ref.min())) == pytest.approx(1.0, abs=1e-6)
    p, s = metrics.paper_psnr_ssim(ref, ref, body)
    assert p == math.inf and s == pytest.approx(1.0, abs=1e-6)
    p, s, n = metrics.udpet_psnr_ssim_nrmse(ref, ref)
    assert p == math.inf and s == pytest.approx(1.0, abs=1e-6) and n == 0.0


def test_known_mse_gives_known_psnr() -> None:
    ref = np.zeros((4, 5, 6), np.float32)
    x = ref + 0.1  # MSE = 0.01 → PSNR = 10·log10(1 / 0.01) = 20 dB with data range 1
    assert metrics.psnr(x, ref, data_range=1.0) == pytest.approx(20.0, abs=1e-4)
    assert metrics.psnr(x, ref, data_range=10.0) == pytest.approx(40.0, abs=1e-4)


def test_psnr_counts_only_the_mask() -> None:
    ref = np.zeros((4, 4, 4), np.float32)
    x = ref.copy()
    x[0] = 5.0  # error only in slice 0
    mask = np.zeros(ref.shape, bool)
    mask[1:] = True
    assert metrics.psnr(x, ref, data_range=1.0, mask=mask) == math.inf
    assert metrics.psnr(x, ref, data_range=1.0) == pytest.approx(10 * math.log10(1 / (25 / 4)), abs=1e-6)


def test_udpet_psnr_and_nrmse_in_bqml() -> None:
    ref = np.full((6, 6, 6), 2.0, np.float32)
    ref[3, 3, 3] = 10.0  # max 10, min 2
    x = ref + 1.0  # RMSE = 1
    p, s, n = metrics.udpet_psnr_ssim_nrmse(x, ref)
    assert p == pytest.approx(20.0, abs=1e-5)  # 20·log10(10 / 1)
    assert n == pytest.approx(1.0 / 8.0)  # RMSE / (max − min)
    assert 0.0 < s < 1.0


def test_paper_normalisation_is_ref_min_max_inside_the_body() -> None:
    ref = np.zeros((6, 6, 6), np.float32)
    body = np.zeros(ref.shape, bool)
    body[1:5, 1:5, 1:5] = True
    ref[body] = 100.0
    ref[2, 2, 2] = 300.0  # body range: 100 … 300, span 200
    x = ref.copy()
    x[body] += 20.0  # RMSE 20 in the body → normalised RMSE 0.1 → 20 dB
    x[~body] += 1e6  # outside the body: ignored
    p, _ = metrics.paper_psnr_ssim(x, ref, body)
    assert p == pytest.approx(20.0, abs=1e-4)


def test_ssim_map_matches_scikit_image() -> None:
    ref = _blobs()
    x = _blobs(seed=1) * 0.9 + 100.0
    span = float(ref.max() - ref.min())
    ours = metrics.ssim_map(x, ref, data_range=span)
    _, theirs = structural_similarity(
        ref.astype(np.float64), x.astype(np.float64), data_range=span, gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, full=True,
    )
    np.testing.assert_allclose(ours, theirs, atol=2e-5)


def test_ssim_of_constant_volumes_is_the_luminance_term() -> None:
    a, b = 0.4, 0.6  # data range 1: SSIM = (2ab + C1) / (a² + b² + C1), variances are zero
    x = np.full((5, 5, 5), a, np.float32)
    ref = np.full((5, 5, 5), b, np.float32)
    c1 = 0.01**2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert metrics.ssim3d(x, ref, data_range=1.0) == pytest.approx(expected, rel=1e-5)
    # A shift is part of the normalisation: SSIM is not shift-invariant.
    shifted = metrics.ssim3d(x + 1, ref + 1, data_range=1.0)
    assert shifted != pytest.approx(expected, rel=1e-3)
    assert metrics.ssim3d(x + 1, ref + 1, data_range=1.0, offset=1.0) == pytest.approx(expected, rel=1e-5)


def test_ssim_falls_with_noise() -> None:
    ref = _blobs()
    rng = np.random.default_rng(3)
    span = float(ref.max() - ref.min())
    low = metrics.ssim3d(ref + rng.normal(0, 100, ref.shape), ref, data_range=span)
    high = metrics.ssim3d(ref + rng.normal(0, 400, ref.shape), ref, data_range=span)
    assert 1.0 > low > high > 0.0


def test_suv_uses_weight_in_grams() -> None:
    # 5000 Bq/ml × 70 000 g / 350 MBq = 1.0
    assert metrics.suv(5000.0, weight_kg=70.0, injected_bq=3.5e8) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="positive"):
        metrics.suv(1.0, weight_kg=0.0, injected_bq=1.0)


def test_lesion_suv_bias_is_signed_per_lesion() -> None:
    ref = np.full((8, 8, 8), 1000.0, np.float32)
    labels = np.zeros(ref.shape, np.uint16)
    labels[1:3, 1:3, 1:3] = 1
    labels[5:7, 5:7, 5:7] = 2
    ref[labels == 1] = 4000.0
    ref[labels == 2] = 2000.0
    x = ref.copy()
    x[1, 1, 1] = 4800.0  # lesion 1: max +20 %, mean + 800/8 = +100 → +2.5 %
    x[labels == 2] = 1500.0  # lesion 2: max and mean −25 %
    out = metrics.lesion_suv_bias(x, ref, labels, weight_kg=70.0, injected_bq=3.5e8)
    assert [o.label for o in out] == [1, 2]
    assert out[0].n_voxels == 8
    assert out[0].suvmax_bias == pytest.approx(0.20)
    assert out[0].suvmean_bias == pytest.approx(0.025)
    assert out[0].suvmax_ref == pytest.approx(0.8)  # 4000 Bq/ml × 70 000 g / 350 MBq
    assert out[1].suvmax_bias == pytest.approx(-0.25) and out[1].suvmean_bias == pytest.approx(-0.25)
    assert metrics.lesion_suv_bias(x, ref, np.zeros_like(labels), weight_kg=70, injected_bq=1e8) == []


def test_liver_cov_known_value_and_exclusions() -> None:
    x = np.zeros((10, 10, 10), np.float32)
    liver = np.zeros(x.shape, bool)
    liver[1:9, 1:9, 1:9] = True
    x[liver] = 100.0
    assert metrics.liver_cov(x, liver, erode_vox=0) == 0.0
    x[1:5][liver[1:5]] = 300.0  # half at 300, half at 100: std/mean = 100/200
    assert metrics.liver_cov(x, liver, erode_vox=0) == pytest.approx(0.5)
    # A lesion inside the liver is excluded, edges are eroded away.
    y = np.full(x.shape, 100.0, np.float32)
    y[0] = y[9] = 1e5
    lesion = np.zeros(x.shape, bool)
    lesion[4, 4, 4] = True
    y[lesion] = 1e6
    assert metrics.liver_cov(y, np.ones(x.shape, bool), exclude=lesion, erode_vox=1) == 0.0


def test_gap_closed() -> None:
    assert metrics.gap_closed(25.0, 20.0, 30.0) == pytest.approx(0.5)
    assert metrics.gap_closed(20.0, 20.0, 30.0) == 0.0
    assert metrics.gap_closed(18.0, 20.0, 30.0) == pytest.approx(-0.2)
    assert metrics.gap_closed(0.15, 0.2, 0.1) == pytest.approx(0.5)  # lower-is-better works too
    assert math.isnan(metrics.gap_closed(1.0, 2.0, 2.0))
    assert math.isnan(metrics.gap_closed(math.inf, 2.0, 3.0))


def test_body_mask_fills_the_lungs() -> None:
    ct = np.full((3, 20, 20), -1000.0, np.float32)
    ct[:, 3:17, 3:17] = 40.0
    ct[:, 6:10, 6:10] = -800.0  # lung inside the body
    body = metrics.body_mask(ct_hu=ct)
    assert body[:, 7, 7].all() and not body[:, 0, 0].any()
    labels = np.zeros(ct.shape, np.uint8)
    labels[1, 5, 5] = 3
    assert metrics.body_mask(labels).sum() == 1


def test_shape_mismatch_is_reported() -> None:
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)), data_range=1.0)
