"""Scanner styles of training: native grids, the inference-like way back, styled slabs and t labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.grid import resample_isotropic
from model.networks.noise_level import LATENT_BAND, NoiseCurve, noise_index
from model.physics import ReconAlgorithm, ReconSettings
from model.training.data import TrainingCase
from model.training.patches import ForwardProcess, PatchSampler, PerturbedPool
from model.training.styles import ScannerStyle, draw_style, native_shape, to_model_grid, to_native
from tests.support.model_toys import one_thread, tiny_phantom  # noqa: F401 - one_thread: autouse fixture

FBP = ReconSettings(algorithm=ReconAlgorithm.FBP, postfilter_fwhm_mm=0.0)


def _style(pixel: float, slice_mm: float = 2.0, recon: ReconSettings = FBP) -> ScannerStyle:
    return ScannerStyle(pixel_mm=pixel, slice_mm=slice_mm, recon=recon, count_scale=1.0)


def test_native_grid_covers_the_same_extent() -> None:
    assert native_shape((32, 96, 96), 2.0, _style(4.0, 4.0)) == (16, 48, 48)
    assert native_shape((32, 96, 96), 2.0, _style(5.5, 3.0)) == (21, 35, 35)


def test_the_way_back_is_the_node_s_own_resampling() -> None:
    rng = np.random.default_rng(0)
    native = rng.random((8, 24, 24)).astype(np.float32)
    ours = to_model_grid(native, (16, 48, 48), 2.0, _style(4.0, 4.0))
    node = resample_isotropic(native, (4.0, 4.0, 4.0), 2.0)  # what inference does with a 4 mm study
    assert node.shape == ours.shape
    inner = np.s_[1:-1, 1:-1, 1:-1]  # at the outer half voxel SimpleITK holds the edge, ours too
    np.testing.assert_allclose(ours[inner], node[inner], atol=1e-5)


def test_to_native_keeps_activity_and_blurs_like_a_bigger_voxel() -> None:
    slab = np.zeros((16, 48, 48), np.float32)
    slab[:, 20:28, 20:28] = 10.0
    native = to_native(slab, 2.0, _style(4.0, 4.0))
    # Activity (mean × volume) is kept to within the edges' rounding.
    assert native.mean() == pytest.approx(slab.mean(), rel=0.02)
    flat = to_native(np.full((16, 48, 48), 3.0, np.float32), 2.0, _style(5.5, 3.0))
    np.testing.assert_allclose(flat, 3.0, rtol=1e-6)


def test_draw_style_spans_the_scanners_we_meet() -> None:
    rng = np.random.default_rng(1)
    styles = [draw_style(rng) for _ in range(300)]
    assert {s.recon.algorithm for s in styles} == {ReconAlgorithm.FBP, ReconAlgorithm.OSEM}
    assert min(s.pixel_mm for s in styles) == 2.0 and max(s.pixel_mm for s in styles) == 5.5
    assert {s.slice_mm for s in styles} == {2.0, 3.0, 4.0}
    assert max(s.count_scale for s in styles) / min(s.count_scale for s in styles) > 8
    assert max(s.recon.postfilter_fwhm_mm for s in styles) > 6.5


def _pool(forward=ForwardProcess.INJECT, **kwargs) -> PerturbedPool:  # noqa: ANN001
    pet, ct = tiny_phantom(0, (8, 64, 64))
    sampler = PatchSampler(
        [TrainingCase("c", pet, ct)], patch=(8, 32, 32), scale_bqml=4000.0,
        rng=np.random.default_rng(0), with_ct=True,
    )  # fmt: skip
    return PerturbedPool(
        sampler, timesteps=400, dose_min=1e-3, size=2, forward=forward,
        generator=torch.Generator().manual_seed(0), **kwargs,
    )  # fmt: skip


def _grain(noise: np.ndarray) -> float:
    """Correlation of in-plane neighbours: how coarse the noise is."""
    a, b = noise[..., :-1].ravel(), noise[..., 1:].ravel()
    return float(np.corrcoef(a, b)[0, 1])


def test_a_styled_slab_is_a_coarser_scanner_s_image_on_the_model_grid() -> None:
    pool = _pool()
    body = pool.sampler.pet[0] > 0.2 * pool.sampler.pet[0].max()
    grains = {}
    for pixel in (2.0, 5.5):
        clean, noisy = pool.styled_slab(0, 0, 0.05, _style(pixel))
        assert clean.shape == noisy.shape == pool.sampler.pet[0].shape
        # Injection keeps the mean: the body's activity is that of the clean slab.
        assert noisy[body].mean() == pytest.approx(clean[body].mean(), rel=0.05)
        grains[pixel] = _grain(noisy - clean)
    # On the model grid a 5.5 mm scanner's noise is much coarser than a 2 mm one's.
    assert grains[5.5] > grains[2.0] + 0.3


def test_slabs_are_labelled_where_the_node_would_place_them() -> None:
    curve = NoiseCurve(
        t=(0.0, 100.0, 200.0, 300.0),
        dose=(1.0, 0.18, 0.03, 0.006),
        latent_sigma=(0.1, 0.3, 0.6, 1.2),
        noise_index=(1e-4, 1e-3, 1e-2, 1e-1),
        index_band=LATENT_BAND,
    )
    pool = _pool(noise_curve=curve, styles=True, dose_range=(0.01, 1.0))
    pool.batch(1)
    for slab in pool.slabs:
        # In the curve's band, as the node reads an LPET of unknown dose.
        index = noise_index(pool.sampler.normalise(0, slab.noisy), band=LATENT_BAND)
        assert slab.t == round(curve.t_from_noise_index(index))
    # Without a curve the label is the dose's step; lower doses sit later on the schedule.
    plain = _pool()
    assert plain.t_of_dose(1.0) == 0 and plain.t_of_dose(0.01) == round(400 * 2 / 3)
    assert plain.t_of_dose(0.001) == 400


def test_injection_keeps_lesion_contrast_where_perturb_loses_it() -> None:
    inject, perturb = _pool(), _pool(ForwardProcess.PERTURB)
    spet = inject.sampler.pet[0]
    hot = spet > np.percentile(spet, 99)
    means = {}
    for name, pool in (("inject", inject), ("perturb", perturb)):
        slabs = [pool.perturb_slab(0, 0, pool.t_of_dose(0.5), recon=ReconSettings()) for _ in range(4)]
        means[name] = float(np.mean([s[hot].mean() for s in slabs]))
    assert means["inject"] == pytest.approx(spet[hot].mean(), rel=0.03)
    assert means["perturb"] < 0.97 * spet[hot].mean()


def test_a_site_s_own_spet_is_made_lower_dose_on_its_own_grid() -> None:
    pet, ct = tiny_phantom(0, (8, 64, 64))
    site = TrainingCase("site", pet, ct, native_spacing_mm=(4.0, 4.0, 4.0))
    sampler = PatchSampler(
        [site], patch=(8, 32, 32), scale_bqml=4000.0, rng=np.random.default_rng(0), with_ct=True
    )
    pool = PerturbedPool(sampler, timesteps=400, dose_min=1e-3, size=1, styles=True)
    own = pool.own_style(0)
    assert (own.pixel_mm, own.slice_mm, own.count_scale) == (4.0, 4.0, 1.0)
    assert own.recon == pool.recons[0][0]  # the case's reconstruction, not a random one
    pool.batch(1)
    slab = pool.slabs[0]
    assert _grain(slab.noisy - slab.clean) > 0.5  # 4 mm grain on the 2 mm grid
    simulated = _pool(styles=True)
    assert simulated.own_style(0) is None
