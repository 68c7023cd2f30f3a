"""Constants shared across the model's packages, free of torch so the node's classical path stays light."""

from __future__ import annotations

import math

__all__ = ["FWHM_PER_SIGMA"]

#: A Gaussian's full width at half maximum over its σ: 2·√(2·ln 2) ≈ 2.3548.
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
