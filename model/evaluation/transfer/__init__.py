"""A transfer test set from a second, independent generator: never used for training or for any choice.

Its own phantom family (:mod:`.phantom`, :mod:`.shapes`), its own rotate-and-sum projector
(:mod:`.projector`), acquisition with attenuation from the CT, scatter, randoms, Poisson counts and
binomial dose thinning (:mod:`.acquisition`), and its own FBP and OSEM/MLEM (:mod:`.reconstruction`),
at the pixel sizes and algorithms clinics use (:mod:`.styles`). It imports nothing from the training
simulator (model.physics, model.simulation, model.training, model.networks; a test checks it) so that
what it measures is transfer, not agreement between two copies of one simulator. NumPy and SciPy only.
"""

from model.evaluation.transfer.case import (
    DEFAULT_DOSES,
    SEED_BASE,
    CaseLesion,
    TransferCase,
    generate_case,
    load_case,
    save_case,
)
from model.evaluation.transfer.filters import gaussian_fwhm
from model.evaluation.transfer.styles import STYLES, Reconstruction, ScannerStyle, get_style

__all__ = [
    "DEFAULT_DOSES",
    "SEED_BASE",
    "STYLES",
    "CaseLesion",
    "Reconstruction",
    "ScannerStyle",
    "TransferCase",
    "gaussian_fwhm",
    "generate_case",
    "get_style",
    "load_case",
    "save_case",
]
