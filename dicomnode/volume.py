"""DICOM series ↔ SimpleITK image: the node's only reader of pixel data.

:func:`load_series` turns the files of one single-frame series (PET or CT) into a 3D image in
physical units — Bq/ml for PET decay corrected to the series start (whatever Units and
DecayCorrection the scanner wrote: :mod:`dicomnode.pet_units`), HU for CT — with the geometry of
the DICOM patient coordinate system (LPS, mm), and keeps the headers sorted like the image's z
axis. Anything that would make the geometry a guess is refused with :class:`VolumeError`, whose
message is the reason a job fails: uneven or missing slices, mixed orientations or sizes, two
slices at one position.

Image axes: x along the row direction (column index), y along the column direction (row index),
z along the slice normal ``row × column``; slices are sorted by their position along that normal,
not by InstanceNumber. Direction cosines are the columns of the SimpleITK direction matrix.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicomnode.pet_units import ActivityError, normalise_activity

__all__ = [
    "MAX_EXTENT_MM",
    "SeriesVolume",
    "VolumeError",
    "load_series",
    "read_headers",
    "resample_onto",
]

log = logging.getLogger("upete.volume")

# Geometry tolerances. Scanners write positions with a few decimals; direction cosines with ~6.
_ORIENTATION_TOL = 1e-4
_SPACING_REL_TOL = 0.01  # 1 % of the slice spacing (and at least _SPACING_ABS_TOL)
_SPACING_ABS_TOL = 0.01  # mm
# Largest extent along any image axis. A whole-body PET/CT is < 2 m long and < 0.8 m across; a header
# claiming kilometres (PixelSpacing 1e6, slices 1e9 mm apart) would make every grid the model
# resamples onto (2 mm voxels) exhaust memory, so it is refused here with a reason instead.
MAX_EXTENT_MM = 3000.0


class VolumeError(Exception):
    """The series cannot be made into a volume; the message says why (it becomes the job's reason)."""


@dataclass
class SeriesVolume:
    """One series as an image plus its headers.

    ``image``: float32 SimpleITK image, Bq/ml for PET and HU for CT (whatever the rescale gives for
    other modalities), x/y/z as in the module doc. ``datasets``: the headers without PixelData, one
    per slice, in the image's z order; a PET's say what the image holds (Units, DecayCorrection,
    SeriesDate/Time and DecayFactor as :func:`dicomnode.pet_units.normalise_activity` set them).
    """

    image: sitk.Image
    datasets: list[Dataset]

    @property
    def modality(self) -> str:
        return str(self.datasets[0].get("Modality", ""))

    @property
    def series_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.datasets[0].get("FrameOfReferenceUID", ""))


