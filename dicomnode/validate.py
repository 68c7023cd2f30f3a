"""Is a received instance usable? Checks one dataset and extracts what the index needs.

:func:`validate_instance` either returns an :class:`InstanceMeta` or raises :class:`Refusal` with the
DIMSE status to answer and the attribute at fault. Statuses (PS3.4 Annex B.2.3, Storage Service Class):

- ``0xA900`` *Error: Data Set does not match SOP Class* — a Type 1 attribute of the IOD we need is
  missing or contradicts the SOP class (no UIDs, no geometry, no pixel data, Modality CT in a PET
  object, pixel data that does not fill Rows × Columns × BitsAllocated);
- ``0xC000`` *Error: Cannot understand* — an attribute is there but its value cannot be read
  (``RescaleSlope = "abc"``, an orientation that is not two unit vectors, compressed pixel data that
  does not decode).

UIDs are checked for syntax too (digits and dots, at most 64 characters): they become file names in
the spool, so nothing else may pass.

Every element is read once at receive time, not only those the node needs
(:func:`dicomnode.elements.check_elements`): a value that does not parse is refused at receive time
and not in a job the sender never hears of.

:func:`read_received` reads a received file with PixelData left on disk (its length is checked
against Rows × Columns × BitsAllocated and against the file's size), so an instance's pixels are
never held in memory to be validated unless they are compressed and must be decoded.
"""

from __future__ import annotations

import math
import os
import re
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import CTImageStorage, PositronEmissionTomographyImageStorage

from dicomnode.elements import check_elements, check_settings, value_of
from dicomnode.pet_units import philips_scale_factors
from dicomnode.statuses import CANNOT_DECODE, CANNOT_UNDERSTAND, DATASET_MISMATCH, Refusal

__all__ = [
    "Refusal",
    "InstanceMeta",
    "read_received",
    "validate_instance",
    "instance_uids",
    "peek_instance_uids",
    "SUPPORTED_SOP_CLASSES",
]

#: SOP class → the Modality its IOD requires (PS3.3 C.8.9.1 PET Series, C.8.2.1 CT Image).
SUPPORTED_SOP_CLASSES: dict[str, str] = {
    PositronEmissionTomographyImageStorage: "PT",
    CTImageStorage: "CT",
}

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# Values above this size are left on disk when a received file is read (in practice: PixelData).
_DEFER_BYTES = 64 * 1024
_PIXEL_DATA = Tag(0x7FE0, 0x0010)
# peek_instance_uids: how much of a file it reads, the syntaxes it reads (implicit and explicit VR
# little endian; others are read in full first), and the explicit VRs with a 4-byte length.
_PEEK_BYTES = 16 * 1024
_PEEK_SYNTAXES = frozenset({b"1.2.840.10008.1.2", b"1.2.840.10008.1.2.1"})
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_PEEK_DEPTH = 8  # sequences nested deeper before (0020,000E): read in full first


@dataclass(frozen=True)
class InstanceMeta:
    """What the index records about one stored instance (no patient identifiers)."""

    sop_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    modality: str  # "PT" or "CT"
    frame_of_reference_uid: str
    position_mm: tuple[float, float, float]  # ImagePositionPatient (x, y, z)
    orientation: tuple[float, float, float, float, float, float]  # ImageOrientationPatient
    rows: int
    columns: int
    pixel_spacing_mm: tuple[float, float]  # PixelSpacing: (between rows, between columns)
    units: str | None = None  # PET Units as the node reads the pixels, e.g. "BQML" (Philips CNTS too)
    corrected_image: tuple[str, ...] = ()  # PET CorrectedImage, e.g. ("ATTN", "DECY")
    series_type: str | None = None  # PET SeriesType value 1, e.g. "STATIC"
    number_of_slices: int | None = None  # PET NumberOfSlices
    derived_by_us: bool = False


@lru_cache(maxsize=256)
def _tag(keyword: str) -> BaseTag:
    # Looked up once: ``keyword in ds`` and ``ds[keyword]`` each translate the keyword again.
    return Tag(keyword)


def _value(ds: Dataset, keyword: str) -> object:
    """The value of ``keyword`` in ``ds``, or None when the element is absent (read only)."""
    return value_of(ds, _tag(keyword))


