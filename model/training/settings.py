"""What a training run is asked to do: the one table of training defaults.

:class:`TrainSettings` (a uPETe variant) and :class:`SupervisedSettings` (the reference U-Net) share
:class:`RunSettings` (where a run reads and writes, and how it runs). Their field defaults are the
only defaults: ``upete train`` leaves an option it was not given at None and builds the settings
with :meth:`RunSettings.from_options`. Free of torch, so the command line reads them cheaply.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from model.networks.diffusion import Variant

__all__ = [
    "DEFAULT_PATCH_CPU",
    "DEFAULT_PATCH_CUDA",
    "ForwardProcess",
    "RunSettings",
    "SupervisedSettings",
    "TrainSettings",
    "TrainStage",
]

_Settings = TypeVar("_Settings", bound="RunSettings")


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """What both trainers share: data, output, batch, EMA, saving, logging, seed and device."""

    data_dir: Path
    out_dir: Path
    batch_size: int = 2
    norm_groups: int = 8
    ema_decay: float = 0.999
    checkpoint_every_s: float = 300.0
    log_every_s: float = 15.0
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    resume: bool = False

    @classmethod
    def from_options(cls: type[_Settings], options: Mapping[str, Any], **fixed: Any) -> _Settings:
        """Settings from ``options`` (e.g. ``vars(args)``): each field it sets (None: this table's
        default), other keys ignored; ``fixed`` over them."""
        names = {f.name for f in dataclasses.fields(cls)}
        given = {k: v for k, v in options.items() if k in names and v is not None}
        return cls(**{**given, **fixed})


class TrainStage(str, Enum):
    """Which stages ``upete train`` runs; the value is the ``--stage`` spelling."""

    AE = "ae"  # the autoencoder, then its calibration
    DENOISER = "denoiser"  # the denoiser on an autoencoder already trained (--init or --resume)
    BOTH = "both"
    # Re-match the noise index of --init (autoencoder) + --init-denoiser over scanner styles; no training.
    INDEX = "index"


class ForwardProcess(str, Enum):
    """How a training LPET is made from the SPET; the value is the spelling in settings and files."""

    INJECT = "inject"  # mean-preserving noise injection: a real lower-dose acquisition
    PERTURB = "perturb"  # re-projection of the reconstructed SPET (blurs the mean a second time)


@dataclass(frozen=True, kw_only=True)
class TrainSettings(RunSettings):
    """Everything ``upete train`` can set for a uPETe variant. Sizes default to a scale that trains
    on two CPU cores (tiny next to the paper's GPU runs)."""

    variant: Variant
    stage: TrainStage = TrainStage.BOTH  # its spelling ("ae", "denoiser", "both") is accepted too
    # A checkpoint whose trained autoencoder (and calibration) to reuse; with stage "ae" the
    # autoencoder is trained further from it (fine-tuning) and calibrated again.
    init: Path | None = None
    patch_size: tuple[int, int, int] | None = None  # None: 96³ on CUDA, 32×48×48 on CPU
    ae_steps: int = 2000
    denoiser_steps: int = 4000
    ae_channels: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (32, 64, 64)
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
    # The forward process ("inject": a real lower-dose acquisition; "perturb": the first runs'), and
    # whether slabs are made on random scanner styles' native grids (model.training.styles).
    forward: ForwardProcess = ForwardProcess.INJECT  # its spelling ("inject", "perturb") is accepted too
    styles: bool = True
    # A checkpoint of this variant whose denoiser (and E_CT) the denoiser stage starts from: fine-tuning
    # (it may be --init itself, or another run's on an autoencoder of the same latent size).
    init_denoiser: Path | None = None
    # Autoencoder patches are multiplied by a gain drawn log-uniformly in [1/2, ae_gain_max]: scanners'
    # hot organs (bladder, brain) reach 20-40x the body's median, which the phantoms rarely show, and
    # an autoencoder that never saw such levels flattens them. 1 turns it off.
    ae_gain_max: float = 4.0
    normalisation: str = "fixed"
    curve_points: int = 9  # σ_t is close to log-linear in t: 50-step spacing is plenty
    curve_slabs: int = 3
    index_slabs: int = 48  # slabs of random scanner styles and doses the noise index is matched on

    def __post_init__(self) -> None:
        # Enum fields accept their spelling (CLI, JSON); frozen, so each is set once, here.
        for name, kind in (("stage", TrainStage), ("forward", ForwardProcess)):
            value = getattr(self, name)
            if not isinstance(value, kind):
                if value not in {member.value for member in kind}:
                    known = ", ".join(member.value for member in kind)
                    raise ValueError(f"{name} must be one of {known}, found {value!r}")
                object.__setattr__(self, name, kind(value))

    def validate(self) -> None:
        if self.stage is TrainStage.DENOISER and self.init is None and not self.resume:
            raise ValueError(
                "--stage denoiser needs a trained autoencoder: give --init CHECKPOINT or --resume"
            )
        index_inputs = self.init is not None and self.init_denoiser is not None and not self.resume
        if self.stage is TrainStage.INDEX and not index_inputs:
            raise ValueError(
                "--stage index re-matches a trained checkpoint's noise index: give --init CHECKPOINT and "
                "--init-denoiser CHECKPOINT (usually the same file), not --resume"
            )
        if min(self.ae_steps, self.denoiser_steps) < 0 or self.batch_size < 1:
            raise ValueError("steps must be ≥ 0 and batch_size ≥ 1")
        if not 0 <= self.noisy_fraction <= 1:
            raise ValueError(f"noisy_fraction must be in [0, 1], found {self.noisy_fraction}")
        if self.init_denoiser is not None and self.init is None:
            raise ValueError("init_denoiser needs --init CHECKPOINT (the autoencoder it denoises for)")
        if self.ae_gain_max < 1:
            raise ValueError(f"ae_gain_max must be ≥ 1, found {self.ae_gain_max}")
        if self.curve_points < 2 or self.curve_slabs < 1 or self.index_slabs < 3:
            raise ValueError("curve_points must be ≥ 2, curve_slabs ≥ 1 and index_slabs ≥ 3")


#: Default training patches (z, y, x): 96³ where a GPU trains, the two-core CPU scale otherwise
#: (64³ costs ≈ 4 s a step for the default autoencoder on two cores, 32×48×48 about a quarter of that).
DEFAULT_PATCH_CUDA = (96, 96, 96)
DEFAULT_PATCH_CPU = (32, 48, 48)


@dataclass(frozen=True, kw_only=True)
class SupervisedSettings(RunSettings):
    """Everything ``upete train --variant supervised`` can set; sizes default to the two-core CPU scale."""

    dose: float = 0.1
    steps: int = 6000
    patch_size: tuple[int, int, int] = DEFAULT_PATCH_CPU
    channels: tuple[int, ...] = (16, 32, 64)
    res_blocks: int = 2  # (16, 32, 64) × 2 blocks ≈ 1.0 M parameters, the uPETe denoiser's order
    lr: float = 5e-4
    # Linear learning-rate warm-up: Adam's first steps from a zero-initialised output layer overshoot.
    warmup_steps: int = 200
    ssim_weight: float = 0.0

    def validate(self) -> None:
        if not 0 < self.dose <= 1:
            raise ValueError(f"dose must be in (0, 1], found {self.dose}")
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError(
                f"steps must be ≥ 0 and batch_size ≥ 1, found {self.steps} and {self.batch_size}"
            )
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be ≥ 0, found {self.warmup_steps}")
        if self.lr <= 0 or self.ssim_weight < 0:
            raise ValueError(
                f"lr must be positive and ssim_weight ≥ 0, found {self.lr} and {self.ssim_weight}"
            )
