"""Float slice → integer pixels and a RescaleSlope, the way PET scanners store activity.

Classic PET Image Storage keeps one image per slice as 16-bit integers with a per-slice
RescaleSlope (and RescaleIntercept 0, PS3.3 C.8.9.4.1.2), so each slice uses the full integer range.
The slope is formatted as a DS string first and the pixels are computed with the *parsed* slope, so
``pixels * float(slope)`` is exactly what a reader recovers.
"""

from __future__ import annotations

import numpy as np
from pydicom.valuerep import format_number_as_ds

__all__ = ["quantize_slice"]

_UNSIGNED_MAX = 65535
_SIGNED_MAX = 32767


def quantize_slice(values: np.ndarray, *, signed: bool = False) -> tuple[np.ndarray, str]:
    """Encode a 2D float slice as 16-bit pixels and a RescaleSlope string (intercept 0).

    ``values`` are in the output unit (Bq/ml for PET). With ``signed=False`` the values must be
    non-negative and the pixels are ``uint16`` (slice maximum → 65535); with ``signed=True`` they are
    ``int16`` (largest magnitude → 32767). Returns ``(pixels, slope_ds)`` with
    ``pixels * float(slope_ds) ≈ values`` to within half a quantisation step.
    """
    if values.ndim != 2:
        raise ValueError(f"expected a 2D slice, found shape {values.shape}")
    values = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError("slice holds NaN or infinite values; cannot store them as pixels")
    if not signed and values.size and values.min() < 0:
        raise ValueError(f"unsigned pixels need non-negative values, found minimum {values.min():g}")
    levels = _SIGNED_MAX if signed else _UNSIGNED_MAX
    peak = float(np.abs(values).max()) if values.size else 0.0
    if peak == 0.0:
        slope_ds = "1"
    else:
        # The tiny bump keeps the DS rounding from making the slope smaller than needed, which
        # would push the peak one level past the integer range.
        slope_ds = format_number_as_ds(peak / levels * (1.0 + 1e-9))
    slope = float(slope_ds)
    low = -levels if signed else 0
    pixels = np.clip(np.rint(values / slope), low, levels)
    return pixels.astype(np.int16 if signed else np.uint16), slope_ds
