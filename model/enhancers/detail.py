"""Put back the detail the autoencoder's decoder loses, where the LPET is clean enough to give it.

The sampler's output is a decoding, D(ẑ₀): whatever D(E(·)) cannot reproduce (a lesion's peak, an edge
at the scale of the scanner's resolution) is missing from it at every dose, even where there is little
noise to remove. The LPET holds that detail, with its noise: LPET − D(E(LPET)) is the decoder's error
on this very image plus the noise E does not pass. Smoothed at the resolution scale and added to the
output, it returns the detail; only at high dose equivalents, where the noise it carries is small
(fitted per case on validation phantoms, it helped every LPET placed above ≈ 35 % dose equivalent and
none below ≈ 18 %, where the residual is mostly noise). The weight rises linearly in log dose between
two dose equivalents, so a clean LPET gets its detail whole and a noisy one none (and costs no extra
decoding). Chosen on validation (benchmarks/results/validate_detail_*.md); on the transfer set it
raised PSNR at 10–50 % but lowered lesion SUVmax on three styles (training_runs/README.md).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = ["dose_weight", "restore_decoder_detail"]


def dose_weight(dose_equivalent: float, doses: tuple[float, float]) -> float:
    """0 at or below ``doses[0]``, 1 at or above ``doses[1]``, linear in log dose between (a step's weight by
    where the LPET is placed: this one's and the significance step's)."""
    low, high = doses
    if dose_equivalent <= low:
        return 0.0
    if dose_equivalent >= high:
        return 1.0
    return math.log(dose_equivalent / low) / math.log(high / low)


def restore_decoder_detail(
    output: np.ndarray, lpet: np.ndarray, lpet_decoded: np.ndarray, *, weight: float, sigma_voxels: float
) -> np.ndarray:
    """``output + weight · G(lpet − lpet_decoded)`` per leading index (a batch of tiles), float32.

    ``lpet_decoded`` is D(E(lpet)) in the units of ``lpet`` and ``output``; G a Gaussian of
    ``sigma_voxels`` over the last three axes (``nearest`` at the edges, as tiles are blended anyway).
    """
    if not output.shape == lpet.shape == lpet_decoded.shape:
        raise ValueError(f"shapes differ: {output.shape}, {lpet.shape}, {lpet_decoded.shape}")
    residual = (lpet - lpet_decoded).astype(np.float32, copy=False)
    sigma = (0.0,) * (residual.ndim - 3) + (sigma_voxels,) * 3
    smooth = ndimage.gaussian_filter(residual, sigma, mode="nearest", truncate=3.0)
    return (output + np.float32(weight) * smooth).astype(np.float32, copy=False)

