"""Latent diffusion (paper §2.2): schedules, the z_0-predicting denoiser, loss and sampler.

Both schedules are written as ``z_t = a_t·z_0 + σ_t·noise`` on the scaled latent:

- **Gaussian** (LDM, LDM-CT): DDPM, linear β, ``a_t = √ᾱ_t``, ``σ_t = √(1 − ᾱ_t)``, noise ~ N(0, I).
- **Poisson** (LDM-P, LDM-P-CT): t ∈ {0..T}, λ_t = t / T, dose ``d_t = d_min^λ_t`` (Eq. (1) with the
  paper's linear λ; d_min = 1e-3 puts a 10 % dose at t ≈ 133). ``z_t = E(perturb(x_0, d_t))`` where
  ``perturb`` (:mod:`model.physics`) draws counts in the sinogram and thins them binomially, so the
  chain is exact and the marginal is closed-form. ``a_t = 1`` (the reconstruction is rescaled by
  1/d_t, so the signal keeps its scale) and ``σ_t`` is the latent RMS of that noise, measured once
  on training data (:class:`model.networks.noise_level.NoiseCurve`).

The denoiser U predicts z_0 from (z_t, t, z_CT); it is wrapped with EDM-style preconditioning
(Karras et al. 2022) in the effective noise ``s = σ_t / a_t`` of ``z_t / a_t``, which keeps the
network's input and target at unit scale for every t and both schedules.
The sampler starts from the LPET latent at t* (the LPET is a noisier state of the same chain) and steps
``z_t' = a_t'·ẑ_0 + (σ_t'/σ_t)(z_t − a_t·ẑ_0)`` (DDIM, η = 0); it outputs the last ẑ_0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np
import torch
from torch import nn

from model.networks.autoencoder import CTEncoder
from model.networks.noise_level import NoiseCurve
from model.networks.unet import UNet

__all__ = [
    "GaussianSchedule",
    "LatentDiffusion",
    "NoiseSchedule",
    "PoissonSchedule",
    "ScheduleConfig",
    "ScheduleKind",
    "Variant",
    "build_schedule",
    "sampling_timesteps",
]


class Variant(str, Enum):
    """The paper's ablation (§3.2). The value is the CLI spelling."""

    LDM = "ldm"
    LDM_P = "ldm-p"
    LDM_CT = "ldm-ct"
    LDM_P_CT = "ldm-p-ct"

    @property
    def poisson(self) -> bool:
        return self in (Variant.LDM_P, Variant.LDM_P_CT)

    @property
    def uses_ct(self) -> bool:
        return self in (Variant.LDM_CT, Variant.LDM_P_CT)

    @property
    def schedule_kind(self) -> ScheduleKind:
        """The forward process this variant trains and samples with."""
        return ScheduleKind.POISSON if self.poisson else ScheduleKind.GAUSSIAN

    @property
    def label(self) -> str:
        """The paper's name, e.g. ``LDM-P-CT``."""
        return self.value.upper()


class ScheduleKind(str, Enum):
    """The forward process: dose thinning (the uPETe variants) or DDPM's Gaussian noise. The value is
    the spelling in a checkpoint's JSON."""

    POISSON = "poisson"
    GAUSSIAN = "gaussian"


