"""What a derived PET image keeps from its source slice, and the repairs dciodvfy asks for.

The derived writer never copies a source dataset wholesale: it copies the attributes listed here,
module by module (PS3.3 A.21 PET Image IOD), so that private tags, vendor oddities and attributes of
other IODs stay behind. Scanner output often breaks the standard in small ways; the repairs below
make the derived object valid even then (ARCHITECTURE.md §6):

* values that do not fit their VR are reformatted (numbers), upper-cased (CS), emptied (Type 2) or
  dropped (Type 3); Type 1 values that cannot be repaired are kept and logged; patient and study
  identity (``IDENTITY``) is copied verbatim whatever it holds, so the PACS files the series with its
  source;
* PatientPosition is dropped (forbidden beside the Patient Orientation Code Sequence) after being
  turned into that sequence when the source lacks it;
* retired SNOMED-RT codes become their SNOMED CT equivalents; missing Type 2 sequences become empty;
* Type 1C/2C attributes follow their condition, not the source: an empty Laterality when the source
  names no BodyPartExamined (a paired organ cannot be ruled out), and no NumberOfTimeSlices (GE, Canon
  write it on static series) unless SeriesType is DYNAMIC, nor gating counts unless it is GATED.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from highdicom.sr import CodedConcept
from pydicom import config as pydicom_config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.valuerep import format_number_as_ds, validate_value

__all__ = ["copy_source_attributes", "code_item", "fix_patient_orientation"]

log = logging.getLogger("upete.derived")

# Module by module, the source attributes a derived PET image carries over. Geometry, pixels, UIDs,
# ImageType, equipment and derivation are written by the derived writer itself.
PATIENT = ("PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
           "PatientBirthDate", "PatientBirthTime", "PatientSex", "OtherPatientIDsSequence",
           "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence")
GENERAL_STUDY = ("StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                 "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyDescription",
                 "ProcedureCodeSequence")
PATIENT_STUDY = ("PatientAge", "PatientSize", "PatientWeight")
GENERAL_SERIES = ("Laterality", "BodyPartExamined", "ProtocolName", "RequestAttributesSequence")
FRAME_OF_REFERENCE = ("FrameOfReferenceUID", "PositionReferenceIndicator")
# SeriesDate/SeriesTime and the acquisition times stay the source's: with DecayCorrection START they
# are the decay reference of the pixel values, so SUV depends on them (PS3.3 C.8.9.1.1.3).
PET_SERIES = ("SeriesDate", "SeriesTime", "Units", "SUVType", "CountsSource", "SeriesType",
              "ReprojectionMethod", "NumberOfRRIntervals", "NumberOfTimeSlots", "NumberOfTimeSlices",
              "CorrectedImage", "RandomsCorrectionMethod", "AttenuationCorrectionMethod",
              "ScatterCorrectionMethod", "DecayCorrection", "ReconstructionDiameter", "ConvolutionKernel",
              "ReconstructionMethod", "DetectorLinesOfResponseUsed", "AcquisitionStartCondition",
              "AcquisitionStartConditionData", "AcquisitionTerminationCondition",
              "AcquisitionTerminationConditionData", "FieldOfViewShape", "FieldOfViewDimensions",
              "GantryDetectorTilt", "GantryDetectorSlew", "TypeOfDetectorMotion", "CollimatorType",
              "CollimatorGridName", "AxialAcceptance", "AxialMash", "TransverseMash", "DetectorElementSize",
              "CoincidenceWindowWidth", "EnergyWindowRangeSequence", "SecondaryCountsType")
PET_ISOTOPE = ("RadiopharmaceuticalInformationSequence", "InterventionDrugInformationSequence")
GENERAL_ACQUISITION = ("AcquisitionDate", "AcquisitionTime")
PET_IMAGE = ("FrameReferenceTime", "TriggerTime", "FrameTime", "LowRRValue", "HighRRValue",
             "ImageIndex", "ActualFrameDuration", "NominalInterval", "IntervalsAcquired",
             "IntervalsRejected", "PrimaryPromptsCountsAccumulated", "SecondaryCountsAccumulated",
             "SliceSensitivityFactor", "DecayFactor", "DoseCalibrationFactor", "ScatterFractionFactor",
             "DeadTimeFactor")
NM_PET_ORIENTATION = ("PatientOrientationCodeSequence", "PatientGantryRelationshipCodeSequence")
SOP_COMMON = ("SpecificCharacterSet", "TimezoneOffsetFromUTC")
COPIED = (PATIENT + GENERAL_STUDY + PATIENT_STUDY + GENERAL_SERIES + FRAME_OF_REFERENCE + PET_SERIES
          + PET_ISOTOPE + GENERAL_ACQUISITION + PET_IMAGE + NM_PET_ORIENTATION + SOP_COMMON)

# Type 2 attributes (present, maybe empty) among those copied: PS3.3 C.7.1.1, C.7.2.1, C.7.4.1,
# C.8.9.1, C.8.9.2, C.8.4.6.
TYPE2 = frozenset({"PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                   "ReferringPhysicianName", "StudyID", "AccessionNumber", "PositionReferenceIndicator",
                   "CollimatorType", "RadiopharmaceuticalInformationSequence",
                   "PatientOrientationCodeSequence", "PatientGantryRelationshipCodeSequence"})
# Type 1 attributes we copy and cannot invent; a broken value is kept (and logged).
TYPE1 = frozenset({"StudyInstanceUID", "FrameOfReferenceUID", "SeriesDate", "SeriesTime", "Units",
                   "CountsSource", "SeriesType", "CorrectedImage", "DecayCorrection", "FrameReferenceTime",
                   "ImageIndex", "ActualFrameDuration", "AcquisitionDate", "AcquisitionTime", "DecayFactor",
                   "SpecificCharacterSet", "NumberOfTimeSlices"})

# What ties the image to its patient and study in a PACS: copied byte for byte, never "repaired" —
# a PACS matches these exactly, and a changed PatientID files the series under another patient.
IDENTITY = frozenset({"PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
                      "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                      "ReferringPhysicianName", "StudyDescription", "FrameOfReferenceUID",
                      "SpecificCharacterSet"})

# Type 1C attributes of the PET Series module and the SeriesType (value 1) that requires them; they
# may not be present otherwise (PS3.3 C.8.9.1).
_SERIES_TYPE_CONDITIONS = {"NumberOfTimeSlices": "DYNAMIC", "NumberOfRRIntervals": "GATED",
                           "NumberOfTimeSlots": "GATED"}

# Retired SNOMED-RT codes scanners still write → SNOMED CT (PS3.16 Annex O; ARCHITECTURE.md §6).
_SRT_TO_SCT = {
    "C-111A1": ("77004003", "^18^Fluorine"),
    "C-B1031": ("35321007", "Fluorodeoxyglucose F^18^"),
    "F-10450": ("102538003", "recumbent"),
    "F-10340": ("40199007", "supine"),
    "F-10310": ("1240000", "prone"),
    "F-10317": ("102535000", "right lateral decubitus"),
    "F-10319": ("102536004", "left lateral decubitus"),
    "G-5190": ("102540008", "headfirst"),
    "G-5191": ("102541007", "feet-first"),
}

# PatientPosition (PS3.3 C.7.3.1.1.2) → recumbent + modifier, and the gantry relationship.
_POSITION_CODES = {
    "HFS": ("40199007", "supine", "102540008", "headfirst"),
    "HFP": ("1240000", "prone", "102540008", "headfirst"),
    "FFS": ("40199007", "supine", "102541007", "feet-first"),
    "FFP": ("1240000", "prone", "102541007", "feet-first"),
    "HFDR": ("102535000", "right lateral decubitus", "102540008", "headfirst"),
    "HFDL": ("102536004", "left lateral decubitus", "102540008", "headfirst"),
    "FFDR": ("102535000", "right lateral decubitus", "102541007", "feet-first"),
    "FFDL": ("102536004", "left lateral decubitus", "102541007", "feet-first"),
}


def code_item(value: str, scheme: str, meaning: str) -> Dataset:
    """A code sequence item (CodeValue, CodingSchemeDesignator, CodeMeaning)."""
    return CodedConcept(value, scheme, meaning)


def _clone(element: DataElement) -> DataElement:
    """A copy of a non-sequence element (values are str/number/bytes, or a list of them)."""
    value = element.value
    if isinstance(value, MultiValue | list):
        value = list(value)
    return DataElement(element.tag, element.VR, value)


def _valid(element: DataElement) -> bool:
    values = element.value if isinstance(element.value, MultiValue | list) else [element.value]
    for value in values:
        if value is None or value == "":
            continue
        try:
            validate_value(element.VR, str(value) if element.VR in ("DS", "IS") else value,
                           pydicom_config.RAISE)
        except (ValueError, TypeError):
            return False
    return True


def _repaired(element: DataElement) -> DataElement | None:
    """A valid copy of a non-sequence element, or None when no repair is possible."""
    element = _clone(element)
    if _valid(element):
        return element
    multi = isinstance(element.value, MultiValue | list)
    values = list(element.value) if multi else [element.value]
    try:
        if element.VR == "DS":
            values = [format_number_as_ds(float(v)) for v in values]
        elif element.VR == "IS":
            values = [str(int(float(v))) for v in values]
        elif element.VR == "CS":
            values = [str(v).strip().upper().replace("-", "_")[:16] for v in values]
        else:
            return None
    except (TypeError, ValueError):
        return None
    element.value = values if multi else values[0]
    return element if _valid(element) else None


def _copy_dataset(source: Dataset, keywords: Iterable[str] | None, context: str) -> Dataset:
    """Copy ``keywords`` (or every public attribute when None) from ``source``, repairing values."""
    target = Dataset()
    elements = ([source[k] for k in keywords if k in source] if keywords is not None
                else [e for e in source if not e.tag.is_private])
    for element in elements:
        keyword = element.keyword or str(element.tag)
        if element.VR == "SQ":
            items = [_copy_dataset(item, None, f"{context}{keyword}>") for item in element.value]
            target[element.tag] = DataElement(element.tag, "SQ", DicomSequence(items))
            continue
        if element.keyword in IDENTITY:
            target[element.tag] = _clone(element)
            continue
        fixed = _repaired(element)
        if fixed is not None:
            target[element.tag] = fixed
        elif element.keyword in TYPE1:
            log.warning("invalid value kept", extra={"fields": {"attribute": f"{context}{keyword}"}})
            target[element.tag] = _clone(element)
        elif element.keyword in TYPE2:
            log.info("invalid value emptied", extra={"fields": {"attribute": f"{context}{keyword}"}})
            target[element.tag] = DataElement(element.tag, element.VR, None)
        else:
            log.info("invalid value dropped", extra={"fields": {"attribute": f"{context}{keyword}"}})
    return target


def _modernise_codes(ds: Dataset) -> None:
    """Replace retired SRT codes by their SCT equivalents, in every code item of ``ds`` (recursive)."""
    for element in ds:
        if element.VR != "SQ":
            continue
        for item in element.value:
            if item.get("CodingSchemeDesignator") == "SRT" and item.get("CodeValue") in _SRT_TO_SCT:
                item.CodeValue, item.CodeMeaning = _SRT_TO_SCT[item.CodeValue]
                item.CodingSchemeDesignator = "SCT"
            _modernise_codes(item)


def fix_patient_orientation(target: Dataset, source: Dataset) -> None:
    """Give ``target`` a Patient Orientation / Gantry Relationship Code Sequence and no PatientPosition.

    When the source has no (or an empty) orientation sequence but a PatientPosition, the position is
    translated into codes, so the information survives the removal of PatientPosition.
    """
    position = str(source.get("PatientPosition", "") or "").strip().upper()
    codes = _POSITION_CODES.get(position)
    if not target.get("PatientOrientationCodeSequence"):
        items = []
        if codes:
            item = code_item("102538003", "SCT", "recumbent")
            modifier = code_item(codes[0], "SCT", codes[1])
            item.PatientOrientationModifierCodeSequence = DicomSequence([modifier])
            items = [item]
        target.PatientOrientationCodeSequence = DicomSequence(items)
    if not target.get("PatientGantryRelationshipCodeSequence"):
        target.PatientGantryRelationshipCodeSequence = DicomSequence(
            [code_item(codes[2], "SCT", codes[3])] if codes else [])
    if "PatientPosition" in target:
        del target.PatientPosition


def copy_source_attributes(source: Dataset) -> Dataset:
    """The attributes of a derived PET image that come from its source slice, repaired (module doc)."""
    target = _copy_dataset(source, COPIED, "")
    for keyword in TYPE2:
        if keyword not in target:
            setattr(target, keyword, [] if keyword.endswith("Sequence") else "")
    for item in target.RadiopharmaceuticalInformationSequence:
        # Type 2 inside each item of the PET Isotope module; dciodvfy insists (ARCHITECTURE.md §6).
        if "RadionuclideCodeSequence" not in item:
            item.RadionuclideCodeSequence = DicomSequence([])
    _modernise_codes(target)
    fix_patient_orientation(target, source)
    _apply_conditions(target)
    return target


def _apply_conditions(target: Dataset) -> None:
    """Type 1C/2C attributes of General and PET Series as their conditions require (module doc)."""
    if not target.get("BodyPartExamined") and "Laterality" not in target:
        # Type 2C: required for a paired body part; unknown body part → present and empty.
        target.Laterality = ""
    series_type = [str(v).strip().upper() for v in (target.get("SeriesType") or [])]
    for keyword, required_by in _SERIES_TYPE_CONDITIONS.items():
        if keyword in target and series_type[:1] != [required_by]:
            del target[keyword]
