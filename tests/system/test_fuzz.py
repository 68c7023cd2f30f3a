"""Property-based fuzzing of what reads untrusted DICOM: receive-time validation and series loading.

A valid synthetic PET instance (or series) is mutated at random — attributes deleted, replaced by
arbitrary bytes under their own or another VR, numbers replaced by odd ones (nan, inf, negative,
huge, text), the encoded file's bytes flipped, cut or spliced — and the property is always the same:

- :func:`dicomnode.validate.read_received` + :func:`~dicomnode.validate.validate_instance` either
  accept the instance (an :class:`InstanceMeta`) or raise :class:`Refusal` with a C-STORE failure
  status; no other exception (which the SCP would turn into the anonymous 0xC211);
- :func:`dicomnode.volume.load_series` either returns a volume or raises :class:`VolumeError` (the
  job's reason); no other exception (a job failing for a traceback, or the worker thread dying).

Examples are bounded and derandomized so CI is reproducible and stays well under a minute; set
``UPETE_FUZZ_EXAMPLES=2000`` (and ``UPETE_FUZZ_RANDOM=1`` for fresh seeds) to search longer.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import PositronEmissionTomographyImageStorage

from dicomnode.testing.scanner import StudyInfo, write_pet_series
from dicomnode.validate import InstanceMeta, Refusal, read_received, validate_instance
from dicomnode.volume import SeriesVolume, VolumeError, load_series

PET = PositronEmissionTomographyImageStorage
FAILURE_STATUSES = {0xA900, 0xC000, 0xC210}

_EXAMPLES = int(os.environ.get("UPETE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=_EXAMPLES,
    deadline=None,  # the CPU is shared with other work; a slow example is not a failure
    derandomize=not os.environ.get("UPETE_FUZZ_RANDOM"),
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# Attributes the node reads (and a few it only copies), the targets of the attribute mutations.
KEYWORDS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "FrameOfReferenceUID",
    "Modality",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "SamplesPerPixel",
    "NumberOfFrames",
    "RescaleSlope",
    "RescaleIntercept",
    "Units",
    "CorrectedImage",
    "SeriesType",
    "NumberOfSlices",
    "InstanceNumber",
    "PatientWeight",
    "DecayFactor",
    "RadiopharmaceuticalInformationSequence",
    "PixelData",
]
ODD_NUMBERS = [
    b"nan",
    b"inf",
    b"-inf",
    b"-1",
    b"0",
    b"-0",
    b"1e308",
    b"1e-308",
    b"65535",
    b"4294967296",
    b"abc",
    b"1.0.0",
    b"",
    b" ",
    b"\\",
    b"1\\2\\3\\4\\5\\6\\7",
]
VRS = ["DS", "IS", "US", "SS", "UL", "FL", "FD", "UI", "CS", "LO", "SQ", "OB", "OW", "UN", "AT"]


def _raw(ds: Dataset, keyword: str, vr: str, value: bytes) -> None:
    """Put bytes the way a broken sender would, bypassing pydicom's checks."""
    tag = Tag(tag_for_keyword(keyword))
    ds._dict[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)


@st.composite
def mutation(draw: st.DrawFn) -> tuple:
    keyword = draw(st.sampled_from(KEYWORDS))
    kind = draw(st.sampled_from(["delete", "number", "bytes", "vr"]))
    if kind == "delete":
        return (kind, keyword)
    if kind == "number":
        count = draw(st.integers(1, 3))
        values = draw(st.lists(st.sampled_from(ODD_NUMBERS), min_size=count, max_size=count))
        return (kind, keyword, b"\\".join(values))
    if kind == "bytes":
        return (kind, keyword, draw(st.binary(max_size=40)))
    return (kind, keyword, draw(st.sampled_from(VRS)), draw(st.binary(max_size=24)))


def _apply(ds: Dataset, change: tuple) -> None:
    kind, keyword = change[0], change[1]
    if kind == "delete":
        if keyword in ds:
            del ds[keyword]
    elif kind == "number":
        vr = dictionary_VR(tag_for_keyword(keyword))
        _raw(ds, keyword, vr if vr in ("DS", "IS") else "DS", change[2])
    elif kind == "bytes":
        _raw(ds, keyword, dictionary_VR(tag_for_keyword(keyword)).split(" ")[0], change[2])
    else:
        _raw(ds, keyword, change[2], change[3])


def _encode(ds: Dataset) -> bytes | None:
    """The file bytes of a mutated dataset, or None when pydicom itself refuses to write them."""
    buffer = BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.save_as(buffer, enforce_file_format=True)
    except Exception:  # noqa: BLE001 - a dataset no sender could put on the wire either
        return None
    return buffer.getvalue()


def _check_received(data: bytes) -> InstanceMeta | Refusal:
    """What the SCP does with a received file, minus the network: read, then validate."""
    with tempfile.NamedTemporaryFile(suffix=".dcm") as handle:
        handle.write(data)
        handle.flush()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = read_received(handle.name)
                return validate_instance(ds, sop_class_uid=PET, sop_instance_uid=SOP_UID)
        except Refusal as refusal:
            assert refusal.status in FAILURE_STATUSES, hex(refusal.status)
            assert refusal.attribute and refusal.reason
            return refusal


