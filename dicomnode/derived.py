"""The derived PET series: the enhanced volume as classic PET Image Storage, one file per source slice.

What a PACS and an SUV tool need (ARCHITECTURE.md §3): the source's geometry slice for slice, new Series and
SOP Instance UIDs (planned once per job, so a rerun replaces rather than duplicates), the same Study,
Patient and Frame of Reference, ImageType DERIVED\\PRIMARY, a references trail (SourceImageSequence,
DerivationDescription and DerivationCodeSequence, ContributingEquipmentSequence naming this software),
Units BQML as uint16 pixels with a per-slice RescaleSlope, and the radiopharmaceutical and decay
attributes of the source so SUV stays what it was. Every object passes dciodvfy without errors, also
from sources that do not (repairs in :mod:`dicomnode.pet_attributes`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import highdicom
import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, PositronEmissionTomographyImageStorage
from pydicom.valuerep import format_number_as_ds

from dicomnode.config import OutputSettings
from dicomnode.pet_attributes import code_item, copy_source_attributes
from dicomnode.quantize import quantize_slice
from model.enhance import EnhancerInfo
from upete import __version__

__all__ = ["DerivedPlan", "plan_derived", "write_derived_series", "is_derived_by_us", "method_label",
           "MANUFACTURER"]

log = logging.getLogger("upete.derived")

#: General Equipment Manufacturer of our output and of our ContributingEquipmentSequence item: the
#: loop guard looks for it (standard attributes only, so it survives any PACS).
MANUFACTURER = "uPETe node"
_DERIVATION_MARKER = "uPETe node"
_MAX_SERIES_NUMBER = 2**31 - 1  # IS range


@dataclass(frozen=True)
class DerivedPlan:
    """The identity of one derived series, fixed before processing and reused on every rerun.

    ``sop_uids`` maps each source SOP Instance UID to the SOP Instance UID of its derived image.
    """

    series_uid: str
    sop_uids: dict[str, str] = field(hash=False)
    series_number: int

    def to_json(self) -> str:
        """A JSON text for the job row (``from_json`` reads it back)."""
        return json.dumps({"series_uid": self.series_uid, "series_number": self.series_number,
                           "sop_uids": self.sop_uids}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DerivedPlan:
        data = json.loads(text)
        sop_uids = {str(k): str(v) for k, v in data["sop_uids"].items()}
        return cls(series_uid=str(data["series_uid"]), sop_uids=sop_uids,
                   series_number=int(data["series_number"]))


def plan_derived(source_datasets: Sequence[Dataset], output: OutputSettings) -> DerivedPlan:
    """Fresh UIDs for the derived series of ``source_datasets`` (one per slice) and its SeriesNumber.

    SeriesNumber = the source's + ``output.series_number_offset`` (capped to the IS range).
    """
    if not source_datasets:
        raise ValueError("plan_derived: no source datasets")
    try:
        source_number = int(source_datasets[0].get("SeriesNumber") or 0)
    except (TypeError, ValueError):
        source_number = 0
    series_number = min(max(source_number, 0) + output.series_number_offset, _MAX_SERIES_NUMBER)
    sop_uids = {str(ds.SOPInstanceUID): str(highdicom.UID()) for ds in source_datasets}
    if len(sop_uids) != len(source_datasets):
        raise ValueError("plan_derived: the source datasets repeat a SOP Instance UID")
    return DerivedPlan(series_uid=str(highdicom.UID()), sop_uids=sop_uids, series_number=series_number)


def is_derived_by_us(ds: Dataset) -> bool:
    """True when ``ds`` is (a copy of) an image this node wrote: the loop guard against re-routing."""
    if str(ds.get("Manufacturer", "") or "") == MANUFACTURER:
        return True
    for item in ds.get("ContributingEquipmentSequence", None) or []:
        if str(item.get("Manufacturer", "") or "") == MANUFACTURER:
            return True
    return _DERIVATION_MARKER in str(ds.get("DerivationDescription", "") or "")


def _check_grid(sources: Sequence[Dataset], enhanced: sitk.Image) -> None:
    size = enhanced.GetSize()
    if enhanced.GetDimension() != 3 or size[2] != len(sources):
        raise ValueError(f"enhanced image has size {size}, expected {len(sources)} slices (one per source)")
    first = sources[0]
    if (int(first.Rows), int(first.Columns)) != (size[1], size[0]):
        raise ValueError(f"enhanced slices are {size[1]}×{size[0]}, "
                         f"the source has {first.Rows}×{first.Columns}")
    orientation = np.array([float(v) for v in first.ImageOrientationPatient])
    direction = np.array(enhanced.GetDirection()).reshape(3, 3)
    if np.abs(direction[:, :2].T.ravel() - orientation).max() > 1e-4:
        raise ValueError(f"enhanced image is not on the source grid: direction {enhanced.GetDirection()} vs "
                         f"ImageOrientationPatient {orientation.tolist()}")
    origin = np.array([float(v) for v in first.ImagePositionPatient])
    spacing = np.array([float(v) for v in first.PixelSpacing])
    if (np.abs(np.array(enhanced.GetOrigin()) - origin).max() > 0.01 * spacing.min()
            or np.abs(np.array(enhanced.GetSpacing())[[1, 0]] - spacing).max() > 1e-3 * spacing.min()):
        raise ValueError(f"enhanced image is not on the source grid: origin {enhanced.GetOrigin()} vs "
                         f"{origin.tolist()}, spacing {enhanced.GetSpacing()[:2]} vs "
                         f"{spacing.tolist()[::-1]}")


def _now() -> tuple[str, str]:
    now = datetime.now()
    return now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")


# The word a derived SeriesDescription ends with, by the start of EnhancerInfo.name: what made the
# pixels, so a reader of the series list tells the diffusion model from a plain filter.
_METHOD_LABELS = (("uPETe", "uPETe"), ("Gaussian", "Gaussian"), ("Supervised", "supervised"))


def method_label(info: EnhancerInfo) -> str:
    """"uPETe" for the diffusion models, "Gaussian" for the classical filter, "supervised" for the
    U-Net; any other enhancer's own name."""
    for prefix, label in _METHOD_LABELS:
        if info.name.startswith(prefix):
            return label
    return info.name


