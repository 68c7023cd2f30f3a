"""Resampling between a volume's own grid and the model's isotropic grid (SimpleITK, linear).

Arrays are ``(z, y, x)`` with ``spacing_mm`` ``(z, y, x)``; the isotropic grid covers the same physical
extent (outer voxel edges kept, centred), so going there and back leaves a smooth image unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

__all__ = [
    "AIR_HU",
    "Box",
    "ModelGrid",
    "array_image",
    "bounding_box",
    "empty_grid",
    "isotropic_reference",
    "resample_isotropic",
    "resample_onto",
]

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
    # ITK's origin is the first voxel's centre: both grids start at the same edge, o − s/2, so the
    # first target centre sits at o − (s − t)/2; the last term centres the rounding of the size.
    origin = [
        o - (s - target_mm) / 2 + (n * s - m * target_mm) / 2
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


Box = tuple[slice, slice, slice]


def bounding_box(mask: np.ndarray) -> tuple[tuple[int, int], ...] | None:
    """``(lo, hi)`` (hi exclusive) per axis of the True voxels of ``mask``, or None when it has none."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hits.size == 0:
            return None
        box.append((int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def empty_grid(box: Box, spacing_mm: Sequence[float], origin_mm: Sequence[float]) -> sitk.Image:
    """An empty image of the voxels ``box`` of a grid of ``spacing_mm`` and ``origin_mm`` (z, y, x)."""
    image = sitk.Image([b.stop - b.start for b in reversed(box)], sitk.sitkFloat32)
    image.SetSpacing(tuple(float(s) for s in reversed(tuple(spacing_mm))))
    corner = [o + b.start * s for o, b, s in zip(origin_mm, box, spacing_mm, strict=True)]
    image.SetOrigin(tuple(reversed(corner)))
    return image


class ModelGrid:
    """One PET array's way onto the model's isotropic grid and back, shared by the model enhancers.

    Where the array already has ``target_mm`` spacing the way is the identity (no interpolation).

    With ``body`` (a mask on the PET's grid: what the enhancer would run a tile for), the model grid
    covers only the bounding box of ``body`` widened by ``margin`` model voxels per axis, its start
    on the whole field of view's model grid at a multiple of ``align`` voxels: a tiling anchored at
    0 with that stride then meets the same tiles, and with a margin of at least a tile (plus the
    reach of any filter after the tiles) every voxel of the body comes out as without the crop.
    A total-body field of view is mostly air around the patient; the crop keeps the volume-sized
    arrays of inference to the patient's size. Beyond the box :meth:`back` returns ``outside``
    (the enhancers pass their input: what they keep for tiles of air).
    """

    def __init__(
        self,
        pet_bqml: np.ndarray,
        spacing_mm: Sequence[float],
        target_mm: float,
        *,
        body: np.ndarray | None = None,
        margin: Sequence[int] = (0, 0, 0),
        align: Sequence[int] = (1, 1, 1),
    ) -> None:
        if body is not None and body.shape != pet_bqml.shape:
            raise ValueError(f"body mask shape {body.shape} differs from PET shape {pet_bqml.shape}")
        self.shape = tuple(pet_bqml.shape)
        self.spacing_mm = tuple(float(s) for s in spacing_mm)
        self.target_mm = float(target_mm)
        self.image = array_image(pet_bqml, self.spacing_mm)
        self.reference = isotropic_reference(self.image, self.target_mm)
        self.same = all(abs(s - self.target_mm) < 1e-6 for s in self.spacing_mm)
        #: The crop on the model grid and the PET voxels it fills on the way back (None: no crop).
        self.box: Box | None = None
        self.pet_box: Box | None = None
        limits = bounding_box(body) if body is not None else None
        if limits is not None:
            self._crop(limits, margin, align)

    def _crop(self, limits: tuple[tuple[int, int], ...], margin: Sequence[int], align: Sequence[int]) -> None:
        """Narrow :attr:`reference` to ``limits`` (PET voxels) widened by ``margin`` model voxels."""
        t = self.target_mm
        size = tuple(reversed(self.reference.GetSize()))  # (z, y, x), as the arrays
        origin = tuple(reversed(self.reference.GetOrigin()))  # the PET image's origin is 0
        model, pet = [], []
        for (lo, hi), s, o, n_model, n_pet, m, a in zip(
            limits, self.spacing_mm, origin, size, self.shape, margin, align, strict=True
        ):
            # The model voxels that overlap the PET voxels lo..hi-1, widened, the start aligned.
            first = math.floor(((lo - 0.5) * s - o) / t) - m
            first = max(0, first // a * a)
            last = min(n_model, math.ceil(((hi - 0.5) * s - o) / t) + 1 + m)
            model.append(slice(first, last))
            # The PET voxels whose centres lie between the crop's first and last voxel centres
            # (to the PET's own edge where the crop reaches the model grid's edge, as without a crop).
            pet_lo = 0 if first == 0 else math.ceil((o + first * t) / s - 1e-6)
            pet_hi = n_pet if last == n_model else math.floor((o + (last - 1) * t) / s + 1e-6) + 1
            pet.append(slice(max(0, pet_lo), min(n_pet, pet_hi)))
        if all(b.start == 0 and b.stop == n for b, n in zip(model, size, strict=True)):
            return  # the body fills the field of view: nothing to crop
        self.box, self.pet_box = tuple(model), tuple(pet)  # type: ignore[assignment]
        self.reference = empty_grid(self.box, (t,) * 3, origin)

    def onto(self, array: np.ndarray, *, default: float) -> np.ndarray:
        """``array`` (on the PET's grid) on the model's grid; ``default`` outside the PET's extent."""
        if self.same:
            return array if self.box is None else np.ascontiguousarray(array[self.box])
        return resample_onto(array_image(array, self.spacing_mm), self.reference, default=default)

    def back(self, array: np.ndarray, *, outside: np.ndarray | None = None) -> np.ndarray:
        """An array on the model's grid back on the PET's grid (0 beyond the model grid's extent).

        With a crop, PET voxels beyond it hold ``outside`` (an array on the PET's grid; None: 0).
        """
        if self.pet_box is None:
            return array if self.same else self._resample_back(array, self.image)
        if outside is None:
            out = np.zeros(self.shape, dtype=np.float32)
        else:
            out = np.array(outside, dtype=np.float32, copy=True)
        if self.same:
            out[self.pet_box] = array
            return out
        out[self.pet_box] = self._resample_back(array, empty_grid(self.pet_box, self.spacing_mm, (0.0,) * 3))
        return out

    def _resample_back(self, array: np.ndarray, onto: sitk.Image) -> np.ndarray:
        image = array_image(array, (self.target_mm,) * 3)
        image.SetOrigin(self.reference.GetOrigin())
        return resample_onto(image, onto, default=0.0)
