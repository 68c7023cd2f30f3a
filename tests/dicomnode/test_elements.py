"""The receive-time element walk (dicomnode.elements.check_elements): each value read as pydicom reads
it, or passed because the very same value was read before without a refusal."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicomnode import elements
from dicomnode.elements import ParsedValues, check_elements, value_of
from dicomnode.statuses import CANNOT_UNDERSTAND, Refusal
from dicomnode.testing.scanner import StudyInfo, write_pet_series
from dicomnode.validate import read_received, validate_instance


@pytest.fixture(scope="module")
def pet(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """A PET instance with what the walk treats apart: private elements, ambiguous VRs, nested items."""
    activity = np.random.default_rng(3).uniform(0, 9000, (2, 6, 5)).astype(np.float32)
    ds = dcmread(write_pet_series(tmp_path_factory.mktemp("pet"), activity, spacing_mm=(3.0, 4.0, 4.0),
                                  study=StudyInfo())[0])
    block = ds.private_block(0x0009, "UPETE TEST", create=True)
    block.add_new(0x10, "LO", "private text")
    block.add_new(0x11, "DS", "1.5")
    block.add_new(0x12, "US", 7)
    ds.add_new(0x00280106, "US", 3)  # SmallestImagePixelValue: "US or SS" in the dictionary
    item = Dataset()
    item.add_new(0x00280106, "US", 1)
    inner = Dataset()
    inner.SliceThickness = "2.5"
    item.ReferencedImageSequence = Sequence([inner])
    ds.SourceImageSequence = Sequence([item])
    return ds


def _write(ds: Dataset, path: Path, syntax: str) -> Path:
    ds = copy.deepcopy(ds)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(path, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True,
               enforce_file_format=True)
    return path


def _values(ds: Dataset) -> list[tuple[int, str, object]]:
    """(tag, VR, value) of every element, nested items included, as pydicom's own ``ds[tag]`` reads them."""
    found = []
    for element in ds:  # iterating converts through Dataset.__getitem__
        if element.tag == 0x7FE00010:
            continue
        if element.VR == "SQ":
            found.append((int(element.tag), element.VR, len(element.value)))
            for item in element.value:
                found += _values(item)
        else:
            found.append((int(element.tag), element.VR, element.value))
    return found


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_the_walk_reads_every_value_as_pydicom_does(pet: Dataset, tmp_path: Path, syntax: str) -> None:
    path = _write(pet, tmp_path / "pet.dcm", syntax)
    walked = read_received(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        validate_instance(walked, sop_class_uid=pet.SOPClassUID, sop_instance_uid=pet.SOPInstanceUID)
        expected = _values(read_received(path))  # a fresh read, converted by pydicom alone
    # Left in the data set as pydicom would have left it: the same VRs (ambiguous ones resolved, the
    # private creator's block found) and the same values, which later checks read from it.
    assert _values(walked) == expected
    assert walked[0x00091012].private_creator == "UPETE TEST"
    assert walked.SourceImageSequence[0][0x00280106].VR == "US"


@pytest.mark.parametrize(
    ("syntax", "where", "value", "attribute", "reason"),
    [
        (ExplicitVRLittleEndian, "nested", b"thick ", "SliceThickness", "value is not a number"),
        (ImplicitVRLittleEndian, "nested", b"thick ", "SliceThickness", "value is not a number"),
        # "nan" parses as a float, but is not a decimal string (PS3.5 6.2). Only with explicit VR: in
        # implicit VR a private element of an unknown creator is UN, opaque bytes.
        (ExplicitVRLittleEndian, "private", b"nan ", "(0009,1011)", "value is not a finite number"),
    ],
)
def test_a_number_that_does_not_parse_is_refused_wherever_it_is(
    pet: Dataset, tmp_path: Path, syntax: str, where: str, value: bytes, attribute: str, reason: str
) -> None:
    ds = copy.deepcopy(pet)
    tag = Tag(0x00180050) if where == "nested" else Tag(0x00091011)
    target = ds.SourceImageSequence[0].ReferencedImageSequence[0] if where == "nested" else ds
    # Bytes as a broken sender puts them, past pydicom's checks.
    implicit = syntax == ImplicitVRLittleEndian
    target._dict[tag] = RawDataElement(tag, "DS", len(value), value, 0, implicit, True)
    path = _write(ds, tmp_path / "bad.dcm", syntax)
    with warnings.catch_warnings(), pytest.raises(Refusal) as refused:
        warnings.simplefilter("ignore")
        validate_instance(read_received(path), sop_class_uid=ds.SOPClassUID,
                          sop_instance_uid=ds.SOPInstanceUID)
    assert (refused.value.status, refused.value.attribute) == (CANNOT_UNDERSTAND, attribute)
    assert refused.value.reason == reason


@pytest.fixture
def memo(monkeypatch: pytest.MonkeyPatch) -> ParsedValues:
    """A fresh memo for one test, so that what other tests read does not decide what passes here."""
    fresh = ParsedValues(limit=1000)
    monkeypatch.setattr(elements, "_PARSED", fresh)
    return fresh


def _slice_thickness_raw(ds: Dataset) -> bool:
    return isinstance(ds.get_item(Tag(0x00180050), keep_deferred=True), RawDataElement)


def _walked_twice(pet: Dataset, tmp_path: Path) -> tuple[Dataset, Dataset]:
    """The same file read twice, each walked: the second walk finds every value in the memo."""
    path = _write(pet, tmp_path / "pet.dcm", ExplicitVRLittleEndian)
    first, second = read_received(path), read_received(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_elements(first)
        assert not _slice_thickness_raw(first)  # converted, as ds[tag] converts it
        check_elements(second)
    return first, second


def test_a_value_read_before_passes_unconverted_and_reads_as_pydicom_reads_it(
    pet: Dataset, tmp_path: Path, memo: ParsedValues
) -> None:
    first, second = _walked_twice(pet, tmp_path)
    # Passed from the memo and left for pydicom to convert when read, which gives the same value.
    assert _slice_thickness_raw(second)
    assert _values(second) == _values(first)


def test_a_refused_value_is_never_remembered(pet: Dataset, tmp_path: Path, memo: ParsedValues) -> None:
    ds = copy.deepcopy(pet)
    tag = Tag(0x00180050)
    ds._dict[tag] = RawDataElement(tag, "DS", 4, b"nan ", 0, False, True)
    path = _write(ds, tmp_path / "bad.dcm", ExplicitVRLittleEndian)
    for _ in range(2):  # refused again: a value is remembered only once it passed
        with warnings.catch_warnings(), pytest.raises(Refusal) as refused:
            warnings.simplefilter("ignore")
            check_elements(read_received(path))
        assert refused.value.attribute == "SliceThickness"
        assert refused.value.reason == "value is not a finite number"


def test_a_value_passed_under_other_settings_is_read_again(
    pet: Dataset, tmp_path: Path, memo: ParsedValues
) -> None:
    # A Short String too long converts with a warning; where warnings are errors, it does not convert.
    ds = copy.deepcopy(pet)
    tag = Tag(0x00081010)  # StationName, SH: at most 16 characters
    ds._dict[tag] = RawDataElement(tag, "SH", 20, b"S" * 20, 0, False, True)
    path = _write(ds, tmp_path / "long.dcm", ExplicitVRLittleEndian)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_elements(read_received(path))
    with warnings.catch_warnings(), pytest.raises(Refusal) as refused:
        warnings.simplefilter("error")
        check_elements(read_received(path))
    assert refused.value.attribute == "StationName"


def test_the_memo_forgets_everything_when_full() -> None:
    memo = ParsedValues(limit=2)
    memo.add(("a",))
    memo.add(("b",))
    assert ("a",) in memo and ("b",) in memo
    memo.add(("c",))
    assert ("a",) not in memo and ("c",) in memo


def test_values_read_again_are_remembered_only_when_they_cannot_change(
    pet: Dataset, tmp_path: Path, memo: ParsedValues
) -> None:
    first, second = _walked_twice(pet, tmp_path)
    modality, orientation = Tag(0x00080060), Tag(0x00200037)
    assert value_of(second, modality) == "PT" and value_of(second, modality) is value_of(first, modality)
    # A list is read afresh for each data set: a reader changing one cannot change another's.
    assert value_of(second, orientation) == first[orientation].value
    assert value_of(second, orientation) is not first[orientation].value
    assert value_of(second, Tag(0x00091099)) is None  # absent


def _nested(depth: int, innermost: Dataset) -> Dataset:
    """``innermost`` as the item of ``depth`` nested Source Image Sequences."""
    ds = innermost
    for _ in range(depth):
        outer = Dataset()
        outer.SourceImageSequence = Sequence([ds])
        ds = outer
    return ds


def _outcome(path: Path) -> tuple[str, str] | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check_elements(read_received(path))
    except Refusal as refusal:
        return refusal.attribute, refusal.reason
    return None


def test_a_sequence_read_before_passes_unparsed_only_where_its_depth_passes(
    pet: Dataset, tmp_path: Path, memo: ParsedValues
) -> None:
    inner = Dataset()
    inner.SliceThickness = "2.5"
    # Four deep below its element; at the top it passes, below 13 more levels it is too deep.
    shallow, deep = copy.deepcopy(pet), copy.deepcopy(pet)
    shallow.ReferencedImageSequence = Sequence([_nested(3, inner)])
    deep.ReferencedImageSequence = Sequence([_nested(13, _nested(1, copy.deepcopy(shallow)[0x00081140][0]))])
    shallow_path = _write(shallow, tmp_path / "shallow.dcm", ExplicitVRLittleEndian)
    deep_path = _write(deep, tmp_path / "deep.dcm", ExplicitVRLittleEndian)
    cold = _outcome(deep_path)
    assert cold is not None and "nested deeper" in cold[1]
    memo.check_settings()
    assert _outcome(shallow_path) is None and _outcome(shallow_path) is None
    assert isinstance(read_received(shallow_path).get_item(Tag(0x00081140)), RawDataElement)
    assert _outcome(deep_path) == cold  # the same refusal as without the memo


def test_a_sequence_with_a_value_that_reads_outside_its_items_is_walked_each_time(
    pet: Dataset, tmp_path: Path, memo: ParsedValues
) -> None:
    # In implicit VR, SmallestImagePixelValue is US or SS, decided by the Pixel Representation of the
    # data set (in explicit VR its VR is written, and the sequence may be remembered).
    path = _write(pet, tmp_path / "pet.dcm", ImplicitVRLittleEndian)
    for _ in range(2):
        ds = read_received(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check_elements(ds)
        assert not isinstance(ds.get_item(Tag(0x00082112)), RawDataElement)  # SourceImageSequence parsed