def _series_description(source: Dataset, suffix: str | None, info: EnhancerInfo) -> str:
    """The source's description + ``suffix`` (None: a space and :func:`method_label`), within LO's 64."""
    suffix = f" {method_label(info)}" if suffix is None else suffix
    base = str(source.get("SeriesDescription", "") or "PET").strip()
    # LO holds 64 characters: shorten the source's part, never our suffix (it marks the series).
    return base[: max(64 - len(suffix), 0)] + suffix[:64]


def _equipment_items(source: Dataset, info: EnhancerInfo, when: str) -> DicomSequence:
    acquisition = Dataset()
    for keyword in ("Manufacturer", "InstitutionName", "StationName", "ManufacturerModelName",
                    "DeviceSerialNumber", "SoftwareVersions"):
        if source.get(keyword):
            setattr(acquisition, keyword, source[keyword].value)
    if "Manufacturer" not in acquisition:
        acquisition.Manufacturer = ""
    acquisition.PurposeOfReferenceCodeSequence = DicomSequence(
        [code_item("109101", "DCM", "Acquisition Equipment")])
    ours = Dataset()
    ours.Manufacturer = MANUFACTURER
    ours.ManufacturerModelName = info.name[:64]
    ours.SoftwareVersions = [f"upete {__version__}"[:64], info.version[:64]]
    ours.ContributionDateTime = when
    ours.ContributionDescription = info.description[:1024]
    ours.PurposeOfReferenceCodeSequence = DicomSequence([code_item("109102", "DCM", "Processing Equipment")])
    return DicomSequence([acquisition, ours])


