"""E, D, E_CT, the patch discriminator and the autoencoder losses: shapes, gradients, validation."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from model.networks.autoencoder import (
    AutoencoderConfig,
    AutoencoderKL,
    CTEncoder,
    CTEncoderConfig,
    DiscriminatorConfig,
    PatchDiscriminator,
    window_ct,
)
from model.training.losses import PerceptualLoss, ResNet3d, hinge_d_loss, hinge_g_loss, ssim3d, ssim_loss
from tests.support.model_toys import one_thread  # noqa: F401 - autouse fixture


def _tiny_ae(levels: int = 3) -> AutoencoderKL:
    return AutoencoderKL(
        AutoencoderConfig(channels=(8,) * levels, num_res_blocks=(1,) * levels, norm_groups=4)
    )


@pytest.mark.parametrize("levels, f", [(2, 2), (3, 4), (4, 8)])
def test_autoencoder_shapes_for_each_compression(levels: int, f: int) -> None:
    ae = _tiny_ae(levels)
    assert ae.config.downsample_factor == f
    x = torch.rand(2, 1, 16, 16, 24)
    posterior = ae.encode(x)
    assert posterior.mean.shape == (2, 4, 16 // f, 16 // f, 24 // f)
    assert posterior.kl().shape == (2,)
    recon, _ = ae(x)
    assert recon.shape == x.shape


def test_autoencoder_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    ae = _tiny_ae()
    x = torch.rand(1, 1, 8, 16, 16)
    recon, posterior = ae(x)
    ((recon - x).abs().mean() + posterior.kl().mean()).backward()
    for name, p in ae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_posterior_sample_is_seeded_and_mean_decode_is_deterministic() -> None:
    ae = _tiny_ae().eval()
    x = torch.rand(1, 1, 8, 16, 16)
    a, _ = ae(x, generator=torch.Generator().manual_seed(3))
    b, _ = ae(x, generator=torch.Generator().manual_seed(3))
    c, _ = ae(x, sample=False)
    d, _ = ae(x, sample=False)
    assert torch.equal(a, b) and torch.equal(c, d)


def test_autoencoder_refuses_sizes_not_divisible_by_f() -> None:
    with pytest.raises(ValueError, match="divisible by f = 4"):
        _tiny_ae().encode(torch.rand(1, 1, 8, 10, 16))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(channels=(8, 8, 8), num_res_blocks=(1, 1)), "num_res_blocks has 2 entries but channels has 3"),
        (
            dict(channels=(8, 10, 8), num_res_blocks=(1, 1, 1)),
            r"channels\[1\] = 10 is not a positive multiple",
        ),
        (dict(channels=(8,) * 5, num_res_blocks=(1,) * 5), "f = 16"),
        (dict(channels=(8, 8), num_res_blocks=(1, 1), latent_channels=0), "latent_channels = 0"),
    ],
)
def test_autoencoder_config_is_checked_up_front(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AutoencoderKL(AutoencoderConfig(norm_groups=4, **kwargs))


def test_ct_encoder_windows_hu_and_matches_the_pet_latent_size() -> None:
    enc = CTEncoder(
        CTEncoderConfig(channels=(8, 8, 8), num_res_blocks=(1, 1, 1), latent_channels=3, norm_groups=4)
    )
    ct = torch.full((2, 1, 16, 32, 32), -1000.0)
    out = enc(ct)
    assert out.shape == (2, 3, 4, 8, 8)
    out.sum().backward()
    assert all(p.grad is not None for p in enc.parameters())
    assert torch.equal(
        window_ct(torch.tensor([-3000.0, -1000.0, 0.0, 1000.0, 3000.0])),
        torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]),
    )


def test_patch_discriminator_gives_a_map_of_logits_and_hinge_losses() -> None:
    disc = PatchDiscriminator(DiscriminatorConfig(channels=8, n_layers=2, norm_groups=4))
    logits = disc(torch.rand(2, 1, 16, 32, 32))
    assert logits.ndim == 5 and logits.shape[:2] == (2, 1) and logits.shape[2:].numel() > 1
    real, fake = torch.full((4,), 2.0), torch.full((4,), -2.0)
    assert hinge_d_loss(real, fake) == 0.0  # both beyond the margin
    assert hinge_d_loss(fake, real) == pytest.approx(6.0)
    assert hinge_g_loss(fake) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="n_layers"):
        DiscriminatorConfig(n_layers=0).validate()


def test_ssim_is_one_for_identical_images_and_falls_with_noise() -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 1, 12, 16, 16)
    assert torch.allclose(ssim3d(x, x), torch.ones(2), atol=1e-5)
    small = ssim3d(x + 0.05 * torch.randn_like(x), x)
    large = ssim3d(x + 0.5 * torch.randn_like(x), x)
    assert (large < small).all() and (small < 1).all()
    assert ssim_loss(x, x) == pytest.approx(0.0, abs=1e-5)
    with pytest.raises(ValueError, match="smaller than the window"):
        ssim3d(torch.rand(1, 1, 4, 16, 16), torch.rand(1, 1, 4, 16, 16))


def test_perceptual_loss_is_off_without_weights_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="model.training.losses"):
        loss = PerceptualLoss(None)
    assert not loss.enabled
    assert loss(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8)) == 0
    assert sum("perceptual loss off" in r.getMessage() for r in caplog.records) == 1


def test_perceptual_loss_loads_a_medicalnet_style_safetensors_file(tmp_path) -> None:
    torch.manual_seed(0)
    state = {f"module.{k}": v for k, v in ResNet3d(10).state_dict().items()}
    weights = tmp_path / "resnet_10.safetensors"
    save_file(state, str(weights))
    loss = PerceptualLoss(weights)
    assert loss.enabled
    x = torch.rand(1, 1, 16, 16, 16)
    assert loss(x, x) == pytest.approx(0.0, abs=1e-6)
    y = x + 0.3 * torch.randn_like(x)
    y.requires_grad_(True)
    value = loss(y, x)
    value.backward()
    assert value > 0 and y.grad is not None
    assert all(p.grad is None for p in loss.parameters())  # the ResNet stays frozen


def test_perceptual_loss_refuses_pickled_weights(tmp_path) -> None:
    (tmp_path / "resnet_10.pth").write_bytes(b"not read")
    with pytest.raises(ValueError, match="must be a .safetensors file"):
        PerceptualLoss(tmp_path / "resnet_10.pth")