def _present(ds: Dataset, keyword: str) -> bool:
    return _value(ds, keyword) not in (None, "", b"")


def _uid(ds: Dataset, keyword: str) -> str:
    if not _present(ds, keyword):
        raise Refusal(DATASET_MISMATCH, keyword, "missing or empty")
    value = str(_value(ds, keyword)).strip().rstrip("\0")
    if len(value) > 64 or not _UID.match(value):
        raise Refusal(
            DATASET_MISMATCH, keyword, "is not a valid UID (digits and dots, at most 64 characters)"
        )
    return value


def _numbers(
    ds: Dataset, keyword: str, count: int | None = None, *, required: bool = True
) -> list[float] | None:
    """Parse a DS/IS (multi-)value into finite floats; missing → refusal if ``required`` else None."""
    if not _present(ds, keyword):
        if required:
            raise Refusal(DATASET_MISMATCH, keyword, "missing or empty")
        return None
    value = _value(ds, keyword)
    items = (
        list(value) if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
    )
    try:
        numbers = [float(str(item).strip()) for item in items]
    except ValueError:
        raise Refusal(CANNOT_UNDERSTAND, keyword, "value is not a number") from None
    if not all(math.isfinite(n) for n in numbers):
        raise Refusal(CANNOT_UNDERSTAND, keyword, "value is not a finite number")
    if count is not None and len(numbers) != count:
        raise Refusal(CANNOT_UNDERSTAND, keyword, f"expected {count} values, found {len(numbers)}")
    return numbers


def _int(ds: Dataset, keyword: str, *, required: bool = True) -> int | None:
    numbers = _numbers(ds, keyword, 1, required=required)
    if numbers is None:
        return None
    if numbers[0] != int(numbers[0]):
        raise Refusal(CANNOT_UNDERSTAND, keyword, "value is not an integer")
    return int(numbers[0])


def _text(ds: Dataset, keyword: str) -> str | None:
    if not _present(ds, keyword):
        return None
    return str(_value(ds, keyword)).strip()


def _check_geometry(ds: Dataset) -> tuple[tuple[float, float, float], tuple[float, ...], tuple[float, float]]:
    position = _numbers(ds, "ImagePositionPatient", 3)
    orientation = _numbers(ds, "ImageOrientationPatient", 6)
    row, col = orientation[:3], orientation[3:]
    # PS3.3 C.7.6.2.1.1: two orthogonal unit vectors. Scanners write 5-6 decimals; 1e-3 tolerates that.
    norm_r = math.sqrt(sum(v * v for v in row))
    norm_c = math.sqrt(sum(v * v for v in col))
    dot = sum(a * b for a, b in zip(row, col, strict=True))
    if abs(norm_r - 1) > 1e-3 or abs(norm_c - 1) > 1e-3 or abs(dot) > 1e-3:
        raise Refusal(CANNOT_UNDERSTAND, "ImageOrientationPatient", "is not two orthogonal unit vectors")
    spacing = _numbers(ds, "PixelSpacing", 2)
    if min(spacing) <= 0:
        raise Refusal(CANNOT_UNDERSTAND, "PixelSpacing", "values must be positive")
    return (position[0], position[1], position[2]), tuple(orientation), (spacing[0], spacing[1])


