"""PET physics, used by the simulator and by the Poisson forward process of training.

Counts, dose thinning and the acquisition model are in :mod:`model.physics.counts`; the projector,
the reconstructions and the filters have their own modules. Everything is re-exported here, so
``from model.physics import perturb`` reads the same wherever it is used.
"""

from model.physics.counts import (
    ScannerModel,
    acquire_counts,
    attenuation_factors,
    expected_counts,
    inject_dose_noise,
    mu_map_from_ct,
    perturb,
    reconstruct,
    thin_counts,
)
from model.physics.projector import ParallelBeamProjector, default_n_angles, get_projector
from model.physics.reconstruction import ReconAlgorithm, ReconSettings

__all__ = [
    "ParallelBeamProjector",
    "ReconAlgorithm",
    "ReconSettings",
    "ScannerModel",
    "acquire_counts",
    "attenuation_factors",
    "default_n_angles",
    "expected_counts",
    "get_projector",
    "inject_dose_noise",
    "mu_map_from_ct",
    "perturb",
    "reconstruct",
    "thin_counts",
]
