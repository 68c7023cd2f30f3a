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
from model.enhancers.tiling import (
    Blender,
    gaussian_weights,
    pad_to_shape,
    split_air,
    tile_starts,
    tile_windows,
)
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

    def _corners(self, shape: tuple[int, ...]) -> list[tuple[int, int, int]]:
        overlap = self.config.tile_overlap
        starts = [tile_starts(n, p, overlap) for n, p in zip(shape, self.config.patch_size, strict=True)]
        return [(z, y, x) for z in starts[0] for y in starts[1] for x in starts[2]]

    @torch.no_grad()
    def run_tiles(self, x: np.ndarray, progress: Progress | None = None) -> np.ndarray:
        """Enhance a normalised ``(z, y, x)`` array on the model's grid; returns the same shape."""
        patch = self.config.patch_size
        padded_shape = tuple(max(n, p) for n, p in zip(x.shape, patch, strict=True))
        x_pad, crop = pad_to_shape(x, padded_shape, 0.0)  # air beyond the volume, as in training
        corners = self._corners(padded_shape)
        weights = gaussian_weights(patch) if len(corners) > 1 else np.ones(patch, dtype=np.float32)
        blend = Blender(padded_shape, weights)
        windows = tile_windows(corners, patch)
        busy, air = split_air(x_pad, windows)  # pure air is kept as it is (model/enhancers/tiling.py)
        for w in air:
            blend.add(w, x_pad[w])
        done = len(air)
        step = self.config.tile_batch
        for i in range(0, len(busy), step):
            batch = busy[i : i + step]
            xs = torch.from_numpy(np.stack([x_pad[w] for w in batch])[:, None]).to(self.device)
            out = self.model(xs).float().cpu().numpy()[:, 0]
            for w, o in zip(batch, out, strict=True):
                blend.add(w, o)
            done += len(batch)
            if progress:
                progress(done / len(windows), "supervised")
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


def load_supervised_enhancer(path: str | Path, *, device: str = "auto") -> SupervisedEnhancer:
    """Load a supervised ``.safetensors`` checkpoint (+ JSON) as a :class:`SupervisedEnhancer`."""
    dev = resolve_inference_device(device)
    return SupervisedEnhancer(load_supervised(path, device=dev), version=weights_digest(path), device=dev)
