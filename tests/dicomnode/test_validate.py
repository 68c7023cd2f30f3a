"""Reading a received file: the UIDs peeked from its first bytes are those the full read checks."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicomnode.testing.scanner import StudyInfo, write_pet_series
from dicomnode.validate import instance_uids, peek_instance_uids, read_received


@pytest.fixture(scope="module")
def pet(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """A PET instance with sequences (nested, of undefined length) before the Study Instance UID."""
    activity = np.random.default_rng(5).uniform(0, 9000, (2, 6, 5)).astype(np.float32)
    ds = dcmread(write_pet_series(tmp_path_factory.mktemp("pet"), activity, spacing_mm=(3.0, 4.0, 4.0),
                                  study=StudyInfo())[0])
    inner = Dataset()
    inner.ReferencedSOPInstanceUID = "1.2.3.4"
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedImageSequence = Sequence([inner])  # nested: an item within an item
    ds.ReferencedImageSequence = Sequence([item, copy.deepcopy(item)])  # (0008,1140)
    return ds


def _write(ds: Dataset, path: Path, syntax: str, *, undefined_lengths: bool = True) -> Path:
    ds = copy.deepcopy(ds)
    ds.file_meta.TransferSyntaxUID = syntax
    for element in ds.iterall():
        if element.VR == "SQ":
            element.is_undefined_length = undefined_lengths
            for item in element.value:
                item.is_undefined_length_sequence_item = undefined_lengths
    implicit = syntax == ImplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True, implicit_vr=implicit, little_endian=True)
    return path


@pytest.mark.parametrize("undefined_lengths", [True, False])
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_the_peek_finds_the_uids_the_full_read_checks(
    pet: Dataset, tmp_path: Path, syntax: str, undefined_lengths: bool
) -> None:
    path = _write(pet, tmp_path / "pet.dcm", syntax, undefined_lengths=undefined_lengths)
    assert (b"\xfe\xff\xdd\xe0" in path.read_bytes()) == undefined_lengths  # sequence delimiters
    expected = instance_uids(read_received(path), sop_instance_uid=pet.SOPInstanceUID)
    assert peek_instance_uids(path, pet.SOPInstanceUID) == expected


def test_other_syntaxes_are_not_peeked(pet: Dataset, tmp_path: Path) -> None:
    deflated = _write(pet, tmp_path / "deflated.dcm", DeflatedExplicitVRLittleEndian)
    assert peek_instance_uids(deflated, pet.SOPInstanceUID) is None
    # The same bytes announced as big endian, whose lengths would read otherwise.
    data = _write(pet, tmp_path / "pet.dcm", ExplicitVRLittleEndian).read_bytes()
    big = tmp_path / "big.dcm"
    meta = data[:300].replace(ExplicitVRLittleEndian.encode(), ExplicitVRBigEndian.encode())
    big.write_bytes(meta + data[300:])
    assert peek_instance_uids(big, pet.SOPInstanceUID) is None


def test_nothing_is_guessed_from_what_is_not_a_plain_uid_or_not_dicom(pet: Dataset, tmp_path: Path) -> None:
    path = _write(pet, tmp_path / "pet.dcm", ExplicitVRLittleEndian)
    assert peek_instance_uids(path, "../1.2") is None  # the request's SOP Instance UID names the file too
    bad = copy.deepcopy(pet)
    bad.SeriesInstanceUID = "1.2.x"
    bad_path = _write(bad, tmp_path / "bad.dcm", ExplicitVRLittleEndian)
    assert peek_instance_uids(bad_path, pet.SOPInstanceUID) is None
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(path.read_bytes()[:300])
    assert peek_instance_uids(garbage, pet.SOPInstanceUID) is None
    assert peek_instance_uids(tmp_path / "missing.dcm", pet.SOPInstanceUID) is None
