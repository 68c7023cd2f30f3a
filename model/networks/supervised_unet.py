"""The supervised reference: a residual 3D U-Net trained on simulated LPET → SPET pairs at one dose.

Not uPETe: it needs paired low- and standard-dose PET, which the paper's method does not, and it is
trained at one dose fraction. It is here because the paper's strongest competitors are supervised
networks trained on paired scans, so the benchmark needs one of similar size to the uPETe denoiser.

Network (:class:`SupervisedUNet`): ``SPET_norm ≈ LPET_norm + U(LPET_norm)``, a U-Net of
:class:`~model.networks.layers.ResBlock` levels with stride-2 down- and nearest up-sampling, its last
convolution zero-initialised so that an untrained network is the identity. Intensities are Bq/ml ÷
a fixed, dose-independent ``scale_bqml`` (not per-patch min-max,
which would discard the absolute activity that SUVs are read from).

Enhancer (:class:`SupervisedEnhancer`): resample to the 2 mm grid → normalise → tiles of the
training patch size (GroupNorm sees the statistics it was trained on), blended with Gaussian
weights → invert the normalisation exactly → resample back.

Files: ``NAME.safetensors`` (weights) + ``NAME.json`` (:class:`SupervisedConfig` with
``"kind": "supervised"``), written with :mod:`model.networks.checkpoint`'s atomic writers; nothing is pickled.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from model.networks.checkpoint import config_path, write_model_files
from model.networks.layers import Downsample, ResBlock, Upsample, check_levels, group_norm

__all__ = [
    "KIND",
    "parameter_count",
    "SupervisedConfig",
    "SupervisedUNet",
    "load_supervised",
    "save_supervised",
]

#: The ``kind`` a supervised checkpoint's JSON carries; :func:`model.enhance.load_enhancer` routes on it.
KIND = "supervised"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SupervisedConfig:
    """Architecture, normalisation and inference settings of the supervised U-Net (JSON-able).

    ``channels`` per level (``len`` levels, ``len − 1`` down-samplings); ``res_blocks`` per level on
    each side; ``patch_size`` ``(z, y, x)`` in ``spacing_mm`` voxels is the training patch and the
    inference tile; ``dose`` the dose fraction it was trained at; ``training`` a summary of the run.
    """

    channels: tuple[int, ...] = (16, 32, 64)
    res_blocks: int = 1
    norm_groups: int = 8
    patch_size: tuple[int, int, int] = (32, 48, 48)
    scale_bqml: float = 5000.0
    spacing_mm: float = 2.0
    dose: float = 0.1
    tile_overlap: float = 0.5
    tile_batch: int = 4
    training: dict[str, Any] = field(default_factory=dict)
    software_version: str = ""

    def validate(self) -> None:
        check_levels("SupervisedConfig", self.channels, self.norm_groups)
        if self.res_blocks < 1:
            raise ValueError(f"SupervisedConfig: res_blocks must be ≥ 1, found {self.res_blocks}")
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(
                f"SupervisedConfig: patch_size must be 3 positive sizes, found {self.patch_size}"
            )
        if not self.scale_bqml > 0:
            raise ValueError(f"SupervisedConfig: scale_bqml must be positive, found {self.scale_bqml}")
        if not self.spacing_mm > 0:
            raise ValueError(f"SupervisedConfig: spacing_mm must be positive, found {self.spacing_mm}")
        if not 0 < self.dose <= 1:
            raise ValueError(f"SupervisedConfig: dose must be in (0, 1], found {self.dose}")
        if not 0 <= self.tile_overlap < 1 or self.tile_batch < 1:
            raise ValueError(
                f"SupervisedConfig: tile_overlap must be in [0, 1) and tile_batch ≥ 1, found "
                f"{self.tile_overlap} and {self.tile_batch}"
            )

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["channels"] = list(self.channels)
        data["patch_size"] = list(self.patch_size)
        return {"kind": KIND, "format_version": FORMAT_VERSION, **data}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SupervisedConfig:
        data = dict(data)
        kind = data.pop("kind", None)
        if kind != KIND:
            raise ValueError(f"not a supervised U-Net config: kind is {kind!r}, expected {KIND!r}")
        version = data.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(
                f"supervised config format_version {version!r}; this code reads {FORMAT_VERSION}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown supervised config key(s) {unknown}")
        data["channels"] = tuple(int(c) for c in data.get("channels", cls.channels))
        data["patch_size"] = tuple(int(p) for p in data.get("patch_size", cls.patch_size))
        config = cls(**data)
        config.validate()
        return config


class SupervisedUNet(nn.Module):
    """Residual 3D U-Net: ``B×1×D×H×W`` normalised LPET → ``B×1×D×H×W`` normalised SPET estimate.

    Works on any spatial size (down-sampling rounds up, up-sampling goes to the skip's size).
    """

    def __init__(self, config: SupervisedConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        ch, groups, n = config.channels, config.norm_groups, config.res_blocks
        self.stem = nn.Conv3d(1, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        for level, c in enumerate(ch):
            c_in = ch[level - 1] if level else ch[0]
            blocks = [ResBlock(c_in if i == 0 else c, c, groups=groups) for i in range(n)]
            self.down_blocks.append(nn.ModuleList(blocks))
            if level < len(ch) - 1:
                self.downsamples.append(Downsample(c, c))
        self.middle = ResBlock(ch[-1], ch[-1], groups=groups)
        self.upsamples = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for level in reversed(range(len(ch) - 1)):
            c = ch[level]
            self.upsamples.append(Upsample(ch[level + 1], c))
            # The first block takes the skip concatenated with the up-sampled features.
            blocks = [ResBlock(2 * c if i == 0 else c, c, groups=groups) for i in range(n)]
            self.up_blocks.append(nn.ModuleList(blocks))
        self.out_norm = group_norm(ch[0], groups)
        self.out_conv = nn.Conv3d(ch[0], 1, 3, padding=1)
        # Zero correction at initialisation: training starts from the identity (the LPET itself).
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    def correction(self, x: torch.Tensor) -> torch.Tensor:
        """The residual the network adds to ``x`` (``B×1×D×H×W``)."""
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"expected a B×1×D×H×W tensor, found shape {tuple(x.shape)}")
        h = self.stem(x)
        skips = []
        for level, blocks in enumerate(self.down_blocks):
            for block in blocks:
                h = block(h)
            if level < len(self.downsamples):
                skips.append(h)
                h = self.downsamples[level](h)
        h = self.middle(h)
        for upsample, blocks in zip(self.upsamples, self.up_blocks, strict=True):
            skip = skips.pop()
            h = torch.cat([upsample(h, size=skip.shape[2:]), skip], dim=1)
            for block in blocks:
                h = block(h)
        return self.out_conv(F.silu(self.out_norm(h)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.correction(x)


# --- files ------------------------------------------------------------------------------------------


def save_supervised(path: str | Path, model: SupervisedUNet, config: SupervisedConfig | None = None) -> Path:
    """Write ``path`` (.safetensors) and its JSON config, atomically; returns the weights path."""
    config = config or model.config
    config.validate()
    return write_model_files(path, model.state_dict(), {"format": "upete", "kind": KIND}, config.to_json())


def load_supervised(path: str | Path, *, device: str | torch.device = "cpu") -> SupervisedUNet:
    """The network a supervised checkpoint describes, weights loaded strictly; eval mode, on ``device``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    cfg = config_path(path)
    if not cfg.is_file():
        raise FileNotFoundError(f"checkpoint config {cfg} is missing (it must sit beside {path.name})")
    try:
        config = SupervisedConfig.from_json(json.loads(cfg.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise ValueError(f"{cfg}: {exc}") from None
    model = SupervisedUNet(config)
    try:
        model.load_state_dict(load_file(str(path), device="cpu"), strict=True)
    except RuntimeError as exc:  # missing/unexpected keys or shape mismatches
        raise ValueError(f"{path.name} does not match its config: {str(exc).splitlines()[0]}") from None
    return model.to(device).eval()


def parameter_count(model: nn.Module) -> int:
    """Trainable parameters (for logs and the config's training summary)."""
    return int(sum(math.prod(p.shape) for p in model.parameters() if p.requires_grad))
