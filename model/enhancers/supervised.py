"""The supervised reference U-Net as an :class:`~model.enhancers.base.Enhancer`.

Resample to the 2 mm grid → normalise → tiles of the training patch size (GroupNorm sees the
statistics it was trained on), blended with Gaussian weights → invert the normalisation exactly →
resample back. The network and its file format are in :mod:`model.networks.supervised_unet`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model.enhancers.base import Enhancer, EnhancerInfo, Progress
from model.enhancers.device import resolve_inference_device
from model.enhancers.options import DEFAULT_OPTIONS, InferenceOptions
from model.enhancers.tiling import run_tiled
from model.grid import ModelGrid
from model.networks.checkpoint import weights_digest
from model.networks.supervised_unet import SupervisedUNet, load_supervised

__all__ = ["SupervisedEnhancer", "load_supervised_enhancer"]


class SupervisedEnhancer(Enhancer):
    """The supervised U-Net as an :class:`Enhancer`: volume in Bq/ml in, volume in Bq/ml out."""

    def __init__(self, model: SupervisedUNet, *, version: str, device: str | torch.device = "cpu") -> None:
        self.model = model.to(device).eval()
        self.config = model.config
        self.device = torch.device(device)
        self.tile_counts: dict[str, int] = {}  # after each call: tiles in all, run, skipped as air
        dose = self.config.dose
        self.info = EnhancerInfo(
            name="Supervised U-Net",
            version=version,
            description=(
                f"supervised residual 3D U-Net (LPET to SPET, trained on simulated pairs at "
                f"{100 * dose:g} % dose; reference method, not uPETe), model {version}"
            ),
            uses_ct=False,
            requires_ct=False,
        )

    @torch.no_grad()
    def run_tiles(self, x: np.ndarray, progress: Progress | None = None) -> np.ndarray:
        """Enhance a normalised ``(z, y, x)`` array on the model's grid; returns the same shape."""

        def run_batch(pet_tiles: np.ndarray, _ct: np.ndarray | None) -> np.ndarray:
            xs = torch.from_numpy(pet_tiles[:, None]).to(self.device)
            return self.model(xs).float().cpu().numpy()[:, 0]

        tiled = run_tiled(  # air beyond the volume, as in training; pure-air tiles kept as they are
            x, run_batch, tile=self.config.patch_size, overlap=self.config.tile_overlap,
            batch_size=self.config.tile_batch, progress=progress, stage="supervised",
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
        if progress:
            progress(0.0, "resample")
        pet_clean = np.nan_to_num(pet_bqml.astype(np.float32), nan=0.0)
        grid = ModelGrid(pet_clean, spacing_mm, self.config.spacing_mm)
        pet_iso = grid.onto(pet_clean, default=0.0)
        scale = self.config.scale_bqml
        out = grid.back(self.run_tiles(pet_iso / scale, progress) * scale)  # exact inverse of the division
        if progress:
            progress(1.0, "done")
        # Activity is non-negative (and uint16 DICOM cannot hold less); the residual can undershoot.
        return np.clip(out, 0.0, None).astype(np.float32)


def load_supervised_enhancer(
    path: str | Path, options: InferenceOptions = DEFAULT_OPTIONS
) -> SupervisedEnhancer:
    """Load a supervised ``.safetensors`` checkpoint (+ JSON) as a :class:`SupervisedEnhancer`.

    Of ``options`` only the device applies: the network was trained at one dose (no t*, no sampler)
    and tiles as its own config says.
    """
    dev = resolve_inference_device(options.device)
    return SupervisedEnhancer(load_supervised(path, device=dev), version=weights_digest(path), device=dev)
