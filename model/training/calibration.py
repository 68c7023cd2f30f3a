"""Measurements made once, after the autoencoder is trained, and stored in the checkpoint.

- the **latent scale**: 1 / std of E(x).mean over SPET patches, so the diffusion sees unit variance;
- the **noise curve** of the Poisson schedule: for a grid of steps t, the latent RMS of
  E(x_{d_t}) − E(x) (the σ_t the sampler and the preconditioning use, :func:`measure_noise_curve`) and
  the image-domain :func:`~model.networks.noise_level.noise_index` an image with that latent noise
  shows, matched over many scanner styles (:func:`match_noise_index`), to place an LPET of unknown dose
  on the schedule. E is frozen from then on, so the curve stays valid through the denoiser's training.

Both return plain numbers so DDP ranks can average them before use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from model.networks.autoencoder import AutoencoderKL
from model.networks.noise_level import LATENT_BAND, noise_index
from model.training.data import body_candidates, random_patch_origin
from model.training.patches import PatchSampler, PerturbedPool
from model.training.styles import draw_style

__all__ = [
    "IndexMatch",
    "floor_first_sigma",
    "latent_moments",
    "latent_noise_variance",
    "match_noise_index",
    "measure_noise_curve",
]


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
    t_points: Sequence[int],
    slabs: int,
    crops: int = 2,
    device: torch.device,
) -> np.ndarray:
    """Per step in ``t_points``: the latent noise σ_t (RMS over ``slabs`` slabs).

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
    clean_latents = []
    for case, z0, corners in positions:
        region = sampler.pet[case][z0 : z0 + pz]
        clean_latents.append(encode([region[:, y : y + py, x : x + px] for _, y, x in corners], case))
    for i, t in enumerate(t_points):
        sq = n = 0.0
        for (case, z0, corners), clean in zip(positions, clean_latents, strict=True):
            noisy = pool.perturb_slab(case, z0, int(t), recon=pool.recons[case][0])
            z = encode([noisy[:, y : y + py, x : x + px] for _, y, x in corners], case)
            sq += float(((z - clean) ** 2).sum())
            n += z.numel()
        sigma[i] = np.sqrt(sq / n)
    return sigma


@torch.no_grad()
def latent_noise_variance(
    autoencoder: AutoencoderKL,
    clean: np.ndarray,
    noisy: np.ndarray,
    *,
    latent_scale: float,
    device: torch.device | str = "cpu",
) -> float:
    """Mean square of E(noisy) − E(clean) in scaled latent units: the noise the denoiser would be asked to
    remove. ``clean`` and ``noisy`` are ``(z, y, x)`` crops of one shape in the autoencoder's input unit."""
    batch = torch.from_numpy(np.stack([clean, noisy])[:, None]).float().to(device)
    z = autoencoder.encode(batch).mean * latent_scale
    return float(((z[1] - z[0]) ** 2).mean())


@dataclass(frozen=True)
class IndexMatch:
    """How the noise index maps to latent noise: ``log σ² = intercept + slope · log index`` fitted over
    slabs of many scanner styles and doses; ``spread`` the residual standard deviation of log σ² (0.1
    ≈ 10 % in σ²), ``largest`` its largest absolute residual, ``pairs`` the slabs it was fitted on."""

    intercept: float
    slope: float
    spread: float
    pairs: int
    largest: float = 0.0

    @classmethod
    def fit(cls, log_index: Sequence[float], log_variance: Sequence[float]) -> IndexMatch:
        """Least-squares power law of ``log_variance`` on ``log_index`` (any slope: callers judge it)."""
        x, y = np.asarray(log_index, dtype=np.float64), np.asarray(log_variance, dtype=np.float64)
        slope, intercept = np.polyfit(x, y, 1)
        residual = y - (intercept + slope * x)
        spread, largest = float(residual.std()), float(np.abs(residual).max())
        return cls(float(intercept), float(slope), spread, len(x), largest)

    def index_for(self, latent_sigma: Sequence[float], dose: Sequence[float]) -> list[float]:
        """The noise index of an image of dose ``dose`` whose added latent noise is ``latent_sigma``.

        σ_t is the noise *added* to the SPET (variance Σ(1/d − 1)); the image's whole noise, which its
        index sees, is Σ/d = σ_t² / (1 − d). At d = 1 (t = 0) only σ_0 itself is there to go by.
        """
        out = []
        for s, d in zip(latent_sigma, dose, strict=True):
            var = max(s, 1e-12) ** 2 / (1.0 - d if d < 1.0 else 1.0)
            out.append(math.exp((math.log(var) - self.intercept) / self.slope))
        return out