def _check_pixels(ds: Dataset) -> tuple[int, int]:
    """Pixel module and pixel data consistent with each other; returns (Rows, Columns)."""
    rows = _int(ds, "Rows")
    cols = _int(ds, "Columns")
    if rows <= 0 or cols <= 0:
        raise Refusal(DATASET_MISMATCH, "Rows" if rows <= 0 else "Columns", "must be positive")
    bits_allocated = _int(ds, "BitsAllocated")
    if bits_allocated not in (8, 16, 32):
        raise Refusal(DATASET_MISMATCH, "BitsAllocated", f"{bits_allocated} is not 8, 16 or 32")
    bits_stored = _int(ds, "BitsStored")
    if not 1 <= bits_stored <= bits_allocated:
        raise Refusal(
            DATASET_MISMATCH, "BitsStored", f"{bits_stored} does not fit BitsAllocated {bits_allocated}"
        )
    samples = _int(ds, "SamplesPerPixel", required=False) or 1
    if samples != 1:
        raise Refusal(
            DATASET_MISMATCH, "SamplesPerPixel", f"PET and CT images have 1 sample per pixel, found {samples}"
        )
    if _int(ds, "PixelRepresentation") not in (0, 1):
        raise Refusal(DATASET_MISMATCH, "PixelRepresentation", "must be 0 or 1")
    frames = _int(ds, "NumberOfFrames", required=False) or 1
    if frames != 1:
        raise Refusal(
            DATASET_MISMATCH, "NumberOfFrames", f"single-frame images expected, found {frames} frames"
        )
    found = _pixel_data_length(ds)
    if found == 0:
        raise Refusal(DATASET_MISMATCH, "PixelData", "missing or empty")
    transfer_syntax = ds.file_meta.TransferSyntaxUID if "TransferSyntaxUID" in ds.file_meta else None
    if transfer_syntax is not None and transfer_syntax.is_encapsulated:
        # Decode now: a Success for pixels that never decode would only fail the job later, unseen
        # by the sender.
        try:
            array = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - any decoder failure means the same to the sender
            raise Refusal(
                CANNOT_UNDERSTAND, "PixelData", f"compressed pixel data does not decode: {exc}"
            ) from None
        if array.shape != (rows, cols):
            raise Refusal(
                DATASET_MISMATCH, "PixelData", f"decodes to {array.shape}, Rows×Columns is {(rows, cols)}"
            )
        return rows, cols
    expected = rows * cols * bits_allocated // 8
    # Odd lengths are padded to even (PS3.5 7.1.1).
    if found not in (expected, expected + expected % 2):
        raise Refusal(
            DATASET_MISMATCH,
            "PixelData",
            f"holds {found} bytes, Rows×Columns×BitsAllocated ({rows}×{cols}×{bits_allocated}) "
            f"need {expected}",
        )
    return rows, cols


def _pixel_data_length(ds: Dataset) -> int:
    """Bytes of PixelData (0 when absent), without loading a value :func:`read_received` left on disk.

    A deferred value must end within the file: a length that runs past the end is a truncated file.
    """
    if _PIXEL_DATA not in ds:
        return 0
    raw = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    if isinstance(raw, RawDataElement) and raw.value is None and raw.length not in (0, 0xFFFFFFFF):
        filename = getattr(ds, "filename", None)
        if isinstance(filename, (str, os.PathLike)):
            if raw.value_tell + raw.length > os.path.getsize(filename):
                raise Refusal(
                    DATASET_MISMATCH,
                    "PixelData",
                    f"announces {raw.length} bytes but the data set ends before",
                )
        return int(raw.length)
    value = ds[_PIXEL_DATA].value
    if value is not None and not isinstance(value, bytes):
        raise Refusal(DATASET_MISMATCH, "PixelData", "is not a byte string")
    return len(value) if value else 0


def peek_instance_uids(path: str | os.PathLike[str], sop_instance_uid: str) -> tuple[str, str, str] | None:
    """Study and Series Instance UID from the first bytes of a received file, and the SOP Instance UID.

    A guess, cheap enough to name the file by before it is read (dicomnode.scp: its directory's fsync
    then overlaps the reading and validating): the elements before (0020,000E) are skipped by their
    lengths, nothing is converted. The caller confirms the guess with :func:`instance_uids` once the
    file is read. ``sop_instance_uid`` is the C-STORE request's (the data set's must equal it). None
    when the file is not simple enough to guess (not explicit or implicit VR little endian, the UIDs
    not within the first :data:`_PEEK_BYTES`) or a UID is not valid.
    """
    if len(sop_instance_uid) > 64 or not _UID.match(sop_instance_uid):
        return None
    try:
        with open(path, "rb") as f:
            data = f.read(_PEEK_BYTES)
        found = _peek(data)
    except (OSError, struct.error, ValueError, UnicodeDecodeError):
        return None  # whatever is wrong with the file, the full read says it
    if found is None:
        return None
    study, series = found
    return (study, series, sop_instance_uid) if all(len(u) <= 64 and _UID.match(u) for u in found) else None