@dataclass(frozen=True)
class ScheduleConfig:
    """Schedule parameters stored in the checkpoint; ``kind`` also accepts its JSON spelling."""

    kind: ScheduleKind = ScheduleKind.POISSON
    timesteps: int = 400  # T (paper §2.3)
    dose_min: float = 1e-3  # d_min: dose at t = T (Poisson)
    beta_start: float = 2.5e-4  # DDPM's 1e-4 … 0.02 for T = 1000, rescaled to keep ᾱ_T for T = 400
    beta_end: float = 0.05

    def __post_init__(self) -> None:
        if not isinstance(self.kind, ScheduleKind):
            known = ", ".join(repr(k.value) for k in ScheduleKind)
            if self.kind not in {k.value for k in ScheduleKind}:
                raise ValueError(f"ScheduleConfig.kind must be one of {known}, found {self.kind!r}")
            object.__setattr__(self, "kind", ScheduleKind(self.kind))  # frozen: set once, here

    def dose_at(self, t: int | float) -> float:
        """The Poisson schedule's dose at step t: d_t = d_min^(t/T)."""
        return float(self.dose_min ** (float(t) / self.timesteps))

    def t_from_dose(self, dose_fraction: float) -> float:
        """t* = T · log d / log d_min, clipped to [0, T]: where an LPET of dose d sits on the Poisson
        schedule (every variant places the LPET there; the Gaussian ones then map it to their own t)."""
        if not 0 < dose_fraction <= 1:
            raise ValueError(f"dose fraction must be in (0, 1], found {dose_fraction}")
        t = self.timesteps * math.log(dose_fraction) / math.log(self.dose_min)
        return float(min(max(t, 0.0), self.timesteps))

    def validate(self) -> None:
        if self.timesteps < 2:
            raise ValueError(f"ScheduleConfig.timesteps must be ≥ 2, found {self.timesteps}")
        if not 0 < self.dose_min < 1:
            raise ValueError(f"ScheduleConfig.dose_min must be in (0, 1), found {self.dose_min}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(
                f"ScheduleConfig: need 0 < beta_start ({self.beta_start}) < beta_end ({self.beta_end}) < 1"
            )


class NoiseSchedule(nn.Module):
    """``z_t = a_t z_0 + σ_t·noise`` for t ∈ {0..T}; ``a`` and ``σ`` are float64 buffers of length T+1."""

    kind: ScheduleKind

    def __init__(self, config: ScheduleConfig, signal: np.ndarray, sigma: np.ndarray) -> None:
        super().__init__()
        self.config = config
        self.timesteps = config.timesteps
        # Non-persistent: the checkpoint's JSON config rebuilds them exactly; one source of truth.
        self.register_buffer("signal", torch.as_tensor(signal, dtype=torch.float64), persistent=False)
        self.register_buffer("sigma", torch.as_tensor(sigma, dtype=torch.float64), persistent=False)

    def coefficients(
        self, t: torch.Tensor, *, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a_t, σ_t)`` for integer steps ``t`` (shape ``B``), each shaped ``B×1×1×1×1``."""
        t = t.long().clamp(0, self.timesteps)
        a = self.signal[t].to(dtype).view(-1, 1, 1, 1, 1)
        s = self.sigma[t].to(dtype).view(-1, 1, 1, 1, 1)
        return a, s

    def effective_sigma(self) -> np.ndarray:
        """σ_t / a_t for every t (the noise std of z_t / a_t), as float64 numpy."""
        return (self.sigma / self.signal).cpu().numpy()

    def t_for_effective_sigma(self, s: float) -> int:
        """The smallest t whose σ_t / a_t reaches ``s`` (T if none does)."""
        eff = self.effective_sigma()
        above = np.nonzero(eff >= s)[0]
        return int(above[0]) if above.size else self.timesteps


class GaussianSchedule(NoiseSchedule):
    """DDPM with linear β (Ho et al. 2020): ᾱ_t = Π_{s≤t} (1 − β_s), ᾱ_0 = 1."""

    kind = ScheduleKind.GAUSSIAN

    def __init__(self, config: ScheduleConfig) -> None:
        config.validate()
        betas = np.linspace(config.beta_start, config.beta_end, config.timesteps, dtype=np.float64)
        # Index 0 is the clean latent (ᾱ_0 = 1): t counts the noising steps already taken.
        alpha_bar = np.concatenate([[1.0], np.cumprod(1.0 - betas)])
        # σ_0 = 0 exactly would make the preconditioning degenerate; the floor is far below any use.
        super().__init__(config, np.sqrt(alpha_bar), np.sqrt(np.maximum(1.0 - alpha_bar, 1e-10)))

    def q_sample(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε`` (DDPM Eq. 4)."""
        a, s = self.coefficients(t, dtype=z0.dtype)
        return a * z0 + s * noise


