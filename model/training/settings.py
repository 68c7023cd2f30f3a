"""What a training run is asked to do: :class:`TrainSettings`, and the model config it starts from."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from model.networks.diffusion import Variant
from model.networks.upete_model import ModelConfig, NormalisationConfig, default_config

__all__ = ["DEFAULT_PATCH_CPU", "DEFAULT_PATCH_CUDA", "TrainSettings", "TrainStage", "config_for"]


class TrainStage(str, Enum):
    """Which stages ``upete train`` runs; the value is the ``--stage`` spelling."""

    AE = "ae"  # the autoencoder, then its calibration
    DENOISER = "denoiser"  # the denoiser on an autoencoder already trained (--init or --resume)
    BOTH = "both"


@dataclass(frozen=True)
class TrainSettings:
    """Everything ``upete train`` can set. Sizes default to DESIGN.md §4's two-CPU-core scale."""

    variant: Variant
    out_dir: Path
    data_dir: Path
    stage: TrainStage = TrainStage.BOTH  # its spelling ("ae", "denoiser", "both") is accepted too
    init: Path | None = None  # a checkpoint whose trained autoencoder (and calibration) to reuse
    patch_size: tuple[int, int, int] | None = None  # None: 96³ on CUDA, 32×48×48 on CPU
    batch_size: int = 2
    ae_steps: int = 2000
    denoiser_steps: int = 4000
    ae_channels: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (32, 64, 64)
    norm_groups: int = 8
    head_channels: int = 32
    ae_lr: float = 1e-4
    disc_lr: float = 1e-4
    unet_lr: float = 2e-4
    kl_weight: float = 1e-6
    ssim_weight: float = 0.5
    # Off by default: with weight 0.01 (and no adaptive weighting) the hinge term took the f = 2
    # autoencoder from ≈ 38 to ≈ 28 dB reconstruction PSNR within 260 steps on the phantoms; PSNR and
    # SUV fidelity are what the node is for, texture realism is not.
    adv_weight: float = 0.0
    adv_start: int | None = None  # AE step where the discriminator joins; default half of ae_steps
    perceptual_weights: Path | None = None
    perceptual_weight: float = 0.1
    noisy_fraction: float = 0.25  # AE batches made of perturbed SPET
    pool_size: int = 8
    # Perturbed slabs replaced per batch. Perturbing a 32-slice slab of 128² (OSEM) costs seconds on a
    # CPU, several network steps; each slab gives many different crops and flips before it goes.
    pool_refresh: float = 0.25
    vary_recon: bool = True
    normalisation: str = "fixed"
    curve_points: int = 9  # σ_t is close to log-linear in t: 50-step spacing is plenty
    curve_slabs: int = 3
    ema_decay: float = 0.999
    checkpoint_every_s: float = 300.0
    log_every_s: float = 15.0
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    resume: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.stage, TrainStage):
            if self.stage not in {s.value for s in TrainStage}:
                known = ", ".join(s.value for s in TrainStage)
                raise ValueError(f"stage must be one of {known}, found {self.stage!r}")
            object.__setattr__(self, "stage", TrainStage(self.stage))  # frozen: set once, here

    def validate(self) -> None:
        if self.stage is TrainStage.DENOISER and self.init is None and not self.resume:
            raise ValueError(
                "--stage denoiser needs a trained autoencoder: give --init CHECKPOINT or --resume"
            )
        if min(self.ae_steps, self.denoiser_steps) < 0 or self.batch_size < 1:
            raise ValueError("steps must be ≥ 0 and batch_size ≥ 1")
        if not 0 <= self.noisy_fraction <= 1:
            raise ValueError(f"noisy_fraction must be in [0, 1], found {self.noisy_fraction}")
        if self.curve_points < 2 or self.curve_slabs < 1:
            raise ValueError("curve_points must be ≥ 2 and curve_slabs ≥ 1")


#: Default training patches (z, y, x): the issue's 96³ where a GPU trains, DESIGN.md §4's CPU scale otherwise
#: (64³ costs ≈ 4 s a step for the default autoencoder on two cores, 32×48×48 about a quarter of that).
DEFAULT_PATCH_CUDA = (96, 96, 96)
DEFAULT_PATCH_CPU = (32, 48, 48)


def config_for(settings: TrainSettings, scale_bqml: float, patch: tuple[int, int, int]) -> ModelConfig:
    return default_config(
        settings.variant,
        ae_channels=settings.ae_channels,
        latent_channels=settings.latent_channels,
        unet_channels=settings.unet_channels,
        norm_groups=settings.norm_groups,
        head_channels=settings.head_channels,
        patch_size=patch,
        normalisation=NormalisationConfig(mode=settings.normalisation, scale_bqml=scale_bqml),
    )