def _read(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise VolumeError(f"{Path(path).name}: cannot read as DICOM: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a hostile file can make the parser raise anything
        raise VolumeError(f"{Path(path).name}: cannot read as DICOM ({type(exc).__name__})") from None


def read_headers(paths: Sequence[str | os.PathLike[str]]) -> list[Dataset]:
    """The headers (no pixels) of stored instances; VolumeError naming a file that is damaged.

    A spool file cut short (a disk fault, a copy gone wrong) parses as far as it goes; one without
    its SOP Instance UID or geometry is not the instance that was received.
    """
    headers = []
    for path in paths:
        name = Path(path).name
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            present = all(ds.get(k) not in (None, "") for k in ("SOPInstanceUID", "ImagePositionPatient"))
        except Exception as exc:  # noqa: BLE001 - a damaged file can make the parser raise anything
            raise VolumeError(f"{name}: cannot read as DICOM ({type(exc).__name__}): the file is damaged") \
                from None
        if not present:
            raise VolumeError(f"{name}: the header is incomplete (no SOP Instance UID or position): "
                              "the file is damaged")
        headers.append(ds)
    return headers


def _floats(ds: Dataset, keyword: str, count: int, name: str) -> np.ndarray:
    try:
        value = ds[keyword].value if keyword in ds else None
    except Exception:  # noqa: BLE001 - pydicom converts lazily and raises many types on bad values
        raise VolumeError(f"{name}: {keyword} is not numeric") from None
    if value is None or value == "":
        raise VolumeError(f"{name}: {keyword} is missing")
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    try:
        array = np.array([float(v) for v in values], dtype=float)
    except (TypeError, ValueError):
        raise VolumeError(f"{name}: {keyword} is not numeric") from None
    if array.size != count or not np.all(np.isfinite(array)):
        raise VolumeError(f"{name}: {keyword} must have {count} finite value(s), found {array.size}")
    return array


def _int(ds: Dataset, keyword: str, name: str, default: int | None = None) -> int:
    value = ds.get(keyword, None)
    if value is None or value == "":
        if default is None:
            raise VolumeError(f"{name}: {keyword} is missing")
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise VolumeError(f"{name}: {keyword} is not a number") from None
    if not math.isfinite(number) or number != int(number):
        raise VolumeError(f"{name}: {keyword} is not an integer")
    return int(number)


# Header attributes read after the per-file pass; parsed there once so later code meets only values.
_TOUCHED = ("SeriesInstanceUID", "Modality", "ImageOrientationPatient", "ImagePositionPatient",
            "PixelSpacing", "SliceThickness", "NumberOfSlices", "RescaleSlope", "RescaleIntercept")


def _read_slice(path: Path, name: str) -> tuple[Dataset, np.ndarray]:
    """One file: its header (PixelData dropped) and its pixels rescaled to float32."""
    ds = _read(path)
    try:
        for keyword in _TOUCHED:
            ds.get(keyword)
        frames = _int(ds, "NumberOfFrames", name, default=1)
        rows, columns = _int(ds, "Rows", name), _int(ds, "Columns", name)
        samples = _int(ds, "SamplesPerPixel", name, default=1)
    except VolumeError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for values it cannot convert
        raise VolumeError(f"{name}: header does not parse ({type(exc).__name__})") from None
    if frames > 1:
        raise VolumeError(f"{name}: multi-frame images are not supported (NumberOfFrames "
                          f"{frames}); send the classic single-frame series")
    if "SeriesInstanceUID" not in ds:
        raise VolumeError(f"{name}: SeriesInstanceUID is missing")
    if "PixelData" not in ds:
        raise VolumeError(f"{name}: PixelData is missing")
    if samples != 1:
        raise VolumeError(f"{name}: only grey-scale images are supported (SamplesPerPixel {samples})")
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for undecodable or truncated data
        raise VolumeError(f"{name}: cannot decode PixelData: {exc}") from None
    if pixels.shape != (rows, columns):
        raise VolumeError(f"{name}: PixelData has shape {pixels.shape}, Rows/Columns say {(rows, columns)}")
    slope, intercept = _rescale(ds, name)
    del ds.PixelData  # headers only from here on: the caller keeps the pixels
    return ds, pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _rescale(ds: Dataset, name: str) -> tuple[float, float]:
    slope = float(_floats(ds, "RescaleSlope", 1, name)[0]) if "RescaleSlope" in ds else 1.0
    intercept = float(_floats(ds, "RescaleIntercept", 1, name)[0]) if "RescaleIntercept" in ds else 0.0
    return slope, intercept


def _check_same(datasets: list[Dataset], names: list[str], keyword: str) -> None:
    first = datasets[0].get(keyword)
    for ds, name in zip(datasets[1:], names[1:], strict=True):
        if ds.get(keyword) != first:
            raise VolumeError(f"{keyword} differs within the series ({names[0]}: {first}, {name}: "
                              f"{ds.get(keyword)})")


def load_series(paths: Sequence[str | os.PathLike[str]]) -> SeriesVolume:
    """Read the single-frame images of one series into a :class:`SeriesVolume`.

    Each file is read once: its pixels are decoded, rescaled with its own RescaleSlope/Intercept and
    dropped from the header kept in ``datasets``. Raises :class:`VolumeError` when the files are not
    one series of equally oriented, equally sized, evenly spaced slices.
    """
    if not paths:
        raise VolumeError("no files given for the series")
    datasets: list[Dataset] = []
    names: list[str] = []
    slices: list[np.ndarray] = []
    for path in paths:
        name = Path(path).name
        ds, pixels = _read_slice(Path(path), name)
        slices.append(pixels)
        datasets.append(ds)
        names.append(name)

    for keyword in ("SeriesInstanceUID", "Modality", "Rows", "Columns"):
        _check_same(datasets, names, keyword)

    # Orientation: the same orthonormal row/column cosines on every slice.
    named = list(zip(datasets, names, strict=True))
    orientations = [_floats(ds, "ImageOrientationPatient", 6, n) for ds, n in named]
    row, col = orientations[0][:3], orientations[0][3:]
    if (abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3
            or abs(row @ col) > 1e-3):
        raise VolumeError(f"{names[0]}: ImageOrientationPatient is not two orthonormal directions")
    for orientation, name in zip(orientations[1:], names[1:], strict=True):
        if np.abs(orientation - orientations[0]).max() > _ORIENTATION_TOL:
            first, other = orientations[0].round(4).tolist(), orientation.round(4).tolist()
            raise VolumeError(f"mixed orientation in the series: {names[0]} has {first}, {name} has {other}")
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)

    spacings = [_floats(ds, "PixelSpacing", 2, n) for ds, n in named]
    for spacing, name in zip(spacings[1:], names[1:], strict=True):
        if np.abs(spacing - spacings[0]).max() > 1e-4:
            raise VolumeError(f"PixelSpacing differs within the series ({names[0]}: {spacings[0].tolist()}, "
                              f"{name}: {spacing.tolist()})")
    if np.any(spacings[0] <= 0):
        raise VolumeError(f"{names[0]}: PixelSpacing must be positive, found {spacings[0].tolist()}")

    # Sort along the slice normal, never by InstanceNumber.
    positions = np.array([_floats(ds, "ImagePositionPatient", 3, n) for ds, n in named])
    distance = positions @ normal
    order = np.argsort(distance, kind="stable")
    datasets = [datasets[i] for i in order]
    names = [names[i] for i in order]
    slices = [slices[i] for i in order]
    positions, distance = positions[order], distance[order]

    dz = _slice_spacing(datasets, names, positions, distance, normal)
    _check_slice_count(datasets, len(datasets))

    _check_extent(names[0], len(datasets), spacings[0], dz, int(datasets[0].Rows), int(datasets[0].Columns))
    volume = np.stack(slices)
    if datasets[0].get("Modality") == "PT":
        try:  # Philips counts, ADMIN/NONE decay correction → Bq/ml referred to the series start
            volume = normalise_activity(datasets, volume)
        except ActivityError as exc:
            raise VolumeError(str(exc)) from None
    image = sitk.GetImageFromArray(volume)
    row_spacing, column_spacing = (float(v) for v in spacings[0])
    image.SetSpacing((column_spacing, row_spacing, dz))
    image.SetOrigin(tuple(float(v) for v in positions[0]))
    image.SetDirection(tuple(float(v) for v in np.column_stack([row, col, normal]).ravel()))
    fields = {"series_uid": datasets[0].SeriesInstanceUID, "slices": len(datasets),
              "size": "x".join(map(str, image.GetSize()))}
    log.debug("series loaded", extra={"fields": fields})
    return SeriesVolume(image=image, datasets=datasets)


def _slice_spacing(datasets: list[Dataset], names: list[str], positions: np.ndarray, distance: np.ndarray,
                   normal: np.ndarray) -> float:
    """The one spacing between consecutive slices (mm), or VolumeError naming the first bad gap."""
    if len(datasets) == 1:
        # A single slice has no neighbour: its thickness is the best spacing there is.
        if "SliceThickness" not in datasets[0]:
            return 1.0
        thickness = float(_floats(datasets[0], "SliceThickness", 1, names[0])[0])
        return thickness if thickness > 0 else 1.0
    gaps = np.diff(distance)
    for i, gap in enumerate(gaps):
        if gap < _SPACING_ABS_TOL:
            raise VolumeError(f"two slices at the same position {distance[i]:.2f} mm along the normal "
                              f"({names[i]}, {names[i + 1]}): duplicate instances or several time frames")
    # Every position must lie on the line through the first along the normal (no shear, no gantry tilt).
    offsets = positions - positions[0] - np.outer(distance - distance[0], normal)
    worst = float(np.abs(offsets).max())
    if worst > max(0.05, 0.02 * float(np.median(gaps))):
        raise VolumeError(f"slice positions are not along the slice normal (offset up to {worst:.2f} mm): "
                          "gantry tilt or sheared geometry is not supported")
    spacing = float(np.median(gaps))
    tolerance = max(_SPACING_ABS_TOL, _SPACING_REL_TOL * spacing)
    bad = np.flatnonzero(np.abs(gaps - spacing) > tolerance)
    if bad.size:
        i = int(bad[0])
        ratio = gaps[i] / spacing
        missing = ratio > 1.5 and abs(ratio - round(ratio)) < 0.05
        hint = f" ({round(ratio) - 1} slice(s) missing?)" if missing else ""
        raise VolumeError(f"uneven slice spacing: {gaps[i]:.3f} mm between {names[i]} and {names[i + 1]}, "
                          f"{spacing:.3f} mm elsewhere{hint}")
    return spacing


def _check_extent(name: str, count: int, spacing: np.ndarray, dz: float, rows: int, columns: int) -> None:
    extent = {"rows": rows * float(spacing[0]), "columns": columns * float(spacing[1]), "slices": count * dz}
    for axis, mm in extent.items():
        if not mm <= MAX_EXTENT_MM:
            raise VolumeError(f"{name}: the series spans {mm:.4g} mm along its {axis}, more than the "
                              f"{MAX_EXTENT_MM:g} mm any PET/CT covers (PixelSpacing or positions are wrong)")


def _check_slice_count(datasets: list[Dataset], count: int) -> None:
    expected = datasets[0].get("NumberOfSlices")
    if expected is None or datasets[0].get("Modality") != "PT":
        return
    try:
        expected = int(expected)
    except (TypeError, ValueError, OverflowError):
        return
    if expected and expected != count:
        raise VolumeError(f"the series has {count} of the {expected} slices its NumberOfSlices announces")


def resample_onto(image: sitk.Image, reference: sitk.Image, *, default_value: float) -> sitk.Image:
    """``image`` resampled (trilinear) onto ``reference``'s grid through patient coordinates.

    Both images must share a frame of reference (the caller checks the UIDs). Voxels of the
    reference outside ``image`` get ``default_value`` (−1000 HU = air for a CT). Returns float32.
    """
    return sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, float(default_value),
                         sitk.sitkFloat32)
