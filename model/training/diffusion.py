"""Training from SPET only (paper §2): two stages and a calibration between them.

1. **Autoencoder** E/D on SPET patches (a fraction of them Poisson-perturbed, so E also encodes
   the noisy images it will meet at inference): L1 + SSIM + KL (+ perceptual with a user's weights
   file) (+ hinge adversarial loss from ``adv_start`` on, when ``adv_weight`` > 0). The autoencoder
   kept is the EMA of its weights.
2. **Calibration** with E frozen: the latent scale and the schedule's noise curve
   (:mod:`model.training.calibration`), stored in the checkpoint.
3. **Denoiser** U (+ E_CT for CT variants, trained jointly by the diffusion loss): Poisson variants
   take z_t = E(perturb(x_0, d_t)) (whole slices perturbed, then cropped); Gaussian variants
   z_t = q_sample(z_0, t). The final weights are the EMA of U's.

Progress is a log line with loss and ETA; the whole state (modules, optimizers, RNGs, step) is saved
every ``checkpoint_every_s`` and at each stage's end, and ``resume`` continues from it. Under
``torchrun`` the ranks split the cases and average gradients (DDP); rank 0 writes the files.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from model.networks.autoencoder import DiscriminatorConfig, PatchDiscriminator
from model.networks.checkpoint import (
    load_checkpoint,
    load_model_config,
    load_training_state,
    read_training_meta,
    save_checkpoint,
    save_training_state,
)
from model.networks.diffusion import GaussianSchedule, LatentDiffusion
from model.networks.noise_level import LATENT_BAND, NoiseCurve
from model.networks.upete_model import ModelConfig, NormalisationConfig, UPETeModel, default_config
from model.training.calibration import (
    floor_first_sigma,
    latent_moments,
    match_noise_index,
    measure_noise_curve,
)
from model.training.data import DicomLoader, fixed_scale_bqml, load_cases
from model.training.losses import PerceptualLoss, hinge_d_loss, hinge_g_loss, ssim_loss
from model.training.patches import PatchSampler, PerturbedPool
from model.training.runtime import Distributed, Ema, Precision, ProgressLog, resolve_device, software_version
from model.training.settings import DEFAULT_PATCH_CPU, DEFAULT_PATCH_CUDA, TrainSettings, TrainStage

__all__ = ["TrainResult", "TrainSettings", "train"]

log = logging.getLogger("model.training.diffusion")

STATE_NAME = "train_state.safetensors"
AUTOENCODER_NAME = "autoencoder.safetensors"


@dataclass
class TrainResult:
    """Files written and the per-step losses of this run (rank 0)."""

    checkpoint: Path | None
    autoencoder_checkpoint: Path | None
    losses: dict[str, list[float]]


class _AEForward(nn.Module):
    """DDP needs a forward returning tensors: reconstruction, posterior mean and log-variance."""

    def __init__(self, ae: nn.Module) -> None:
        super().__init__()
        self.ae = ae

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        recon, posterior = self.ae(x)
        return recon, posterior.mean, posterior.logvar


class _DenoiserLoss(nn.Module):
    def __init__(self, diffusion: LatentDiffusion) -> None:
        super().__init__()
        self.diffusion = diffusion

    def forward(self, z0, z_t, t, ct):  # noqa: ANN001, ANN201
        return self.diffusion.loss(z0, z_t, t, ct)


class _Run:
    """One training run: the data, the model, the optimizers and the state file."""

    def __init__(self, settings: TrainSettings, dicom_loader: DicomLoader | None, on_step: Callable | None):
        settings.validate()
        self.settings = settings
        self.on_step = on_step
        self._set_up_runtime()
        self.out = Path(settings.out_dir)
        self.state_path = self.out / STATE_NAME
        self.t_start = time.monotonic()
        self.seconds_before = 0.0  # training time of earlier invocations (from the state)
        self.losses: dict[str, list[float]] = {"ae": [], "denoiser": []}

        self.cases = load_cases(
            settings.data_dir,
            dicom_loader=dicom_loader,
            need_ct=settings.variant.uses_ct,
            shard=(self.dist.rank, self.dist.world),
        )
        self.meta: dict[str, Any] = {"stage": "ae", "step": 0}
        resumed = settings.resume and self.state_path.is_file()
        if settings.resume and not resumed:
            log.info("no training state to resume; starting afresh", extra={"fields": {"out": str(self.out)}})
        self.config = self._start_config(resumed)
        self._build_networks(reuse_init=settings.init is not None and not resumed)
        if resumed:
            self._load_state()
        self._build_sampling()

    def _set_up_runtime(self) -> None:
        """Processes (DDP under torchrun), device, precision and the seeded generators of this rank."""
        settings = self.settings
        self.dist = Distributed.setup(settings.device)
        self.device = resolve_device(settings.device, self.dist.local_rank)
        self.precision = Precision(self.device, settings.amp)
        torch.manual_seed(settings.seed * 1000 + self.dist.rank)
        self.rng = np.random.default_rng([settings.seed, self.dist.rank])
        self.generator = torch.Generator(device=self.device).manual_seed(
            settings.seed * 1000 + self.dist.rank + 1
        )

    def _start_config(self, resumed: bool) -> ModelConfig:
        """The saved state's config, else one reusing ``--init``'s autoencoder, else a fresh one."""
        settings = self.settings
        if resumed:
            config = ModelConfig.from_json(read_training_meta(self.state_path)["config"])
            if config.variant != settings.variant:
                raise ValueError(
                    f"the state in {self.out} trains {config.variant.value}, not {settings.variant.value}"
                )
            return config
        if settings.init is not None:
            return self._config_from_init(settings.init)
        total, count = self.dist.sum(list(fixed_scale_bqml(self.cases)), self.device)
        return config_for(settings, total / count, self._default_patch())

    def _build_networks(self, *, reuse_init: bool) -> None:
        """The model (with ``--init``'s trained autoencoder when ``reuse_init``), the discriminator,
        the EMAs and the optimizers."""
        settings = self.settings
        self.model = UPETeModel(self.config).to(self.device)
        if reuse_init:
            self.model.autoencoder.load_state_dict(load_checkpoint(settings.init).autoencoder.state_dict())
            if settings.init_denoiser is not None:
                # Fine-tuning: the denoiser (and its CT encoder) start from that checkpoint's, before
                # the EMA below copies them.
                tuned = load_checkpoint(settings.init_denoiser).diffusion.state_dict()
                self.model.diffusion.load_state_dict(tuned)
            # --stage ae trains the reused autoencoder further; otherwise the denoiser is next.
            fine_tune_ae = settings.stage is TrainStage.AE
            self.meta = {"stage": "ae" if fine_tune_ae else "denoiser", "step": 0}
        self.disc = PatchDiscriminator(
            DiscriminatorConfig(
                channels=self.config.autoencoder.channels[0], norm_groups=settings.norm_groups
            )
        ).to(self.device)
        self.ema = Ema(self.model.diffusion, settings.ema_decay).to(self.device)
        # The autoencoder's last weights swing by several dB of reconstruction PSNR from one save to
        # the next (batch 2, noisy and clean batches mixed): its EMA is what calibration and stage 2 use.
        self.ae_ema = Ema(self.model.autoencoder, settings.ema_decay).to(self.device)
        self.opt_ae = torch.optim.Adam(
            self.model.autoencoder.parameters(), lr=settings.ae_lr, betas=(0.5, 0.9)
        )
        self.opt_disc = torch.optim.Adam(self.disc.parameters(), lr=settings.disc_lr, betas=(0.5, 0.9))
        self.opt_unet = torch.optim.AdamW(
            self.model.diffusion.parameters(), lr=settings.unet_lr, weight_decay=0.0
        )

    def _build_sampling(self) -> None:
        """Patches of the cases, and the pool of perturbed slabs the forward process crops from."""
        settings = self.settings
        self.sampler = PatchSampler(
            self.cases,
            patch=self.config.patch_size,
            scale_bqml=self.config.normalisation.scale_bqml,
            rng=self.rng,
            with_ct=settings.variant.uses_ct,
            minmax=self.config.normalisation.mode == "minmax",
        )
        self.pool = PerturbedPool(
            self.sampler,
            timesteps=self.config.schedule.timesteps,
            dose_min=self.config.schedule.dose_min,
            size=settings.pool_size,
            refresh=settings.pool_refresh,
            vary_recon=settings.vary_recon,
            spacing_mm=self.config.spacing_mm,
            forward=settings.forward,
            styles=settings.styles,
            device=self.device,
            generator=self.generator,
        )

    # --- state -------------------------------------------------------------------------------------

    def _config_from_init(self, path: Path) -> ModelConfig:
        init = load_model_config(path)
        if init.noise_curve is None:
            raise ValueError(f"{path} has no calibrated autoencoder (no noise curve); train stage ae first")
        # E_CT mirrors E (same down-sampling and latent size), so it follows the reused autoencoder,
        # not this run's --ae-channels.
        sizes = dataclasses.replace(
            self.settings,
            ae_channels=init.autoencoder.channels,
            latent_channels=init.autoencoder.latent_channels,
        )
        config = config_for(sizes, init.normalisation.scale_bqml, init.patch_size)
        if self.settings.init_denoiser is not None:
            tuned = load_model_config(self.settings.init_denoiser)
            if tuned.variant != self.settings.variant:
                raise ValueError(
                    f"--init-denoiser: {self.settings.init_denoiser} is {tuned.variant.value}, "
                    f"not {self.settings.variant.value}"
                )
            channels = (tuned.autoencoder.latent_channels, init.autoencoder.latent_channels)
            if channels[0] != channels[1]:
                raise ValueError(
                    f"--init-denoiser: {self.settings.init_denoiser} denoises {channels[0]} latent "
                    f"channels, the autoencoder of {path} makes {channels[1]}"
                )
            config = dataclasses.replace(
                config,
                unet=tuned.unet,
                ct_encoder=tuned.ct_encoder,
                schedule=tuned.schedule,
                sampler=tuned.sampler,
            )
        return dataclasses.replace(
            config,
            autoencoder=init.autoencoder,
            normalisation=init.normalisation,
            latent_scale=init.latent_scale,
            noise_curve=init.noise_curve,
            patch_size=init.patch_size,
            training={"autoencoder": init.training.get("autoencoder", {})},
        )

    def _default_patch(self) -> tuple[int, int, int]:
        if self.settings.patch_size is not None:
            return tuple(self.settings.patch_size)  # type: ignore[return-value]
        return DEFAULT_PATCH_CUDA if self.device.type == "cuda" else DEFAULT_PATCH_CPU

    def _modules(self) -> dict[str, nn.Module]:
        return {"model": self.model, "discriminator": self.disc, "ema": self.ema, "ae_ema": self.ae_ema}

    def _optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"ae": self.opt_ae, "disc": self.opt_disc, "unet": self.opt_unet}

    def _load_state(self) -> None:
        meta, rng = load_training_state(
            self.state_path, modules=self._modules(), optimizers=self._optimizers()
        )
        self.meta = {"stage": meta["stage"], "step": meta["step"]}
        self.losses = meta.get("losses", self.losses)
        self.seconds_before = float(meta.get("seconds", 0.0))
        if self.dist.main:
            if "torch_cpu" in rng:
                torch.set_rng_state(rng["torch_cpu"])
            if "generator" in rng:
                self.generator.set_state(rng["generator"])
            if meta.get("numpy_rng"):
                self.rng.bit_generator.state = meta["numpy_rng"]
        else:
            # Only rank 0's streams are saved; the others start fresh ones that depend on the step, so
            # they neither replay their first run nor copy rank 0's.
            step = int(self.meta["step"])
            stage = 1 if self.meta["stage"] == "denoiser" else 0
            self.rng = np.random.default_rng([self.settings.seed, self.dist.rank, stage, step])
            self.generator.manual_seed(hash((self.settings.seed, self.dist.rank, stage, step)) & 0x7FFFFFFF)
        log.info("resumed", extra={"fields": {"stage": self.meta["stage"], "step": self.meta["step"]}})

    def save_state(self) -> None:
        if self.dist.main:
            rng = {"torch_cpu": torch.get_rng_state(), "generator": self.generator.get_state()}
            meta = {
                **self.meta,
                "config": self.config.to_json(),
                "numpy_rng": self.rng.bit_generator.state,
                "losses": self.losses,
                "seconds": self._seconds(),
            }
            save_training_state(
                self.state_path, modules=self._modules(), optimizers=self._optimizers(), meta=meta, rng=rng
            )
        self.dist.barrier()

    def _seconds(self) -> float:
        """Wall time of this run so far, over every invocation that resumed it."""
        return round(self.seconds_before + time.monotonic() - self.t_start, 3)

    def _maybe_save(self, last_save: float) -> float:
        if time.monotonic() - last_save >= self.settings.checkpoint_every_s:
            self.save_state()
            return time.monotonic()
        return last_save

    def _summary(self, **extra: Any) -> dict[str, Any]:
        # Counts and settings only: case names could carry patient identifiers.
        return {
            "cases": len(self.cases) * self.dist.world,
            "patch_size": list(self.config.patch_size),
            "batch_size": self.settings.batch_size,
            "world_size": self.dist.world,
            "seed": self.settings.seed,
            "recons": sorted({r.name for choices in self.pool.recons for r in choices}),
            "forward_process": self.pool.forward.value,
            "scanner_styles": self.pool.styles,
            "dose_range": list(self.pool.dose_range),
            "init_denoiser": self.settings.init_denoiser is not None,
            **extra,
        }

    # --- stage 1 -----------------------------------------------------------------------------------

    def train_autoencoder(self) -> None:
        s = self.settings
        ae = self.model.autoencoder.train()
        forward = self.dist.wrap(_AEForward(ae), self.device)
        disc = self.dist.wrap(self.disc.train(), self.device)
        perceptual = PerceptualLoss(s.perceptual_weights).to(self.device)
        adv_start = s.adv_start if s.adv_start is not None else s.ae_steps // 2
        start = self.meta["step"]
        progress = ProgressLog(
            "autoencoder", total=s.ae_steps, start=start, every_s=s.log_every_s, enabled=self.dist.main
        )
        last_save = time.monotonic()
        for step in range(start, s.ae_steps):
            noisy = s.noisy_fraction > 0 and self.rng.random() < s.noisy_fraction
            batch = (self.pool.batch(s.batch_size) if noisy else self.sampler.clean_batch(s.batch_size)).to(
                self.device
            )
            x = batch.noisy if noisy else batch.clean
            if s.ae_gain_max > 1:
                low, high = np.log(0.5), np.log(s.ae_gain_max)
                gain = np.exp(self.rng.uniform(low, high, size=x.shape[0])).astype(np.float32)
                x = x * torch.from_numpy(gain).to(x.device).view(-1, 1, 1, 1, 1)
            with self.precision.autocast():
                recon, mean, logvar = forward(x)
            recon = recon.float()
            kl = 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1.0 - logvar.float()).mean()
            loss = F.l1_loss(recon, x) + s.ssim_weight * ssim_loss(recon, x) + s.kl_weight * kl
            if perceptual.enabled:
                loss = loss + s.perceptual_weight * perceptual(recon, x)
            use_adv = step >= adv_start and s.adv_weight > 0
            if use_adv:
                # The generator's adversarial term goes through the bare discriminator: its own
                # weights are not updated here, and DDP must not expect gradients for them.
                self.disc.requires_grad_(False)
                with self.precision.autocast():
                    loss = loss + s.adv_weight * hinge_g_loss(self.disc(recon).float())
                self.disc.requires_grad_(True)
            self.precision.step(loss, self.opt_ae, ae.parameters(), clip=1.0)
            if use_adv:
                with self.precision.autocast():
                    # One forward over real and fake together: DDP expects one forward per backward.
                    logits = disc(torch.cat([x, recon.detach()])).float()
                real, fake = logits.chunk(2)
                d_loss = hinge_d_loss(real, fake)
                self.precision.step(d_loss, self.opt_disc, self.disc.parameters(), clip=None)
            self.ae_ema.update(ae)
            value = float(loss.detach())
            self.losses["ae"].append(value)
            progress.update(step + 1, value)
            if self.on_step:
                self.on_step("ae", step + 1, value)
            self.meta = {"stage": "ae", "step": step + 1}
            last_save = self._maybe_save(last_save)
        if int(self.ae_ema.updates) > 0:
            self.model.autoencoder.load_state_dict(self.ae_ema.shadow.state_dict())
        self.meta = {"stage": "calibrate", "step": 0}
        self.save_state()

    # --- calibration -------------------------------------------------------------------------------

    def _matched_curve(
        self,
        ae: torch.nn.Module,
        latent_scale: float,
        *,
        t: tuple[float, ...],
        dose: tuple[float, ...],
        latent_sigma: tuple[float, ...],
    ) -> NoiseCurve:
        """The noise curve of σ_t ``latent_sigma``, its noise-index column matched over scanner styles."""
        match = match_noise_index(
            ae,
            self.pool,
            latent_scale=latent_scale,
            scale_bqml=self.config.normalisation.scale_bqml,
            slabs=self.settings.index_slabs,
            device=self.device,
        )
        index = self.dist.mean(match.index_for(latent_sigma, dose), self.device)
        if self.dist.main:
            log.info(
                "noise index matched to the latent noise",
                extra={"fields": {"slope": f"{match.slope:.3g}", "spread": f"{match.spread:.3g}",
                                  "slabs": match.pairs}},
            )
        return NoiseCurve(
            t=t, dose=dose, latent_sigma=latent_sigma,
            noise_index=tuple(max(v, 1e-12) for v in index), index_band=LATENT_BAND,
        )

    def match_index(self) -> Path | None:
        """Re-match an ``--init`` checkpoint's noise index over scanner styles and save it, weights, σ_t
        and training record unchanged (``--stage index``: a checkpoint calibrated before the index was
        matched). Returns the checkpoint written (None on other DDP ranks)."""
        curve = self.config.noise_curve
        matched = self._matched_curve(
            self.model.autoencoder.eval(), self.config.latent_scale,
            t=curve.t, dose=curve.dose, latent_sigma=curve.latent_sigma,
        )
        training = dict(load_model_config(self.settings.init_denoiser).training)
        training["noise_index"] = {"slabs": self.settings.index_slabs, "band": list(matched.index_band)}
        self.config = dataclasses.replace(
            self.config, noise_curve=matched, training=training, software_version=software_version()
        )
        self.model.with_config(self.config)
        return self._save_model(self.config)

    def calibrate(self) -> None:
        s = self.settings
        ae = self.model.autoencoder.eval()
        total, total_sq, count = self.dist.sum(
            list(latent_moments(ae, self.sampler, batches=8, batch_size=s.batch_size, device=self.device)),
            self.device,
        )
        mean = total / count
        std = max(total_sq / count - mean**2, 1e-12) ** 0.5
        latent_scale = 1.0 / std
        timesteps = self.config.schedule.timesteps
        t_points = sorted({int(round(v)) for v in np.linspace(0, timesteps, s.curve_points)})
        sigma = measure_noise_curve(
            ae,
            self.pool,
            latent_scale=latent_scale,
            t_points=t_points,
            slabs=s.curve_slabs,
            device=self.device,
        )
        sigma = floor_first_sigma(self.dist.mean(list(sigma), self.device))
        dose_min = self.config.schedule.dose_min
        curve = self._matched_curve(
            ae,
            latent_scale,
            t=tuple(float(t) for t in t_points),
            dose=tuple(float(dose_min ** (t / timesteps)) for t in t_points),
            latent_sigma=tuple(max(v, 1e-6) for v in sigma),
        )
        ae_summary = self._summary(steps=s.ae_steps)
        self.config = dataclasses.replace(
            self.config, latent_scale=latent_scale, noise_curve=curve, training={"autoencoder": ae_summary}
        )
        self.model.with_config(self.config)
        self.ema.shadow.schedule = self.model.diffusion.schedule
        if self.dist.main:
            log.info(
                "calibrated",
                extra={
                    "fields": {
                        "latent_scale": f"{latent_scale:.4g}",
                        "sigma_0": f"{sigma[0]:.4g}",
                        "sigma_T": f"{sigma[-1]:.4g}",
                    }
                },
            )
        self.meta = {"stage": "denoiser", "step": 0}
        self.save_state()
        if self.dist.main:
            save_checkpoint(self.out / AUTOENCODER_NAME, self.model, self._final_config(denoiser_steps=0))

    # --- stage 2 -----------------------------------------------------------------------------------

    @torch.no_grad()
    def _latent(self, x: torch.Tensor) -> torch.Tensor:
        with self.precision.autocast():
            return (self.model.autoencoder.encode(x).mean * self.config.latent_scale).float()

    def train_denoiser(self) -> None:
        s = self.settings
        self.model.autoencoder.eval().requires_grad_(False)
        diffusion = self.model.diffusion.train()
        loss_fn = self.dist.wrap(_DenoiserLoss(diffusion), self.device)
        schedule = diffusion.schedule
        start = self.meta["step"]
        # Slabs are labelled with the step the node would estimate for them: the calibrated curve,
        # known only from here on (the autoencoder stage's slabs need no t).
        self.pool.noise_curve = self.config.noise_curve
        progress = ProgressLog(
            "denoiser", total=s.denoiser_steps, start=start, every_s=s.log_every_s, enabled=self.dist.main
        )
        last_save = time.monotonic()
        for step in range(start, s.denoiser_steps):
            if self.config.variant.poisson:
                batch = self.pool.batch(s.batch_size).to(self.device)
                z0, z_t, t = self._latent(batch.clean), self._latent(batch.noisy), batch.t
            else:
                batch = self.sampler.clean_batch(s.batch_size).to(self.device)
                z0 = self._latent(batch.clean)
                if not isinstance(schedule, GaussianSchedule):
                    raise TypeError(f"variant {self.config.variant.value} needs a Gaussian schedule")
                t = torch.randint(
                    0, schedule.timesteps + 1, (z0.shape[0],), device=self.device, generator=self.generator
                )
                noise = torch.randn(z0.shape, device=self.device, generator=self.generator)
                z_t = schedule.q_sample(z0, t, noise)
            with self.precision.autocast():
                loss = loss_fn(z0, z_t, t, batch.ct)
            loss = loss.float()
            self.precision.step(loss, self.opt_unet, diffusion.parameters(), clip=1.0)
            self.ema.update(diffusion)
            value = float(loss.detach())
            self.losses["denoiser"].append(value)
            progress.update(step + 1, value)
            if self.on_step:
                self.on_step("denoiser", step + 1, value)
            self.meta = {"stage": "denoiser", "step": step + 1}
            last_save = self._maybe_save(last_save)
        self.meta = {"stage": "done", "step": s.denoiser_steps}
        self.save_state()

    def _final_config(self, *, denoiser_steps: int) -> ModelConfig:
        training = dict(self.config.training)
        training["denoiser"] = self._summary(steps=denoiser_steps)
        if self.settings.init_denoiser is not None:
            # A fine-tuned denoiser's record counts the steps it started with, run after run.
            before = load_model_config(self.settings.init_denoiser).training.get("denoiser", {})
            earlier = int(before.get("steps_total", before.get("steps", 0)))
            training["denoiser"]["steps_total"] = earlier + denoiser_steps
        training["seconds"] = self._seconds()
        return dataclasses.replace(self.config, training=training, software_version=software_version())

    def _save_model(self, config: ModelConfig) -> Path | None:
        """Write the model with ``config`` into ``out`` on the main rank (None elsewhere), all ranks
        waiting for it."""
        if not self.dist.main:
            self.dist.barrier()
            return None
        path = save_checkpoint(self.out / f"upete-{config.variant.value}.safetensors", self.model, config)
        log.info("model saved", extra={"fields": {"checkpoint": str(path), "variant": config.variant.value}})
        self.dist.barrier()
        return path

    def finish(self) -> Path | None:
        # The shipped weights are the EMA of the denoiser's: smoother and better than the last step.
        self.model.diffusion.load_state_dict(self.ema.shadow.state_dict())
        return self._save_model(self._final_config(denoiser_steps=self.settings.denoiser_steps))


def config_for(settings: TrainSettings, scale_bqml: float, patch: tuple[int, int, int]) -> ModelConfig:
    """The model config a run of ``settings`` trains, at ``scale_bqml`` and training patch ``patch``."""
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


def train(
    settings: TrainSettings,
    *,
    dicom_loader: DicomLoader | None = None,
    on_step: Callable[[str, int, float], None] | None = None,
) -> TrainResult:
    """Run the stages ``settings.stage`` asks for; returns the files written and the losses."""
    run = _Run(settings, dicom_loader, on_step)
    try:
        stage = run.meta["stage"]
        if settings.stage in (TrainStage.AE, TrainStage.BOTH) and stage == "ae":
            run.train_autoencoder()
            stage = run.meta["stage"]
        if stage == "calibrate":
            run.calibrate()
            stage = run.meta["stage"]
        ae_path = run.out / AUTOENCODER_NAME
        if settings.stage is TrainStage.INDEX:
            return TrainResult(run.match_index(), None, run.losses)
        if settings.stage is TrainStage.AE:
            return TrainResult(None, ae_path if ae_path.is_file() else None, run.losses)
        if stage == "ae":
            raise ValueError("the autoencoder is not trained yet: run --stage ae or both first")
        if stage == "done" and settings.resume and run.meta["step"] < settings.denoiser_steps:
            run.meta["stage"] = stage = "denoiser"  # a finished run extended to more steps
        if stage == "denoiser":
            run.train_denoiser()
        checkpoint = run.finish()
        return TrainResult(checkpoint, ae_path if ae_path.is_file() else None, run.losses)
    finally:
        run.dist.close()
