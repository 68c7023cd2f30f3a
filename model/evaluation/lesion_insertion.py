"""Small lesions added to a validation phantom's noiseless expectation: the lesions a reader must not lose.

The training simulator draws lesions log-uniform over 4–30 mm, so a validation case holds few of the
10–14 mm lesions that sit at the edge of what a 4–5 mm reconstruction resolves; those are the lesions
a denoiser flattens first, and the ones the transfer set scores (its lesions ≥ 10 mm are mostly just
above 10 mm). Validation's lesion score, over a few large lesions, once moved the other way from the
transfer set's. This module adds such lesions to a validation case before its scanner style is
applied, so that validation sees them too: spheres of 10–14 mm with 1.7–10× their host organ's uptake,
blurred by the case's own resolution (scanner and post-filter, in quadrature) and added to the
expectation, whose reconstruction is close to linear at this scale. The CT is left as it is (a lesion
the CT does not show is the harder case for a CT-guided model).

Only for evaluation (never for training): the truth of an inserted lesion is the expectation it was
added to, so scores against that expectation are exact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from model.units import FWHM_PER_SIGMA

__all__ = ["InsertedLesion", "insert_lesions"]

# Hosts in the order they are tried (the training simulator's organ names).
DEFAULT_HOSTS = ("lung", "liver", "muscle", "bone", "spleen", "lung", "liver", "muscle")
_MARGIN_MM = 6.0  # between an inserted lesion's edge and any other lesion


@dataclass(frozen=True)
class InsertedLesion:
    """One inserted sphere: its ``label`` in the returned lesion labels, host organ, centre (voxels)."""

    label: int
    host: str
    center_voxel: tuple[int, int, int]
    diameter_mm: float
    contrast: float
    suv: float


def insert_lesions(
    expectation: np.ndarray,
    organ_labels: np.ndarray,
    lesion_labels: np.ndarray,
    *,
    organs: Mapping[int, str],
    organ_suv: Mapping[str, float],
    bqml_per_suv: float,
    spacing_mm: float,
    resolution_fwhm_mm: float,
    rng: np.random.Generator,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    diameter_mm: tuple[float, float] = (10.0, 14.0),
    contrast: tuple[float, float] = (1.7, 10.0),
) -> tuple[np.ndarray, np.ndarray, list[InsertedLesion]]:
    """Add one sphere per entry of ``hosts`` (where it fits) to ``expectation`` (Bq/ml, isotropic grid).

    A sphere fits where all of it lies in its host organ and at least 6 mm from every other lesion;
    a host with no such place is skipped. Its uptake is ``contrast`` × the host's SUV, the excess over
    the host blurred by a Gaussian of ``resolution_fwhm_mm`` and added. Returns the new expectation,
    the lesion labels with the spheres added (labels after the existing ones; the mask is the sphere)
    and the lesions. The inputs are not modified.
    """
    if expectation.shape != organ_labels.shape or expectation.shape != lesion_labels.shape:
        raise ValueError(
            f"shapes differ: expectation {expectation.shape}, organs {organ_labels.shape}, "
            f"lesions {lesion_labels.shape}"
        )
    label_of = {name: int(k) for k, name in organs.items()}
    out_labels = lesion_labels.astype(np.uint16, copy=True)
    excess = np.zeros(expectation.shape, dtype=np.float32)
    inserted: list[InsertedLesion] = []
    next_label = int(out_labels.max()) + 1
    for host in hosts:
        if host not in label_of or host not in organ_suv:
            continue
        diameter = float(rng.uniform(*diameter_mm))
        radius_vox = diameter / 2 / spacing_mm
        margin_vox = radius_vox + _MARGIN_MM / spacing_mm
        # Centres whose whole sphere is host: the host eroded by the radius (a distance transform,
        # padded so that the volume's edge bounds the host too).
        host_mask = np.pad(organ_labels == label_of[host], 1)
        inside = (ndimage.distance_transform_edt(host_mask) > radius_vox)[1:-1, 1:-1, 1:-1]
        free = ndimage.distance_transform_edt(out_labels == 0) > margin_vox
        candidates = np.flatnonzero(inside & free)
        if candidates.size == 0:
            continue
        centre = np.unravel_index(candidates[rng.integers(candidates.size)], expectation.shape)
        ratio = float(rng.uniform(*contrast))
        host_suv = float(organ_suv[host])
        reach = int(np.ceil(radius_vox)) + 1
        box = tuple(
            slice(max(c - reach, 0), min(c + reach + 1, n)) for c, n in zip(centre, excess.shape, strict=True)
        )
        grids = np.meshgrid(*(np.arange(s.start, s.stop) for s in box), indexing="ij")
        dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True)))
        # Partial volume: a one-voxel linear ramp at the surface.
        fraction = np.clip(radius_vox - dist + 0.5, 0.0, 1.0).astype(np.float32)
        excess[box] += fraction * np.float32((ratio - 1.0) * host_suv * bqml_per_suv)
        out_labels[box][dist <= radius_vox] = next_label
        inserted.append(
            InsertedLesion(next_label, host, tuple(int(c) for c in centre), round(diameter, 2),
                           round(ratio, 3), round(ratio * host_suv, 3))
        )
        next_label += 1
    sigma = resolution_fwhm_mm / FWHM_PER_SIGMA / spacing_mm
    blurred = ndimage.gaussian_filter(excess, sigma, mode="constant") if sigma > 0 else excess
    return (expectation + blurred).astype(np.float32, copy=False), out_labels, inserted
