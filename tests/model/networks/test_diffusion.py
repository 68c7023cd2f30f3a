"""Schedules, the z_0-predicting denoiser, its loss, the sampler, and placing an LPET on the schedule."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from model.networks.diffusion import (
    GaussianSchedule,
    PoissonSchedule,
    ScheduleConfig,
    ScheduleKind,
    Variant,
    sampling_timesteps,
)
from model.networks.noise_level import FINE_BAND, LATENT_BAND, NoiseCurve, noise_index
from model.networks.upete_model import UPETeModel
from tests.support.model_toys import one_thread, tiny_config, tiny_phantom  # noqa: F401 - one_thread: autouse fixture

CURVE = tiny_config("ldm-p").noise_curve


def test_poisson_schedule_follows_the_design() -> None:
    schedule = PoissonSchedule(ScheduleConfig(kind="poisson"), CURVE)
    assert schedule.timesteps == 400
    assert schedule.dose.dtype == torch.float64 and schedule.sigma.dtype == torch.float64
    assert schedule.dose[0] == 1.0 and schedule.dose[-1] == pytest.approx(1e-3)
    # λ_t = t/T linear, d_t = d_min^λ_t: log-linear in t; a 10 % dose sits at t* ≈ 133.
    assert schedule.dose_at(200) == pytest.approx(1e-3**0.5)
    assert schedule.t_from_dose(0.1) == pytest.approx(400 / 3)
    assert schedule.t_from_dose(1.0) == 0.0
    with pytest.raises(ValueError, match="dose fraction"):
        schedule.t_from_dose(0.0)
    # a_t = 1 (the reconstruction is rescaled by 1/d_t); σ_t follows the measured curve.
    assert torch.all(schedule.signal == 1)
    assert schedule.sigma[100].item() == pytest.approx(0.2)
    assert schedule.sigma[150].item() == pytest.approx(math.sqrt((0.2**2 + 0.4**2) / 2))  # variances add
    assert torch.all(schedule.sigma[1:] >= schedule.sigma[:-1])


def test_uncalibrated_poisson_schedule_cannot_denoise() -> None:
    config = tiny_config("ldm-p", noise_curve=None)
    model = UPETeModel(config)
    assert not model.diffusion.schedule.calibrated
    with pytest.raises(RuntimeError, match="not calibrated"):
        model.diffusion.denoise(torch.zeros(1, 4, 4, 8, 8), torch.tensor([3]), None)


def test_gaussian_schedule_is_ddpm_with_clean_step_zero() -> None:
    schedule = GaussianSchedule(ScheduleConfig(kind="gaussian"))
    a, s = schedule.signal, schedule.sigma
    assert a.dtype == torch.float64 and a[0] == 1.0
    assert torch.allclose(a**2 + s**2, torch.ones_like(a))
    assert torch.all(a[1:] < a[:-1])
    assert a[-1] ** 2 < 1e-3  # ᾱ_T ≈ 0: the chain reaches noise
    z0, noise = torch.ones(2, 1, 1, 1, 1), torch.zeros(2, 1, 1, 1, 1)
    assert torch.allclose(schedule.q_sample(z0, torch.tensor([0, 400]), noise).flatten(), a[[0, 400]].float())
    assert schedule.t_for_effective_sigma(0.0) == 0
    assert schedule.t_for_effective_sigma(1e9) == 400


def test_schedule_config_is_validated() -> None:
    for bad, message in [
        (dict(kind="uniform"), "kind"),
        (dict(timesteps=1), "timesteps"),
        (dict(dose_min=1.5), "dose_min"),
        (dict(beta_start=0.1, beta_end=0.01), "beta_start"),
    ]:
        with pytest.raises(ValueError, match=message):
            ScheduleConfig(**bad).validate()


def test_schedule_kind_is_an_enum_in_code_and_its_plain_spelling_in_json() -> None:
    from model.networks.upete_model import ModelConfig, default_config

    assert ScheduleConfig(kind="gaussian").kind is ScheduleKind.GAUSSIAN
    config = default_config("ldm-p")
    assert config.schedule.kind is ScheduleKind.POISSON is Variant.LDM_P.schedule_kind
    written = json.loads(json.dumps(config.to_json()))
    assert written["schedule"]["kind"] == "poisson"
    assert ModelConfig.from_json(written) == config
    with pytest.raises(ValueError, match="kind must be one of 'poisson', 'gaussian', found 'uniform'"):
        ScheduleConfig(kind="uniform")


def test_sampling_timesteps_descend_from_t_star() -> None:
    assert sampling_timesteps(133, 4) == [133, 100, 66, 33]
    assert sampling_timesteps(3, 10) == [3, 2, 1, 0]  # never more steps than distinct times
    assert sampling_timesteps(0, 5) == [0]
    with pytest.raises(ValueError):
        sampling_timesteps(10, 0)


def test_variants_know_their_noise_and_ct() -> None:
    assert [(v.poisson, v.uses_ct) for v in Variant] == [
        (False, False),
        (True, False),
        (False, True),
        (True, True),
    ]
    assert Variant("ldm-p-ct").label == "LDM-P-CT"


@pytest.mark.parametrize("variant", ["ldm", "ldm-p-ct"])
def test_training_loss_has_gradients_for_u_and_e_ct(variant: str) -> None:
    torch.manual_seed(0)
    model = UPETeModel(tiny_config(variant))
    diffusion = model.diffusion
    z0 = torch.randn(2, 4, 4, 8, 8)
    t = torch.tensor([10, 300])
    ct = torch.randn(2, 1, 16, 32, 32) * 300 if diffusion.uses_ct else None
    loss = diffusion.loss(z0, z0 + 0.3 * torch.randn_like(z0), t, ct)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    trainable = list(diffusion.unet.parameters()) + (
        list(diffusion.ct_encoder.parameters()) if ct is not None else []
    )
    assert all(p.grad is not None for p in trainable)
    assert not any(p.grad is not None for p in model.autoencoder.parameters())


def test_preconditioned_denoiser_is_the_identity_when_noise_vanishes() -> None:
    # c_skip → 1 and c_out → 0 as σ_t/a_t → 0: at t = 0 of the Gaussian schedule ẑ_0 ≈ z_t.
    model = UPETeModel(tiny_config("ldm"))
    z = torch.randn(1, 4, 4, 8, 8)
    with torch.no_grad():
        out = model.diffusion.denoise(z, torch.tensor([0]), None)
    assert torch.allclose(out, z, atol=1e-3)


def test_sampler_follows_the_ddim_update(monkeypatch: pytest.MonkeyPatch) -> None:
    model = UPETeModel(tiny_config("ldm-p"))
    diffusion = model.diffusion
    target = torch.full((1, 4, 2, 2, 2), 0.5)
    seen: list[tuple[int, torch.Tensor]] = []

    def fake_denoise(z, t, z_ct):  # ẑ_0 is a constant: z_t' − ẑ_0 must shrink by σ_t'/σ_t each step
        seen.append((int(t[0]), z.clone()))
        return target

    monkeypatch.setattr(diffusion, "denoise", fake_denoise)
    z_start = torch.full((1, 4, 2, 2, 2), 2.5)
    out = diffusion.sample(z_start, 300, z_ct=None, steps=3)
    assert torch.equal(out, target)
    assert [t for t, _ in seen] == [300, 200, 100]
    sigma = diffusion.schedule.sigma
    for (t, z), (t_next, z_next) in zip(seen, seen[1:], strict=False):
        expected = target + (sigma[t_next] / sigma[t]).float() * (z - target)
        assert torch.allclose(z_next, expected)


def test_start_from_lpet_poisson_keeps_the_latent_and_gaussian_adds_the_missing_noise() -> None:
    z = torch.zeros(4096, 4, 1, 1, 1)
    poisson = UPETeModel(tiny_config("ldm-p")).diffusion
    start, t = poisson.start_from_lpet(z, t_poisson=133.4, curve=CURVE)
    assert start is z and t == 133
    gaussian = UPETeModel(tiny_config("ldm")).diffusion
    gen = torch.Generator().manual_seed(0)
    start, t = gaussian.start_from_lpet(z, t_poisson=200.0, curve=CURVE, generator=gen, renoise_ratio=1.0)
    sigma_l = float(CURVE.latent_sigma_at(200.0))  # 0.4
    a, s = gaussian.schedule.signal[t].item(), gaussian.schedule.sigma[t].item()
    assert (
        s / a
        >= sigma_l * math.sqrt(2)
        > gaussian.schedule.sigma[t - 1].item() / gaussian.schedule.signal[t - 1].item()
    )
    # The injected noise has variance σ_t² − a_t² σ_L² (the LPET's own noise supplies the rest).
    assert start.std().item() == pytest.approx(math.sqrt(s**2 - (a * sigma_l) ** 2), rel=0.05)
    again, _ = gaussian.start_from_lpet(
        z, t_poisson=200.0, curve=CURVE, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(start, again)


def test_noise_curve_interpolates_and_inverts() -> None:
    curve = NoiseCurve(
        t=(0, 200, 400), dose=(1, 0.03, 0.001), latent_sigma=(0.1, 0.4, 1.6), noise_index=(0.01, 0.1, 1)
    )
    assert curve.latent_sigma_at(100) == pytest.approx(math.sqrt((0.1**2 + 0.4**2) / 2))  # linear in σ²
    # The mean-preserving forward process adds nothing at dose 1: σ_0 ≈ 0, then σ grows like √t.
    injected = NoiseCurve(
        t=(0, 50, 100), dose=(1, 0.4, 0.2), latent_sigma=(1e-6, 0.1, 0.2), noise_index=(1, 2, 3)
    )
    assert injected.latent_sigma_at(12.5) == pytest.approx(0.05, rel=1e-3)
    # The t of a latent noise level is the inverse of σ_t, clipped to the measured range.
    for t in (0.0, 12.5, 60.0, 100.0):
        assert injected.t_from_latent_sigma(float(injected.latent_sigma_at(t))) == pytest.approx(t, abs=1e-3)
    assert injected.t_from_latent_sigma(10.0) == 100.0
    assert curve.t_from_noise_index(0.1) == pytest.approx(200)
    assert curve.t_from_noise_index(math.sqrt(0.01 * 0.1)) == pytest.approx(100)
    assert curve.t_from_noise_index(1e-9) == 0 and curve.t_from_noise_index(1e9) == 400
    assert NoiseCurve.from_json(curve.to_json()) == curve
    matched = dataclasses.replace(curve, index_band=LATENT_BAND)
    assert NoiseCurve.from_json(matched.to_json()) == matched
    # A checkpoint written before the curve recorded its band was calibrated with the fine one.
    legacy = {k: v for k, v in matched.to_json().items() if k != "index_band"}
    assert NoiseCurve.from_json(legacy).index_band == FINE_BAND
    with pytest.raises(ValueError, match="increase strictly"):
        NoiseCurve(t=(0, 0), dose=(1, 1), latent_sigma=(1, 1), noise_index=(1, 1))
    # A wiggle in measured data does not make the inversion ambiguous (running maximum).
    wiggly = NoiseCurve(
        t=(0, 1, 2, 3), dose=(1, 1, 1, 1), latent_sigma=(1, 1, 1, 1), noise_index=(1, 3, 2, 4)
    )
    assert 0 < wiggly.t_from_noise_index(2.5) < 1
    assert wiggly.t_from_noise_index(3.0) == pytest.approx(1, abs=1e-3)


def test_noise_index_tracks_the_dose_of_a_perturbed_image() -> None:
    from model.physics import perturb

    pet, _ = tiny_phantom(0, (16, 48, 48))
    gen = torch.Generator().manual_seed(0)
    images = {
        d: perturb(torch.from_numpy(pet), d, pixel_size_mm=2.0, generator=gen).numpy() / 4000
        for d in (0.5, 0.1, 0.02)
    }
    index = {d: noise_index(v, band=FINE_BAND) for d, v in images.items()}
    assert index[0.5] < index[0.1] < index[0.02]
    assert 2.5 < index[0.1] / index[0.5] < 7.5  # variance ∝ 1/dose, less the structure's floor
    # The latent band sees more of the phantom's edges (a higher floor), and still orders the doses.
    latent = {d: noise_index(v, band=LATENT_BAND) for d, v in images.items()}
    assert latent[0.5] < latent[0.1] < latent[0.02]
    assert noise_index(np.zeros((4, 8, 8))) == 0.0
    with pytest.raises(ValueError, match="0 ≤ inner < outer"):
        noise_index(np.ones((4, 8, 8)), band=(2.0, 1.0))


def test_the_latent_band_sees_a_coarse_grain_the_fine_band_misses() -> None:
    """A 4–5 mm post-filtered scanner's noise has the variance of a 2 mm grid's but a coarser grain: the
    first checkpoints' fine index saw a sliver of it and placed such a study near full dose."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    white = rng.normal(0.0, 0.1, (32, 64, 64)).astype(np.float32)
    coarse = gaussian_filter(white, 1.5)
    coarse *= white.std() / coarse.std()  # the same image variance, a coarser grain
    flat = np.ones_like(white)

    def seen(band: tuple[float, float]) -> float:  # the coarse grain's index relative to the fine one's
        return noise_index(flat + coarse, band=band) / noise_index(flat + white, band=band)

    assert seen(FINE_BAND) < 0.1
    assert seen(LATENT_BAND) > 3 * seen(FINE_BAND)
    # The curve reads the image in the band it was calibrated with.
    curve = NoiseCurve(
        t=(0, 400), dose=(1, 0.001), latent_sigma=(0.1, 1), noise_index=(1e-4, 1), index_band=LATENT_BAND
    )
    assert curve.image_index(flat + coarse) == noise_index(flat + coarse, band=LATENT_BAND)
    assert curve.t_from_image(flat + coarse) == curve.t_from_noise_index(curve.image_index(flat + coarse))