def _derivation_description(info: EnhancerInfo, note: str | None) -> str:
    # The note (why the study's CT was not used) leads, so no viewer's truncation hides it; ST holds 1024
    # characters, and the loop guard's marker at the end must survive, so the note is what gets cut.
    tail = f"{info.description} [{info.name}, version {info.version}; {_DERIVATION_MARKER} {__version__}]"
    lead = f"{note}. " if note else ""
    return lead[: max(1024 - len(tail), 0)] + tail[:1024]


def _fill_pet_image_gaps(ds: Dataset, index: int) -> None:
    """Type 1 PET Image attributes a sloppy source may lack, recomputed where the physics allows."""
    if "ImageIndex" not in ds:
        ds.ImageIndex = index + 1
    if not ds.get("AcquisitionDate") and ds.get("SeriesDate"):
        ds.AcquisitionDate = ds.SeriesDate
    if not ds.get("AcquisitionTime") and ds.get("SeriesTime"):
        ds.AcquisitionTime = ds.SeriesTime
    if str(ds.get("DecayCorrection", "NONE")) == "NONE" or "DecayFactor" in ds:
        return
    # DecayFactor for a static frame referred to its start: λT / (1 − e^(−λT)) (PS3.3 C.8.9.4.1.5).
    try:
        half_life = float(ds.RadiopharmaceuticalInformationSequence[0].RadionuclideHalfLife)
        duration_s = float(ds.ActualFrameDuration) / 1000
        lam = math.log(2) / half_life
        ds.DecayFactor = format_number_as_ds(lam * duration_s / (1 - math.exp(-lam * duration_s)))
        log.info("DecayFactor missing in source, recomputed", extra={"fields": {"slice": index + 1}})
    except (AttributeError, IndexError, KeyError, TypeError, ValueError, ZeroDivisionError):
        log.warning("DecayFactor missing in source and not computable",
                    extra={"fields": {"slice": index + 1}})


def _clip_negative(volume: np.ndarray, series_uid: str) -> np.ndarray:
    negative = volume < 0
    if negative.any():
        lost = float(-volume[negative].sum())
        total = float(volume[~negative].sum())
        fields = {"series_uid": series_uid, "voxels": int(negative.sum()),
                  "fraction_of_voxels": f"{negative.mean():.4g}", "clipped_bqml_sum": f"{lost:.4g}",
                  "fraction_of_total": f"{lost / total:.4g}" if total > 0 else "inf"}
        log.info("negative activity clipped to 0", extra={"fields": fields})
        volume = np.where(negative, 0.0, volume)
    return volume


def _write_file(ds: Dataset, path: Path) -> None:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationVersionName = f"UPETE_{__version__}"[:16]
    temporary = path.with_name(f".{path.name}.tmp")
    # Write beside the final name and rename: a crash never leaves a half file under the real name.
    ds.save_as(temporary, enforce_file_format=True)
    os.replace(temporary, path)


