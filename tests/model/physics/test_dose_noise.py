"""Mean-preserving noise injection: mean kept, variance (1/d − 1) × the SPET's own (also above d = 0.5, where
the count level is scaled up), exact at d = 1."""

from __future__ import annotations

import pytest
import torch

from model.physics import ReconSettings, inject_dose_noise, perturb

PIXEL_MM = 4.0
# Linear FBP: the injected bracket's mean is exactly zero, so the tolerances below test the method.
FBP = ReconSettings(algorithm="fbp", fbp_cutoff=0.8, postfilter_fwhm_mm=0.0)


def _disc(z: int = 2, n: int = 24, batch: tuple[int, ...] = ()) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    inside = ((yy - n / 2 + 0.5) ** 2 + (xx - n / 2 + 0.5) ** 2) < (n / 2.5) ** 2
    return (inside.float() * 8000.0).expand(*batch, z, n, n).contiguous()


def _inject(x: torch.Tensor, dose, seed: int = 0, **kwargs) -> torch.Tensor:  # noqa: ANN001
    generator = torch.Generator().manual_seed(seed)
    return inject_dose_noise(x, dose, pixel_size_mm=PIXEL_MM, generator=generator, **kwargs)


def _center(n: int = 24) -> tuple[slice, slice]:
    return slice(n // 2 - 4, n // 2 + 4), slice(n // 2 - 4, n // 2 + 4)


def test_mean_is_preserved_over_many_draws() -> None:
    x = _disc(batch=(64,))
    out = _inject(x, 0.1, recon=FBP)
    cy, cx = _center()
    bias = (out - x).mean(dim=0)[..., cy, cx].mean()
    spread = (out - x)[..., cy, cx].std()
    # The average of 64 draws over 128 voxels: its standard error is spread / √(64·128) ≈ spread / 90.
    assert abs(float(bias)) < 5 * float(spread) / 90


def test_added_variance_scales_as_inverse_dose_minus_one() -> None:
    x = _disc(batch=(48,))
    cy, cx = _center()
    added = {d: (_inject(x, d, seed=3, recon=FBP) - x)[..., cy, cx].var().item() for d in (0.1, 0.75)}
    # A real SPET's own noise: perturb at d = 1 is one standard-dose acquisition, minus its mean.
    spet = perturb(x, 1.0, pixel_size_mm=PIXEL_MM, recon=FBP, generator=torch.Generator().manual_seed(5))
    spet_var = (spet - spet.mean(dim=0))[..., cy, cx].var().item() * 48 / 47
    for d, var in added.items():
        assert var / spet_var == pytest.approx(1 / d - 1, rel=0.15), d


def test_full_dose_returns_x_and_mixed_batches_keep_it() -> None:
    x = _disc(batch=(2,))
    assert torch.equal(_inject(x, 1.0), x)
    mixed = _inject(x, torch.tensor([1.0, 0.2]))
    assert torch.equal(mixed[0], x[0])
    assert not torch.equal(mixed[1], x[1])


def test_deterministic_with_a_generator_and_shaped_like_perturb() -> None:
    x = _disc(z=3, n=20).to(torch.float64)[..., :18]  # non-square slices are padded and cropped back
    a, b = _inject(x, 0.7, seed=11), _inject(x, 0.7, seed=11)
    assert torch.equal(a, b)
    assert not torch.equal(a, _inject(x, 0.7, seed=12))
    like = perturb(x, 0.7, pixel_size_mm=PIXEL_MM, generator=torch.Generator().manual_seed(1))
    assert a.shape == like.shape == x.shape
    assert a.dtype == like.dtype == torch.float64


@pytest.mark.parametrize("dose", [0.0, 1.5, -0.1])
def test_dose_outside_zero_one_is_refused(dose: float) -> None:
    with pytest.raises(ValueError, match="dose_fraction"):
        _inject(_disc(), dose)