class PoissonSchedule(NoiseSchedule):
    """The Poisson schedule: dose ``d_t = d_min^(t/T)``; σ_t from the measured :class:`NoiseCurve`.

    Without a curve (before calibration) σ_t is NaN and the schedule cannot be used for denoising.
    """

    kind = ScheduleKind.POISSON

    def __init__(self, config: ScheduleConfig, curve: NoiseCurve | None = None) -> None:
        config.validate()
        t = np.arange(config.timesteps + 1, dtype=np.float64)
        sigma = curve.latent_sigma_at(t) if curve is not None else np.full(t.shape, np.nan)
        super().__init__(config, np.ones_like(t), sigma)
        self.register_buffer(
            "dose", torch.as_tensor(config.dose_min ** (t / config.timesteps)), persistent=False
        )
        self.curve = curve

    @property
    def calibrated(self) -> bool:
        return self.curve is not None

    def dose_at(self, t: int | float) -> float:
        """d_t = d_min^(t/T)."""
        return self.config.dose_at(t)

    def t_from_dose(self, dose_fraction: float) -> float:
        """The step whose dose is ``dose_fraction`` (see :meth:`ScheduleConfig.t_from_dose`)."""
        return self.config.t_from_dose(dose_fraction)


def build_schedule(config: ScheduleConfig, curve: NoiseCurve | None = None) -> NoiseSchedule:
    """The schedule a config names (the curve is used by the Poisson schedule only)."""
    config.validate()
    if config.kind is ScheduleKind.POISSON:
        return PoissonSchedule(config, curve)
    return GaussianSchedule(config)


def sampling_timesteps(t_start: int, steps: int) -> list[int]:
    """``steps`` integer times from ``t_start`` down towards 0 (descending, distinct, ≥ 0).

    The sampler evaluates U at each and finally outputs the last ẑ_0, so 0 itself is not needed.
    """
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, found {steps}")
    raw = np.rint(np.linspace(t_start, 0, steps + 1)[:-1]).astype(int)
    out: list[int] = []
    for t in raw:
        if not out or t < out[-1]:
            out.append(int(t))
    return out