def write_derived_series(
    sources: Sequence[Dataset],
    enhanced: sitk.Image,
    plan: DerivedPlan,
    *,
    info: EnhancerInfo,
    output: OutputSettings,
    out_dir: str | os.PathLike[str],
    note: str | None = None,
) -> list[Path]:
    """Write the derived series of ``enhanced`` (Bq/ml, on the grid of ``sources``) into ``out_dir``.

    ``sources`` are the source PET headers in the image's z order (as :func:`volume.load_series`
    returns them); slice ``k`` of ``enhanced`` becomes the derived image of ``sources[k]``, named
    ``<SOP Instance UID>.dcm``. Negative activity is clipped to 0 (logged). Returns the paths in slice
    order. ``note`` (why the study's CT was not used) leads the DerivationDescription. Raises
    ValueError when the image, the sources and the plan do not match.
    """
    sources = list(sources)
    if not sources:
        raise ValueError("write_derived_series: no source datasets")
    missing = [str(ds.SOPInstanceUID) for ds in sources if str(ds.SOPInstanceUID) not in plan.sop_uids]
    if missing:
        raise ValueError(f"the plan has no derived UID for {len(missing)} source instance(s), "
                         f"e.g. {missing[0]}")
    _check_grid(sources, enhanced)
    volume = sitk.GetArrayFromImage(enhanced).astype(np.float64)
    if not np.all(np.isfinite(volume)):
        bad = int((~np.isfinite(volume)).sum())
        raise ValueError(f"the enhanced volume holds {bad} NaN or infinite voxels")
    volume = _clip_negative(volume, plan.series_uid)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    date, time = _now()
    equipment = _equipment_items(sources[0], info, date + time)
    description = _series_description(sources[0], output.series_description_suffix, info)
    paths: list[Path] = []
    for k, source in enumerate(sources):
        ds = copy_source_attributes(source)
        # SOP Common
        ds.SOPClassUID = PositronEmissionTomographyImageStorage
        ds.SOPInstanceUID = plan.sop_uids[str(source.SOPInstanceUID)]
        ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
        # General Series
        ds.Modality = "PT"
        ds.SeriesInstanceUID = plan.series_uid
        ds.SeriesNumber = plan.series_number
        ds.SeriesDescription = description
        # PET Series
        ds.Units = "BQML"
        ds.NumberOfSlices = len(sources)
        # General Equipment: this software made these pixels; the scanner is in ContributingEquipment.
        ds.Manufacturer = MANUFACTURER
        ds.ManufacturerModelName = info.name[:64]
        ds.SoftwareVersions = [f"upete {__version__}"[:64], info.version[:64]]
        ds.ContributingEquipmentSequence = copy.deepcopy(equipment)  # each instance owns its items
        # General Image
        ds.InstanceNumber = int(source.get("InstanceNumber") or k + 1)
        ds.ContentDate, ds.ContentTime = date, time
        ds.ImageType = ["DERIVED", "PRIMARY"]  # value 2 must stay PRIMARY for PET (ARCHITECTURE.md §6)
        ds.DerivationDescription = _derivation_description(info, note)
        ds.DerivationCodeSequence = DicomSequence([code_item("113087", "DCM", "Smoothing")])
        reference = Dataset()
        reference.ReferencedSOPClassUID = source.SOPClassUID
        reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
        reference.PurposeOfReferenceCodeSequence = DicomSequence(
            [code_item("121322", "DCM", "Source image for image processing operation")])
        ds.SourceImageSequence = DicomSequence([reference])
        # Image Plane: the source's, written from the parsed numbers so no malformed DS is copied.
        ds.ImagePositionPatient = [format_number_as_ds(float(v)) for v in source.ImagePositionPatient]
        ds.ImageOrientationPatient = [format_number_as_ds(float(v)) for v in source.ImageOrientationPatient]
        ds.PixelSpacing = [format_number_as_ds(float(v)) for v in source.PixelSpacing]
        thickness = source.get("SliceThickness") or enhanced.GetSpacing()[2]
        ds.SliceThickness = format_number_as_ds(float(thickness))
        if source.get("SliceLocation") not in (None, ""):
            ds.SliceLocation = format_number_as_ds(float(source.SliceLocation))
        # Image Pixel and PET Image
        pixels, slope = quantize_slice(volume[k], signed=False)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = slope
        ds.PixelData = pixels.tobytes()
        _fill_pet_image_gaps(ds, k)
        path = out / f"{ds.SOPInstanceUID}.dcm"
        _write_file(ds, path)
        paths.append(path)
    fields = {"series_uid": plan.series_uid, "instances": len(paths), "enhancer": info.name,
              "version": info.version}
    log.info("derived series written", extra={"fields": fields})
    return paths
