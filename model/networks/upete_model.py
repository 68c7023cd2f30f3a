"""The whole uPETe model as one object: its JSON-able config and the modules built from it.

:class:`ModelConfig` is everything a checkpoint needs besides the weights: architecture (the
dataclasses of each network), variant, intensity normalisation, latent scale, schedule, measured
noise curve, training patch size, sampler defaults and a summary of the training data.
:func:`build_model` turns it into a :class:`UPETeModel`; :mod:`model.networks.checkpoint` stores both.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from torch import nn

from model.networks.autoencoder import AutoencoderConfig, AutoencoderKL, CTEncoder, CTEncoderConfig
from model.networks.diffusion import LatentDiffusion, ScheduleConfig, Variant, build_schedule
from model.networks.noise_level import NoiseCurve
from model.networks.unet import UNet, UNetConfig

__all__ = [
    "FORMAT_VERSION",
    "ModelConfig",
    "NormalisationConfig",
    "SamplerConfig",
    "UPETeModel",
    "build_model",
    "default_config",
]

#: Bumped when the checkpoint layout changes incompatibly.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class NormalisationConfig:
    """Intensity normalisation: PET_norm = Bq/ml ÷ ``scale_bqml``.

    ``mode = "fixed"`` (default) uses the fixed, dose-independent scale; ``"minmax"`` (the paper's)
    maps each volume's [min, max] to [0, 1] and back. ``scale_bqml`` is set in both modes: the noise
    index that places an LPET on the schedule is always measured in fixed units.
    """

    mode: str = "fixed"
    scale_bqml: float = 5000.0

    def validate(self) -> None:
        if self.mode not in ("fixed", "minmax"):
            raise ValueError(f"normalisation mode must be 'fixed' or 'minmax', found {self.mode!r}")
        if not self.scale_bqml > 0:
            raise ValueError(f"normalisation scale_bqml must be positive, found {self.scale_bqml}")


@dataclass(frozen=True)
class SamplerConfig:
    """Inference defaults (the node's ``model.steps`` overrides ``steps``)."""

    steps: int = 20
    renoise_ratio: float = 1.0  # Gaussian variants: injected variance / LPET latent variance
    tile_overlap: float = 0.25  # fraction of the training patch shared by neighbouring tiles
    tile_batch: int = 2  # tiles per forward pass
    # > 0: the output keeps the LPET's local mean activity at this scale (model/enhancers/quantitation.py);
    # 0: the paper's sampler output as it is.
    local_mean_fwhm_mm: float = 0.0
    # > 0: the decoder's own error on the LPET, smoothed by a Gaussian of this FWHM, is put back into
    # the output where the LPET is placed at a dose equivalent of at least decoder_detail_doses[0],
    # fully from decoder_detail_doses[1] up (model/enhancers/detail.py); 0: off.
    decoder_detail_fwhm_mm: float = 0.0
    decoder_detail_doses: tuple[float, float] = (0.18, 0.35)
    # > 0: where the LPET, smoothed by a Gaussian of this FWHM, differs from the output smoothed alike by
    # more than significance_threshold local RMS (over significance_window_mm), the difference is put
    # back: a small lesion the denoiser flattened (model/enhancers/significance.py); 0: off.
    significance_fwhm_mm: float = 0.0
    significance_threshold: float = 4.0
    significance_window_mm: float = 40.0
    significance_doses: tuple[float, float] = (0.06, 0.12)  # weight 0 at or below, 1 at or above
    # > 0: the rest of the weight (1 − the step's weight, i.e. where the LPET is placed low and its noise
    # would pass a 5 mm test) goes to the same step at this coarser FWHM and its own threshold; 0: off.
    significance_low_fwhm_mm: float = 0.0
    significance_low_threshold: float = 4.0

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"sampler steps must be ≥ 1, found {self.steps}")
        if not 0 <= self.tile_overlap < 1:
            raise ValueError(f"tile_overlap must be in [0, 1), found {self.tile_overlap}")
        if self.local_mean_fwhm_mm < 0:
            raise ValueError(f"local_mean_fwhm_mm must be ≥ 0, found {self.local_mean_fwhm_mm}")
        if self.decoder_detail_fwhm_mm < 0:
            raise ValueError(f"decoder_detail_fwhm_mm must be ≥ 0, found {self.decoder_detail_fwhm_mm}")
        low, high = self.decoder_detail_doses
        if not 0 < low < high <= 1:
            raise ValueError(f"decoder_detail_doses must be 0 < low < high ≤ 1, found {low}, {high}")
        if self.significance_fwhm_mm < 0:
            raise ValueError(f"significance_fwhm_mm must be ≥ 0, found {self.significance_fwhm_mm}")
        if self.significance_threshold <= 1 or self.significance_window_mm <= 0:
            raise ValueError(
                f"significance_threshold ({self.significance_threshold}) must be above 1 and "
                f"significance_window_mm ({self.significance_window_mm}) positive"
            )
        low, high = self.significance_doses
        if not 0 < low < high <= 1:
            raise ValueError(f"significance_doses must be 0 < low < high ≤ 1, found {low}, {high}")
        if self.significance_low_fwhm_mm < 0 or self.significance_low_threshold <= 1:
            raise ValueError(
                f"significance_low_fwhm_mm ({self.significance_low_fwhm_mm}) must be ≥ 0 and "
                f"significance_low_threshold ({self.significance_low_threshold}) above 1"
            )
        if self.significance_low_fwhm_mm > 0 and self.significance_fwhm_mm == 0:
            raise ValueError("significance_low_fwhm_mm needs significance_fwhm_mm > 0 (it takes the rest "
                             "of that step's weight)")
        if self.tile_batch < 1 or self.renoise_ratio < 0:
            raise ValueError(
                f"tile_batch ({self.tile_batch}) must be ≥ 1 and renoise_ratio ({self.renoise_ratio}) ≥ 0"
            )


@dataclass(frozen=True)
class ModelConfig:
    """Everything about a trained model but its weights. JSON round-trips via to_json/from_json."""

    variant: Variant
    autoencoder: AutoencoderConfig = AutoencoderConfig()
    unet: UNetConfig = UNetConfig()
    ct_encoder: CTEncoderConfig | None = None
    schedule: ScheduleConfig = ScheduleConfig()
    normalisation: NormalisationConfig = NormalisationConfig()
    sampler: SamplerConfig = SamplerConfig()
    latent_scale: float = 1.0  # z = latent_scale · E(x).mean: unit variance on training data
    noise_curve: NoiseCurve | None = None
    patch_size: tuple[int, int, int] = (64, 64, 64)  # training patch, voxels (z, y, x) at spacing_mm
    spacing_mm: float = 2.0
    training: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    software_version: str = ""

    def validate(self) -> None:
        self.autoencoder.validate()
        self.unet.validate()
        self.schedule.validate()
        self.normalisation.validate()
        self.sampler.validate()
        if self.variant.uses_ct != self.unet.uses_ct:
            raise ValueError(
                f"variant {self.variant.value} {'uses' if self.variant.uses_ct else 'takes no'} CT but the "
                f"U-Net's ct_attention_levels are {self.unet.ct_attention_levels}"
            )
        if self.variant.uses_ct != (self.ct_encoder is not None):
            raise ValueError(
                f"variant {self.variant.value}: ct_encoder must be given exactly for CT variants"
            )
        if self.ct_encoder is not None:
            self.ct_encoder.validate()
            if self.ct_encoder.downsample_factor != self.autoencoder.downsample_factor:
                raise ValueError(
                    f"E_CT down-samples by {self.ct_encoder.downsample_factor}, E by "
                    f"{self.autoencoder.downsample_factor}: they must match"
                )
            if self.ct_encoder.latent_channels != self.unet.ct_channels:
                raise ValueError(
                    f"E_CT gives {self.ct_encoder.latent_channels} channels, the U-Net expects "
                    f"{self.unet.ct_channels}"
                )
        if self.unet.in_channels != self.autoencoder.latent_channels or self.unet.out_channels != (
            self.autoencoder.latent_channels
        ):
            raise ValueError(
                f"U-Net in/out channels ({self.unet.in_channels}, {self.unet.out_channels}) must equal the "
                f"latent channels ({self.autoencoder.latent_channels})"
            )
        if self.schedule.kind is not self.variant.schedule_kind:
            raise ValueError(f"variant {self.variant.value} cannot use a {self.schedule.kind.value} schedule")
        multiple = self.autoencoder.downsample_factor * self.unet.downsample_factor
        if len(self.patch_size) != 3 or any(p < 1 or p % multiple for p in self.patch_size):
            raise ValueError(f"patch_size {self.patch_size} must be 3 sizes, each a multiple of {multiple}")
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"checkpoint format {self.format_version} is not supported by this version "
                f"(expects {FORMAT_VERSION})"
            )

    @property
    def size_multiple(self) -> int:
        """Image sizes fed to the model must be multiples of this (E's f × the U-Net's levels)."""
        return self.autoencoder.downsample_factor * self.unet.downsample_factor

    def to_json(self) -> dict[str, Any]:
        return _to_json(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelConfig:
        config = _from_json(cls, data, "config")
        config.validate()
        return config


def default_config(
    variant: Variant | str,
    *,
    ae_channels: tuple[int, ...] = (16, 32, 64),
    latent_channels: int = 4,
    unet_channels: tuple[int, ...] = (32, 64, 64),
    ct_channels: tuple[int, ...] | None = None,
    norm_groups: int = 8,
    head_channels: int = 32,
    patch_size: tuple[int, int, int] = (64, 64, 64),
    **overrides: Any,
) -> ModelConfig:
    """A consistent config for ``variant`` from a few sizes (by default, sizes that train on two CPU
    cores).

    CT cross-attention goes on the two coarsest U-Net levels; E_CT gets ``ct_channels`` (default: E's).
    """
    variant = Variant(variant)
    levels = len(unet_channels)
    ct_levels = tuple(variant.uses_ct and i >= levels - 2 for i in range(levels))
    ae = AutoencoderConfig(
        channels=ae_channels,
        num_res_blocks=(1,) * len(ae_channels),
        latent_channels=latent_channels,
        norm_groups=norm_groups,
    )
    ct_encoder = None
    if variant.uses_ct:
        ct_ch = ct_channels or ae_channels
        ct_encoder = CTEncoderConfig(
            channels=ct_ch,
            num_res_blocks=(1,) * len(ct_ch),
            latent_channels=latent_channels,
            norm_groups=norm_groups,
        )
    unet = UNetConfig(
        in_channels=latent_channels,
        out_channels=latent_channels,
        channels=unet_channels,
        num_res_blocks=(1,) * levels,
        ct_attention_levels=ct_levels,
        ct_channels=latent_channels,
        head_channels=head_channels,
        norm_groups=norm_groups,
    )
    schedule = ScheduleConfig(kind=variant.schedule_kind)
    config = ModelConfig(
        variant=variant,
        autoencoder=ae,
        unet=unet,
        ct_encoder=ct_encoder,
        schedule=schedule,
        patch_size=patch_size,
    )
    config = dataclasses.replace(config, **overrides)
    config.validate()
    return config


class UPETeModel(nn.Module):
    """E/D (``autoencoder``) and U with its schedule and E_CT (``diffusion``), built from one config."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.autoencoder = AutoencoderKL(config.autoencoder)
        ct_encoder = CTEncoder(config.ct_encoder) if config.ct_encoder is not None else None
        schedule = build_schedule(config.schedule, config.noise_curve)
        self.diffusion = LatentDiffusion(UNet(config.unet), schedule, ct_encoder)

    def with_config(self, config: ModelConfig) -> UPETeModel:
        """Adopt a config that differs only in non-architectural fields (scale, curve, summary).

        The schedule is rebuilt (the Poisson σ_t comes from the noise curve).
        """
        config.validate()
        for name in ("variant", "autoencoder", "unet", "ct_encoder"):
            if getattr(config, name) != getattr(self.config, name):
                raise ValueError(f"with_config cannot change the architecture ({name})")
        self.config = config
        device = next(self.parameters()).device
        self.diffusion.schedule = build_schedule(config.schedule, config.noise_curve).to(device)
        return self


def build_model(config: ModelConfig) -> UPETeModel:
    """Fresh (untrained) modules for ``config``."""
    return UPETeModel(config)


# --- JSON (de)serialisation of the nested frozen dataclasses -----------------------------------


def _to_json(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, NoiseCurve):
        return value.to_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    return value


def _from_json(tp: Any, data: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if data is None:
            return None
        return _from_json(args[0], data, where)
    if isinstance(tp, type) and issubclass(tp, Enum):
        return tp(data)
    if tp is NoiseCurve:
        return NoiseCurve.from_json(data)
    if dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected an object, found {type(data).__name__}")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        return tp(**{k: _from_json(hints[k], v, f"{where}.{k}") for k, v in data.items()})
    if origin is tuple:
        return tuple(data)
    return data
