"""PET/CT series with the header habits of each major vendor: a test corpus for the readers and the writer.

The fake scanner (:mod:`dicomnode.testing.scanner`) writes clean, standard headers. Hospitals send
what their scanners write, and each vendor has habits, taken here from public conformance statements
and the vendor branches of open SUV calculators (QIBA's vendor-neutral pseudo-code, dcm2niix,
OHIF's SUV code):

* Siemens (Biograph): a whole-body scan of several bed positions, each slice's AcquisitionTime its
  bed's start; private group 0071 of "SIEMENS MED PT" (decay correction date/time at
  (0071,1022)); InstanceNumber 1 at the head end (positions descend as the number rises); no
  BodyPartExamined, Laterality or CollimatorType; DecayCorrection START, or ADMIN from some
  reconstructions; CT as unsigned 12-bit pixels with RescaleIntercept −1024.
* GE (Discovery): bed positions as Siemens; signed 16-bit PET pixels (PixelRepresentation 1) with
  a RescaleSlope per slice; private group 0009 of "GEMS_PETD_01" ((0009,100D) scan date/time,
  (0009,103B) administration date/time, (0009,1036) tracer, (0009,103F) half life); a series
  reconstructed after the scan has a SeriesTime later than its AcquisitionTime (the values stay
  decay corrected to (0009,100D)); SeriesType STATIC with NumberOfTimeSlices 1; descending
  InstanceNumber; DecayCorrection START or NONE; CT as signed 16-bit pixels with RescaleIntercept
  −1024.
* Philips (Vereos): Units CNTS, Bq/ml = counts × the private Activity Concentration Scale Factor
  (7053,1009) and SUVbw = counts × the SUV Scale Factor (7053,1000) of "Philips PET Private Group";
  PatientPosition instead of the orientation code sequences.
* United Imaging (uMI): no orientation code sequences at all, no CollimatorType, the injection only
  as RadiopharmaceuticalStartDateTime; CT signed 12-bit, RescaleIntercept −1024.
* Canon (Celesteion): NumberOfTimeSlices on a static series, no BodyPartExamined; CT as signed
  pixels holding HU themselves (RescaleIntercept 0).

Every style keeps the physics true: the stored values, times and factors describe one activity
distribution, whose SUVbw per Bq/ml (decay corrected to the scan start) :class:`VendorStudy` gives,
so a test can check the node's output against it. :data:`REFUSED_STYLES` are inputs the node must
refuse, with the attribute its reason names.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.valuerep import format_number_as_ds

from dicomnode.testing.scanner import StudyInfo, write_ct_series, write_pet_series

__all__ = ["VendorStyle", "VendorStudy", "VENDOR_STYLES", "REFUSED_STYLES", "write_vendor_study"]

_PHILIPS = "Philips PET Private Group"
_GE = "GEMS_PETD_01"
_SIEMENS = "SIEMENS MED PT"
#: Bq/ml per count of the Philips style (any positive number; not 1, so a missed factor shows).
_PHILIPS_BQML_PER_COUNT = 0.3125
_FRAME_S = 180.0  # the scanner's frame length (its default)


@dataclass(frozen=True)
class VendorStyle:
    """How one vendor (or one of its reconstructions) writes a PET/CT study.

    ``decay_correction``: START, ADMIN or NONE, with values to match. ``reconstructed_after_s``: the
    series was made that long after the scan (SeriesTime moves, the values do not).
    ``pet_edit``/``ct_edit``: the vendor's header habits, applied to every slice.
    ``suv_error``: the vendor's stored SUV is off by this fraction (a header contradicting it).
    """

    name: str
    manufacturer: str
    model: str
    units: str = "BQML"
    decay_correction: str = "START"
    descending: bool = False
    signed_pet: bool = False
    reconstructed_after_s: float = 0.0
    ct_intercept: float = -1024.0
    ct_signed: bool = False
    ct_bits: int = 12
    pet_edit: Callable[[Dataset], None] | None = None
    ct_edit: Callable[[Dataset], None] | None = None
    activity_factor: bool = True  # Philips: writes (7053,1009) beside (7053,1000)
    bed_slices: int = 0  # a whole-body scan of bed positions this many slices long (0: one bed)
    suv_error: float = 0.0


@dataclass
class VendorStudy:
    """A written vendor-style study. ``suv_per_bqml``: the true SUVbw of 1 Bq/ml at the scan start."""

    style: VendorStyle
    pet_paths: list[Path]
    ct_paths: list[Path]
    suv_per_bqml: float


def _drop(ds: Dataset, *keywords: str) -> None:
    for keyword in keywords:
        if keyword in ds:
            delattr(ds, keyword)


def _siemens_pet(ds: Dataset) -> None:
    _drop(ds, "BodyPartExamined", "Laterality", "CollimatorType")
    scan = str(ds.AcquisitionDate) + str(ds.AcquisitionTime)
    ds.private_block(0x0071, _SIEMENS, create=True).add_new(0x22, "DT", scan + ".000000")


def _siemens_ct(ds: Dataset) -> None:
    _drop(ds, "BodyPartExamined")
    ds.ConvolutionKernel = "Br38f"


def _ge_pet(ds: Dataset) -> None:
    _drop(ds, "CollimatorType", "PatientGantryRelationshipCodeSequence")
    ds.SeriesType = ["STATIC", "IMAGE"]
    ds.NumberOfTimeSlices = 1
    radio = ds.RadiopharmaceuticalInformationSequence[0]
    block = ds.private_block(0x0009, _GE, create=True)
    block.add_new(0x0D, "DT", str(ds.AcquisitionDate) + str(ds.AcquisitionTime))
    block.add_new(0x3B, "DT", str(radio.RadiopharmaceuticalStartDateTime))
    block.add_new(0x36, "LO", "FDG -- fluorodeoxyglucose")
    block.add_new(0x3F, "FL", float(radio.RadionuclideHalfLife))


def _ge_ct(ds: Dataset) -> None:
    ds.ConvolutionKernel = "STANDARD"


def _philips_pet(ds: Dataset) -> None:
    _drop(ds, "BodyPartExamined", "PatientOrientationCodeSequence", "PatientGantryRelationshipCodeSequence")
    ds.PatientPosition = "HFS"


def _uih_pet(ds: Dataset) -> None:
    _drop(ds, "BodyPartExamined", "CollimatorType", "PatientOrientationCodeSequence",
          "PatientGantryRelationshipCodeSequence")
    _drop(ds.RadiopharmaceuticalInformationSequence[0], "RadiopharmaceuticalStartTime")


def _canon_pet(ds: Dataset) -> None:
    _drop(ds, "BodyPartExamined")
    ds.NumberOfTimeSlices = 1


def _no_body_part(ds: Dataset) -> None:
    _drop(ds, "BodyPartExamined")


_SIEMENS_STYLE = VendorStyle("siemens", "SIEMENS", "Biograph Vision 600", descending=True, bed_slices=5,
                             pet_edit=_siemens_pet, ct_edit=_siemens_ct)
_GE_STYLE = VendorStyle("ge", "GE MEDICAL SYSTEMS", "Discovery MI", descending=True, signed_pet=True,
                        reconstructed_after_s=2700.0, ct_signed=True, ct_bits=16, bed_slices=5,
                        pet_edit=_ge_pet, ct_edit=_ge_ct)
_PHILIPS_STYLE = VendorStyle("philips", "Philips Medical Systems", "Vereos PET/CT", units="CNTS",
                             pet_edit=_philips_pet, ct_edit=_no_body_part)

#: Styles the node accepts: each must give a dciodvfy-clean derived series with the same SUVbw.
VENDOR_STYLES: dict[str, VendorStyle] = {style.name: style for style in (
    _SIEMENS_STYLE,
    replace(_SIEMENS_STYLE, name="siemens-admin", decay_correction="ADMIN"),
    _GE_STYLE,
    replace(_GE_STYLE, name="ge-nodecay", decay_correction="NONE", reconstructed_after_s=0.0),
    _PHILIPS_STYLE,
    VendorStyle("uih", "UIH", "uMI 780", ct_signed=True, pet_edit=_uih_pet, ct_edit=_no_body_part),
    VendorStyle("canon", "CANON_MEC", "Celesteion", ct_intercept=0.0, ct_signed=True, ct_bits=16,
                pet_edit=_canon_pet, ct_edit=_no_body_part),
)}

#: Styles the node must refuse, and the attribute the refusal names.
REFUSED_STYLES: dict[str, tuple[VendorStyle, str]] = {
    "philips-without-activity-factor": (
        replace(_PHILIPS_STYLE, name="philips-without-activity-factor", activity_factor=False),
        "(7053,1009)"),
    "philips-suv-contradicts-headers": (
        replace(_PHILIPS_STYLE, name="philips-suv-contradicts-headers", suv_error=0.05), "(7053,1000)"),
}


def _moment(date: str, time: str) -> datetime:
    return datetime.strptime(date + time[:6], "%Y%m%d%H%M%S")


def _uptake_s(study: StudyInfo) -> float:
    """Seconds from the injection to the scan start."""
    return (_moment(study.study_date, study.acquisition_time)
            - _moment(study.study_date, study.injection_time)).total_seconds()


def _suv_per_bqml(study: StudyInfo) -> float:
    """SUVbw of 1 Bq/ml decay corrected to the scan start: weight / dose decayed to that start."""
    decayed = study.injected_activity_bq * 0.5 ** (_uptake_s(study) / study.half_life_s)
    return study.weight_kg * 1000.0 / decayed


def _bed_start_s(style: VendorStyle, n_slices: int) -> np.ndarray:
    """Seconds from the scan start to the start of each slice's bed position (one frame per bed)."""
    beds = np.arange(n_slices) // style.bed_slices if style.bed_slices else np.zeros(n_slices)
    return beds * _FRAME_S


