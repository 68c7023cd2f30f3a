"""The denoiser U (paper §2.2): a 3D attention U-Net with CT-guided cross-attention, Eq. (2).

- residual GroupNorm blocks with a sinusoidal time embedding;
- Oktay attention gates on every skip connection (the gate is the up-sampled decoder feature);
- at the levels ``ct_attention_levels`` marks (the two coarsest by default), after the residual blocks
  of the encoder, the middle and the decoder: ``softmax(Q_CT K_CTᵀ / √d + B) V_PET``, with Q, K
  1×1×1 convolutions of the CT latent features at that level, V a 1×1×1 convolution of the PET
  features and B a relative position bias computed by a small MLP from the relative offset
  (dz, dy, dx) of every token pair, so it exists for any spatial size.

Variants without CT have every ``ct_attention_levels`` False and refuse a CT input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from model.networks.layers import (
    Downsample,
    ResBlock,
    Upsample,
    check_levels,
    group_norm,
    sinusoidal_embedding,
)

__all__ = [
    "AttentionGate",
    "CTCrossAttention",
    "RelativePositionBias",
    "UNet",
    "UNetConfig",
]


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of U. ``ct_channels`` is the channel count of z_CT (ignored when no level uses CT)."""

    in_channels: int = 4
    out_channels: int = 4
    channels: tuple[int, ...] = (32, 64, 64)
    num_res_blocks: tuple[int, ...] = (1, 1, 1)
    ct_attention_levels: tuple[bool, ...] = (False, True, True)
    ct_channels: int = 4
    head_channels: int = 32
    attention_gates: bool = True
    norm_groups: int = 8
    position_bias_hidden: int = 32
    dropout: float = 0.0
    time_embedding_dim: int = field(default=0)  # 0 = 4 × channels[0]

    @property
    def uses_ct(self) -> bool:
        return any(self.ct_attention_levels)

    @property
    def downsample_factor(self) -> int:
        """Latent sizes must be divisible by this for the U-Net's skips to line up without rounding."""
        return 2 ** (len(self.channels) - 1)

    def validate(self) -> None:
        check_levels(
            "UNetConfig",
            self.channels,
            self.norm_groups,
            num_res_blocks=self.num_res_blocks,
            ct_attention_levels=self.ct_attention_levels,
        )
        if self.uses_ct and self.ct_channels < 1:
            raise ValueError(f"UNetConfig: CT attention is on but ct_channels = {self.ct_channels}")
        for level, (ch, on) in enumerate(zip(self.channels, self.ct_attention_levels, strict=True)):
            if on and ch % self.head_channels:
                raise ValueError(
                    f"UNetConfig: channels[{level}] = {ch} is not a multiple of head_channels = "
                    f"{self.head_channels}"
                )
        if self.time_embedding_dim % 2:
            raise ValueError(f"UNetConfig: time_embedding_dim must be even, found {self.time_embedding_dim}")


