"""3D building blocks shared by the autoencoder and the denoising U-Net.

Every block works on ``B×C×D×H×W`` tensors of any spatial size: down-sampling is a stride-2
convolution (``ceil(n / 2)``), up-sampling interpolates to an explicit target size, so skip
connections line up even for odd sizes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "Downsample",
    "ResBlock",
    "Upsample",
    "check_levels",
    "group_norm",
    "sinusoidal_embedding",
]


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with ``groups`` groups (``channels`` must be a multiple; checked up front by configs)."""
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


def check_levels(
    owner: str,
    channels: Sequence[int],
    groups: int,
    **per_level: Sequence[object],
) -> None:
    """Validate per-level tuples up front, MONAI-style: every tuple as long as ``channels``.

    Raises ``ValueError`` quoting both lengths, or the channel count that ``groups`` does not divide.
    """
    if len(channels) < 1:
        raise ValueError(f"{owner}: channels must name at least one level, found {tuple(channels)}")
    if groups < 1:
        raise ValueError(f"{owner}: norm_groups must be positive, found {groups}")
    for level, ch in enumerate(channels):
        if ch < 1 or ch % groups:
            raise ValueError(
                f"{owner}: channels[{level}] = {ch} is not a positive multiple of norm_groups = {groups}"
            )
    for name, values in per_level.items():
        if len(values) != len(channels):
            raise ValueError(
                f"{owner}: {name} has {len(values)} entries but channels has {len(channels)} levels"
            )


def sinusoidal_embedding(t: torch.Tensor, dim: int, *, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of (possibly fractional) time steps.

    ``t``: shape ``B`` (any real dtype). Returns ``B×dim`` float32.
    """
    if dim % 2:
        raise ValueError(f"time embedding dim must be even, found {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    """Residual block: GroupNorm → SiLU → conv3³ → (+ time embedding) → GroupNorm → SiLU → conv3³.

    ``B×C_in×D×H×W`` → ``B×C_out×D×H×W``. ``time_channels`` = 0 builds a block without time input
    (the autoencoder's).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        groups: int,
        time_channels: int = 0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.time = nn.Linear(time_channels, out_channels) if time_channels else None
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time is not None:
            if temb is None:
                raise ValueError("this block needs a time embedding")
            h = h + self.time(F.silu(temb))[:, :, None, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Downsample(nn.Module):
    """Stride-2 3³ convolution: ``B×C×D×H×W`` → ``B×C_out×⌈D/2⌉×⌈H/2⌉×⌈W/2⌉``."""

    def __init__(self, in_channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels or in_channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour up-sampling to ``size`` (default ×2) followed by a 3³ convolution."""

    def __init__(self, in_channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels or in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x)
