"""PET physics: projector adjointness and mass, count statistics, reconstruction, attenuation, perturb."""

from __future__ import annotations

import math

import pytest
import torch

from model.physics import (
    ParallelBeamProjector,
    ReconAlgorithm,
    ReconSettings,
    ScannerModel,
    acquire_counts,
    attenuation_factors,
    expected_counts,
    get_projector,
    mu_map_from_ct,
    perturb,
    reconstruct,
    thin_counts,
)
from model.units import FWHM_PER_SIGMA

PIXEL_MM = 2.0


def _grid(n: int, pixel_mm: float = PIXEL_MM) -> tuple[torch.Tensor, torch.Tensor]:
    c = (torch.arange(n, dtype=torch.float32) - (n - 1) / 2) * pixel_mm
    return torch.meshgrid(c, c, indexing="ij")  # (y, x)


def _disc(n: int, radius_mm: float, value: float = 1.0) -> torch.Tensor:
    y, x = _grid(n)
    return ((x**2 + y**2) < radius_mm**2).float() * value


# -- projector ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,n_angles", [(16, None), (33, 20), (48, 7)])
def test_adjoint_is_exact_transpose(size: int, n_angles: int | None) -> None:
    proj = ParallelBeamProjector(size, n_angles=n_angles, pixel_size_mm=1.5)
    gen = torch.Generator().manual_seed(size)
    x = torch.rand(3, size, size, generator=gen, dtype=torch.float64).float()
    y = torch.rand(3, proj.n_angles, proj.n_bins, generator=gen, dtype=torch.float64).float()
    lhs = (proj(x).double() * y.double()).sum()
    rhs = (x.double() * proj.adjoint(y).double()).sum()
    assert abs(lhs - rhs) / abs(lhs) < 1e-5


def test_subset_operators_are_adjoint_and_partition_the_angles() -> None:
    proj = ParallelBeamProjector(24, pixel_size_mm=PIXEL_MM)
    x = torch.rand(2, 24, 24)
    full = proj(x)
    subsets = proj.subset_angles(4)
    assert sorted(torch.cat(subsets).tolist()) == list(range(proj.n_angles))
    for s, idx in enumerate(subsets):
        part = proj.forward_subset(x, s, 4)
        torch.testing.assert_close(part, full[:, idx], rtol=1e-5, atol=1e-4)
        y = torch.rand_like(part)
        lhs = (part.double() * y.double()).sum()
        rhs = (x.double() * proj.adjoint_subset(y, s, 4).double()).sum()
        assert abs(lhs - rhs) / abs(lhs) < 1e-5


