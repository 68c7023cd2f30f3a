"""Training data: SPET (+ CT) cases on the model's 2 mm grid, and random patches of them.

Sources (:func:`load_cases`), all SPET only, CT optional:

- a folder of simulated cases (``model.simulation.dataset``: ``DIR/case_*/arrays.npz + meta.json``);
- a folder of NIfTI files: ``DIR/NAME/pet.nii[.gz]`` (+ ``ct.nii[.gz]``), or flat
  ``DIR/NAME_pet.nii[.gz]`` (+ ``NAME_ct.nii[.gz]``); the CT is resampled onto the PET;
- a folder of DICOM studies, one sub-folder each, read by a loader the caller passes in
  (``model/`` never imports pydicom; the CLI passes one built on ``dicomnode.volume``).

Everything is resampled to isotropic ``spacing_mm`` (2 mm) with SimpleITK, as the enhancer does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from model.grid import AIR_HU, resample_isotropic

__all__ = [
    "DicomLoader",
    "TrainingCase",
    "body_candidates",
    "body_mask",
    "fixed_scale_bqml",
    "load_cases",
    "pad_to",
    "random_patch_origin",
]

log = logging.getLogger(__name__)

#: ``loader(folder) -> (pet, ct | None[, acquisition])``: PET in Bq/ml and CT in HU (already on the
#: PET grid or not). ``acquisition``, plain data so that ``model/`` needs no DICOM reader, is what the
#: headers say: ``{"recon": ReconSettings dict, "scanner": ScannerModel kwargs, "notes": [str]}``,
#: ``recon`` and ``scanner`` absent where they do not say (``dicomnode.pet_acquisition``).
DicomLoader = Callable[
    [Path], "tuple[sitk.Image, sitk.Image | None] | tuple[sitk.Image, sitk.Image | None, dict | None]"
]


@dataclass
class TrainingCase:
    """One SPET study on the training grid: ``pet`` Bq/ml and ``ct`` HU (or None), both ``(z, y, x)``."""

    name: str
    pet: np.ndarray
    ct: np.ndarray | None
    #: How the SPET was made, when known (simulated data): ``ReconSettings.to_dict()`` and
    #: ``ScannerModel.to_dict()``. Perturbation then reproduces that reconstruction and count level.
    recon: dict | None = None
    scanner: dict | None = None
    #: The ``(z, y, x)`` voxel size (mm) the SPET was reconstructed at, for a site's own images
    #: (NIfTI, DICOM): training then makes its LPET on that grid, with ``recon`` and ``scanner``
    #: (from the headers where they say). None for simulated cases, made on the model grid, which
    #: training shows through random scanner styles.
    native_spacing_mm: tuple[float, float, float] | None = None
    #: The SPET's noiseless expectation on the training grid (simulated data only): where the noise
    #: index is matched to the latent noise, a scanner style's lower-dose image is made from it, so
    #: that its whole noise has that style's texture (``model.training.calibration``).
    expectation: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.pet.ndim != 3:
            raise ValueError(f"case {self.name}: PET must be 3D (z, y, x), found shape {self.pet.shape}")
        if self.ct is not None and self.ct.shape != self.pet.shape:
            raise ValueError(f"case {self.name}: CT shape {self.ct.shape} differs from PET {self.pet.shape}")


def _resample_image(image: sitk.Image, target_mm: float, *, default: float) -> np.ndarray:
    sx, sy, sz = image.GetSpacing()
    return resample_isotropic(sitk.GetArrayFromImage(image), (sz, sy, sx), target_mm, default=default)


def _ct_on_pet(ct: sitk.Image, pet: sitk.Image) -> sitk.Image:
    same = (
        ct.GetSize() == pet.GetSize()
        and np.allclose(ct.GetSpacing(), pet.GetSpacing(), atol=1e-3)
        and np.allclose(ct.GetOrigin(), pet.GetOrigin(), atol=1e-3)
    )
    if same:
        return ct
    return sitk.Resample(ct, pet, sitk.Transform(), sitk.sitkLinear, AIR_HU, sitk.sitkFloat32)


def _case_from_images(
    name: str, pet: sitk.Image, ct: sitk.Image | None, target_mm: float, acquisition: dict | None = None
) -> TrainingCase:
    """``acquisition`` (a :data:`DicomLoader`'s third value) gives the case its recon and scanner."""
    pet_arr = _resample_image(pet, target_mm, default=0.0)
    ct_arr = None
    if ct is not None:
        ct_arr = _resample_image(_ct_on_pet(ct, pet), target_mm, default=AIR_HU)
    sx, sy, sz = pet.GetSpacing()
    acquisition = acquisition or {}
    return TrainingCase(
        name,
        np.clip(pet_arr, 0.0, None),
        ct_arr,
        recon=acquisition.get("recon"),
        scanner=acquisition.get("scanner"),
        native_spacing_mm=(sz, sy, sx),
    )


def _log_acquisition(index: int, case: TrainingCase, acquisition: dict | None) -> None:
    # The folder's index, not its name: study folders are often named after the patient.
    from model.physics import ReconSettings  # torch: only where DICOM cases are loaded

    recon, duration = case.recon, (case.scanner or {}).get("frame_duration_s")
    fields = {
        "case": index,
        # The label of the settings training will use (and a ValueError here, not mid-training,
        # when a loader's recon is not valid ReconSettings).
        "recon": f"{ReconSettings.from_dict(recon).name} (headers)" if recon else "default",
        "frame_duration_s": f"{duration:g} (headers)" if duration is not None else "default",
        "native_spacing_mm": "x".join(f"{v:g}" for v in case.native_spacing_mm or ()),
        "notes": "; ".join((acquisition or {}).get("notes") or ()) or "none",
    }
    log.info("DICOM case acquisition", extra={"fields": fields})


def _nifti_pairs(root: Path) -> list[tuple[str, Path, Path | None]]:
    pairs = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        pet = next((sub / n for n in ("pet.nii.gz", "pet.nii") if (sub / n).is_file()), None)
        if pet is not None:
            ct = next((sub / n for n in ("ct.nii.gz", "ct.nii") if (sub / n).is_file()), None)
            pairs.append((sub.name, pet, ct))
    for pet in sorted(root.glob("*_pet.nii*")):
        stem = pet.name.split("_pet.nii")[0]
        ct = next(
            (root / f"{stem}_ct{ext}" for ext in (".nii.gz", ".nii") if (root / f"{stem}_ct{ext}").is_file()),
            None,
        )
        pairs.append((stem, pet, ct))
    return pairs


def _dicom_folders(root: Path) -> list[Path]:
    return [p for p in sorted(root.iterdir()) if p.is_dir() and any(f.is_file() for f in p.rglob("*"))]


def load_cases(
    root: str | Path,
    *,
    spacing_mm: float = 2.0,
    dicom_loader: DicomLoader | None = None,
    need_ct: bool = False,
    shard: tuple[int, int] = (0, 1),
) -> list[TrainingCase]:
    """Every case under ``root`` (simulated, NIfTI or DICOM, in that order of detection).

    ``shard = (rank, world)`` keeps every ``world``-th case starting at ``rank`` (DDP). With
    ``need_ct`` a case without CT is an error (the CT variants train on CT). Raises ``ValueError``
    when ``root`` holds no usable case.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"training data folder {root} does not exist")
    rank, world = shard
    cases: list[TrainingCase] = []

    simulated: list[Path] = []
    if any(root.glob("*/arrays.npz")):
        from model.simulation import dataset  # the simulator's on-disk format

        simulated = list(dataset.list_cases(root))
    if simulated:
        for path in simulated[rank::world]:
            case = dataset.load_case(path)
            pet = resample_isotropic(case.spet_bqml, case.spacing_mm, spacing_mm)
            ct = resample_isotropic(case.ct_hu, case.spacing_mm, spacing_mm, default=AIR_HU)
            meta = case.meta
            expectation = resample_isotropic(case.expectation_bqml, case.spacing_mm, spacing_mm)
            cases.append(
                TrainingCase(
                    Path(path).name, np.clip(pet, 0.0, None), ct, meta.get("recon"), meta.get("scanner"),
                    expectation=expectation.astype(np.float32),
                )
            )
        source = "simulated"
    elif pairs := _nifti_pairs(root):
        for name, pet_path, ct_path in pairs[rank::world]:
            pet = sitk.ReadImage(str(pet_path), sitk.sitkFloat32)
            ct = sitk.ReadImage(str(ct_path), sitk.sitkFloat32) if ct_path is not None else None
            cases.append(_case_from_images(name, pet, ct, spacing_mm))
        source = "nifti"
    else:
        folders = _dicom_folders(root)
        if not folders:
            raise ValueError(f"{root} holds no simulated case, NIfTI pair or DICOM study folder")
        if dicom_loader is None:
            raise ValueError(f"{root} holds DICOM folders but no DICOM loader was given")
        for index, folder in list(enumerate(folders))[rank::world]:
            pet, ct, *rest = dicom_loader(folder)
            acquisition = rest[0] if rest else None
            cases.append(_case_from_images(folder.name, pet, ct, spacing_mm, acquisition))
            _log_acquisition(index, cases[-1], acquisition)
        source = "dicom"
    if not cases:
        raise ValueError(f"{root}: no case for rank {rank} of {world}; give at least {world} cases")
    if need_ct:
        missing = [c.name for c in cases if c.ct is None]
        if missing:
            raise ValueError(f"a CT variant needs CT for every case; {len(missing)} case(s) have none")
    log.info("training data loaded", extra={"fields": {"source": source, "cases": len(cases), "rank": rank}})
    return cases


def body_mask(pet: np.ndarray, fraction: float = 0.05) -> np.ndarray:
    """Voxels above ``fraction`` of the 99.9th percentile: the patient, not the air around."""
    top = float(np.percentile(pet, 99.9))
    return pet > fraction * top if top > 0 else np.zeros(pet.shape, dtype=bool)


def fixed_scale_bqml(cases: Sequence[TrainingCase]) -> tuple[float, float]:
    """``(sum, count)`` of per-case median body activity (Bq/ml); the fixed scale is sum / count.

    Returned as a sum so DDP ranks can all-reduce before dividing. The median body activity is
    close to SUV 1 for FDG, so normalised images read like SUVs.
    """
    total = 0.0
    for case in cases:
        mask = body_mask(case.pet)
        total += float(np.median(case.pet[mask])) if mask.any() else float(case.pet.mean())
    return total, float(len(cases))


def body_candidates(pet: np.ndarray, *, stride: int = 4) -> np.ndarray:
    """Flat indices of body voxels on a ``stride`` sub-grid: cheap centres for body-weighted patches."""
    mask = np.zeros(pet.shape, dtype=bool)
    sub = (slice(None, None, stride),) * 3
    mask[sub] = body_mask(pet)[sub]
    return np.flatnonzero(mask)


def random_patch_origin(
    shape: Sequence[int],
    patch: Sequence[int],
    rng: np.random.Generator,
    *,
    candidates: np.ndarray | None = None,
) -> tuple[int, int, int]:
    """A patch corner inside ``shape`` (which must be ≥ ``patch``).

    With ``candidates`` (flat voxel indices, e.g. from :func:`body_candidates`) the patch is centred
    on one of them, clipped to the volume; otherwise the corner is uniform.
    """
    if any(p > s for p, s in zip(patch, shape, strict=True)):
        raise ValueError(f"patch {tuple(patch)} is larger than the volume {tuple(shape)}; pad first")
    if candidates is not None and candidates.size:
        centre = np.unravel_index(int(candidates[rng.integers(candidates.size)]), tuple(shape))
        corner = (min(max(c - p // 2, 0), s - p) for c, p, s in zip(centre, patch, shape, strict=True))
    else:
        corner = (rng.integers(0, s - p + 1) for s, p in zip(shape, patch, strict=True))
    z, y, x = (int(v) for v in corner)
    return z, y, x


def pad_to(array: np.ndarray, shape: Sequence[int], value: float) -> np.ndarray:
    """Pad ``array`` symmetrically with ``value`` to at least ``shape`` (never crops)."""
    pads = []
    for n, m in zip(array.shape, shape, strict=True):
        extra = max(m - n, 0)
        pads.append((extra // 2, extra - extra // 2))
    if not any(a or b for a, b in pads):
        return array
    return np.pad(array, pads, mode="constant", constant_values=value)
