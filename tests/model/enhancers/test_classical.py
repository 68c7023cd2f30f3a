"""Every baseline through the Enhancer contract, and tuning on toy cases."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from model.enhance import Enhancer
from model.enhancers.classical import METHODS, body_box, estimate_noise_sigma, make_baseline
from model.evaluation.tuning import central_slab, tune
from model.units import FWHM_PER_SIGMA
from tests.support.toy_cases import toy_case


@pytest.fixture(scope="module")
def case():
    return toy_case(0, doses=(0.1,))


def _rmse(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a[mask] - b[mask]) ** 2)))


@pytest.mark.parametrize("method", list(METHODS))
def test_contract(method: str, case) -> None:
    enhancer = make_baseline(method)
    assert isinstance(enhancer, Enhancer)
    lpet = case.lpet_bqml[0.1]
    before = lpet.copy()
    ct = case.ct_hu if enhancer.info.uses_ct else None
    out = enhancer.enhance_array(lpet, ct, spacing_mm=case.spacing_mm)
    np.testing.assert_array_equal(lpet, before)  # input untouched
    assert out.shape == lpet.shape and out.dtype == np.float32
    assert np.isfinite(out).all()
    assert out.min() >= 0.0  # the LPET is non-negative, so is every output
    # Total activity within a few per cent.
    assert out.sum() == pytest.approx(lpet.sum(), rel=0.03)
    noise_in = _rmse(lpet, case.expectation_bqml, case.body)
    noise_out = _rmse(out, case.expectation_bqml, case.body)
    if method == "lpet":
        np.testing.assert_array_equal(out, lpet)
    else:
        assert noise_out < 0.8 * noise_in, f"{method} did not reduce noise: {noise_in:.0f} → {noise_out:.0f}"


@pytest.mark.parametrize("method", list(METHODS))
def test_through_sitk_images(method: str, case) -> None:
    enhancer = make_baseline(method)
    pet = sitk.GetImageFromArray(case.lpet_bqml[0.1])
    pet.SetSpacing((2.0, 2.0, 2.0))
    ct = sitk.GetImageFromArray(case.ct_hu)
    ct.CopyInformation(pet)
    out = enhancer.enhance(pet, ct)
    assert out.GetSize() == pet.GetSize() and out.GetSpacing() == pet.GetSpacing()
    if enhancer.info.requires_ct:
        with pytest.raises(ValueError, match="needs a CT"):
            enhancer.enhance(pet)


def test_bilateral_keeps_a_ct_edge_sharper_than_gaussian(case) -> None:
    # Activity uniform within each CT tissue (body 3000, liver 7000 Bq/ml): the range kernel stops the
    # averaging at the CT edges, so the guided filter leaves it almost as is; a Gaussian blurs the edges.
    pet = np.where(case.organ_labels == 2, 7000.0, np.where(case.body, 3000.0, 0.0)).astype(np.float32)
    gauss = make_baseline("gaussian", fwhm_mm=8.0).enhance_array(pet, spacing_mm=case.spacing_mm)
    bilateral = make_baseline("bilateral", spatial_fwhm_mm=8.0, range_sigma_hu=5.0)
    guided = bilateral.enhance_array(pet, case.ct_hu, spacing_mm=case.spacing_mm)
    assert _rmse(guided, pet, case.body) < 0.05 * _rmse(gauss, pet, case.body)


def test_parameters_are_validated() -> None:
    with pytest.raises(ValueError, match="fwhm_mm must be positive"):
        make_baseline("gaussian", fwhm_mm=0)
    with pytest.raises(ValueError, match="unknown BM4D profile"):
        make_baseline("bm4d", profile="fastest")
    with pytest.raises(ValueError, match="unknown baseline"):
        make_baseline("median")
    with pytest.raises(ValueError, match="needs a CT"):
        make_baseline("bilateral").enhance_array(np.ones((4, 4, 4), np.float32), spacing_mm=(2, 2, 2))


def test_body_box_and_noise_sigma(case) -> None:
    box = body_box(case.expectation_bqml, margin_vox=0)
    inside = np.zeros(case.body.shape, bool)
    inside[box] = True
    assert inside[case.body].mean() > 0.95  # the box holds the body
    assert inside.sum() < case.body.size  # and not the whole volume
    assert estimate_noise_sigma(case.lpet_bqml[0.1]) > 2 * estimate_noise_sigma(case.spet_bqml)


def test_tuning_picks_the_better_parameter() -> None:
    noisy = [toy_case(1, doses=(0.1,)), toy_case(2, doses=(0.1,))]
    result = tune("gaussian", noisy, 0.1, grid={"fwhm_mm": (0.5, 6.0)})
    assert result.params == {"fwhm_mm": 6.0}
    assert result.n_cases == 2 and len(result.grid) == 2
    assert result.grid[1]["psnr_db"] > result.grid[0]["psnr_db"] == pytest.approx(result.grid[0]["psnr_db"])
    # When the LPET already equals the reference, smoothing only loses: the smallest FWHM wins.
    clean = toy_case(3, doses=(0.1,))
    clean.lpet_bqml[0.1] = clean.spet_bqml.copy()
    assert tune("gaussian", [clean], 0.1, grid={"fwhm_mm": (0.5, 6.0)}).params == {"fwhm_mm": 0.5}


def test_tuning_two_parameters_and_defaults(case) -> None:
    result = tune("bilateral", [case], 0.1, grid={"spatial_fwhm_mm": (2.0, 8.0), "range_sigma_hu": (50.0,)})
    assert result.params["spatial_fwhm_mm"] == 8.0 and result.params["range_sigma_hu"] == 50.0
    assert tune("lpet", [case], 0.1).params == {}
    with pytest.raises(KeyError, match="no LPET at dose 0.25"):
        tune("gaussian", [case], 0.25)


def test_central_slab(case) -> None:
    slab = central_slab(case, 6)
    assert slab.spet_bqml.shape[0] == 6 and slab.lpet_bqml[0.1].shape[0] == 6
    assert central_slab(case, None) is case


def _bilateral_brute_force(pet, ct, spacing, fwhm_mm, sigma_hu):
    """out(p) = Σ_q Gs Gr PET(q) / Σ_q Gs Gr over every q in the volume, one voxel at a time."""
    sigma = fwhm_mm / FWHM_PER_SIGMA
    expected = np.zeros_like(pet)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in pet.shape], indexing="ij"), -1).reshape(-1, 3)
    for p in grid:
        d2 = (((grid - p) * spacing) ** 2).sum(1)
        w = np.exp(-d2 / (2 * sigma**2) - (ct[tuple(grid.T)] - ct[tuple(p)]) ** 2 / (2 * sigma_hu**2))
        expected[tuple(p)] = (w * pet[tuple(grid.T)]).sum() / w.sum()
    return expected


def test_bilateral_matches_the_definition() -> None:
    rng = np.random.default_rng(5)
    pet = rng.uniform(100, 1000, (5, 6, 7)).astype(np.float32)  # uniformly positive: body_box keeps it all
    spacing = (3.0, 2.0, 2.0)
    # CT values on the filter's levels (lowest + k·σr/2): the piecewise-linear method is then exact.
    ct = rng.choice([-100.0, -80.0, 0.0, 60.0], pet.shape).astype(np.float32)
    enhancer = make_baseline("bilateral", spatial_fwhm_mm=6.0, range_sigma_hu=40.0)
    out = enhancer.enhance_array(pet, ct, spacing_mm=spacing)
    np.testing.assert_allclose(out, _bilateral_brute_force(pet, ct, spacing, 6.0, 40.0), rtol=2e-4)
    # Any other CT values: interpolated between levels. Even CT noise as wide as σr (a harsh case)
    # stays within ~1 %.
    ct = rng.uniform(-100, 100, pet.shape).astype(np.float32)
    out = enhancer.enhance_array(pet, ct, spacing_mm=spacing)
    exact = _bilateral_brute_force(pet, ct, spacing, 6.0, 40.0)
    np.testing.assert_allclose(out, exact, rtol=1.5e-2)
    assert np.mean(np.abs(out - exact) / exact) < 3e-3
