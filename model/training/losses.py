"""Autoencoder losses (paper §2.1): L1, 3D SSIM, hinge adversarial and an optional perceptual loss.

The paper's perceptual loss runs a pretrained 3D ResNet (Med3D). Those weights cannot be downloaded
here, so :class:`PerceptualLoss` takes a weights file the user supplies (``.safetensors``, MedicalNet
key names; a ``module.`` prefix is stripped) and is off — said once in the log — without one.
Loading never unpickles: a ``.pth`` file is refused with the one-line conversion to run on a
machine where the user trusts it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

__all__ = [
    "PerceptualLoss",
    "ResNet3d",
    "hinge_d_loss",
    "hinge_g_loss",
    "ssim3d",
    "ssim_loss",
]

log = logging.getLogger(__name__)


def _gaussian_window(size: int, sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    w = torch.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def _blur(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    # Separable Gaussian, 'valid' padding as in Wang et al. (no border artefacts in the mean).
    c = x.shape[1]
    k = window.numel()
    for dim in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + dim] = k
        x = F.conv3d(x, window.view(shape).expand(c, 1, *shape[2:]).contiguous(), groups=c)
    return x


def ssim3d(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    data_range: torch.Tensor | float | None = None,
    window_size: int = 7,
    sigma: float = 1.5,
) -> torch.Tensor:
    """Mean 3D SSIM per batch item (shape ``B``) of ``B×C×D×H×W`` tensors.

    ``data_range`` (L in the SSIM constants) defaults to each item's ``max(y) − min(y)`` of the
    reference ``y``, detached. Spatial sizes must be at least ``window_size``.
    """
    if x.shape != y.shape or x.ndim != 5:
        raise ValueError(
            f"ssim3d needs two equal B×C×D×H×W tensors, found {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if min(x.shape[2:]) < window_size:
        raise ValueError(
            f"ssim3d: spatial size {tuple(x.shape[2:])} is smaller than the window {window_size}"
        )
    if data_range is None:
        flat = y.detach().flatten(1)
        data_range = (flat.max(1).values - flat.min(1).values).clamp_min(1e-6).view(-1, 1, 1, 1, 1)
    window = _gaussian_window(window_size, sigma, x.device, x.dtype)
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    mu_x, mu_y = _blur(x, window), _blur(y, window)
    sxx = _blur(x * x, window) - mu_x**2
    syy = _blur(y * y, window) - mu_y**2
    sxy = _blur(x * y, window) - mu_x * mu_y
    ssim = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return ssim.flatten(1).mean(1)


def ssim_loss(x: torch.Tensor, y: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """1 − SSIM, averaged over the batch (scalar)."""
    return 1.0 - ssim3d(x, y, **kwargs).mean()  # type: ignore[arg-type]


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: E[relu(1 − D(real))] + E[relu(1 + D(fake))] (scalar)."""
    return F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean()


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge loss: −E[D(fake)] (scalar)."""
    return -logits_fake.mean()


class _BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(out_ch)
        self.conv2 = nn.Conv3d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(out_ch)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv3d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm3d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet3d(nn.Module):
    """MedicalNet/Med3D ResNet-10/18/34 trunk (BasicBlock), key names as in its published weights.

    ``forward`` returns the feature maps of layer1…layer4 of a ``B×1×D×H×W`` input.
    """

    LAYERS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}

    def __init__(self, depth: int = 10) -> None:
        super().__init__()
        if depth not in self.LAYERS:
            raise ValueError(f"ResNet3d depth must be one of {sorted(self.LAYERS)}, found {depth}")
        self.conv1 = nn.Conv3d(1, 64, 7, stride=(2, 2, 2), padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        widths = (64, 128, 256, 512)
        in_ch = 64
        for i, (width, n) in enumerate(zip(widths, self.LAYERS[depth], strict=True)):
            blocks = [_BasicBlock(in_ch, width, 1 if i == 0 else 2)]
            blocks += [_BasicBlock(width, width, 1) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            in_ch = width

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = F.max_pool3d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        features = []
        for i in range(1, 5):
            h = getattr(self, f"layer{i}")(h)
            features.append(h)
        return features


class PerceptualLoss(nn.Module):
    """LPIPS-style distance on frozen 3D ResNet features; a no-op returning 0 without a weights file.

    ``weights``: a ``.safetensors`` file with MedicalNet ResNet keys (``conv1.weight``, ``layer1.0...``),
    or ``None``. ``enabled`` tells whether the loss does anything.
    """

    def __init__(self, weights: str | Path | None, *, depth: int = 10) -> None:
        super().__init__()
        self.net: ResNet3d | None = None
        if weights is None:
            log.info("perceptual loss off: no 3D ResNet weights file given (--perceptual-weights)")
            return
        path = Path(weights)
        if path.suffix != ".safetensors":
            raise ValueError(
                f"perceptual weights must be a .safetensors file, found {path.name!r}; convert a trusted "
                'MedicalNet .pth once with: python -c "import torch, safetensors.torch as s; '
                "d = torch.load('resnet_10.pth', map_location='cpu')['state_dict']; "
                "s.save_file({k.removeprefix('module.'): v for k, v in d.items()}, 'resnet_10.safetensors')\""
            )
        state = {k.removeprefix("module."): v for k, v in load_file(str(path)).items()}
        net = ResNet3d(depth)
        missing, _unexpected = net.load_state_dict(state, strict=False)
        trunk_missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if trunk_missing:
            raise ValueError(f"{path.name}: not a ResNet-{depth} weights file, missing {trunk_missing[:3]}…")
        net.eval().requires_grad_(False)
        self.net = net
        log.info("perceptual loss on", extra={"fields": {"weights": path.name, "depth": depth}})

    @property
    def enabled(self) -> bool:
        return self.net is not None

    def train(self, mode: bool = True) -> PerceptualLoss:
        # The ResNet stays in eval mode: its BatchNorm statistics are part of the pretrained weights.
        super().train(mode)
        if self.net is not None:
            self.net.eval()
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Scalar distance between ``B×1×D×H×W`` images (0 when disabled)."""
        if self.net is None:
            return x.new_zeros(())
        total = x.new_zeros(())
        for fx, fy in zip(self.net(x), self.net(y), strict=True):
            # Unit-normalise channels per voxel as LPIPS does, so every layer counts alike.
            fx = fx / (fx.norm(dim=1, keepdim=True) + 1e-8)
            fy = fy / (fy.norm(dim=1, keepdim=True) + 1e-8)
            total = total + (fx - fy).pow(2).sum(1).mean()
        return total
