"""The Enhancer: the one door between the DICOM node and the model.

The node hands a PET volume in Bq/ml (and, if it has one, the CT in HU already resampled onto the PET
grid) as SimpleITK images with their geometry, and gets the enhanced PET back in Bq/ml on the same grid.
Nothing here knows DICOM; nothing in the node knows torch.

Array convention inside the model: numpy ``float32`` in ``(z, y, x)`` order with ``spacing_mm`` given
as ``(z, y, x)`` too. SimpleITK images are ``(x, y, z)`` in their API; :meth:`Enhancer.enhance` converts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

__all__ = [
    "Enhancer",
    "EnhancerInfo",
    "GaussianEnhancer",
    "Progress",
    "load_enhancer",
]

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


class GaussianEnhancer(Enhancer):
    """Classical fallback: an isotropic Gaussian filter of ``fwhm_mm``. Preserves total activity."""

    def __init__(self, *, fwhm_mm: float = 6.0) -> None:
        if fwhm_mm <= 0:
            raise ValueError(f"fwhm_mm must be positive, found {fwhm_mm}")
        self.fwhm_mm = fwhm_mm
        self.info = EnhancerInfo(
            name="Gaussian filter",
            version=f"fwhm{fwhm_mm:g}mm",
            description=f"Gaussian filter, FWHM {fwhm_mm:g} mm (classical fallback, not uPETe)",
            uses_ct=False,
            requires_ct=False,
        )

    def enhance_array(self, pet_bqml, ct_hu=None, *, spacing_mm, progress=None):
        from scipy.ndimage import gaussian_filter

        sigma_vox = [self.fwhm_mm / 2.3548 / s for s in spacing_mm]
        if progress:
            progress(0.0, "gaussian")
        # mode="constant" would leak activity out at the edges; "nearest" keeps the total close.
        out = gaussian_filter(pet_bqml.astype(np.float32), sigma=sigma_vox, mode="nearest")
        if progress:
            progress(1.0, "gaussian")
        return out.astype(np.float32)


def load_enhancer(
    spec: str,
    *,
    device: str = "auto",
    steps: int | None = None,
    dose_fraction: float | None = None,
    seed: int = 0,
) -> Enhancer:
    """Build the enhancer a config names.

    ``spec`` is ``"classical:gaussian"`` (optionally ``"classical:gaussian:FWHM_MM"``) or the path of a
    ``.safetensors`` checkpoint with its JSON config beside it: a uPETe diffusion model, or the
    supervised reference U-Net when the JSON says ``"kind": "supervised"`` (``steps``,
    ``dose_fraction`` and ``seed`` do not apply to it).
    """
    if spec.startswith("classical:"):
        parts = spec.split(":")
        if parts[1] != "gaussian" or len(parts) > 3:
            raise ValueError(f"unknown classical enhancer {spec!r}; known: classical:gaussian[:FWHM_MM]")
        return GaussianEnhancer(fwhm_mm=float(parts[2])) if len(parts) == 3 else GaussianEnhancer()
    path = Path(spec)
    if path.suffix != ".safetensors":
        raise ValueError(f"a model checkpoint must be a .safetensors file, found {spec!r}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {spec} does not exist")
    # Imported here: torch and the networks load only when a model checkpoint is asked for.
    if _checkpoint_kind(path) == "supervised":
        from model.supervised import load_supervised_enhancer

        return load_supervised_enhancer(path, device=device)  # trained at one dose: no t*, no sampler
    from model.latent_enhancer import load_diffusion_enhancer

    return load_diffusion_enhancer(path, device=device, steps=steps, dose_fraction=dose_fraction, seed=seed)


def _checkpoint_kind(path: Path) -> str | None:
    """The ``kind`` in a checkpoint's JSON config (None when absent or unreadable: a diffusion model)."""
    import json

    try:
        data = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None  # the diffusion loader reports a missing or broken config in its own words
    return data.get("kind") if isinstance(data, dict) else None
