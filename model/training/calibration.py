"""Measurements made once, after the autoencoder is trained, and stored in the checkpoint.

- the **latent scale**: 1 / std of E(x).mean over SPET patches, so the diffusion sees unit variance;
- the **noise curve** of the Poisson schedule: for a grid of steps t, the latent RMS of
  E(perturb(x, d_t)) − E(x) (the σ_t the sampler and the preconditioning use) and the image-domain
  :func:`~model.networks.noise_level.noise_index` of perturb(x, d_t) (to place an LPET of unknown dose on the
  schedule). E is frozen from then on, so the curve stays valid through the denoiser's training.

Both return plain numbers so DDP ranks can average them before use.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from model.networks.autoencoder import AutoencoderKL
from model.networks.noise_level import noise_index
from model.training.data import body_candidates, random_patch_origin
from model.training.patches import PatchSampler, PerturbedPool

__all__ = ["floor_first_sigma", "latent_moments", "measure_noise_curve"]


@torch.no_grad()
def latent_moments(
    autoencoder: AutoencoderKL,
    sampler: PatchSampler,
    *,
    batches: int,
    batch_size: int,
    device: torch.device,
) -> tuple[float, float, float]:
    """``(sum, sum of squares, count)`` of E(x).mean over ``batches`` random SPET batches."""
    total = total_sq = count = 0.0
    for _ in range(batches):
        clean = sampler.clean_batch(batch_size).clean.to(device)
        z = autoencoder.encode(clean).mean.double()
        total += float(z.sum())
        total_sq += float((z**2).sum())
        count += z.numel()
    return total, total_sq, count


@torch.no_grad()
def measure_noise_curve(
    autoencoder: AutoencoderKL,
    pool: PerturbedPool,
    *,
    latent_scale: float,
    scale_bqml: float,
    t_points: Sequence[int],
    slabs: int,
    crops: int = 2,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """Per step in ``t_points``: ``(latent_sigma, noise_index)`` averaged over ``slabs`` slabs.

    Slabs sit at fixed body positions of the first cases, ``crops`` patches each; every step uses the
    same slabs, crops and each case's base reconstruction, so the curve is smooth in t.
    """
    sampler = pool.sampler
    rng = np.random.default_rng(1234)  # fixed positions: the curve must not depend on training's RNG
    pz, py, px = sampler.patch
    positions = []
    for k in range(slabs):
        case = k % len(sampler.pet)
        shape = sampler.pet[case].shape
        z0, _, _ = random_patch_origin(
            shape, (pz, shape[1], shape[2]), rng, candidates=sampler.candidates[case]
        )
        region = sampler.pet[case][z0 : z0 + pz]
        body = body_candidates(region, stride=2)
        corners = [
            random_patch_origin(region.shape, sampler.patch, rng, candidates=body) for _ in range(crops)
        ]
        positions.append((case, z0, corners))

    def encode(arrays: list[np.ndarray], case: int) -> torch.Tensor:
        batch = np.stack([sampler.normalise(case, a) for a in arrays])[:, None]
        return autoencoder.encode(torch.from_numpy(batch).float().to(device)).mean * latent_scale

    sigma = np.zeros(len(t_points))
    index = np.zeros(len(t_points))
    clean_latents = []
    for case, z0, corners in positions:
        region = sampler.pet[case][z0 : z0 + pz]
        clean_latents.append(encode([region[:, y : y + py, x : x + px] for _, y, x in corners], case))
    for i, t in enumerate(t_points):
        sq = n = 0.0
        for (case, z0, corners), clean in zip(positions, clean_latents, strict=True):
            noisy = pool.perturb_slab(case, z0, int(t), recon=pool.recons[case][0])
            index[i] += noise_index(noisy / scale_bqml) / len(positions)
            z = encode([noisy[:, y : y + py, x : x + px] for _, y, x in corners], case)
            sq += float(((z - clean) ** 2).sum())
            n += z.numel()
        sigma[i] = np.sqrt(sq / n)
    return sigma, index


def floor_first_sigma(sigma: Sequence[float]) -> list[float]:
    """The measured σ_t with σ_0 raised to at least half of σ at the next point.

    The mean-preserving forward process adds no noise at dose 1, so σ_0 measures 0. But t = 0 is
    also the label of every image whose noise index is at or below the SPET's (the node's estimate,
    and training's labels, are clipped there): such images still carry some noise, and with σ_0 → 0
    the preconditioning would ask the denoiser to remove it with weight 1/σ_0² (training diverged).
    """
    out = [float(v) for v in sigma]
    if len(out) > 1:
        out[0] = max(out[0], 0.5 * out[1])
    return out