class RelativePositionBias(nn.Module):
    """B of Eq. (2) for a D×H×W token grid of any size: ``heads×N×N``, N = D·H·W.

    An MLP maps each relative offset (dz, dy, dx), log-spaced as sign(Δ)·log2(1 + |Δ|) (Swin V2's
    continuous position bias), to one bias per head. It is evaluated once per distinct offset
    ((2D−1)(2H−1)(2W−1) of them) and gathered, so the cost grows with N, not N², until the gather.
    """

    def __init__(self, heads: int, *, hidden: int = 32) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, heads))
        # Start neutral: attention is first driven by content alone.
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)
        self._index_cache: dict[tuple[int, int, int, str], torch.Tensor] = {}
        self._bias_cache: torch.Tensor | None = None
        self._bias_cache_key: tuple | None = None

    def _index(self, size: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        key = (*size, str(device))
        index = self._index_cache.get(key)
        if index is None:
            d, h, w = size
            grid = torch.stack(
                torch.meshgrid(
                    torch.arange(d, device=device),
                    torch.arange(h, device=device),
                    torch.arange(w, device=device),
                    indexing="ij",
                ),
                dim=-1,
            ).reshape(-1, 3)
            rel = grid[:, None, :] - grid[None, :, :]  # N×N×3, offsets in tokens
            rel = rel + torch.tensor([d - 1, h - 1, w - 1], device=device)
            index = (rel[..., 0] * (2 * h - 1) + rel[..., 1]) * (2 * w - 1) + rel[..., 2]
            self._index_cache[key] = index
        return index

    def forward(
        self, size: tuple[int, int, int], *, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        if torch.is_grad_enabled():
            return self._compute(size, device=device, dtype=dtype)
        # Without gradients (sampling: every step and tile asks for the same B) the result is kept;
        # the parameters' version counters in the key make any weight update recompute it.
        key = (*size, str(device), dtype, *(p._version for p in self.mlp.parameters()))
        if self._bias_cache_key != key:
            self._bias_cache = self._compute(size, device=device, dtype=dtype)
            self._bias_cache_key = key
        return self._bias_cache

    def _compute(
        self, size: tuple[int, int, int], *, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        d, h, w = size
        offsets = torch.stack(
            torch.meshgrid(
                torch.arange(-(d - 1), d, device=device, dtype=torch.float32),
                torch.arange(-(h - 1), h, device=device, dtype=torch.float32),
                torch.arange(-(w - 1), w, device=device, dtype=torch.float32),
                indexing="ij",
            ),
            dim=-1,
        ).reshape(-1, 3)
        coords = torch.sign(offsets) * torch.log2(1.0 + offsets.abs())
        table = self.mlp(coords)  # (2D−1)(2H−1)(2W−1) × heads
        bias = table[self._index(size, device)]  # N×N×heads
        return bias.permute(2, 0, 1).to(dtype)


class CTCrossAttention(nn.Module):
    """Eq. (2): ``h + Proj(softmax(Q_CT K_CTᵀ/√d + B) V_PET)`` on ``B×C×D×H×W`` PET features ``h``.

    ``ct``: ``B×C_ct×D×H×W`` CT features at the same level. d is the channel count of one head.
    """

    def __init__(self, channels: int, ct_channels: int, *, head_channels: int, groups: int, bias_hidden: int):
        super().__init__()
        self.heads = channels // head_channels
        self.norm_pet = group_norm(channels, groups)
        self.norm_ct = group_norm(ct_channels, groups)
        self.to_q = nn.Conv3d(ct_channels, channels, 1)
        self.to_k = nn.Conv3d(ct_channels, channels, 1)
        self.to_v = nn.Conv3d(channels, channels, 1)
        self.proj = nn.Conv3d(channels, channels, 1)
        self.position_bias = RelativePositionBias(self.heads, hidden=bias_hidden)

    def forward(self, h: torch.Tensor, ct: torch.Tensor) -> torch.Tensor:
        b, c, d, hh, w = h.shape
        if ct.shape[0] != b or ct.shape[2:] != h.shape[2:]:
            raise ValueError(f"CT features {tuple(ct.shape)} do not match PET features {tuple(h.shape)}")
        ct_n = self.norm_ct(ct)

        def heads(x: torch.Tensor) -> torch.Tensor:  # B×C×D×H×W → B×heads×N×d
            # Contiguous: on CPU, SDPA takes its fused kernel only then (≈4× faster than the math path
            # it falls back to for transposed inputs; benchmarks/results/speed.md).
            return x.reshape(b, self.heads, c // self.heads, d * hh * w).transpose(2, 3).contiguous()

        q, k = heads(self.to_q(ct_n)), heads(self.to_k(ct_n))
        v = heads(self.to_v(self.norm_pet(h)))
        bias = self.position_bias((d, hh, w), device=h.device, dtype=q.dtype)[None]
        # scaled_dot_product_attention computes softmax(QKᵀ/√d + mask)V; the float mask is B.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(2, 3).reshape(b, c, d, hh, w)
        return h + self.proj(out)


class AttentionGate(nn.Module):
    """Oktay et al. additive attention gate: ``skip · σ(ψ(ReLU(W_x skip + W_g gate)))``.

    ``skip``: ``B×C_s×D×H×W`` encoder features; ``gate``: ``B×C_g×D×H×W`` decoder features at the same
    size (already up-sampled from the coarser level). Returns ``B×C_s×D×H×W``.
    """

    def __init__(self, skip_channels: int, gate_channels: int, inter_channels: int) -> None:
        super().__init__()
        self.w_x = nn.Conv3d(skip_channels, inter_channels, 1, bias=False)
        self.w_g = nn.Conv3d(gate_channels, inter_channels, 1)
        self.psi = nn.Conv3d(inter_channels, 1, 1)

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        alpha = torch.sigmoid(self.psi(F.relu(self.w_x(skip) + self.w_g(gate))))
        return skip * alpha


class UNet(nn.Module):
    """``forward(z, t, ct=None)``: ``B×C_in×d×h×w`` latent, ``B`` time steps, optional ``B×C_ct×d×h×w``.

    Returns ``B×C_out×d×h×w``. A CT is required when the config uses CT and refused otherwise.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        ch = config.channels
        groups = config.norm_groups
        temb = config.time_embedding_dim or 4 * ch[0]
        self.time_dim = ch[0] if ch[0] % 2 == 0 else ch[0] + 1
        self.time_mlp = nn.Sequential(nn.Linear(self.time_dim, temb), nn.SiLU(), nn.Linear(temb, temb))

        def xattn(level: int) -> CTCrossAttention | None:
            if not config.ct_attention_levels[level]:
                return None
            return CTCrossAttention(
                ch[level],
                ch[level],
                head_channels=config.head_channels,
                groups=groups,
                bias_hidden=config.position_bias_hidden,
            )

        # CT feature pyramid: z_CT at the latent size, then one stride-2 stage per U-Net level.
        if config.uses_ct:
            self.ct_in = nn.Conv3d(config.ct_channels, ch[0], 3, padding=1)
            self.ct_down = nn.ModuleList(
                nn.Sequential(Downsample(ch[i - 1], ch[i]), group_norm(ch[i], groups), nn.SiLU())
                for i in range(1, len(ch))
            )

        self.conv_in = nn.Conv3d(config.in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        previous = ch[0]
        for level, n_blocks in enumerate(config.num_res_blocks):
            stage = nn.Module()
            stage.blocks = nn.ModuleList()
            for _ in range(n_blocks):
                stage.blocks.append(ResBlock(previous, ch[level], groups=groups, time_channels=temb))
                previous = ch[level]
            stage.xattn = xattn(level)
            stage.downsample = Downsample(previous) if level < len(ch) - 1 else None
            self.down.append(stage)

        self.mid1 = ResBlock(previous, previous, groups=groups, time_channels=temb)
        self.mid_xattn = xattn(len(ch) - 1)
        self.mid2 = ResBlock(previous, previous, groups=groups, time_channels=temb)

        self.up = nn.ModuleList()
        for level in reversed(range(len(ch))):
            stage = nn.Module()
            stage.upsample = Upsample(previous, ch[level]) if level < len(ch) - 1 else None
            if stage.upsample is not None:
                previous = ch[level]
            stage.gate = (
                AttentionGate(ch[level], previous, max(ch[level] // 2, 1)) if config.attention_gates else None
            )
            stage.blocks = nn.ModuleList()
            in_ch = previous + ch[level]
            for _ in range(config.num_res_blocks[level]):
                stage.blocks.append(ResBlock(in_ch, ch[level], groups=groups, time_channels=temb))
                in_ch = ch[level]
            previous = ch[level]
            stage.xattn = xattn(level)
            self.up.append(stage)

        self.norm_out = group_norm(previous, groups)
        self.conv_out = nn.Conv3d(previous, config.out_channels, 3, padding=1)

    def _ct_pyramid(self, ct: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.ct_in(ct)]
        for down in self.ct_down:
            feats.append(down(feats[-1]))
        return feats

    def forward(self, z: torch.Tensor, t: torch.Tensor, ct: torch.Tensor | None = None) -> torch.Tensor:
        config = self.config
        if z.ndim != 5 or z.shape[1] != config.in_channels:
            raise ValueError(f"expected a B×{config.in_channels}×d×h×w latent, found {tuple(z.shape)}")
        if config.uses_ct:
            if ct is None:
                raise ValueError("this denoiser is CT-guided and needs z_CT")
            if ct.shape[0] != z.shape[0] or ct.shape[1] != config.ct_channels or ct.shape[2:] != z.shape[2:]:
                raise ValueError(
                    f"z_CT of shape {tuple(ct.shape)} does not fit the latent {tuple(z.shape)} "
                    f"with {config.ct_channels} CT channels"
                )
        elif ct is not None:
            raise ValueError("this denoiser variant takes no CT; pass ct=None")
        if t.ndim == 0:
            t = t.expand(z.shape[0])
        temb = self.time_mlp(sinusoidal_embedding(t, self.time_dim))
        ct_feats = self._ct_pyramid(ct) if ct is not None else None

        h = self.conv_in(z)
        skips = []
        for level, stage in enumerate(self.down):
            for block in stage.blocks:
                h = block(h, temb)
            if stage.xattn is not None:
                h = stage.xattn(h, ct_feats[level])
            skips.append(h)
            if stage.downsample is not None:
                h = stage.downsample(h)

        h = self.mid1(h, temb)
        if self.mid_xattn is not None:
            h = self.mid_xattn(h, ct_feats[-1])
        h = self.mid2(h, temb)

        for stage, level in zip(self.up, reversed(range(len(self.down))), strict=True):
            skip = skips[level]
            if stage.upsample is not None:
                h = stage.upsample(h, size=skip.shape[2:])
            if stage.gate is not None:
                skip = stage.gate(skip, h)
            h = torch.cat([h, skip], dim=1)
            for block in stage.blocks:
                h = block(h, temb)
            if stage.xattn is not None:
                h = stage.xattn(h, ct_feats[level])
        return self.conv_out(F.silu(self.norm_out(h)))
