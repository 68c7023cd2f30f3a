"""The denoiser U: shapes at several sizes, gradients, the live CT path, the position bias, validation."""

from __future__ import annotations

import pytest
import torch

from model.networks.unet import AttentionGate, CTCrossAttention, RelativePositionBias, UNet, UNetConfig
from tests.support.model_toys import one_thread  # noqa: F401 - autouse fixture


def _config(uses_ct: bool, **kw) -> UNetConfig:
    base = dict(
        in_channels=4,
        out_channels=4,
        channels=(8, 16, 16),
        num_res_blocks=(1, 1, 1),
        ct_attention_levels=(False, True, True) if uses_ct else (False, False, False),
        ct_channels=4,
        head_channels=8,
        norm_groups=4,
    )
    base.update(kw)
    return UNetConfig(**base)


@pytest.mark.parametrize("size", [(4, 8, 8), (5, 6, 7)])
def test_unet_output_has_the_latent_shape_for_any_size(size: tuple[int, int, int]) -> None:
    unet = UNet(_config(True))
    z = torch.randn(2, 4, *size)
    out = unet(z, torch.tensor([0, 399]), torch.randn(2, 4, *size))
    assert out.shape == z.shape


def test_unet_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    unet = UNet(_config(True))
    # The position bias MLP starts at zero (neutral); give it weights so its gradient path is exercised.
    for module in unet.modules():
        if isinstance(module, RelativePositionBias):
            torch.nn.init.normal_(module.mlp[2].weight, std=0.1)
    z = torch.randn(2, 4, 4, 8, 8)
    unet(z, torch.tensor([3, 200]), torch.randn(2, 4, 4, 8, 8)).pow(2).mean().backward()
    for name, p in unet.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_the_ct_path_is_live() -> None:
    torch.manual_seed(0)
    unet = UNet(_config(True)).eval()
    z = torch.randn(1, 4, 4, 8, 8)
    t = torch.tensor([100])
    ct = torch.randn(1, 4, 4, 8, 8)
    with torch.no_grad():
        a = unet(z, t, ct)
        b = unet(z, t, ct)
        c = unet(z, t, ct + torch.randn_like(ct))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-4


def test_no_ct_variants_take_no_ct_and_ct_variants_need_one() -> None:
    plain = UNet(_config(False))
    assert not plain.config.uses_ct
    assert not any(isinstance(m, CTCrossAttention) for m in plain.modules())
    z = torch.randn(1, 4, 4, 8, 8)
    plain(z, torch.tensor([5]))
    with pytest.raises(ValueError, match="takes no CT"):
        plain(z, torch.tensor([5]), torch.randn(1, 4, 4, 8, 8))
    guided = UNet(_config(True))
    with pytest.raises(ValueError, match="needs z_CT"):
        guided(z, torch.tensor([5]))
    with pytest.raises(ValueError, match="does not fit"):
        guided(z, torch.tensor([5]), torch.randn(1, 4, 4, 8, 6))


def test_ct_cross_attention_sits_at_the_two_coarsest_levels() -> None:
    unet = UNet(_config(True))
    assert [s.xattn is not None for s in unet.down] == [False, True, True]
    assert unet.mid_xattn is not None
    assert [s.xattn is not None for s in unet.up] == [True, True, False]  # up runs coarse → fine


@pytest.mark.parametrize("size", [(2, 3, 4), (4, 6, 6)])
def test_position_bias_works_at_any_size_and_depends_only_on_offsets(size: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    bias = RelativePositionBias(heads=2, hidden=8)
    torch.nn.init.normal_(bias.mlp[2].weight)
    b = bias(size, device=torch.device("cpu"), dtype=torch.float32)
    n = size[0] * size[1] * size[2]
    assert b.shape == (2, n, n)
    d, h, w = size
    index = lambda z, y, x: (z * h + y) * w + x  # noqa: E731
    # Same offset (+1, +1, +1) from two different positions → same bias.
    assert torch.equal(b[:, index(0, 0, 0), index(1, 1, 1)], b[:, index(0, 1, 2), index(1, 2, 3)])
    # The same MLP gives the same bias for the same offset at another grid size.
    other = bias((3, 3, 3), device=torch.device("cpu"), dtype=torch.float32)
    assert torch.allclose(b[:, index(0, 0, 0), index(1, 0, 1)], other[:, 0, (1 * 3 + 0) * 3 + 1])


def test_cross_attention_is_eq_2_softmax_of_ct_queries_and_keys_over_pet_values() -> None:
    torch.manual_seed(0)
    attn = CTCrossAttention(8, 8, head_channels=8, groups=4, bias_hidden=8).eval()
    h, ct = torch.randn(1, 8, 2, 2, 2), torch.randn(1, 8, 2, 2, 2)
    with torch.no_grad():
        out = attn(h, ct)
        q = attn.to_q(attn.norm_ct(ct)).flatten(2).transpose(1, 2)
        k = attn.to_k(attn.norm_ct(ct)).flatten(2).transpose(1, 2)
        v = attn.to_v(attn.norm_pet(h)).flatten(2).transpose(1, 2)
        weights = torch.softmax(q @ k.transpose(1, 2) / 8**0.5, dim=-1)  # B = 0 at initialisation
        expected = h + attn.proj((weights @ v).transpose(1, 2).reshape(1, 8, 2, 2, 2))
    assert torch.allclose(out, expected, atol=1e-5)


def test_attention_gate_scales_the_skip_by_a_map_in_0_1() -> None:
    gate = AttentionGate(8, 16, 4)
    skip = torch.ones(1, 8, 3, 4, 5)
    out = gate(skip, torch.randn(1, 16, 3, 4, 5))
    assert out.shape == skip.shape
    assert (out >= 0).all() and (out <= 1).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_res_blocks=(1, 1)), "num_res_blocks has 2 entries but channels has 3"),
        (dict(ct_attention_levels=(True, True)), "ct_attention_levels has 2 entries"),
        (dict(channels=(8, 16, 18)), r"channels\[2\] = 18 is not a positive multiple of norm_groups = 4"),
        (
            dict(head_channels=16, channels=(8, 24, 24)),
            r"channels\[1\] = 24 is not a multiple of head_channels",
        ),
        (dict(ct_channels=0), "ct_channels = 0"),
    ],
)
def test_unet_config_is_checked_up_front(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UNet(_config(True, **kwargs))
