"""Tiny PET/CT cases for the evaluation and baseline tests: fast, deterministic, no physics needed.

A cylinder of "muscle" with a "liver" block and two hot lesions; the expectation is the truth blurred
(a scanner's resolution), SPET and LPET are Poisson counts at a count level ∝ dose, blurred a little
so the noise is spatially correlated like reconstructed PET. Liver label 2, body label 1.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from model.evaluation.evaluate import EvalCase

SHAPE = (16, 40, 40)
SPACING = (2.0, 2.0, 2.0)
LIVER_LABEL = 2


def toy_case(seed: int = 0, *, doses=(0.5, 0.1), counts_per_bqml: float = 2e-3, shape=SHAPE) -> EvalCase:
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    z, y, x = np.mgrid[:nz, :ny, :nx]
    cy, cx = ny / 2, nx / 2
    body = ((y - cy) / (0.42 * ny)) ** 2 + ((x - cx) / (0.45 * nx)) ** 2 < 1
    liver = body & (x > cx) & (y > cy - 0.25 * ny) & (y < cy + 0.25 * ny)
    organs = np.where(body, 1, 0).astype(np.uint8)
    organs[liver] = LIVER_LABEL
    lesions = np.zeros(shape, np.uint16)
    lesions[((z - nz // 2) ** 2 + (y - cy + 6) ** 2 + (x - cx + 8) ** 2) <= 4] = 1
    lesions[((z - nz // 2 + 3) ** 2 + (y - cy - 4) ** 2 + (x - cx - 8) ** 2) <= 2] = 2
    truth = np.where(body, 3000.0, 0.0) + np.where(liver, 4000.0, 0.0)
    truth[lesions > 0] = 20000.0 + 2000.0 * seed
    ct = np.where(body, 40.0, -1000.0) + np.where(liver, 20.0, 0.0)
    expectation = ndimage.gaussian_filter(truth, 1.0).astype(np.float32)

    def acquire(dose: float) -> np.ndarray:
        scale = counts_per_bqml * dose
        counts = rng.poisson(expectation * scale).astype(np.float64) / scale
        return ndimage.gaussian_filter(counts, 0.6).astype(np.float32)

    return EvalCase(
        case_id=f"toy{seed}",
        ct_hu=ct.astype(np.float32),
        spet_bqml=acquire(1.0),
        expectation_bqml=expectation,
        lpet_bqml={float(d): acquire(d) for d in doses},
        organ_labels=organs,
        lesion_labels=lesions,
        spacing_mm=SPACING,
        weight_kg=70.0 + seed,
        injected_bq=3.0e8,
        liver_label=LIVER_LABEL,
    )
