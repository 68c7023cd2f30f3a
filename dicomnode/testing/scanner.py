"""Scanner-like synthetic PET and CT series from arrays (tests, demos and ``upete simulate``).

The objects carry what a PET/CT scanner puts in — the SUV attributes (patient weight and size, the
Radiopharmaceutical Information Sequence with dose, start time, half life and coded radionuclide and
tracer), Units BQML, DecayCorrection START with a DecayFactor, CorrectedImage, NumberOfSlices, one
RescaleSlope per slice — and pass ``dciodvfy`` without errors (its test checks it).
``scanner_sins=True`` adds faults real scanners ship (PatientPosition beside the Patient Orientation
Code Sequence, missing Type 2 attributes, a retired SRT code) so readers and the derived writer can
be tested against them. The pixel options (signed pixels, a CT's RescaleIntercept and bits stored)
and ``edit``, a function called on every slice's data set before it is saved, let
:mod:`dicomnode.testing.vendors` shape the series like a given vendor's.

Geometry: arrays are ``(z, y, x)``; ``spacing_mm`` is ``(z, y, x)``; ``origin_mm`` is the patient
position ``(x, y, z)`` of voxel ``[0, 0, 0]``. Slice ``k`` lies at ``origin + k·dz·normal`` with
``normal = row × column`` of ``orientation``; column index runs along the row direction, row index
along the column direction (PS3.3 C.7.6.2.1.1).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    PositronEmissionTomographyImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from dicomnode.quantize import quantize_slice

__all__ = ["SliceEdit", "StudyInfo", "write_pet_series", "write_ct_series"]

#: Called as ``edit(ds, k)`` on slice ``k``'s data set just before it is saved.
SliceEdit = Callable[[Dataset, int], None]

_AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
_MANUFACTURER = "uPETe synthetic"


@dataclass(frozen=True)
class StudyInfo:
    """Patient and study context shared by every series of one synthetic study.

    Times are DICOM TM strings (HHMMSS) on ``study_date``; ``injection_time`` is the tracer injection
    (RadiopharmaceuticalStartDateTime), ``acquisition_time`` the PET series start (the decay
    reference for DecayCorrection START). Activity in Bq, half life in s (18F: 6586.2 s).
    """

    patient_name: str = "PHANTOM^ONE"
    patient_id: str = "PH0001"
    birth_date: str = "19700101"
    sex: str = "O"
    weight_kg: float = 75.0
    height_m: float = 1.75
    study_uid: str = field(default_factory=generate_uid)
    frame_of_reference_uid: str = field(default_factory=generate_uid)
    study_date: str = "20260115"
    study_time: str = "093000"
    accession: str = "ACC0001"
    study_id: str = "1"
    injected_activity_bq: float = 3.0e8
    injection_time: str = "083000"
    acquisition_time: str = "093000"
    half_life_s: float = 6586.2


def _ds(value: float) -> str:
    return format_number_as_ds(float(value))


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _check_volume(name: str, array: np.ndarray, spacing_mm: Sequence[float],
                  origin_mm: Sequence[float]) -> None:
    if array.ndim != 3 or 0 in array.shape:
        raise ValueError(f"{name}: expected a non-empty (z, y, x) array, found shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name}: array holds NaN or infinite values")
    if len(spacing_mm) != 3 or any(s <= 0 for s in spacing_mm):
        raise ValueError(f"spacing_mm must be three positive numbers (z, y, x), found {tuple(spacing_mm)}")
    if len(origin_mm) != 3:
        raise ValueError(f"origin_mm must be the (x, y, z) position of voxel [0, 0, 0], "
                         f"found {tuple(origin_mm)}")


def _geometry(orientation: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if len(orientation) != 6:
        raise ValueError(f"orientation must be 6 direction cosines, found {len(orientation)}")
    row = np.asarray(orientation[:3], dtype=float)
    col = np.asarray(orientation[3:], dtype=float)
    if abs(np.linalg.norm(row) - 1) > 1e-6 or abs(np.linalg.norm(col) - 1) > 1e-6 or abs(row @ col) > 1e-6:
        raise ValueError(f"orientation {tuple(orientation)} is not two orthonormal direction cosines")
    return row, col, np.cross(row, col)


def _base_dataset(study: StudyInfo, *, sop_class: UID, modality: str, series_uid: str, series_number: int,
                  series_description: str, series_time: str) -> Dataset:
    ds = Dataset()
    # SOP Common
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.InstanceCreationDate = study.study_date
    ds.InstanceCreationTime = series_time
    # Patient
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.birth_date
    ds.PatientSex = study.sex
    # General Study
    ds.StudyInstanceUID = study.study_uid
    ds.StudyDate = study.study_date
    ds.StudyTime = study.study_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = study.study_id
    ds.AccessionNumber = study.accession
    ds.StudyDescription = "PET/CT synthetic"
    # Patient Study
    ds.PatientWeight = _ds(study.weight_kg)
    ds.PatientSize = _ds(study.height_m)
    # General Series
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDate = study.study_date
    ds.SeriesTime = series_time
    ds.SeriesDescription = series_description
    ds.BodyPartExamined = "WHOLEBODY"
    # Frame of Reference
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    # General Equipment
    ds.Manufacturer = _MANUFACTURER
    ds.ManufacturerModelName = "Phantom PET/CT"
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = "1.0"
    ds.InstitutionName = "uPETe test site"
    # General Acquisition
    ds.AcquisitionDate = study.study_date
    ds.AcquisitionTime = series_time
    return ds


def _set_plane(ds: Dataset, k: int, *, spacing_mm: Sequence[float], origin: np.ndarray, normal: np.ndarray,
               orientation: Sequence[float]) -> None:
    # Image Plane
    dz, dy, dx = (float(s) for s in spacing_mm)
    position = origin + k * dz * normal
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v) for v in orientation]
    ds.PixelSpacing = [_ds(dy), _ds(dx)]  # row spacing (between rows), then column spacing
    ds.SliceThickness = _ds(dz)
    ds.SliceLocation = _ds(float(position @ normal))


def _set_pixels(ds: Dataset, pixels: np.ndarray, *, bits_stored: int) -> None:
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()


def _save(ds: Dataset, path: Path, transfer_syntax: UID) -> None:
    transfer_syntax = UID(transfer_syntax)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if transfer_syntax.is_compressed:
        # compress() encodes PixelData from its native form and sets the file meta's TransferSyntaxUID.
        ds.compress(transfer_syntax, generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.save_as(path, enforce_file_format=True)


def _file_names(n: int, prefix: str, shuffle_seed: int | None) -> tuple[list[str], list[int]]:
    """Names for slices 0..n-1 and the order to return them in (shuffled names hide the slice order)."""
    order = list(range(n))
    labels = list(range(n))
    if shuffle_seed is not None:
        rng = np.random.default_rng(shuffle_seed)
        labels = [int(i) for i in rng.permutation(n)]
        order = [int(i) for i in rng.permutation(n)]
    return [f"{prefix}{labels[k]:04d}.dcm" for k in range(n)], order


def _tm_seconds(tm: str) -> float:
    return int(tm[0:2]) * 3600 + int(tm[2:4]) * 60 + float(tm[4:] or 0)


def write_pet_series(
    out_dir: str | os.PathLike[str],
    activity_bqml: np.ndarray,
    *,
    spacing_mm: Sequence[float] = (3.0, 4.0, 4.0),
    origin_mm: Sequence[float] = (0.0, 0.0, 0.0),
    study: StudyInfo,
    series_uid: str | None = None,
    series_number: int = 1,
    series_description: str = "PET AC",
    attenuation_corrected: bool = True,
    units: str = "BQML",
    transfer_syntax: str = ExplicitVRLittleEndian,
    shuffle_seed: int | None = None,
    dose_fraction_note: float | None = None,
    frame_duration_s: float = 180.0,
    orientation: Sequence[float] = _AXIAL,
    scanner_sins: bool = False,
    signed_pixels: bool | None = None,
    edit: SliceEdit | None = None,
) -> list[Path]:
    """Write a static PET series, one PET Image Storage file per slice of ``activity_bqml`` (z, y, x).

    Activity is in Bq/ml (``units`` only changes the Units attribute, for tests of selection rules).
    Non-negative arrays are stored as ``uint16``, arrays with negative values (FBP noise) as ``int16``
    (``signed_pixels`` forces one or the other); each slice gets its own RescaleSlope.
    ``attenuation_corrected=False`` leaves ATTN out of CorrectedImage (an NAC series).
    ``shuffle_seed`` scrambles both the file names and the order of the returned paths
    (InstanceNumber stays true to the slice order, as on a scanner).
    ``dose_fraction_note`` records a simulated dose fraction in ImageComments. ``edit`` (module doc)
    changes each slice's header last. Returns the paths.
    """
    activity = np.asarray(activity_bqml)
    _check_volume("activity_bqml", activity, spacing_mm, origin_mm)
    if frame_duration_s <= 0:
        raise ValueError(f"frame_duration_s must be positive, found {frame_duration_s}")
    if dose_fraction_note is not None and not 0 < dose_fraction_note <= 1:
        raise ValueError(f"dose_fraction_note must be in (0, 1], found {dose_fraction_note}")
    _, _, normal = _geometry(orientation)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    signed = bool(activity.min() < 0) if signed_pixels is None else signed_pixels
    if not signed and activity.min() < 0:
        raise ValueError("signed_pixels=False cannot store negative activity")
    n_slices = activity.shape[0]

    # Decay during a static frame of length T, referred to its start (DecayCorrection START):
    # factor λT / (1 − e^(−λT)); the frame's activity-weighted mid time is ln(factor)/λ (PS3.3 C.8.9.4.1.5).
    lam = math.log(2) / study.half_life_s
    frame_decay = lam * frame_duration_s / (1 - math.exp(-lam * frame_duration_s))
    frame_reference_ms = math.log(frame_decay) / lam * 1000

    corrected = ["DECY", "ATTN", "SCAT", "DTIM", "RAN", "NORM"] if attenuation_corrected else [
        "DECY", "DTIM", "RAN", "NORM"]
    names, order = _file_names(n_slices, "PT", shuffle_seed)
    paths: list[Path] = []
    for k in range(n_slices):
        ds = _base_dataset(study, sop_class=PositronEmissionTomographyImageStorage, modality="PT",
                           series_uid=series_uid, series_number=series_number,
                           series_description=series_description, series_time=study.acquisition_time)
        ds.SOPInstanceUID = generate_uid()
        _set_pet_series(ds, study, units=units, corrected=corrected, n_slices=n_slices,
                        attenuation_corrected=attenuation_corrected)
        # General Image
        ds.InstanceNumber = k + 1
        ds.ContentDate = study.study_date
        ds.ContentTime = study.acquisition_time
        if dose_fraction_note is not None:
            ds.ImageComments = f"simulated low-dose acquisition, dose fraction {dose_fraction_note:g}"
        _set_plane(ds, k, spacing_mm=spacing_mm, origin=np.asarray(origin_mm, float), normal=normal,
                   orientation=orientation)
        # PET Image
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        pixels, slope = quantize_slice(activity[k], signed=signed)
        _set_pixels(ds, pixels, bits_stored=16)
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = slope
        ds.FrameReferenceTime = _ds(frame_reference_ms)
        ds.ImageIndex = k + 1
        ds.ActualFrameDuration = round(frame_duration_s * 1000)
        ds.DecayFactor = _ds(frame_decay)
        ds.DoseCalibrationFactor = "1"
        if scanner_sins:
            _add_scanner_sins(ds)
        if edit is not None:
            edit(ds, k)
        path = out / names[k]
        _save(ds, path, transfer_syntax)
        paths.append(path)
    return [paths[i] for i in order]


def _set_pet_series(ds: Dataset, study: StudyInfo, *, units: str, corrected: list[str], n_slices: int,
                    attenuation_corrected: bool) -> None:
    """The PET Series, PET Isotope and NM/PET Patient Orientation modules, as a scanner fills them."""
    # PET Series
    ds.Units = units
    ds.CountsSource = "EMISSION"
    ds.SeriesType = ["WHOLE BODY", "IMAGE"]
    ds.CorrectedImage = corrected
    ds.RandomsCorrectionMethod = "DLYD"
    if attenuation_corrected:
        ds.AttenuationCorrectionMethod = "CT-based"
        ds.ScatterCorrectionMethod = "Model-based"
    ds.DecayCorrection = "START"
    ds.ReconstructionMethod = "OSEM 3i21s"
    ds.CollimatorType = "NONE"
    ds.NumberOfSlices = n_slices
    # PET Isotope
    radio = Dataset()
    radio.Radiopharmaceutical = "Fluorodeoxyglucose"
    radio.RadiopharmaceuticalStartTime = study.injection_time
    radio.RadiopharmaceuticalStartDateTime = study.study_date + study.injection_time
    radio.RadionuclideTotalDose = _ds(study.injected_activity_bq)
    radio.RadionuclideHalfLife = _ds(study.half_life_s)
    radio.RadionuclidePositronFraction = "0.9686"
    radio.RadionuclideCodeSequence = DicomSequence([_code("77004003", "SCT", "^18^Fluorine")])
    radio.RadiopharmaceuticalCodeSequence = DicomSequence(
        [_code("35321007", "SCT", "Fluorodeoxyglucose F^18^")])
    ds.RadiopharmaceuticalInformationSequence = DicomSequence([radio])
    # NM/PET Patient Orientation: recumbent, supine, head first
    orient = _code("102538003", "SCT", "recumbent")
    orient.PatientOrientationModifierCodeSequence = DicomSequence([_code("40199007", "SCT", "supine")])
    ds.PatientOrientationCodeSequence = DicomSequence([orient])
    ds.PatientGantryRelationshipCodeSequence = DicomSequence([_code("102540008", "SCT", "headfirst")])


def _add_scanner_sins(ds: Dataset) -> None:
    """Faults seen in real scanner output that dciodvfy reports as errors."""
    ds.PatientPosition = "HFS"  # beside PatientOrientationCodeSequence: forbidden for PET
    del ds.CollimatorType  # Type 2, left out
    del ds.PatientGantryRelationshipCodeSequence  # Type 2, left out
    ds.RadiopharmaceuticalInformationSequence[0].RadionuclideCodeSequence[0] = _code(
        "C-111A1", "SRT", "^18^Fluorine")  # retired SNOMED-RT code


def write_ct_series(
    out_dir: str | os.PathLike[str],
    hu: np.ndarray,
    *,
    spacing_mm: Sequence[float] = (2.0, 1.5, 1.5),
    origin_mm: Sequence[float] = (0.0, 0.0, 0.0),
    study: StudyInfo,
    series_uid: str | None = None,
    series_number: int = 2,
    series_description: str = "CT AC",
    transfer_syntax: str = ExplicitVRLittleEndian,
    shuffle_seed: int | None = None,
    orientation: Sequence[float] = _AXIAL,
    rescale_intercept: float = -1024.0,
    signed_pixels: bool = False,
    bits_stored: int = 12,
    edit: SliceEdit | None = None,
) -> list[Path]:
    """Write a CT series, one CT Image Storage file per slice of ``hu`` (z, y, x) in Hounsfield units.

    By default pixels are ``uint16`` with RescaleIntercept −1024 and slope 1 (12 bits stored), as most
    CT scanners store them, so values are rounded to whole HU and clipped to [−1024, 3071].
    ``rescale_intercept``, ``signed_pixels`` (``int16``) and ``bits_stored`` change that storage; the
    values are clipped to what it can hold. ``edit`` (module doc) changes each slice's header last.
    """
    volume = np.asarray(hu)
    _check_volume("hu", volume, spacing_mm, origin_mm)
    if not 8 <= bits_stored <= 16:
        raise ValueError(f"bits_stored must be 8 to 16, found {bits_stored}")
    low, high = (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1) if signed_pixels else (
        0, 2**bits_stored - 1)
    _, _, normal = _geometry(orientation)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    # The CT of a PET/CT is acquired a few minutes before the PET.
    seconds = max(_tm_seconds(study.acquisition_time) - 300, 0)
    ct_time = f"{int(seconds // 3600):02d}{int(seconds % 3600 // 60):02d}{int(seconds % 60):02d}"
    names, order = _file_names(volume.shape[0], "CT", shuffle_seed)
    paths: list[Path] = []
    for k in range(volume.shape[0]):
        ds = _base_dataset(study, sop_class=CTImageStorage, modality="CT", series_uid=series_uid,
                           series_number=series_number, series_description=series_description,
                           series_time=ct_time)
        ds.SOPInstanceUID = generate_uid()
        ds.PatientPosition = "HFS"  # Type 2C in General Series, required for CT
        # General Image
        ds.InstanceNumber = k + 1
        ds.ContentDate = study.study_date
        ds.ContentTime = ct_time
        _set_plane(ds, k, spacing_mm=spacing_mm, origin=np.asarray(origin_mm, float), normal=normal,
                   orientation=orientation)
        # CT Image
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        stored = np.clip(np.rint(volume[k].astype(np.float64) - rescale_intercept), low, high)
        _set_pixels(ds, stored.astype(np.int16 if signed_pixels else np.uint16), bits_stored=bits_stored)
        ds.RescaleIntercept = _ds(rescale_intercept)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.KVP = "120"
        ds.AcquisitionNumber = 1
        ds.XRayTubeCurrent = 80
        ds.ExposureTime = 500
        ds.ConvolutionKernel = "B30f"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        if edit is not None:
            edit(ds, k)
        path = out / names[k]
        _save(ds, path, transfer_syntax)
        paths.append(path)
    return [paths[i] for i in order]