def _peek(data: bytes) -> tuple[str, str] | None:
    if data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00":  # (0002,0000) group length
        return None
    start = 144 + struct.unpack_from("<I", data, 140)[0]  # the data set begins after group 0002
    meta = data[144:start]
    at = meta.find(b"\x02\x00\x10\x00UI")  # (0002,0010) TransferSyntaxUID
    if at < 0:
        return None
    syntax = meta[at + 8 : at + 8 + struct.unpack_from("<H", meta, at + 6)[0]].rstrip(b"\0 ")
    if syntax not in _PEEK_SYNTAXES:
        return None
    uids: dict[int, str] = {}
    _peek_elements(data, start, len(data), syntax == b"1.2.840.10008.1.2", uids, depth=0)
    study, series = uids.get(0x0020000D), uids.get(0x0020000E)
    return (study, series) if study and series else None


def _peek_elements(
    data: bytes, at: int, end: int, implicit: bool, uids: dict[int, str], *, depth: int
) -> int:
    """Skip elements from ``at``; at the top level keep the two UIDs, stopping past (0020,000E).

    Returns where it stopped: ``end``, or just past an item or sequence delimiter (nested levels).
    """
    if depth > _PEEK_DEPTH:
        raise ValueError("sequences nested too deep to skip")
    top = depth == 0
    while at + 8 <= end:
        group, element = struct.unpack_from("<HH", data, at)
        tag = group << 16 | element
        if top and tag > 0x0020000E:
            return at
        if tag in (0xFFFEE00D, 0xFFFEE0DD):  # item / sequence delimitation: the end of this level
            return at + 8
        if implicit:
            vr, length, at = b"", struct.unpack_from("<I", data, at + 4)[0], at + 8
        else:
            vr = data[at + 4 : at + 6]
            if vr in _LONG_VRS:
                length, at = struct.unpack_from("<I", data, at + 8)[0], at + 12
            else:
                length, at = struct.unpack_from("<H", data, at + 6)[0], at + 8
        if length == 0xFFFFFFFF:  # a sequence of undefined length: its items, to its delimiter
            at = _peek_items(data, at, end, implicit, depth + 1)
            continue
        if top and tag in (0x0020000D, 0x0020000E):
            uids[tag] = data[at : at + length].decode("ascii").rstrip("\0 ").strip()
        at += length
    if top:
        raise ValueError("the UIDs are not within the bytes read")
    return at


def _peek_items(data: bytes, at: int, end: int, implicit: bool, depth: int) -> int:
    while at + 8 <= end:
        tag, length = struct.unpack_from("<II", data, at)
        at += 8
        if tag == 0xE0DDFFFE:  # sequence delimitation item
            return at
        if tag != 0xE000FFFE:
            raise ValueError("not an item")
        at = _peek_elements(data, at, end, implicit, {}, depth=depth) if length == 0xFFFFFFFF else at + length
    raise ValueError("the sequence does not end within the bytes read")


def read_received(path: str | os.PathLike[str]) -> Dataset:
    """Read a received DICOM file (with file meta) for :func:`validate_instance`, PixelData left on disk.

    Raises :class:`Refusal` (``CANNOT_DECODE``) when the bytes are not a DICOM data set.
    """
    try:
        ds = dcmread(Path(path), defer_size=_DEFER_BYTES)
        syntax = ds.file_meta.get("TransferSyntaxUID")
        known = syntax is not None and syntax.is_transfer_syntax
    except Exception as exc:  # noqa: BLE001 - whatever the parser raises, the bytes are not a data set
        raise Refusal(CANNOT_DECODE, "(dataset)", f"does not decode: {type(exc).__name__}: {exc}") from None
    if not known:
        # pynetdicom writes the negotiated syntax here; anything else is a file we cannot interpret.
        raise Refusal(CANNOT_DECODE, "TransferSyntaxUID", "missing or not a transfer syntax")
    return ds


def _check_slice_thickness(ds: Dataset) -> None:
    thickness = _numbers(ds, "SliceThickness", 1, required=False)
    if thickness is not None and thickness[0] <= 0:
        raise Refusal(CANNOT_UNDERSTAND, "SliceThickness", "must be positive")


def _check_rescale(ds: Dataset, modality: str) -> None:
    slope = _numbers(ds, "RescaleSlope", 1, required=modality == "PT")
    _numbers(ds, "RescaleIntercept", 1, required=modality == "PT")
    if slope is not None and slope[0] == 0:
        raise Refusal(CANNOT_UNDERSTAND, "RescaleSlope", "is zero")


