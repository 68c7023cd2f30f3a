"""Resampling between a volume's own grid and the model's isotropic grid (SimpleITK, linear).

Arrays are ``(z, y, x)`` with ``spacing_mm`` ``(z, y, x)``; the isotropic grid covers the same physical
extent (outer voxel edges kept, centred), so going there and back leaves a smooth image unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

__all__ = ["AIR_HU", "ModelGrid", "array_image", "isotropic_reference", "resample_isotropic", "resample_onto"]

#: What the CT holds outside its field of view and beyond the volume, in training and at inference alike.
AIR_HU = -1000.0


def array_image(array: np.ndarray, spacing_mm: Sequence[float]) -> sitk.Image:
    """A float32 SimpleITK image of a ``(z, y, x)`` array, origin 0, identity direction."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    image.SetSpacing(tuple(float(s) for s in reversed(tuple(spacing_mm))))
    return image


def isotropic_reference(image: sitk.Image, target_mm: float) -> sitk.Image:
    """An empty image on a ``target_mm`` isotropic grid covering ``image``'s extent."""
    extent = zip(image.GetSize(), image.GetSpacing(), strict=True)
    size = [max(1, int(round(n * s / target_mm))) for n, s in extent]
    origin = [
        o + (s - target_mm) / 2 + (n * s - m * target_mm) / 2
        for o, s, n, m in zip(image.GetOrigin(), image.GetSpacing(), image.GetSize(), size, strict=True)
    ]
    reference = sitk.Image(size, sitk.sitkFloat32)
    reference.SetSpacing((target_mm,) * 3)
    reference.SetOrigin(origin)
    reference.SetDirection(image.GetDirection())
    return reference


def resample_onto(image: sitk.Image, reference: sitk.Image, *, default: float) -> np.ndarray:
    """``image`` linearly resampled onto ``reference``'s grid, as a ``(z, y, x)`` float32 array."""
    out = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, default, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def resample_isotropic(
    array: np.ndarray, spacing_mm: Sequence[float], target_mm: float, *, default: float = 0.0
) -> np.ndarray:
    """``array`` on the isotropic ``target_mm`` grid (returned as is when already there)."""
    if all(abs(float(s) - target_mm) < 1e-6 for s in spacing_mm):
        return np.asarray(array, dtype=np.float32)
    image = array_image(array, spacing_mm)
    return resample_onto(image, isotropic_reference(image, target_mm), default=default)


class ModelGrid:
    """One PET array's way onto the model's isotropic grid and back, shared by the model enhancers.

    Where the array already has ``target_mm`` spacing the way is the identity (no interpolation).
    """

    def __init__(self, pet_bqml: np.ndarray, spacing_mm: Sequence[float], target_mm: float) -> None:
        self.spacing_mm = tuple(float(s) for s in spacing_mm)
        self.target_mm = float(target_mm)
        self.image = array_image(pet_bqml, self.spacing_mm)
        self.reference = isotropic_reference(self.image, self.target_mm)
        self.same = all(abs(s - self.target_mm) < 1e-6 for s in self.spacing_mm)

    def onto(self, array: np.ndarray, *, default: float) -> np.ndarray:
        """``array`` (on the PET's grid) on the model's grid; ``default`` outside the PET's extent."""
        if self.same:
            return array
        return resample_onto(array_image(array, self.spacing_mm), self.reference, default=default)

    def back(self, array: np.ndarray) -> np.ndarray:
        """An array on the model's grid back on the PET's grid (0 outside)."""
        if self.same:
            return array
        image = array_image(array, (self.target_mm,) * 3)
        image.SetOrigin(self.reference.GetOrigin())
        return resample_onto(image, self.image, default=0.0)
