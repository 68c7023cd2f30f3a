"""Image compression (paper §2.1): the KL autoencoder E/D, the CT encoder E_CT and a 3D patch discriminator.

``encode`` / ``decode`` are the only way in and out of the latent space. With ``channels`` of length
L the compression factor is f = 2^(L−1): (16, 32, 64) gives f = 4 (the default: small enough
to train on two CPU cores),
(32, 64) f = 2, (16, 32, 64, 64) f = 8. Inputs must have spatial sizes divisible by f (the enhancer pads).

PET enters normalised (Bq/ml ÷ a fixed scale, see :mod:`model.networks.checkpoint`); CT enters windowed by
:func:`window_ct`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from model.networks.layers import Downsample, ResBlock, Upsample, check_levels, group_norm

__all__ = [
    "AutoencoderConfig",
    "AutoencoderKL",
    "CTEncoder",
    "CTEncoderConfig",
    "DiagonalGaussian",
    "DiscriminatorConfig",
    "PatchDiscriminator",
    "window_ct",
]

#: The CT window: HU in [-1000, 1000] → [0, 1] (air to dense bone; metal saturates).
CT_WINDOW_HU = (-1000.0, 1000.0)


def window_ct(ct_hu: torch.Tensor) -> torch.Tensor:
    """Map CT in HU to [0, 1] with the window [-1000, 1000] HU (clipped outside)."""
    low, high = CT_WINDOW_HU
    return ((ct_hu - low) / (high - low)).clamp(0.0, 1.0)


@dataclass(frozen=True)
class AutoencoderConfig:
    """Architecture of E and D. Per-level tuples must have equal length (checked in the constructor)."""

    in_channels: int = 1
    channels: tuple[int, ...] = (16, 32, 64)
    num_res_blocks: tuple[int, ...] = (1, 1, 1)
    latent_channels: int = 4
    norm_groups: int = 8

    @property
    def downsample_factor(self) -> int:
        """f = H / h (paper §2.1)."""
        return 2 ** (len(self.channels) - 1)

    def validate(self) -> None:
        check_levels("AutoencoderConfig", self.channels, self.norm_groups, num_res_blocks=self.num_res_blocks)
        if self.downsample_factor not in (2, 4, 8):
            raise ValueError(
                f"AutoencoderConfig: {len(self.channels)} levels give f = {self.downsample_factor}; "
                "use 2, 3 or 4 levels for f = 2, 4 or 8"
            )
        if self.latent_channels < 1 or self.in_channels < 1:
            raise ValueError(
                f"AutoencoderConfig: in_channels = {self.in_channels} and latent_channels = "
                f"{self.latent_channels} must be positive"
            )


class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)), each ``B×c×d×h×w``."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        # The clamp keeps exp() finite early in training (as in latent diffusion's autoencoder).
        self.logvar = logvar.clamp(-30.0, 20.0)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + torch.exp(0.5 * self.logvar) * noise

    def kl(self) -> torch.Tensor:
        """KL(q ‖ N(0, I)) averaged over latent elements, one value per batch item (shape ``B``)."""
        kl = 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)
        return kl.flatten(1).mean(1)


class _Encoder(nn.Module):
    """``B×C_in×D×H×W`` → ``B×C_out×D/f×H/f×W/f``; shared by E (C_out = 2c) and E_CT."""

    def __init__(
        self,
        *,
        in_channels: int,
        channels: tuple[int, ...],
        num_res_blocks: tuple[int, ...],
        out_channels: int,
        groups: int,
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv3d(in_channels, channels[0], 3, padding=1)
        blocks: list[nn.Module] = []
        previous = channels[0]
        for level, (ch, n_blocks) in enumerate(zip(channels, num_res_blocks, strict=True)):
            for _ in range(n_blocks):
                blocks.append(ResBlock(previous, ch, groups=groups))
                previous = ch
            if level < len(channels) - 1:
                blocks.append(Downsample(ch))
        self.blocks = nn.Sequential(*blocks)
        self.mid = ResBlock(previous, previous, groups=groups)
        self.norm_out = group_norm(previous, groups)
        self.conv_out = nn.Conv3d(previous, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.blocks(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class _Decoder(nn.Module):
    """``B×c×d×h×w`` → ``B×C_in×(d·f)×(h·f)×(w·f)``."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        channels, groups = config.channels, config.norm_groups
        self.conv_in = nn.Conv3d(config.latent_channels, channels[-1], 3, padding=1)
        self.mid = ResBlock(channels[-1], channels[-1], groups=groups)
        self.levels = nn.ModuleList()
        previous = channels[-1]
        for level in reversed(range(len(channels))):
            stage = nn.Module()
            stage.blocks = nn.ModuleList()
            for _ in range(config.num_res_blocks[level]):
                stage.blocks.append(ResBlock(previous, channels[level], groups=groups))
                previous = channels[level]
            stage.up = Upsample(previous, channels[level - 1]) if level > 0 else None
            if level > 0:
                previous = channels[level - 1]
            self.levels.append(stage)
        self.norm_out = group_norm(previous, groups)
        self.conv_out = nn.Conv3d(previous, config.in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in self.levels:
            for block in stage.blocks:
                h = block(h)
            if stage.up is not None:
                h = stage.up(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder: ``encode`` → :class:`DiagonalGaussian`, ``decode`` → image.

    ``x``: ``B×1×D×H×W`` normalised PET, D, H, W divisible by f. Latent ``B×c×D/f×H/f×W/f``.
    """

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.encoder = _Encoder(
            in_channels=config.in_channels,
            channels=config.channels,
            num_res_blocks=config.num_res_blocks,
            out_channels=2 * config.latent_channels,
            groups=config.norm_groups,
        )
        self.quant = nn.Conv3d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant = nn.Conv3d(config.latent_channels, config.latent_channels, 1)
        self.decoder = _Decoder(config)

    def _check(self, x: torch.Tensor) -> None:
        f = self.config.downsample_factor
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected B×{self.config.in_channels}×D×H×W, found shape {tuple(x.shape)}")
        if any(n % f for n in x.shape[2:]):
            raise ValueError(f"spatial size {tuple(x.shape[2:])} is not divisible by f = {f}; pad first")

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        self._check(x)
        return DiagonalGaussian(self.quant(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant(z))

    def forward(
        self, x: torch.Tensor, *, sample: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruction and posterior; ``sample=False`` decodes the posterior mean."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mean
        return self.decode(z), posterior


@dataclass(frozen=True)
class CTEncoderConfig:
    """E_CT: same down-sampling as E (its latent lies on the PET latent's grid), its own weights,
    deterministic output."""

    channels: tuple[int, ...] = (16, 32, 64)
    num_res_blocks: tuple[int, ...] = (1, 1, 1)
    latent_channels: int = 4
    norm_groups: int = 8

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def validate(self) -> None:
        check_levels("CTEncoderConfig", self.channels, self.norm_groups, num_res_blocks=self.num_res_blocks)
        if self.latent_channels < 1:
            raise ValueError(
                f"CTEncoderConfig: latent_channels must be positive, found {self.latent_channels}"
            )


class CTEncoder(nn.Module):
    """``B×1×D×H×W`` CT in HU → ``B×c_CT×D/f×H/f×W/f`` (windowed inside, see :func:`window_ct`)."""

    def __init__(self, config: CTEncoderConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.encoder = _Encoder(
            in_channels=1,
            channels=config.channels,
            num_res_blocks=config.num_res_blocks,
            out_channels=config.latent_channels,
            groups=config.norm_groups,
        )

    def forward(self, ct_hu: torch.Tensor) -> torch.Tensor:
        f = self.config.downsample_factor
        if ct_hu.ndim != 5 or ct_hu.shape[1] != 1:
            raise ValueError(f"expected CT as B×1×D×H×W, found shape {tuple(ct_hu.shape)}")
        if any(n % f for n in ct_hu.shape[2:]):
            raise ValueError(f"CT size {tuple(ct_hu.shape[2:])} is not divisible by f = {f}; pad first")
        return self.encoder(window_ct(ct_hu))


@dataclass(frozen=True)
class DiscriminatorConfig:
    """3D PatchGAN (pix2pix-style): ``n_layers`` stride-2 stages, then two stride-1 convolutions."""

    channels: int = 32
    n_layers: int = 2
    norm_groups: int = 8

    def validate(self) -> None:
        if self.n_layers < 1:
            raise ValueError(f"DiscriminatorConfig: n_layers must be ≥ 1, found {self.n_layers}")
        widths = [self.channels * min(2**i, 8) for i in range(self.n_layers + 1)]
        bad = [w for w in widths if w % self.norm_groups]
        if bad:
            raise ValueError(
                f"DiscriminatorConfig: widths {widths} must be multiples of norm_groups = {self.norm_groups}"
            )


class PatchDiscriminator(nn.Module):
    """``B×1×D×H×W`` → ``B×1×d×h×w`` realness logits, one per overlapping patch."""

    def __init__(self, config: DiscriminatorConfig, *, in_channels: int = 1) -> None:
        super().__init__()
        config.validate()
        ch = config.channels
        layers: list[nn.Module] = [nn.Conv3d(in_channels, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for i in range(1, config.n_layers + 1):
            out = config.channels * min(2**i, 8)
            stride = 2 if i < config.n_layers else 1
            layers += [
                nn.Conv3d(ch, out, 4, stride=stride, padding=1, bias=False),
                group_norm(out, config.norm_groups),
                nn.LeakyReLU(0.2),
            ]
            ch = out
        layers.append(nn.Conv3d(ch, 1, 3, stride=1, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
