"""The uPETe :class:`~model.enhance.Enhancer`: a trained checkpoint applied to a whole PET volume.

Per volume: resample to the model's 2 mm grid → normalise (Bq/ml ÷ the fixed scale, or min-max) →
place the LPET on the schedule (t* from a known dose fraction, else from its measured noise and the
checkpoint's noise curve) → for overlapping tiles of the **training patch size** (GroupNorm sees the
statistics it was trained on): encode, sample from t*, decode (and, for a clean LPET, put back the
decoder's own error on it: model/enhancers/detail.py) → blend the tiles with Gaussian weights → invert
the normalisation exactly → keep the LPET's local mean → resample back onto the input grid.
A volume that fits in one patch is done whole (padded with air). Same input + same seed → same output.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from model.enhancers.base import Enhancer, EnhancerInfo, Progress
from model.enhancers.detail import dose_weight, restore_decoder_detail
from model.enhancers.device import resolve_inference_device
from model.enhancers.options import DEFAULT_OPTIONS, InferenceOptions
from model.enhancers.precision import autocast, resolve_precision
from model.enhancers.quantitation import preserve_local_mean
from model.enhancers.significance import restore_significant_by_dose
from model.enhancers.tiling import CTAir, body_mask, run_tiled, tile_stride
from model.grid import AIR_HU, ModelGrid
from model.networks.checkpoint import load_checkpoint, weights_digest
from model.networks.diffusion import sampling_timesteps
from model.networks.upete_model import UPETeModel
from model.units import FWHM_PER_SIGMA

__all__ = ["DiffusionEnhancer", "load_diffusion_enhancer"]

log = logging.getLogger(__name__)


class DiffusionEnhancer(Enhancer):
    """uPETe (any of the four variants) as an :class:`Enhancer`, run as ``options`` say.

    After each :meth:`enhance_array`, ``timings`` holds seconds per stage (resample, normalise,
    encode, sample, decode, resample_back), ``tile_counts`` how many tiles ran and were skipped, and
    ``sampling`` the start step t* and the denoiser evaluations per tile (fewer than ``steps`` when t*
    is small: the steps are distinct integer times). benchmarks/results/speed.md measured the options.
    """

    def __init__(
        self, model: UPETeModel, *, version: str, options: InferenceOptions = DEFAULT_OPTIONS
    ) -> None:
        config = model.config
        if config.noise_curve is None:
            raise ValueError("this checkpoint has no noise curve: its autoencoder was never calibrated")
        options = replace(options, device=resolve_inference_device(options.device))
        self.model = model.to(options.device).eval()
        self.config = config
        self.options = options
        self.device = torch.device(options.device)
        self.precision = resolve_precision(options.precision, self.device)  # fp32 or bf16
        self.memory_format = torch.contiguous_format
        if options.channels_last and self.device.type == "cpu":
            self.memory_format = torch.channels_last_3d
            self.model = self.model.to(memory_format=self.memory_format)
        self.steps = options.steps or config.sampler.steps
        overlap = options.tile_overlap
        self.tile_overlap = config.sampler.tile_overlap if overlap is None else overlap
        self.timings: dict[str, float] = {}
        self.tile_counts: dict[str, int] = {}
        self.sampling: dict[str, int] = {}
        # Where the last volume was placed and the weights that follows (benchmarks read it).
        self.placement: dict[str, float] = {}
        variant = config.variant
        self.info = EnhancerInfo(
            name=f"uPETe {variant.label}",
            version=version,
            description=(
                f"uPETe {variant.label} latent diffusion (SPET-only), {self.steps} steps, model {version}"
                + (f", LPET local mean kept at {config.sampler.local_mean_fwhm_mm:g} mm"
                   if config.sampler.local_mean_fwhm_mm > 0 else "")
                + (f", decoder detail restored at {config.sampler.decoder_detail_fwhm_mm:g} mm"
                   if config.sampler.decoder_detail_fwhm_mm > 0 else "")
                + (f", LPET differences beyond {config.sampler.significance_threshold:g} σ kept at "
                   f"{config.sampler.significance_fwhm_mm:g} mm"
                   if config.sampler.significance_fwhm_mm > 0 else "")
                + (f" ({config.sampler.significance_low_threshold:g} σ at "
                   f"{config.sampler.significance_low_fwhm_mm:g} mm where the LPET is placed low)"
                   if config.sampler.significance_fwhm_mm > 0 and config.sampler.significance_low_fwhm_mm > 0
                   else "")
            ),
            uses_ct=variant.uses_ct,
            requires_ct=variant.uses_ct,
        )

    # --- placing the LPET on the schedule -----------------------------------------------------------

    def poisson_step(self, pet_norm_fixed: np.ndarray) -> float:
        """t* on the Poisson schedule: from the dose fraction if known, else from the image's noise."""
        if self.options.dose_fraction is not None:
            return self.config.schedule.t_from_dose(self.options.dose_fraction)
        return self.config.noise_curve.t_from_image(pet_norm_fixed)

    # --- tiles ------------------------------------------------------------------------------------

    def _tile_size(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """The training patch, or with ``tiling="whole"`` the volume rounded up to the size multiple."""
        patch = self.config.patch_size
        if self.options.tiling == "auto":
            return patch
        m = self.config.size_multiple
        return tuple(max(int(math.ceil(n / m) * m), m) for n in shape)  # type: ignore[return-value]

    def _model_grid(
        self, pet_bqml: np.ndarray, ct_hu: np.ndarray | None, spacing_mm: tuple[float, float, float]
    ) -> ModelGrid:
        """The model grid of ``pet_bqml``, cropped to what the tiles would run (see :class:`ModelGrid`).

        The margin is a tile plus the reach of the local-mean filter (a Gaussian cut at 3 σ) and two
        voxels for the resampling: every tile reaching the body, and every voxel that filter mixes
        into the body, is then inside the crop and the body's output is as without it.
        """
        target = self.config.spacing_mm
        if not self.options.crop_to_body or self.options.tiling != "auto":
            return ModelGrid(pet_bqml, spacing_mm, target)
        options = self.options
        if ct_hu is not None and options.skip_air_ct:
            body = body_mask(pet_bqml, ct_hu, air_hu=options.air_hu, pet_limit=options.air_max_bqml)
        else:
            body = body_mask(pet_bqml)
        fwhm = self.config.sampler.local_mean_fwhm_mm
        reach = math.ceil(3.0 * fwhm / FWHM_PER_SIGMA / target) if fwhm > 0 else 0
        patch = self.config.patch_size
        return ModelGrid(
            pet_bqml, spacing_mm, target, body=body,
            margin=[p + reach + 2 for p in patch], align=[tile_stride(p, self.tile_overlap) for p in patch],
        )

    # --- the model ----------------------------------------------------------------------------------

    def _sync(self) -> None:
        # CUDA runs asynchronously: without a sync a stage's time would land in the next one.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _timed(self, stage: str, started: float) -> float:
        self._sync()
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - started
        return now

    def _tensor(self, tiles: np.ndarray) -> torch.Tensor:
        """``(B, *tile)`` tiles as a ``(B, 1, *tile)`` tensor on the device, in the networks' layout."""
        return torch.from_numpy(tiles[:, None]).to(self.device).contiguous(memory_format=self.memory_format)

    @torch.inference_mode()
    def _run_tiles(
        self,
        x: np.ndarray,
        ct: np.ndarray | None,
        t_poisson: float,
        progress: Progress | None,
        air_pet_limit: float | None = None,
        detail: float = 0.0,
    ) -> np.ndarray:
        """Enhance a normalised ``(z, y, x)`` array on the model grid; returns the same shape.

        Each busy tile is encoded once, sampled with ``tile_batch`` tiles per denoiser call and
        decoded once; GroupNorm normalises per sample, so the batch size does not change a tile's result.
        With ``detail`` > 0 the LPET latent is decoded too and that weight of the decoder's smoothed
        error put back (:func:`~model.enhancers.detail.restore_decoder_detail`).
        """
        model, scale = self.model, self.config.latent_scale
        detail_sigma = self.config.sampler.decoder_detail_fwhm_mm / FWHM_PER_SIGMA / self.config.spacing_mm
        generator = torch.Generator().manual_seed(self.options.seed)

        def run_batch(pet_tiles: np.ndarray, ct_tiles: np.ndarray | None) -> np.ndarray:
            started = time.perf_counter()
            xs = self._tensor(pet_tiles)
            with autocast(self.precision, self.device):
                z_ct = None
                if ct_tiles is not None:
                    z_ct = model.diffusion.encode_ct(self._tensor(ct_tiles))
                z_lpet = model.autoencoder.encode(xs).mean.float() * scale
                # One start per tile, in tile order: the Gaussian variants' noise, drawn from the one
                # generator, is then the same whatever the batch size.
                starts = [
                    model.diffusion.start_from_lpet(
                        z_lpet[k : k + 1],
                        t_poisson=t_poisson,
                        curve=self.config.noise_curve,
                        generator=generator,
                        renoise_ratio=self.config.sampler.renoise_ratio,
                    )
                    for k in range(len(pet_tiles))
                ]
                z_start, t_start = torch.cat([z for z, _ in starts]), starts[0][1]
                evaluations = len(sampling_timesteps(t_start, self.steps))
                self.sampling = {"t_start": t_start, "evaluations": evaluations}
                started = self._timed("encode", started)
                z0 = model.diffusion.sample(z_start, t_start, z_ct=z_ct, steps=self.steps)
                started = self._timed("sample", started)
                if detail > 0:  # one decoder call for both (GroupNorm is per sample: as two calls)
                    both = model.autoencoder.decode(torch.cat([z0, z_lpet]) / scale).float().cpu().numpy()
                    out = restore_decoder_detail(
                        both[: len(pet_tiles), 0], pet_tiles, both[len(pet_tiles) :, 0],
                        weight=detail, sigma_voxels=detail_sigma,
                    )
                else:
                    out = model.autoencoder.decode(z0 / scale).float().cpu().numpy()[:, 0]
            self._timed("decode", started)
            return out

        options = self.options
        tiled = run_tiled(
            x,
            run_batch,
            tile=self._tile_size(x.shape),
            overlap=self.tile_overlap,
            batch_size=options.tile_batch,
            ct=ct if model.diffusion.uses_ct else None,
            ct_air=CTAir(options.air_hu, air_pet_limit) if options.skip_air_ct else None,
            progress=progress,
            stage="diffusion",
        )
        self.tile_counts = tiled.counts
        return tiled.volume

    def enhance_array(
        self,
        pet_bqml: np.ndarray,
        ct_hu: np.ndarray | None = None,
        *,
        spacing_mm: tuple[float, float, float],
        progress: Progress | None = None,
    ) -> np.ndarray:
        if pet_bqml.ndim != 3:
            raise ValueError(f"expected a (z, y, x) PET array, found shape {pet_bqml.shape}")
        if self.info.requires_ct and ct_hu is None:
            raise ValueError(f"{self.info.name} needs a CT and none was given")
        if ct_hu is not None and ct_hu.shape != pet_bqml.shape:
            raise ValueError(f"CT shape {ct_hu.shape} differs from PET shape {pet_bqml.shape}")
        self.timings = {}
        self.tile_counts = {}
        self.sampling = {}
        self.placement = {}
        started = time.perf_counter()
        if progress:
            progress(0.0, "resample")
        pet_clean = np.nan_to_num(pet_bqml.astype(np.float32), nan=0.0)
        uses_ct = ct_hu is not None and self.model.diffusion.uses_ct
        ct_used = np.asarray(ct_hu, dtype=np.float32) if uses_ct else None
        grid = self._model_grid(pet_clean, ct_used, spacing_mm)
        pet_iso = grid.onto(pet_clean, default=0.0)
        ct_iso = grid.onto(ct_used, default=AIR_HU) if ct_used is not None else None
        started = self._timed("resample", started)

        norm = self.config.normalisation
        if norm.mode == "minmax":
            low, high = float(pet_iso.min()), float(pet_iso.max())
            offset, scale = low, max(high - low, 1e-6)
        else:
            offset, scale = 0.0, norm.scale_bqml
        t_poisson = self.poisson_step(pet_iso / norm.scale_bqml)
        dose_equivalent = self.config.schedule.dose_at(t_poisson)
        detail = 0.0
        if self.config.sampler.decoder_detail_fwhm_mm > 0:
            detail = dose_weight(dose_equivalent, self.config.sampler.decoder_detail_doses)
        significance = 0.0
        if self.config.sampler.significance_fwhm_mm > 0:
            significance = dose_weight(dose_equivalent, self.config.sampler.significance_doses)
        self.placement = {
            "t_star": t_poisson, "dose_equivalent": dose_equivalent, "decoder_detail": detail,
            "significance": significance,
        }
        log.info(
            "LPET placed on the schedule",
            extra={
                "fields": {
                    "t_star": round(t_poisson, 1),
                    "from": "dose fraction" if self.options.dose_fraction is not None else "image noise",
                    "dose_equivalent": round(dose_equivalent, 4),
                    "decoder_detail": round(detail, 3),
                    "significance": round(significance, 3),
                }
            },
        )
        x_norm = (pet_iso - offset) / scale
        air_pet_limit = (self.options.air_max_bqml - offset) / scale
        self._timed("normalise", started)  # includes placing the LPET on the schedule (noise index)
        out_norm = self._run_tiles(x_norm, ct_iso, t_poisson, progress, air_pet_limit, detail)
        # Volume-sized arrays no longer needed: a total-body study holds several hundred MB each.
        del x_norm, ct_iso
        started = time.perf_counter()
        out_iso = out_norm * scale + offset  # the exact inverse of the normalisation above
        del out_norm
        sampler, spacing = self.config.sampler, (self.config.spacing_mm,) * 3
        if sampler.local_mean_fwhm_mm > 0:
            out_iso = preserve_local_mean(
                out_iso, pet_iso, fwhm_mm=sampler.local_mean_fwhm_mm, spacing_mm=spacing
            )
        if sampler.significance_fwhm_mm > 0:  # after the local mean: it works at a finer scale
            low = sampler.significance_low_fwhm_mm
            out_iso = restore_significant_by_dose(
                out_iso, pet_iso, setting=(sampler.significance_fwhm_mm, sampler.significance_threshold),
                low_setting=(low, sampler.significance_low_threshold) if low > 0 else None,
                weight=significance, window_fwhm_mm=sampler.significance_window_mm, spacing_mm=spacing,
            )
        started = self._timed("normalise", started)

        out = grid.back(out_iso, outside=pet_clean)  # beyond the crop: the input, as for tiles of air
        # Activity is non-negative; decoder ringing below zero is not (and uint16 DICOM cannot hold it).
        out = np.maximum(out, 0.0, out=out).astype(np.float32, copy=False)  # out is this call's own array
        self._timed("resample_back", started)
        if progress:
            progress(1.0, "done")
        return out


def load_diffusion_enhancer(
    path: str | Path, options: InferenceOptions = DEFAULT_OPTIONS
) -> DiffusionEnhancer:
    """Load a ``.safetensors`` checkpoint (+ JSON config) as a :class:`DiffusionEnhancer`.

    Refuses a checkpoint whose denoiser was never trained (an autoencoder-stage file).
    """
    options = replace(options, device=resolve_inference_device(options.device))
    model = load_checkpoint(path, device=options.device)
    if not model.config.training.get("denoiser", {}).get("steps"):
        raise ValueError(f"{Path(path).name} holds a trained autoencoder only; train the denoiser first")
    return DiffusionEnhancer(model, version=weights_digest(path), options=options)
