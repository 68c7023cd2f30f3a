"""The uPETe :class:`~model.enhance.Enhancer`: a trained checkpoint applied to a whole PET volume.

Per volume: resample to the model's 2 mm grid → normalise (Bq/ml ÷ the fixed scale, or min-max) →
place the LPET on the schedule (t* from a known dose fraction, else from its measured noise and the
checkpoint's noise curve) → for overlapping tiles of the **training patch size** (GroupNorm sees the
statistics it was trained on; DESIGN.md §4): encode, sample from t*, decode → blend the tiles with
Gaussian weights → invert the normalisation exactly → resample back onto the input grid.
A volume that fits in one patch is done whole (padded with air). Same input + same seed → same output.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from model.enhancers.base import Enhancer, EnhancerInfo, Progress
from model.enhancers.device import resolve_inference_device
from model.enhancers.quantitation import preserve_local_mean
from model.enhancers.tiling import Blender, split_air, split_air_by_ct, tile_starts, tile_windows
from model.enhancers.tiling import gaussian_weights as _gaussian_weights
from model.enhancers.tiling import pad_to_shape as _pad
from model.grid import AIR_HU, ModelGrid
from model.networks.checkpoint import load_checkpoint, weights_digest
from model.networks.diffusion import sampling_timesteps
from model.networks.noise_level import noise_index
from model.networks.upete_model import UPETeModel

__all__ = ["DiffusionEnhancer", "load_diffusion_enhancer", "tile_starts"]

log = logging.getLogger(__name__)


class DiffusionEnhancer(Enhancer):
    """uPETe (any of the four variants) as an :class:`Enhancer`.

    ``steps``: sampler steps (default: the checkpoint's); ``dose_fraction``: the LPET's known dose
    (None = estimate t* from its noise); ``tiling``: ``"auto"`` (tiles of the training patch, or the
    whole volume when it fits in one) or ``"whole"`` (one pass over the padded volume).

    Inference settings that do not change the model (benchmarks/results/speed.md measured them):
    ``tile_batch`` tiles per denoiser call (default 8; per-sample GroupNorm makes it exact);
    ``tile_overlap`` (default: the checkpoint's); ``skip_air_ct``: with a CT, tiles whose CT is air
    (≤ ``air_hu`` everywhere: no patient) and whose PET stays below ``air_max_bqml`` (outside the
    body a 10 %-dose MLEM LPET stayed below ≈1100 Bq/ml; tissue beyond a smaller CT field of view
    does not) are kept as they are instead of being enhanced;
    ``autocast``: bf16 autocast, on CUDA only (off by default: its quality is not verified yet).
    After each :meth:`enhance_array`, ``timings`` holds seconds per stage (resample, normalise,
    encode, sample, decode, resample_back), ``tile_counts`` how many tiles ran and were skipped, and
    ``sampling`` the start step t* and the denoiser evaluations per tile (fewer than ``steps`` when t*
    is small: the steps are distinct integer times).
    """

    def __init__(
        self,
        model: UPETeModel,
        *,
        version: str,
        device: str | torch.device = "cpu",
        steps: int | None = None,
        dose_fraction: float | None = None,
        seed: int = 0,
        tiling: str = "auto",
        tile_batch: int = 8,
        tile_overlap: float | None = None,
        skip_air_ct: bool = True,
        air_hu: float = -900.0,
        air_max_bqml: float = 1500.0,
        autocast: bool = False,
    ) -> None:
        config = model.config
        if config.noise_curve is None:
            raise ValueError("this checkpoint has no noise curve: its autoencoder was never calibrated")
        if dose_fraction is not None and not 0 < dose_fraction <= 1:
            raise ValueError(f"dose_fraction must be in (0, 1], found {dose_fraction}")
        if tiling not in ("auto", "whole"):
            raise ValueError(f"tiling must be 'auto' or 'whole', found {tiling!r}")
        self.model = model.to(device).eval()
        self.config = config
        self.device = torch.device(device)
        self.steps = steps or config.sampler.steps
        self.dose_fraction = dose_fraction
        self.seed = seed
        self.tiling = tiling
        if tile_batch < 1:
            raise ValueError(f"tile_batch must be ≥ 1, found {tile_batch}")
        overlap = config.sampler.tile_overlap if tile_overlap is None else tile_overlap
        if not 0 <= overlap < 1:
            raise ValueError(f"tile_overlap must be in [0, 1), found {overlap}")
        self.tile_batch = tile_batch
        self.tile_overlap = overlap
        self.skip_air_ct = skip_air_ct
        self.air_hu = air_hu
        self.air_max_bqml = air_max_bqml
        self._air_pet_limit: float | None = None  # air_max_bqml in the normalised units of a call
        self.autocast = autocast
        self.timings: dict[str, float] = {}
        self.tile_counts: dict[str, int] = {}
        self.sampling: dict[str, int] = {}
        variant = config.variant
        self.info = EnhancerInfo(
            name=f"uPETe {variant.label}",
            version=version,
            description=(
                f"uPETe {variant.label} latent diffusion (SPET-only), {self.steps} steps, model {version}"
                + (f", LPET local mean kept at {config.sampler.local_mean_fwhm_mm:g} mm"
                   if config.sampler.local_mean_fwhm_mm > 0 else "")
            ),
            uses_ct=variant.uses_ct,
            requires_ct=variant.uses_ct,
        )

    # --- placing the LPET on the schedule -----------------------------------------------------------

    def poisson_step(self, pet_norm_fixed: np.ndarray) -> float:
        """t* on the Poisson schedule: from the dose fraction if known, else from the image's noise."""
        schedule = self.config.schedule
        if self.dose_fraction is not None:
            t = schedule.timesteps * math.log(self.dose_fraction) / math.log(schedule.dose_min)
            return float(min(max(t, 0.0), schedule.timesteps))
        return self.config.noise_curve.t_from_noise_index(noise_index(pet_norm_fixed))

    # --- tiles ------------------------------------------------------------------------------------

    def _tiles(self, shape: tuple[int, int, int]) -> tuple[tuple[int, int, int], list[tuple[int, int, int]]]:
        patch = self.config.patch_size
        m = self.config.size_multiple
        if self.tiling == "whole" or all(n <= p for n, p in zip(shape, patch, strict=True)):
            size = tuple(max(int(math.ceil(n / m) * m), m) for n in shape)
            if self.tiling == "auto":
                size = tuple(max(s, p) for s, p in zip(size, patch, strict=True))
            return size, [(0, 0, 0)]  # type: ignore[return-value]
        starts = [tile_starts(max(n, p), p, self.tile_overlap) for n, p in zip(shape, patch, strict=True)]
        corners = [(z, y, x) for z in starts[0] for y in starts[1] for x in starts[2]]
        return patch, corners

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

    def _autocast(self):  # noqa: ANN202 - a context manager
        if self.autocast and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def _run_tiles(
        self,
        x: np.ndarray,
        ct: np.ndarray | None,
        t_poisson: float,
        progress: Progress | None,
    ) -> np.ndarray:
        """Enhance a normalised ``(z, y, x)`` array on the model grid; returns the same shape.

        Each busy tile is encoded once, sampled with ``tile_batch`` tiles per denoiser call and
        decoded once; GroupNorm normalises per sample, so the batch size does not change a tile's result.
        """
        tile, corners = self._tiles(x.shape)
        padded_shape = tuple(max(n, t) for n, t in zip(x.shape, tile, strict=True))
        x_pad, crop = _pad(x, padded_shape, 0.0)
        ct_pad = _pad(ct, padded_shape, AIR_HU)[0] if ct is not None else None
        weights = _gaussian_weights(tile) if len(corners) > 1 else np.ones(tile, dtype=np.float32)
        blend = Blender(padded_shape, weights)
        model, scale = self.model, self.config.latent_scale
        generator = torch.Generator().manual_seed(self.seed)
        busy, air = split_air(x_pad, tile_windows(corners, tile))
        if self.skip_air_ct and ct_pad is not None and len(corners) > 1:
            busy, outside = split_air_by_ct(
                ct_pad, busy, air_hu=self.air_hu, pet=x_pad, pet_limit=self._air_pet_limit
            )
            air += outside
        for w in air:  # kept as they are (model/enhancers/tiling.py: split_air)
            blend.add(w, x_pad[w])
        self.tile_counts = {"tiles": len(corners), "run": len(busy), "skipped_air": len(air)}
        done = len(air)
        for i in range(0, len(busy), self.tile_batch):
            windows = busy[i : i + self.tile_batch]
            started = time.perf_counter()
            xs = torch.from_numpy(np.stack([x_pad[w] for w in windows])[:, None]).to(self.device)
            with self._autocast():
                z_ct = None
                if model.diffusion.uses_ct:
                    cts = torch.from_numpy(np.stack([ct_pad[w] for w in windows])[:, None]).to(self.device)
                    z_ct = model.diffusion.encode_ct(cts)
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
                    for k in range(len(windows))
                ]
                z_start, t_start = torch.cat([z for z, _ in starts]), starts[0][1]
                evaluations = len(sampling_timesteps(t_start, self.steps))
                self.sampling = {"t_start": t_start, "evaluations": evaluations}
                started = self._timed("encode", started)
                z0 = model.diffusion.sample(z_start, t_start, z_ct=z_ct, steps=self.steps)
                started = self._timed("sample", started)
                out = model.autoencoder.decode(z0 / scale).float().cpu().numpy()[:, 0]
            for w, o in zip(windows, out, strict=True):
                blend.add(w, o)
            self._timed("decode", started)
            done += len(windows)
            if progress:
                progress(done / len(corners), "diffusion")
        return blend.result()[crop]

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
        started = time.perf_counter()
        if progress:
            progress(0.0, "resample")
        pet_clean = np.nan_to_num(pet_bqml.astype(np.float32), nan=0.0)
        grid = ModelGrid(pet_clean, spacing_mm, self.config.spacing_mm)
        pet_iso = grid.onto(pet_clean, default=0.0)
        ct_iso = None
        if ct_hu is not None and self.model.diffusion.uses_ct:
            ct_iso = grid.onto(ct_hu.astype(np.float32), default=AIR_HU)
        started = self._timed("resample", started)

        norm = self.config.normalisation
        if norm.mode == "minmax":
            low, high = float(pet_iso.min()), float(pet_iso.max())
            offset, scale = low, max(high - low, 1e-6)
        else:
            offset, scale = 0.0, norm.scale_bqml
        t_poisson = self.poisson_step(pet_iso / norm.scale_bqml)
        log.info(
            "LPET placed on the schedule",
            extra={
                "fields": {
                    "t_star": round(t_poisson, 1),
                    "from": "dose fraction" if self.dose_fraction is not None else "image noise",
                    "dose_equivalent": round(
                        self.config.schedule.dose_min ** (t_poisson / self.config.schedule.timesteps), 4
                    ),
                }
            },
        )
        x_norm = (pet_iso - offset) / scale
        self._air_pet_limit = (self.air_max_bqml - offset) / scale
        self._timed("normalise", started)  # includes placing the LPET on the schedule (noise index)
        out_norm = self._run_tiles(x_norm, ct_iso, t_poisson, progress)
        started = time.perf_counter()
        out_iso = out_norm * scale + offset  # the exact inverse of the normalisation above
        if self.config.sampler.local_mean_fwhm_mm > 0:
            out_iso = preserve_local_mean(
                out_iso, pet_iso, fwhm_mm=self.config.sampler.local_mean_fwhm_mm,
                spacing_mm=(self.config.spacing_mm,) * 3,
            )
        started = self._timed("normalise", started)

        out = grid.back(out_iso)
        # Activity is non-negative; decoder ringing below zero is not (and uint16 DICOM cannot hold it).
        out = np.clip(out, 0.0, None).astype(np.float32)
        self._timed("resample_back", started)
        if progress:
            progress(1.0, "done")
        return out



def load_diffusion_enhancer(
    path: str | Path,
    *,
    device: str = "auto",
    steps: int | None = None,
    dose_fraction: float | None = None,
    seed: int = 0,
) -> DiffusionEnhancer:
    """Load a ``.safetensors`` checkpoint (+ JSON config) as a :class:`DiffusionEnhancer`.

    Refuses a checkpoint whose denoiser was never trained (an autoencoder-stage file).
    """
    dev = resolve_inference_device(device)
    model = load_checkpoint(path, device=dev)
    if not model.config.training.get("denoiser", {}).get("steps"):
        raise ValueError(f"{Path(path).name} holds a trained autoencoder only; train the denoiser first")
    return DiffusionEnhancer(
        model, version=weights_digest(path), device=dev, steps=steps, dose_fraction=dose_fraction, seed=seed
    )
