"""Does the CT cover the patient? The rule that decides whether the CT-guided model runs on a study.

The PET's rectangular box is not the patient. Most PET/CT systems reconstruct the PET over a 52–70 cm
field of view and the CT over 50 cm, so a CT never covers the corners of the PET's box, yet it shows
the whole body. Coverage is therefore judged over the patient's body as the PET sees it:

- **Body mask** (:func:`body_mask`): the PET smoothed with a Gaussian of one voxel (σ), so that the
  speckle of a low-dose reconstruction in air does not count as body; voxels above
  :data:`BODY_THRESHOLD` (5 %) of the smoothed image's 99.5th percentile (a robust high level: the
  body's own uptake, not one hot voxel) are body; the mask is then opened (eroded and dilated by one
  voxel: specks that survive the smoothing go) and dilated by one more voxel to take in the skin.
  Large volumes are judged on every second (third, …) voxel along each axis, keeping the work near
  :data:`_MAX_JUDGED_VOXELS` voxels.
- **Rule** (:func:`judge_ct`): the CT is used when at least :data:`MIN_AXIAL_COVERAGE` (99 %) of the
  body's voxels lie within the CT's axial range (its first to last slice, half a slice beyond each)
  and at least :data:`MIN_BODY_COVERAGE` (90 %) lie inside its whole field of view. The first catches
  a CT that stops short of the patient (the model would see air over part of the body); the second
  leaves room for the arms that a 50 cm CT cuts at its edge.

Outside the CT's field of view the model is given air, −1000 HU (``CT_OUTSIDE_HU``): the value
training pads a CT with (``model.grid.AIR_HU``), so it reads as "no tissue here", never as a guess.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

__all__ = [
    "BODY_THRESHOLD",
    "CT_OUTSIDE_HU",
    "CtCoverage",
    "MIN_AXIAL_COVERAGE",
    "MIN_BODY_COVERAGE",
    "body_mask",
    "judge_ct",
]

#: Body = smoothed PET above this fraction of its 99.5th percentile.
BODY_THRESHOLD = 0.05
_BODY_PERCENTILE = 99.5
#: The CT must span, axially, at least this fraction of the body's voxels.
MIN_AXIAL_COVERAGE = 0.99
#: And hold at least this fraction of them inside its field of view (arms cut by a 50 cm CT: allowed).
MIN_BODY_COVERAGE = 0.9
#: What the model sees outside the CT's field of view: air, as in training (model.grid.AIR_HU).
CT_OUTSIDE_HU = -1000.0
# About 128³: the mask's percentile, smoothing and dilation stay well under a second.
_MAX_JUDGED_VOXELS = 2_000_000


@dataclass(frozen=True)
class CtCoverage:
    """How much of the patient's body (PET voxels) a CT holds; :attr:`refusal` says whether it is used.

    ``axial``: fraction of body voxels within the CT's axial range; ``inside``: fraction inside its
    field of view on all three axes; ``body_voxels``: how many voxels were judged (0: no body found, then
    the fractions are over the PET's whole box).
    """

    axial: float
    inside: float
    body_voxels: int

    @property
    def refusal(self) -> str | None:
        """Why the CT is not used (a sentence for the job, the log and the derived series), or None."""
        where = "of the patient's body" if self.body_voxels else "of the PET volume (no body found in it)"
        if self.axial < MIN_AXIAL_COVERAGE:
            return (f"the CT's axial range holds {self.axial:.0%} {where}, at least "
                    f"{MIN_AXIAL_COVERAGE:.0%} is needed (the CT is shorter than the PET)")
        if self.inside < MIN_BODY_COVERAGE:
            return (f"the CT's field of view holds {self.inside:.0%} {where}, at least "
                    f"{MIN_BODY_COVERAGE:.0%} is needed")
        return None


def _stride(shape: tuple[int, ...]) -> int:
    """Voxels stepped over along each axis so that about _MAX_JUDGED_VOXELS are judged."""
    return max(1, int(np.ceil((float(np.prod(shape)) / _MAX_JUDGED_VOXELS) ** (1 / 3))))


def body_mask(pet_bqml: np.ndarray) -> np.ndarray:
    """Boolean ``(z, y, x)`` mask of the patient's body in a PET array (Bq/ml); see the module doc."""
    smoothed = ndimage.gaussian_filter(np.asarray(pet_bqml, dtype=np.float32), sigma=1.0)
    level = float(np.percentile(smoothed, _BODY_PERCENTILE))
    if not np.isfinite(level) or level <= 0:
        return np.zeros(smoothed.shape, dtype=bool)
    mask = ndimage.binary_erosion(smoothed > BODY_THRESHOLD * level, iterations=1)
    return ndimage.binary_dilation(mask, iterations=2)


def _continuous_index(points: np.ndarray, image: sitk.Image) -> np.ndarray:
    """(n, 3) patient points (LPS, mm) → continuous (x, y, z) voxel indices of ``image``."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return ((points - np.array(image.GetOrigin())) @ direction) / np.array(image.GetSpacing())


def judge_ct(pet: sitk.Image, ct: sitk.Image) -> CtCoverage:
    """How much of the body in ``pet`` (Bq/ml) lies inside ``ct``; both in one Frame of Reference."""
    array = sitk.GetArrayViewFromImage(pet)
    step = _stride(array.shape)
    sampled = np.asarray(array[::step, ::step, ::step])
    mask = body_mask(sampled)
    body_voxels = int(mask.sum())
    if body_voxels == 0:
        mask = np.ones(sampled.shape, dtype=bool)  # nothing above background: judge the whole box
    zyx = np.argwhere(mask).astype(np.float64) * step
    direction = np.array(pet.GetDirection()).reshape(3, 3)
    points = np.array(pet.GetOrigin()) + (zyx[:, ::-1] * np.array(pet.GetSpacing())) @ direction.T
    index = _continuous_index(points, ct)
    upper = np.array(ct.GetSize(), dtype=np.float64) - 0.5
    within = (index >= -0.5) & (index <= upper)
    axial = float(within[:, 2].mean())
    inside = float(within.all(axis=1).mean())
    return CtCoverage(axial=axial, inside=inside, body_voxels=body_voxels)
