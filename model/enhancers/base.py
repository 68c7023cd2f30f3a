"""The Enhancer contract: volume in, volume out, in Bq/ml, on the volume's own grid.

The node hands a PET volume in Bq/ml (and, if it has one, the CT in HU already resampled onto the PET
grid) as SimpleITK images with their geometry, and gets the enhanced PET back in Bq/ml on the same grid.
Nothing here knows DICOM or torch.

Array convention inside the model: numpy ``float32`` in ``(z, y, x)`` order with ``spacing_mm`` given
as ``(z, y, x)`` too. SimpleITK images are ``(x, y, z)`` in their API; :meth:`Enhancer.enhance` converts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

__all__ = ["Enhancer", "EnhancerInfo", "Progress"]

#: ``progress(fraction_done, stage)``: called with 0 ≤ fraction ≤ 1 and a short stage name.
Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class EnhancerInfo:
    """What the node records about the algorithm in the derived series and the logs."""

    name: str  # e.g. "uPETe LDM-P-CT" or "Gaussian filter"
    version: str  # model or algorithm version, e.g. checkpoint hash
    description: str  # one line for DerivationDescription
    uses_ct: bool  # the enhancer looks at the CT when one is given
    requires_ct: bool  # the enhancer cannot run without a CT


class Enhancer(ABC):
    """Volume in, volume out, in Bq/ml. Implementations override :meth:`enhance_array`."""

    info: EnhancerInfo

    @abstractmethod
    def enhance_array(
        self,
        pet_bqml: np.ndarray,
        ct_hu: np.ndarray | None = None,
        *,
        spacing_mm: tuple[float, float, float],
        progress: Progress | None = None,
    ) -> np.ndarray:
        """Enhance a ``(z, y, x)`` PET array in Bq/ml; ``ct_hu`` (same shape) is on the PET grid.

        Returns a float32 array of the same shape in Bq/ml.
        """

    def enhance(
        self,
        pet: sitk.Image,
        ct: sitk.Image | None = None,
        *,
        progress: Progress | None = None,
    ) -> sitk.Image:
        """Enhance a PET image (Bq/ml); ``ct`` (HU), if given, must share the PET grid."""
        if pet.GetDimension() != 3:
            raise ValueError(f"expected a 3D PET image, found {pet.GetDimension()}D")
        if ct is not None and (ct.GetSize() != pet.GetSize() or not _same_grid(ct, pet)):
            raise ValueError(
                f"the CT must be resampled onto the PET grid first: CT size {ct.GetSize()}, "
                f"PET size {pet.GetSize()}"
            )
        if self.info.requires_ct and ct is None:
            raise ValueError(f"{self.info.name} needs a CT and none was given")
        pet_array = sitk.GetArrayFromImage(pet).astype(np.float32, copy=False)
        ct_array = sitk.GetArrayFromImage(ct).astype(np.float32, copy=False) if ct is not None else None
        sx, sy, sz = pet.GetSpacing()
        result = self.enhance_array(
            pet_array, ct_array if self.info.uses_ct else None, spacing_mm=(sz, sy, sx), progress=progress
        )
        if result.shape != pet_array.shape:
            raise RuntimeError(f"{self.info.name} returned shape {result.shape}, expected {pet_array.shape}")
        out = sitk.GetImageFromArray(np.ascontiguousarray(result, dtype=np.float32))
        out.CopyInformation(pet)
        return out


def _same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-3) -> bool:
    return (
        np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )
