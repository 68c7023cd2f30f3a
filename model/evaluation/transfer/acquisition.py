"""From an activity and attenuation map to counts: expectation, Poisson standard dose, thinned doses.

Per 2D slice: ``trues = kappa · att · A·x``, scatter = the trues smoothed across bins (a broad
Gaussian, σ = 60 mm) scaled to ``scatter_fraction`` of the prompts, randoms = uniform over the
sinogram at ``randoms_fraction`` of the prompts. ``kappa`` makes the mean trues per slice the style's
count level. A lower dose d is binomial thinning of the standard-dose counts: each count kept with
probability d, which is exactly a d-times-shorter (or d-times-lower activity, randoms aside)
acquisition of the same patient. Its reconstruction model is the standard one scaled by d.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from model.evaluation.transfer.projector import RotateSumProjector
from model.evaluation.transfer.reconstruction import SinogramModel

__all__ = ["Acquisition", "acquire", "attenuation_from_hu", "poisson_counts", "thin"]

_MU_WATER_PER_MM = 0.0096  # linear attenuation of water at 511 keV
_SCATTER_SIGMA_MM = 60.0


class Acquisition:
    """The noiseless sinogram (``mean``) of one standard-dose acquisition and its reconstruction model."""

    def __init__(self, mean: np.ndarray, model: SinogramModel) -> None:
        self.mean = mean
        self.model = model

    def at_dose(self, dose: float) -> SinogramModel:
        """The reconstruction model of a dose-``dose`` acquisition: scale and background times ``dose``."""
        m = self.model
        background = m.background * np.float32(dose)
        return SinogramModel(m.projector, m.att, m.kappa * dose, background, m.spacing_mm)


def attenuation_from_hu(hu: np.ndarray) -> np.ndarray:
    """μ at 511 keV in 1/mm from HU: water-scaled below 0 HU, a shallower bone slope above (bilinear)."""
    hu = np.asarray(hu, dtype=np.float32)
    soft = _MU_WATER_PER_MM * (1.0 + hu / 1000.0)
    bone = _MU_WATER_PER_MM * (1.0 + 0.5 * hu / 1000.0)  # bone's photoelectric share is small at 511 keV
    return np.clip(np.where(hu <= 0, soft, bone), 0.0, None).astype(np.float32)


def acquire(activity: np.ndarray, mu_per_mm: np.ndarray, projector: RotateSumProjector, *,
            spacing_mm: tuple[float, float, float], trues_per_slice: float, scatter_fraction: float,
            randoms_fraction: float) -> Acquisition:
    """The standard-dose expected counts of ``activity`` (z, y, x; already blurred by the scanner's
    resolution) attenuated by ``mu_per_mm``, with scatter and randoms, at ``trues_per_slice`` mean trues."""
    if activity.shape != mu_per_mm.shape:
        raise ValueError(f"activity {activity.shape} and attenuation {mu_per_mm.shape} differ in shape")
    if trues_per_slice <= 0:
        raise ValueError(f"trues_per_slice must be positive, found {trues_per_slice}")
    att = np.exp(-projector.forward(mu_per_mm)).astype(np.float32)
    line = att * projector.forward(activity)
    kappa = trues_per_slice * activity.shape[0] / max(float(line.sum()), 1e-12)
    trues = line * np.float32(kappa)
    sigma_bins = _SCATTER_SIGMA_MM / projector.pixel_mm
    shape = ndimage.gaussian_filter1d(trues, sigma_bins, axis=2, mode="constant")
    per_slice_trues = trues.sum(axis=(1, 2), keepdims=True)
    # Fractions of the prompts P = T + S + R: S = sf·P and R = rf·P, so S = sf/(1 − sf − rf)·T.
    rest = 1.0 - scatter_fraction - randoms_fraction
    if rest <= 0:
        raise ValueError(f"scatter ({scatter_fraction}) and randoms ({randoms_fraction}) fractions "
                         "leave no room for trues")
    shape_total = np.maximum(shape.sum(axis=(1, 2), keepdims=True), 1e-12)
    scatter = shape * (scatter_fraction / rest * per_slice_trues / shape_total)
    randoms = np.broadcast_to(randoms_fraction / rest * per_slice_trues / trues[0].size, trues.shape)
    background = (scatter + randoms).astype(np.float32)
    model = SinogramModel(projector, att, kappa, background, spacing_mm)
    return Acquisition((trues + background).astype(np.float32), model)


def poisson_counts(mean: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Poisson counts of expectation ``mean`` (int64)."""
    return rng.poisson(np.asarray(mean, dtype=np.float64))


def thin(counts: np.ndarray, dose: float, rng: np.random.Generator) -> np.ndarray:
    """Keep each count with probability ``dose`` (binomial thinning): a dose-``dose`` acquisition."""
    if not 0 < dose <= 1:
        raise ValueError(f"dose must be in (0, 1], found {dose}")
    return rng.binomial(np.asarray(counts, dtype=np.int64), dose)