class LatentDiffusion(nn.Module):
    """U with its schedule and (for CT variants) E_CT: ``denoise``, ``loss`` and ``sample``.

    Latents are ``B×c×d×h×w`` in scaled units (unit variance on training data); CT is ``B×1×D×H×W`` HU
    at image resolution (E_CT down-samples it to the latent size).
    """

    def __init__(self, unet: UNet, schedule: NoiseSchedule, ct_encoder: CTEncoder | None = None) -> None:
        super().__init__()
        if unet.config.uses_ct != (ct_encoder is not None):
            raise ValueError(
                f"the U-Net {'uses' if unet.config.uses_ct else 'does not use'} CT but the CT encoder is "
                f"{'missing' if ct_encoder is None else 'given'}"
            )
        self.unet = unet
        self.schedule = schedule
        self.ct_encoder = ct_encoder

    @property
    def uses_ct(self) -> bool:
        return self.ct_encoder is not None

    def encode_ct(self, ct_hu: torch.Tensor | None) -> torch.Tensor | None:
        """z_CT = E_CT(CT) for CT variants; ``None`` for the others (which take no CT)."""
        if self.ct_encoder is None:
            if ct_hu is not None:
                raise ValueError("this variant takes no CT; pass ct_hu=None")
            return None
        if ct_hu is None:
            raise ValueError("this variant is CT-guided and needs the CT")
        return self.ct_encoder(ct_hu)

    def _preconditioning(self, t: torch.Tensor, dtype: torch.dtype):
        a, s = self.schedule.coefficients(t, dtype=torch.float64)
        if torch.isnan(s).any():
            raise RuntimeError("the Poisson schedule is not calibrated: measure its NoiseCurve first")
        eff = s / a
        c_in = 1.0 / torch.sqrt(1.0 + eff**2)
        c_skip = 1.0 / (1.0 + eff**2)
        c_out = eff / torch.sqrt(1.0 + eff**2)
        return tuple(v.to(dtype) for v in (a, c_in, c_skip, c_out))

    def denoise(self, z_t: torch.Tensor, t: torch.Tensor, z_ct: torch.Tensor | None) -> torch.Tensor:
        """ẑ_0 = c_skip·z̃ + c_out·U(c_in·z̃, t, z_CT) with z̃ = z_t / a_t."""
        if t.ndim == 0:
            t = t.expand(z_t.shape[0])
        a, c_in, c_skip, c_out = self._preconditioning(t, z_t.dtype)
        z_tilde = z_t / a
        return c_skip * z_tilde + c_out * self.unet(c_in * z_tilde, t.to(z_t.dtype), z_ct)

    def loss(
        self,
        z0: torch.Tensor,
        z_t: torch.Tensor,
        t: torch.Tensor,
        ct_hu: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Training loss: predict z_0 from (z_t, t, z_CT); MSE on ẑ_0 weighted by 1/c_out² (scalar).

        The weight makes every t count alike (EDM's λ(σ)): it is the plain MSE of U's own output
        against its target ``(z_0 − c_skip z̃) / c_out``.
        """
        pred = self.denoise(z_t, t, self.encode_ct(ct_hu))
        _, _, _, c_out = self._preconditioning(t, z0.dtype)
        return (((pred - z0) / c_out) ** 2).mean()

    @torch.no_grad()
    def sample(
        self,
        z_start: torch.Tensor,
        t_start: int,
        *,
        z_ct: torch.Tensor | None,
        steps: int,
    ) -> torch.Tensor:
        """Deterministic sampling from ``z_start`` at ``t_start`` (DDIM, η = 0); returns ẑ_0.

        For t = t* … in ``steps`` steps: ẑ_0 = U(z_t, t, z_CT), z_t' = a_t' ẑ_0 + (σ_t'/σ_t)(z_t − a_t ẑ_0).
        """
        times = sampling_timesteps(int(t_start), steps)
        z = z_start
        b = z.shape[0]
        x0 = z
        for i, t in enumerate(times):
            tt = torch.full((b,), t, device=z.device, dtype=torch.long)
            x0 = self.denoise(z, tt, z_ct)
            if i + 1 < len(times):
                tn = torch.full((b,), times[i + 1], device=z.device, dtype=torch.long)
                a, s = self.schedule.coefficients(tt, dtype=z.dtype)
                a_next, s_next = self.schedule.coefficients(tn, dtype=z.dtype)
                z = a_next * x0 + (s_next / s) * (z - a * x0)
        return x0

    def start_from_lpet(
        self,
        z_lpet: torch.Tensor,
        *,
        t_poisson: float,
        curve: NoiseCurve,
        generator: torch.Generator | None = None,
        renoise_ratio: float = 1.0,
    ) -> tuple[torch.Tensor, int]:
        """The sampler's starting point for an LPET latent at Poisson step ``t_poisson``.

        Poisson variants start at z_LPET itself, t* = t_poisson. Gaussian variants (LDM, LDM-CT)
        "noise the LPET latent to t*": with σ_L the LPET's latent noise (from the
        curve), they pick the t whose σ_t/a_t is σ_L·√(1 + ``renoise_ratio``) and add the Gaussian noise
        missing to reach it, so ``renoise_ratio`` is the injected variance over the LPET's own.
        """
        if isinstance(self.schedule, PoissonSchedule):
            return z_lpet, int(round(t_poisson))
        if renoise_ratio < 0:
            raise ValueError(f"renoise_ratio must be ≥ 0, found {renoise_ratio}")
        sigma_l = float(curve.latent_sigma_at(t_poisson))
        t_star = self.schedule.t_for_effective_sigma(sigma_l * math.sqrt(1.0 + renoise_ratio))
        tt = torch.full((z_lpet.shape[0],), t_star, device=z_lpet.device, dtype=torch.long)
        a, s = self.schedule.coefficients(tt, dtype=z_lpet.dtype)
        extra = torch.sqrt(torch.clamp(s**2 - (a * sigma_l) ** 2, min=0.0))
        # Drawn on the generator's device so a CPU generator gives the same noise on any device.
        gen_device = generator.device if generator is not None else z_lpet.device
        noise = torch.randn(z_lpet.shape, generator=generator, device=gen_device, dtype=z_lpet.dtype)
        return a * z_lpet + extra * noise.to(z_lpet.device), t_star