@torch.no_grad()
def match_noise_index(
    autoencoder: AutoencoderKL,
    pool: PerturbedPool,
    *,
    latent_scale: float,
    scale_bqml: float,
    slabs: int,
    band: tuple[float, float] = LATENT_BAND,
    device: torch.device,
    seed: int = 4321,
) -> IndexMatch:
    """Fit the latent noise of a slab against its image noise index over ``slabs`` random slabs.

    Each slab is a case's lower-dose acquisition by a random scanner style (or the case's own, for a
    site's DICOM) at a dose log-uniform over the pool's range (up to 90 %), brought onto the model grid
    as the node brings an LPET (:meth:`PerturbedPool.styled_slab`); its index is taken over the whole
    slab, as the node takes it over the study, and sees the image's whole noise. Its latent noise, the
    mean square of E(noisy) − E(clean) over a body patch, must be that whole noise too:

    * where the case has its noiseless expectation (simulated data), the dose-d image is acquired from
      it, so all of its noise has the style's texture, and ``clean`` is the expectation;
    * otherwise (a site's SPET) from the SPET, whose own noise the difference misses: the noise added
      is Σ(1/d − 1) of the whole Σ/d, so it is divided by 1 − d.

    The node then places an LPET at the t whose σ_t its index predicts, whatever scanner made it: the
    first calibrations measured the index on the model grid's own reconstruction only, and put a
    post-filtered 4 mm study of 10 % dose at 100 %.
    """
    sampler = pool.sampler
    rng = np.random.default_rng(seed)  # fixed slabs: the fit must not depend on training's RNG
    # Above 90 % the added noise is a sliver of the SPET's own: ÷ (1 − dose) would amplify its error.
    low, high = (math.log(d) for d in (pool.dose_range[0], min(pool.dose_range[1], 0.9)))
    pz, py, px = sampler.patch
    log_index, log_var = [], []
    for k in range(slabs):
        case = k % len(sampler.pet)
        shape = sampler.pet[case].shape
        z0, _, _ = random_patch_origin(
            shape, (pz, shape[1], shape[2]), rng, candidates=sampler.candidates[case]
        )
        style = pool.own_style(case) or draw_style(rng)
        dose = math.exp(rng.uniform(low, high))
        expectation = sampler.expectation[case]
        if expectation is not None:
            # Injection adds Σ(1/d′ − 1) to a noiseless image: d′ = d / (1 + d) makes that Σ/d.
            clean, noisy = pool.styled_slab(case, z0, dose / (1.0 + dose), style, source=expectation)
            whole = 1.0
        else:
            clean, noisy = pool.styled_slab(case, z0, dose, style)
            whole = 1.0 - dose
        body = body_candidates(clean, stride=2)
        y, x = random_patch_origin(clean.shape, sampler.patch, rng, candidates=body)[1:]
        clean_crop, noisy_crop = (
            sampler.normalise(case, a)[:, y : y + py, x : x + px] for a in (clean, noisy)
        )
        var = latent_noise_variance(
            autoencoder, clean_crop, noisy_crop, latent_scale=latent_scale, device=device
        ) / whole
        index = noise_index(noisy / scale_bqml, band=band)  # as the node reads an LPET (÷ the fixed scale)
        if var > 0 and index > 0:
            log_index.append(math.log(index))
            log_var.append(math.log(var))
    if len(log_index) < 3 or np.ptp(log_index) <= 0:
        raise ValueError(f"noise index match: {len(log_index)} usable slabs of {slabs}, need ≥ 3 that differ")
    match = IndexMatch.fit(log_index, log_var)
    if match.slope <= 0:
        raise ValueError(
            f"noise index match: latent noise does not grow with the index (slope {match.slope:.3g})"
        )
    return match


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