def test_full_operator_from_a_cached_subset_split_is_the_same() -> None:
    # After OSEM built a split, A and Aᵀ are assembled from it instead of building the full matrix.
    split = ParallelBeamProjector(20, pixel_size_mm=PIXEL_MM)
    split.forward_subset(torch.zeros(20, 20), 0, 4)
    full = ParallelBeamProjector(20, pixel_size_mm=PIXEL_MM)
    x = torch.rand(3, 20, 20)
    y = torch.rand(3, full.n_angles, full.n_bins)
    torch.testing.assert_close(split(x), full(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split.adjoint(y), full.adjoint(y), rtol=1e-5, atol=1e-5)
    assert list(split._ops) == [4]


def test_projection_conserves_mass_at_every_angle() -> None:
    # Each angle sees every pixel once: Σ_bins (A x) · bin = Σ_pixels x · pixel².
    proj = ParallelBeamProjector(32, pixel_size_mm=PIXEL_MM)
    x = torch.rand(32, 32)
    per_angle = proj(x).sum(dim=-1) * proj.bin_size_mm
    expected = x.sum() * PIXEL_MM**2
    torch.testing.assert_close(per_angle, expected.expand_as(per_angle), rtol=1e-5, atol=0)


def test_projection_of_disc_is_its_chord_length() -> None:
    proj = ParallelBeamProjector(64, pixel_size_mm=PIXEL_MM)
    radius = 40.0
    sino = proj(_disc(64, radius))
    centre = sino[:, proj.n_bins // 2 - 1 : proj.n_bins // 2 + 1].mean()
    # Bin centres sit at ±1 mm around s = 0: chord 2·sqrt(R² − 1).
    assert centre.item() == pytest.approx(2 * math.sqrt(radius**2 - 1), rel=0.02)


def test_projector_rejects_wrong_shapes() -> None:
    proj = ParallelBeamProjector(16, pixel_size_mm=PIXEL_MM)
    with pytest.raises(ValueError, match="shape"):
        proj(torch.zeros(2, 16, 15))
    with pytest.raises(ValueError, match="pixel_size_mm"):
        ParallelBeamProjector(16, pixel_size_mm=0)


# -- counts ------------------------------------------------------------------------------------------
def test_thinned_poisson_counts_are_poisson_with_mean_d_n() -> None:
    gen = torch.Generator().manual_seed(1)
    lam, d = 40.0, 0.25
    counts = torch.poisson(torch.full((400_000,), lam), generator=gen)
    thinned = thin_counts(counts, d, generator=gen)
    assert thinned.mean().item() == pytest.approx(d * lam, rel=0.01)
    assert thinned.var().item() == pytest.approx(d * lam, rel=0.02)  # Poisson in → Poisson out
    assert torch.all(thinned <= counts) and torch.all(thinned == thinned.round())


def test_thinning_fixed_counts_is_binomial() -> None:
    gen = torch.Generator().manual_seed(2)
    n, d = 200.0, 0.1
    thinned = thin_counts(torch.full((200_000,), n), d, generator=gen)
    assert thinned.mean().item() == pytest.approx(d * n, rel=0.01)
    assert thinned.var().item() == pytest.approx(n * d * (1 - d), rel=0.02)


def test_thinning_is_a_markov_chain() -> None:
    # thin(thin(n, 0.5), 0.2) has the law of a 10 % acquisition: Poisson(0.1 λ).
    gen = torch.Generator().manual_seed(3)
    lam = 60.0
    counts = torch.poisson(torch.full((300_000,), lam), generator=gen)
    twice = thin_counts(thin_counts(counts, 0.5, generator=gen), 0.2, generator=gen)
    assert twice.mean().item() == pytest.approx(0.1 * lam, rel=0.015)
    assert twice.var().item() == pytest.approx(0.1 * lam, rel=0.03)


def test_thinning_per_batch_element_dose() -> None:
    counts = torch.full((3, 2, 50, 50), 100.0)
    out = thin_counts(counts, torch.tensor([1.0, 0.5, 0.1]), generator=torch.Generator().manual_seed(4))
    assert torch.equal(out[0], counts[0])
    assert out[1].mean().item() == pytest.approx(50, rel=0.02)
    assert out[2].mean().item() == pytest.approx(10, rel=0.03)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_dose_fraction_outside_unit_interval_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="dose_fraction"):
        thin_counts(torch.ones(4, 4), bad)


def test_acquired_counts_have_expected_mean_and_scale_with_dose() -> None:
    proj = get_projector(32, pixel_size_mm=PIXEL_MM)
    scanner = ScannerModel()
    activity = _disc(32, 25.0, 5000.0).expand(200, 32, 32)
    mean = expected_counts(activity[:1], projector=proj, scanner=scanner)
    counts = acquire_counts(
        activity, projector=proj, scanner=scanner, generator=torch.Generator().manual_seed(5)
    )
    torch.testing.assert_close(counts.mean(dim=0), mean[0], rtol=0.1, atol=0.5)
    half = expected_counts(activity[:1], projector=proj, scanner=scanner, dose_fraction=0.5)
    torch.testing.assert_close(half, mean * 0.5)


def test_count_level_follows_the_scanner_model() -> None:
    # Trues of a uniform slice: activity · volume · sensitivity · duration · survival.
    proj = get_projector(32, pixel_size_mm=PIXEL_MM)
    scanner = ScannerModel(background_fraction=0.0)
    activity = torch.full((32, 32), 3000.0)
    total = expected_counts(activity, projector=proj, scanner=scanner).sum().item()
    voxel_ml = PIXEL_MM**3 / 1000
    expected = (
        3000.0
        * voxel_ml
        * 32
        * 32
        * scanner.sensitivity_cps_per_bq
        * scanner.axial_overlap_gain
        * scanner.frame_duration_s
        * scanner.survival_without_mumap
    )
    assert total == pytest.approx(expected, rel=1e-4)


def test_scanner_model_validates_fields() -> None:
    with pytest.raises(ValueError, match="frame_duration_s"):
        ScannerModel(frame_duration_s=0)
    with pytest.raises(ValueError, match="probabilities"):
        ScannerModel(survival_without_mumap=1.5)


# -- attenuation -------------------------------------------------------------------------------------
def test_mu_map_from_ct_known_values() -> None:
    mu = mu_map_from_ct(torch.tensor([-1000.0, 0.0, 1000.0, -3000.0]))
    assert mu[0].item() == pytest.approx(0.0, abs=1e-7)
    assert mu[1].item() == pytest.approx(0.0096, rel=1e-3)  # water at 511 keV: 0.096 /cm
    assert mu[2].item() == pytest.approx(0.0149, rel=1e-2)  # dense bone
    assert mu[3].item() == 0.0


def test_attenuation_factors_are_survival_probabilities() -> None:
    proj = get_projector(48, pixel_size_mm=PIXEL_MM)
    radius = 40.0
    mu = _disc(48, radius, 0.0096)
    factors = attenuation_factors(proj, mu)
    assert factors.shape == (proj.n_angles, proj.n_bins)
    assert torch.all(factors > 0) and torch.all(factors <= 1)
    assert factors[:, 0].min().item() == 1.0  # lines missing the body
    centre = factors[:, proj.n_bins // 2].mean().item()
    assert centre == pytest.approx(math.exp(-0.0096 * 2 * radius), rel=0.03)


def test_attenuation_corrected_reconstruction_recovers_activity() -> None:
    proj = get_projector(48, pixel_size_mm=PIXEL_MM)
    scanner = ScannerModel()
    activity = _disc(48, 40.0, 4000.0)
    factors = attenuation_factors(proj, _disc(48, 40.0, 0.0096))
    mean = expected_counts(activity, projector=proj, scanner=scanner, attenuation=factors)
    inner = _disc(48, 28.0) > 0
    for recon in (ReconSettings(algorithm="fbp", postfilter_fwhm_mm=0), ReconSettings(postfilter_fwhm_mm=0)):
        image = reconstruct(mean, projector=proj, recon=recon, scanner=scanner, attenuation=factors)
        assert image[inner].mean().item() == pytest.approx(4000.0, rel=0.03), recon.name


# -- reconstruction ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "recon",
    [
        ReconSettings(algorithm="fbp", postfilter_fwhm_mm=0),
        ReconSettings(algorithm="fbp", fbp_cutoff=0.5, postfilter_fwhm_mm=0),
        ReconSettings(iterations=4, subsets=8, postfilter_fwhm_mm=0),
        ReconSettings(iterations=4, subsets=8, psf_fwhm_mm=4.0, postfilter_fwhm_mm=5.0),
    ],
    ids=lambda r: r.name,
)
def test_noiseless_disc_is_reconstructed_within_a_few_percent(recon: ReconSettings) -> None:
    proj = get_projector(64, pixel_size_mm=PIXEL_MM)
    scanner = ScannerModel()
    activity = _disc(64, 45.0, 5000.0)
    mean = expected_counts(activity, projector=proj, scanner=scanner)
    image = reconstruct(mean, projector=proj, recon=recon, scanner=scanner)
    inner = _disc(64, 32.0) > 0
    outside = _disc(64, 58.0) == 0
    assert image[inner].mean().item() == pytest.approx(5000.0, rel=0.03)
    assert image[inner].std().item() < 0.05 * 5000.0
    assert image[outside].abs().mean().item() < 0.03 * 5000.0
    if recon.algorithm is ReconAlgorithm.OSEM:
        assert image.min().item() >= 0.0


def test_reconstruct_applies_the_dose_rescale() -> None:
    proj = get_projector(32, pixel_size_mm=PIXEL_MM)
    scanner = ScannerModel()
    activity = _disc(32, 25.0, 3000.0)
    inner = _disc(32, 15.0) > 0
    for d in (1.0, 0.1):
        mean = expected_counts(activity, projector=proj, scanner=scanner, dose_fraction=d)
        image = reconstruct(mean, projector=proj, recon=ReconSettings(), scanner=scanner, dose_fraction=d)
        assert image[inner].mean().item() == pytest.approx(3000.0, rel=0.03)


def test_recon_settings_validate_and_round_trip() -> None:
    with pytest.raises(ValueError, match="algorithm"):
        ReconSettings(algorithm="art")
    with pytest.raises(ValueError, match="iterations"):
        ReconSettings(iterations=0)
    recon = ReconSettings(algorithm="fbp", postfilter_fwhm_mm=5.0)
    assert recon.algorithm is ReconAlgorithm.FBP
    assert ReconSettings.from_dict(recon.to_dict()) == recon
    assert ReconSettings().name == "osem-i3s8-psf0-pf4"


# -- perturb -----------------------------------------------------------------------------------------
def _body_patch(z: int = 8, n: int = 48) -> torch.Tensor:
    """A smooth non-negative 'activity' volume in Bq/ml: warm disc with a hot spot."""
    y, x = _grid(n)
    body = ((x / 44) ** 2 + (y / 36) ** 2 < 1).float() * 6000.0
    hot = (((x - 10) ** 2 + (y + 5) ** 2) < 36).float() * 12000.0
    return (body + hot).expand(z, n, n).clone()


def _inner(mask: torch.Tensor, margin: int = 3) -> torch.Tensor:
    """The mask shrunk by ``margin`` pixels: away from edges that partial-volume effects blur."""
    outside = (~mask).float()[None, None]
    grown = torch.nn.functional.max_pool2d(outside, 2 * margin + 1, 1, margin)[0, 0]
    return grown == 0


def _noiseless(x: torch.Tensor, recon: ReconSettings) -> torch.Tensor:
    proj = get_projector(x.shape[-1], pixel_size_mm=PIXEL_MM)
    scanner = ScannerModel()
    mean = expected_counts(x, projector=proj, scanner=scanner)
    return reconstruct(mean, projector=proj, recon=recon, scanner=scanner, stack_is_volume=True)


@pytest.mark.parametrize(
    "recon,doses",
    [(ReconSettings(), (0.5, 0.1)), (ReconSettings(algorithm="fbp"), (0.5, 0.1, 0.02))],
    ids=lambda v: v.name if isinstance(v, ReconSettings) else "-",
)
def test_perturb_keeps_shape_dtype_and_mean_activity(recon: ReconSettings, doses: tuple) -> None:
    x = _body_patch(z=32)
    inner = _inner(x[0] > 0)
    clean = _noiseless(x, recon)[:, inner].mean().item()
    gen = torch.Generator().manual_seed(7)
    for d in doses:
        out = perturb(x, d, recon=recon, pixel_size_mm=PIXEL_MM, generator=gen)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert out[:, inner].mean().item() == pytest.approx(clean, rel=0.03), d
    # The noiseless reconstruction itself recovers the activity away from edges.
    assert clean == pytest.approx(x[:, inner].mean().item(), rel=0.03)


def test_perturb_noise_grows_as_dose_falls_like_poisson() -> None:
    x = _body_patch(z=16)
    inner = _inner(x[0] > 0)
    recon = ReconSettings()
    clean = _noiseless(x, recon)
    gen = torch.Generator().manual_seed(8)
    stds = [
        (perturb(x, d, recon=recon, pixel_size_mm=PIXEL_MM, generator=gen) - clean)[:, inner].std().item()
        for d in (0.5, 0.1, 0.02)
    ]
    assert stds[0] < stds[1] < stds[2]
    # 5× fewer counts → noise about √5 ≈ 2.2× larger (OSEM's non-linearity bends it a little).
    assert 1.6 < stds[1] / stds[0] < 3.0
    assert 1.6 < stds[2] / stds[1] < 3.0


def test_perturb_noise_is_spatially_correlated_not_white() -> None:
    # Noise made on counts and reconstructed is correlated between neighbours, unlike per-voxel deviates.
    x = _body_patch(z=8)
    inner = _inner(x[0] > 0)
    noise = perturb(x, 0.05, pixel_size_mm=PIXEL_MM, generator=torch.Generator().manual_seed(9))
    noise = noise - _noiseless(x, ReconSettings())
    pairs = inner[:, :-1] & inner[:, 1:]
    a, b = noise[:, :, :-1][:, pairs], noise[:, :, 1:][:, pairs]
    corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
    assert corr > 0.3


def test_perturb_accepts_batched_patches_with_per_patch_dose_and_units() -> None:
    x = (_body_patch(z=8, n=32) / 1000.0).expand(3, 1, 8, 32, 32).clone()  # kBq/ml
    d = torch.tensor([1.0, 0.2, 0.05])
    out = perturb(
        x, d, pixel_size_mm=PIXEL_MM, bqml_per_unit=1000.0, generator=torch.Generator().manual_seed(10)
    )
    assert out.shape == x.shape
    inner = _inner(x[0, 0, 0] > 0, margin=2)
    clean = _noiseless(x[0, 0] * 1000.0, ReconSettings())[:, inner].mean().item() / 1000.0
    means = [out[i, 0][:, inner].mean().item() for i in range(3)]
    assert means == pytest.approx([clean] * 3, rel=0.06)
    noise = [(out[i, 0] - x[i, 0])[:, inner].std().item() for i in range(3)]
    assert noise[0] < noise[1] < noise[2]


def test_perturb_pads_non_square_slices_and_is_deterministic_by_generator() -> None:
    x = _body_patch(z=3, n=40)[:, 4:36, :]  # 32 × 40
    a = perturb(x, 0.1, pixel_size_mm=PIXEL_MM, generator=torch.Generator().manual_seed(11))
    b = perturb(x, 0.1, pixel_size_mm=PIXEL_MM, generator=torch.Generator().manual_seed(11))
    assert a.shape == x.shape
    torch.testing.assert_close(a, b)


def test_perturb_64_cubed_is_fast() -> None:
    import time

    x = torch.rand(64, 64, 64) * 3000 + 1000
    perturb(x, 0.1, pixel_size_mm=PIXEL_MM)  # builds and caches the projector
    # CPU time on one thread, not wall time: the shared test machine may be busy, and idle OpenMP
    # threads spin. About 0.15 s here on a quiet machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.process_time()
        perturb(x, 0.1, pixel_size_mm=PIXEL_MM)
        elapsed = time.process_time() - start
    finally:
        torch.set_num_threads(threads)
    assert elapsed < 1.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_path() -> None:
    proj = ParallelBeamProjector(32, pixel_size_mm=PIXEL_MM, device="cuda")
    x = torch.rand(4, 32, 32, device="cuda")
    y = torch.rand(4, proj.n_angles, proj.n_bins, device="cuda")
    lhs = (proj(x).double() * y.double()).sum()
    rhs = (x.double() * proj.adjoint(y).double()).sum()
    assert abs(lhs - rhs) / abs(lhs) < 1e-5
    cpu = ParallelBeamProjector(32, pixel_size_mm=PIXEL_MM)
    torch.testing.assert_close(proj(x).cpu(), cpu(x.cpu()), rtol=1e-4, atol=1e-4)
    patch = _body_patch(z=4, n=32).cuda()
    out = perturb(patch, 0.1, pixel_size_mm=PIXEL_MM, generator=torch.Generator(device="cuda").manual_seed(1))
    assert out.device.type == "cuda" and out.shape == patch.shape
    mask = patch[0] > 0
    assert out[:, mask].mean().item() == pytest.approx(patch[:, mask].mean().item(), rel=0.05)


# -- filters -----------------------------------------------------------------------------------------
def test_gaussian_filters_match_scipy_and_zero_mode_is_self_adjoint() -> None:
    import numpy as np
    from scipy.ndimage import gaussian_filter

    from model.physics.filters import gaussian_filter_axial, gaussian_filter_inplane

    x = torch.rand(6, 30, 30, generator=torch.Generator().manual_seed(12))
    sigma = 5.0 / FWHM_PER_SIGMA / PIXEL_MM
    ours = gaussian_filter_inplane(x, 5.0, PIXEL_MM, mode="replicate").numpy()
    ref = gaussian_filter(x.numpy(), (0, sigma, sigma), mode="nearest", truncate=3.5)
    assert np.abs(ours - ref).max() < 2e-3
    ours_z = gaussian_filter_axial(x, 5.0, PIXEL_MM).numpy()
    ref_z = gaussian_filter(x.numpy(), (sigma, 0, 0), mode="nearest", truncate=3.5)
    assert np.abs(ours_z - ref_z).max() < 2e-3
    y = torch.rand_like(x)
    lhs = (gaussian_filter_inplane(x, 6.0, PIXEL_MM, mode="zeros") * y).sum()
    rhs = (x * gaussian_filter_inplane(y, 6.0, PIXEL_MM, mode="zeros")).sum()
    assert lhs.item() == pytest.approx(rhs.item(), rel=1e-5)
