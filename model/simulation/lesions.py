"""Lesions for the PET/CT phantom: 0–8 ellipsoids of 4–30 mm, 2–10× contrast, in varied organs.

Painted in place into the phantom's uptake (SUV) and CT arrays, with a one-voxel partial-volume ramp
in activity and a binary mask per lesion (``lesion_labels``), kept inside the body and apart from
each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from model.simulation.fields import BodyGrid

__all__ = ["Lesion", "add_lesions"]

# Where lesions go (organ, weight) and their CT appearance relative to the host (HU).
_LESION_SITES = (
    ("liver", 0.3),
    ("lung", 0.22),
    ("bone", 0.15),
    ("soft_tissue", 0.18),
    ("spleen", 0.08),
    ("kidney", 0.07),
)
_LESION_HU = {
    "liver": -25.0,
    "lung": None,
    "bone": None,
    "soft_tissue": 0.0,
    "spleen": -15.0,
    "kidney": -10.0,
}


@dataclass(frozen=True)
class Lesion:
    """One lesion: ``label`` in ``lesion_labels``; centre ``(z, y, x)`` in mm from voxel ``[0, 0, 0]``;
    equivalent-sphere ``diameter_mm``; host ``organ``; ``contrast`` = lesion / host uptake."""

    label: int
    center_mm: tuple[float, float, float]
    diameter_mm: float
    organ: str
    contrast: float
    suv: float


def add_lesions(
    rng: np.random.Generator,
    grid: BodyGrid,
    labels: np.ndarray,
    label_of: dict[str, int],
    spacing: tuple[float, float, float],
    activity_suv: np.ndarray,
    ct: np.ndarray,
    organ_suv: dict[str, float],
) -> tuple[np.ndarray, list[Lesion]]:
    """Draw 0–8 lesions and paint them into ``activity_suv`` and ``ct`` (in place).

    ``labels`` are the organ labels (``label_of`` maps organ names to them); ``organ_suv`` the
    patient's organ uptake, the reference of each lesion's contrast. Returns ``lesion_labels`` (uint16,
    k for ``lesions[k-1]``) and the lesions.
    """
    lesion_labels = np.zeros(labels.shape, dtype=np.uint16)
    lesions: list[Lesion] = []
    n_wanted = int(rng.integers(0, 9))
    sites = [s for s, _ in _LESION_SITES]
    weights = np.array([w for _, w in _LESION_SITES])
    vox = np.array(spacing)
    central = (grid.x[None, :] ** 2 / 140.0**2 + grid.y[:, None] ** 2 / 95.0**2) < 1  # nodes sit centrally
    for _ in range(n_wanted * 4):
        if len(lesions) == n_wanted:
            break
        site = sites[int(rng.choice(len(sites), p=weights / weights.sum()))]
        host = ("muscle", "bowel") if site == "soft_tissue" else (site,)
        candidates = np.isin(labels, [label_of[h] for h in host])
        if site == "soft_tissue":
            candidates &= central[None]
        flat = np.flatnonzero(candidates)
        if flat.size < 8:
            continue
        centre = np.array(np.unravel_index(flat[rng.integers(flat.size)], labels.shape))
        blob = _draw_blob(rng, centre, vox, labels.shape)
        box, dist, diameter = blob.box, blob.dist, blob.diameter
        mask = dist <= 1.0
        if blob.clipped or (labels[box][mask] == 0).any() or (lesion_labels[box][dist <= 1.5] > 0).any():
            continue  # reaching out of the body or the grid, or touching an earlier lesion
        host_mask = candidates[box] & mask
        if host_mask.sum() < 0.5 * mask.sum():
            continue  # mostly outside its host organ: draw again
        host_name = host[0] if site != "soft_tissue" else "muscle"
        contrast = float(rng.uniform(2.0, 10.0))
        suv = contrast * organ_suv[host_name]
        # Partial volume: a one-voxel linear ramp at the edge (in units of the mean voxel side).
        edge = diameter / 2 * float(blob.axes.mean()) / float(vox.mean())
        weight = np.clip((1.0 - dist) * edge + 0.5, 0.0, 1.0) * (labels[box] > 0)  # no activity in air
        region = activity_suv[box]
        region[...] = region * (1 - weight) + suv * weight
        label = len(lesions) + 1
        lesion_labels[box][mask] = label
        lesions.append(
            Lesion(
                label=label,
                center_mm=tuple(float(c * s) for c, s in zip(centre, vox, strict=True)),
                diameter_mm=round(diameter, 2),
                organ=site,
                contrast=round(contrast, 3),
                suv=round(suv, 3),
            )
        )
        _paint_ct(rng, ct, box, mask, site)
    return lesion_labels, lesions


@dataclass(frozen=True)
class _Blob:
    """A drawn lesion shape: its ``box`` in the volume, the normalised distance ``dist`` (≤ 1 inside)
    over the box, its axes' stretch, and whether the volume's edge ``clipped`` the box."""

    box: tuple[slice, ...]
    dist: np.ndarray
    diameter: float
    axes: np.ndarray
    clipped: bool


def _draw_blob(
    rng: np.random.Generator, centre: np.ndarray, vox: np.ndarray, shape: tuple[int, ...]
) -> _Blob:
    """An ellipsoid at ``centre`` (voxels) of log-uniform 4–30 mm equivalent-sphere diameter."""
    diameter = float(math.exp(rng.uniform(math.log(4.0), math.log(30.0))))
    radius = diameter / 2
    axes = rng.uniform(0.8, 1.25, size=3)
    axes /= np.prod(axes) ** (1 / 3)  # equivalent-sphere diameter stays ``diameter``
    reach = np.ceil(radius * axes.max() / vox + 1).astype(int)
    lo = np.maximum(centre - reach, 0)
    hi = np.minimum(centre + reach + 1, shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    offs = [((np.arange(lo[i], hi[i]) - centre[i]) * vox[i] / (radius * axes[i])) for i in range(3)]
    dist = np.sqrt(offs[0][:, None, None] ** 2 + offs[1][None, :, None] ** 2 + offs[2][None, None, :] ** 2)
    clipped = any(lo[i] > centre[i] - reach[i] or hi[i] < centre[i] + reach[i] + 1 for i in range(3))
    return _Blob(box, dist, diameter, axes, clipped)


def _paint_ct(
    rng: np.random.Generator, ct: np.ndarray, box: tuple[slice, ...], mask: np.ndarray, site: str
) -> None:
    """The lesion's CT appearance, in place: a nodule in lung, lytic or sclerotic in bone, else a shift."""
    if site == "lung":
        ct[box][mask] = rng.uniform(20.0, 45.0)  # a soft-tissue nodule in air-filled lung
    elif site == "bone":
        ct[box][mask] = ct[box][mask] + rng.choice([-250.0, 300.0])  # lytic or sclerotic
    else:
        ct[box][mask] = ct[box][mask] + _LESION_HU[site]