def instance_uids(ds: Dataset, *, sop_instance_uid: str) -> tuple[str, str, str]:
    """Study, Series and SOP Instance UID, checked as :func:`validate_instance` checks them.

    The store names an instance's file by them while the rest is validated (dicomnode.store), so they
    are read first: digits and dots only, and the SOP Instance UID the C-STORE request announced.
    """
    check_settings()  # read before the element walk, which checks them otherwise
    try:
        keys = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
        study, series, sop = (_uid(ds, key) for key in keys)
    except Refusal:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for values it cannot read
        raise Refusal(CANNOT_UNDERSTAND, "(UIDs)", f"a UID does not parse ({type(exc).__name__})") from None
    if sop != sop_instance_uid:
        raise Refusal(
            DATASET_MISMATCH, "SOPInstanceUID", "differs from the C-STORE request's Affected SOP Instance UID"
        )
    return study, series, sop


def validate_instance(ds: Dataset, *, sop_class_uid: str, sop_instance_uid: str) -> InstanceMeta:
    """Check a received dataset against the DIMSE request that carried it.

    ``ds`` needs ``file_meta`` (its transfer syntax tells whether pixel data is encapsulated);
    ``sop_class_uid``/``sop_instance_uid`` are the C-STORE request's Affected SOP Class/Instance UIDs.
    Raises :class:`Refusal`; returns the index fields otherwise.
    """
    # First: every value parses, so the checks below read values without surprises.
    check_elements(ds)
    sop_class = _uid(ds, "SOPClassUID")
    if sop_class != sop_class_uid:
        raise Refusal(
            DATASET_MISMATCH, "SOPClassUID", "differs from the C-STORE request's Affected SOP Class UID"
        )
    if sop_class not in SUPPORTED_SOP_CLASSES:
        raise Refusal(DATASET_MISMATCH, "SOPClassUID", "is not PET or CT Image Storage")
    sop_uid = _uid(ds, "SOPInstanceUID")
    if sop_uid != sop_instance_uid:
        raise Refusal(
            DATASET_MISMATCH, "SOPInstanceUID", "differs from the C-STORE request's Affected SOP Instance UID"
        )
    study_uid = _uid(ds, "StudyInstanceUID")
    series_uid = _uid(ds, "SeriesInstanceUID")
    modality = _text(ds, "Modality")
    expected_modality = SUPPORTED_SOP_CLASSES[sop_class]
    if modality != expected_modality:
        raise Refusal(
            DATASET_MISMATCH,
            "Modality",
            f"{modality or 'missing'} does not match the SOP class (needs {expected_modality})",
        )
    frame_of_reference = _uid(ds, "FrameOfReferenceUID")
    position, orientation, pixel_spacing = _check_geometry(ds)
    _check_slice_thickness(ds)
    _check_rescale(ds, modality)
    rows, cols = _check_pixels(ds)

    units = corrected = series_type = number_of_slices = None
    if modality == "PT":
        units = _text(ds, "Units")
        if units == "CNTS" and philips_scale_factors(ds)[1] is not None:
            # Philips counts with their activity concentration factor are read as Bq/ml
            # (dicomnode.pet_units), so the series is selected like any BQML one.
            units = "BQML"
        corrected = ds.get("CorrectedImage")
        series_type = ds.get("SeriesType")
        number_of_slices = _int(ds, "NumberOfSlices", required=False)
        if number_of_slices is not None and number_of_slices <= 0:
            raise Refusal(CANNOT_UNDERSTAND, "NumberOfSlices", "must be positive")
    return InstanceMeta(
        sop_uid=sop_uid,
        study_uid=study_uid,
        series_uid=series_uid,
        sop_class_uid=sop_class,
        modality=modality,
        frame_of_reference_uid=frame_of_reference,
        position_mm=position,
        orientation=orientation,  # type: ignore[arg-type]
        rows=rows,
        columns=cols,
        pixel_spacing_mm=pixel_spacing,
        units=units,
        corrected_image=_values(corrected),
        series_type=_values(series_type)[0] if _values(series_type) else None,
        number_of_slices=number_of_slices,
    )


def _values(value: object) -> tuple[str, ...]:
    """A CS (multi-)value as a tuple of upper-case strings."""
    if value in (None, ""):
        return ()
    items = value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
    return tuple(str(v).strip().upper() for v in items)  # type: ignore[union-attr]