def _stored_scale(style: VendorStyle, study: StudyInfo, n_slices: int) -> tuple[np.ndarray, np.ndarray]:
    """Per slice, the stored value of 1 Bq/ml at the scan start and the DecayFactor to write, for the
    style's decay correction, units and bed positions (each a static frame of ``_FRAME_S``)."""
    lam = math.log(2) / study.half_life_s
    frame = lam * _FRAME_S / -math.expm1(-lam * _FRAME_S)  # frame mean → frame start
    to_start = frame * np.exp(lam * _bed_start_s(style, n_slices))  # measured → scan start
    scale, decay_factor = np.ones(n_slices), to_start
    if style.decay_correction == "ADMIN":  # referred to the injection: more activity than at the scan
        scale = np.full(n_slices, math.exp(lam * _uptake_s(study)))
        decay_factor = to_start * scale
    elif style.decay_correction == "NONE":  # each bed's frame mean, as measured
        scale, decay_factor = 1.0 / to_start, np.ones(n_slices)
    if style.units == "CNTS":
        scale = scale / _PHILIPS_BQML_PER_COUNT
    return scale, decay_factor


def _pet_edit(style: VendorStyle, study: StudyInfo, decay_factor: np.ndarray,
              suv_per_stored: np.ndarray) -> Callable[[Dataset, int], None]:
    scan = _moment(study.study_date, study.acquisition_time)
    series = scan + timedelta(seconds=style.reconstructed_after_s)
    bed_start = _bed_start_s(style, len(decay_factor))

    def edit(ds: Dataset, k: int) -> None:
        if style.pet_edit is not None:  # first: it sees the scan start as AcquisitionTime
            style.pet_edit(ds)
        ds.Manufacturer, ds.ManufacturerModelName = style.manufacturer, style.model
        ds.Units = style.units
        ds.DecayCorrection = style.decay_correction
        ds.DecayFactor = format_number_as_ds(float(decay_factor[k]))
        if style.decay_correction == "NONE":
            ds.CorrectedImage = [v for v in ds.CorrectedImage if v != "DECY"]
        ds.SeriesDate, ds.SeriesTime = series.strftime("%Y%m%d"), series.strftime("%H%M%S")
        ds.AcquisitionTime = (scan + timedelta(seconds=float(bed_start[k]))).strftime("%H%M%S")
        if style.descending:
            ds.InstanceNumber = ds.ImageIndex = len(decay_factor) - k
        if style.units == "CNTS":
            block = ds.private_block(0x7053, _PHILIPS, create=True)
            suv = float(suv_per_stored[k]) * (1 + style.suv_error)
            block.add_new(0x00, "DS", format_number_as_ds(suv))
            if style.activity_factor:
                block.add_new(0x09, "DS", format_number_as_ds(_PHILIPS_BQML_PER_COUNT))

    return edit