SOP_UID = "1.2.826.0.1.3680043.8.498.1"


@pytest.fixture(scope="module")
def good_pet(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    activity = np.random.default_rng(7).uniform(0, 9000, (3, 6, 5)).astype(np.float32)
    path = write_pet_series(
        tmp_path_factory.mktemp("fuzz"), activity, spacing_mm=(3.0, 4.0, 4.0), study=StudyInfo()
    )[0]
    ds = dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = SOP_UID
    return ds


def test_the_unmutated_instance_is_accepted(good_pet: Dataset) -> None:
    # Without this the properties below could pass by refusing everything.
    meta = _check_received(_encode(copy.deepcopy(good_pet)))
    assert isinstance(meta, InstanceMeta) and (meta.rows, meta.columns) == (6, 5)


@FUZZ
@given(changes=st.lists(mutation(), min_size=1, max_size=4))
@example(changes=[("vr", "Rows", "UN", b"\x00")])  # found by a long run: UN is converted to US
def test_mutated_attributes_are_accepted_or_refused_by_name(good_pet: Dataset, changes: list) -> None:
    ds = copy.deepcopy(good_pet)
    for change in changes:
        _apply(ds, change)
    data = _encode(ds)
    if data is not None:
        _check_received(data)


@FUZZ
@given(data=st.data())
def test_mutated_bytes_are_accepted_or_refused(good_pet: Dataset, data: st.DataObject) -> None:
    encoded = bytearray(_encode(copy.deepcopy(good_pet)))
    header_end = len(encoded) - len(good_pet.PixelData)  # mutate the header, where parsing happens
    for _ in range(data.draw(st.integers(1, 6))):
        end = min(header_end, len(encoded)) - 1
        if end <= 132:
            break
        position = data.draw(st.integers(132, end))  # after the preamble and "DICM"
        how = data.draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
        if how == "flip":
            encoded[position] = data.draw(st.integers(0, 255))
        elif how == "cut":
            del encoded[position : position + data.draw(st.integers(1, 16))]
        elif how == "insert":
            encoded[position:position] = data.draw(st.binary(min_size=1, max_size=16))
        else:
            del encoded[position:]
    _check_received(bytes(encoded))


def test_a_truncated_file_is_refused(good_pet: Dataset) -> None:
    encoded = _encode(copy.deepcopy(good_pet))
    result = _check_received(encoded[:-7])
    assert isinstance(result, Refusal) and result.attribute == "PixelData"


# ---------------------------------------------------------------------------------------------------
# Series loading


@pytest.fixture(scope="module")
def pet_series(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    activity = np.random.default_rng(8).uniform(0, 9000, (4, 5, 6)).astype(np.float32)
    paths = write_pet_series(
        tmp_path_factory.mktemp("fuzz-series"), activity, spacing_mm=(3.0, 4.0, 4.0), study=StudyInfo()
    )
    return [dcmread(p) for p in paths]


def _load(datasets: list[Dataset], directory: Path) -> SeriesVolume | VolumeError:
    paths = []
    for i, ds in enumerate(datasets):
        path = directory / f"{i}.dcm"
        data = _encode(ds)
        path.write_bytes(data if data is not None else b"not DICOM")
        paths.append(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return load_series(paths)
    except VolumeError as exc:
        assert str(exc)
        return exc


def test_the_unmutated_series_loads(pet_series: list[Dataset], tmp_path: Path) -> None:
    volume = _load(copy.deepcopy(pet_series), tmp_path)
    assert isinstance(volume, SeriesVolume) and volume.image.GetSize() == (6, 5, 4)


@FUZZ
@given(changes=st.lists(st.tuples(st.integers(0, 3), mutation()), min_size=1, max_size=4))
def test_mutated_series_load_or_fail_with_a_reason(pet_series: list[Dataset], changes: list) -> None:
    datasets = copy.deepcopy(pet_series)
    for index, change in changes:
        _apply(datasets[index], change)
    with tempfile.TemporaryDirectory() as directory:
        _load(datasets, Path(directory))


@pytest.mark.parametrize(
    ("keyword", "value", "reason"),
    [
        ("PixelSpacing", [1e6, 1e6], "spans"),
        ("ImagePositionPatient", [0, 0, 1e9], "uneven slice spacing"),
        ("SliceThickness", -3.0, None),  # not used for a multi-slice series: loads
    ],
)
def test_absurd_geometry_fails_with_a_reason(
    pet_series: list[Dataset], tmp_path: Path, keyword: str, value: object, reason: str | None
) -> None:
    datasets = copy.deepcopy(pet_series)
    for ds in datasets if keyword != "ImagePositionPatient" else datasets[-1:]:
        setattr(ds, keyword, value)
    result = _load(datasets, tmp_path)
    if reason is None:
        assert isinstance(result, SeriesVolume)
    else:
        assert isinstance(result, VolumeError) and reason in str(result)


def test_a_whole_series_spread_over_kilometres_is_refused(pet_series: list[Dataset], tmp_path: Path) -> None:
    datasets = copy.deepcopy(pet_series)
    for k, ds in enumerate(datasets):
        position = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [position[0], position[1], k * 1e6]
    result = _load(datasets, tmp_path)
    assert isinstance(result, VolumeError) and "spans" in str(result)