def write_vendor_study(
    out_dir: str | os.PathLike[str],
    style: VendorStyle,
    activity_bqml: np.ndarray,
    hu: np.ndarray,
    *,
    pet_spacing_mm: tuple[float, float, float],
    pet_origin_mm: tuple[float, float, float],
    ct_spacing_mm: tuple[float, float, float],
    ct_origin_mm: tuple[float, float, float],
    study: StudyInfo | None = None,
) -> VendorStudy:
    """Write a PET (``activity_bqml``, Bq/ml at the scan start) and CT (``hu``) in ``style`` under
    ``out_dir`` (``pet/``, ``ct/``); geometry as :func:`~dicomnode.testing.scanner.write_pet_series`."""
    study = study or StudyInfo()
    out = Path(out_dir)
    scale, decay_factor = _stored_scale(style, study, activity_bqml.shape[0])
    suv = _suv_per_bqml(study)
    edit = _pet_edit(style, study, decay_factor, suv / scale)
    pet_paths = write_pet_series(out / "pet", np.asarray(activity_bqml, np.float64) * scale[:, None, None],
                                 spacing_mm=pet_spacing_mm, origin_mm=pet_origin_mm, study=study,
                                 series_number=3, series_description="PET WB", shuffle_seed=7,
                                 frame_duration_s=_FRAME_S, signed_pixels=style.signed_pet or None,
                                 edit=edit)

    def ct_edit(ds: Dataset, k: int) -> None:
        ds.Manufacturer, ds.ManufacturerModelName = style.manufacturer, style.model
        if style.descending:
            ds.InstanceNumber = len(hu) - k
        if style.ct_edit is not None:
            style.ct_edit(ds)

    ct_paths = write_ct_series(out / "ct", hu, spacing_mm=ct_spacing_mm, origin_mm=ct_origin_mm,
                               study=study, series_number=2, shuffle_seed=7,
                               rescale_intercept=style.ct_intercept, signed_pixels=style.ct_signed,
                               bits_stored=style.ct_bits, edit=ct_edit)
    return VendorStudy(style, pet_paths, ct_paths, suv)
