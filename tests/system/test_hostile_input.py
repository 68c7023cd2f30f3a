"""Hostile input over real associations: a corpus of malformed and adversarial data sets, each sent to
a running `upete serve` as the bytes a broken or malicious sender would put on the wire.

Every one must get a failure status (0xA900 data set mismatch, 0xC000/0xC210 cannot understand or
decode; PS3.4 B.2.3, as dicomnode/validate.py names them) with a log line naming the attribute —
never Success, a dropped association, a hang or a dead node — and nothing of it may reach the spool.
tests/system/test_bad_input.py has the plain cases (missing attributes, short pixel data); this file has
the adversarial ones: truncation, wrong VRs, absurd sizes, nesting, non-numbers in numeric fields.
"""

from __future__ import annotations

import copy
import struct
import time
import warnings
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import Tag
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    PositronEmissionTomographyImageStorage,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.dsutils import encode

from dicomnode.testing.peers import NodeProcess, db_rows, echoscu, free_port, write_config
from dicomnode.testing.scanner import StudyInfo, write_pet_series

pytestmark = pytest.mark.network

PET = PositronEmissionTomographyImageStorage
_PIXEL_DATA_HEADER = b"\xe0\x7f\x10\x00"  # (7FE0,0010) in little endian
_PRIVATE_SQ = b"\x09\x00\x10\x10"  # (0009,1010)
_ITEM, _ITEM_END, _SEQ_END = b"\xfe\xff\x00\xe0", b"\xfe\xff\x0d\xe0", b"\xfe\xff\xdd\xe0"
_UNDEFINED = b"\xff\xff\xff\xff"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> NodeProcess:
    directory = tmp_path_factory.mktemp("hostile")
    # A long quiet timer: the good instances sent here never become a job.
    config = write_config(directory, port=free_port(), series_timeout_s=600)
    with NodeProcess(config) as running:
        yield running


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    activity = np.random.default_rng(5).uniform(0, 9000, (2, 8, 8)).astype(np.float32)
    path = write_pet_series(
        tmp_path_factory.mktemp("good"), activity, spacing_mm=(3.0, 4.0, 4.0), study=StudyInfo()
    )[0]
    return dcmread(path)


class Wire:
    """One hostile instance: the SOP class and instance announced, and the data set's bytes."""

    def __init__(self, good: Dataset, *, sop_class: str = PET) -> None:
        self.ds = copy.deepcopy(good)
        self.ds.SOPInstanceUID = generate_uid()
        self.sop_class = sop_class
        self.sop_instance = str(self.ds.SOPInstanceUID)

    def raw(self, keyword_or_tag: str | int, vr: str, value: bytes) -> Wire:
        """Put a value the way a broken sender would, bypassing pydicom's checks."""
        tag = Tag(keyword_or_tag)
        self.ds._dict[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)
        return self

    def body(self) -> bytes:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return encode(self.ds, False, True)


def _before_pixels(body: bytes, insert: bytes) -> bytes:
    at = body.index(_PIXEL_DATA_HEADER)
    return body[:at] + insert + body[at:]


def _nested(depth: int, *, undefined: bool) -> bytes:
    """A private sequence nested ``depth`` deep, with defined or undefined lengths."""
    inner = b""
    for _ in range(depth):
        if undefined:
            item = _ITEM + _UNDEFINED + inner + _ITEM_END + b"\0\0\0\0"
            inner = _PRIVATE_SQ + b"SQ\0\0" + _UNDEFINED + item + _SEQ_END + b"\0\0\0\0"
        else:
            item = _ITEM + struct.pack("<I", len(inner)) + inner
            inner = _PRIVATE_SQ + b"SQ\0\0" + struct.pack("<I", len(item)) + item
    return inner


def _huge_sequence(items: int) -> bytes:
    """A private sequence of ``items`` items holding one short element each (~20 bytes per item)."""
    element = b"\x09\x00\x11\x10LO\x04\x00abcd"
    item = _ITEM + struct.pack("<I", len(element)) + element
    value = item * items
    return _PRIVATE_SQ + b"SQ\0\0" + struct.pack("<I", len(value)) + value


def _set(keyword: str, value: object) -> Callable[[Wire], bytes]:
    def build(wire: Wire) -> bytes:
        setattr(wire.ds, keyword, value)
        return wire.body()

    return build


def _raw(keyword: str, vr: str, value: bytes) -> Callable[[Wire], bytes]:
    return lambda wire: wire.raw(keyword, vr, value).body()


def _pixels(value: bytes) -> Callable[[Wire], bytes]:
    def build(wire: Wire) -> bytes:
        wire.ds.PixelData = value
        return wire.body()

    return build


# case: (builder of the bytes on the wire, SOP class announced, expected status, attribute logged)
CORPUS: dict[str, tuple[Callable[[Wire], bytes], str, int, str]] = {
    # Truncation: the association delivers fewer bytes than the elements announce.
    "truncated inside PixelData": (lambda w: w.body()[:-37], PET, 0xA900, "PixelData"),
    "truncated inside an element header": (
        lambda w: w.body()[: w.body().index(_PIXEL_DATA_HEADER) + 3],
        PET,
        0xA900,
        "PixelData",  # pydicom stops at the broken element header: no pixel data
    ),
    "cut after the first 40 bytes": (lambda w: w.body()[:40], PET, 0xA900, "SOPClassUID"),
    "an element announcing 4 GB": (
        lambda w: _before_pixels(w.body(), b"\x09\x00\x12\x10OB\0\0\xf0\xff\xff\xff" + b"\x01" * 16),
        PET,
        0xA900,
        "PixelData",  # the 4 GB value swallows the rest of the data set
    ),
    "undefined length on a text element": (
        lambda w: _before_pixels(w.body(), b"\x09\x00\x13\x10UN\0\0" + _UNDEFINED + b"abcd"),
        PET,
        0xC210,
        "(dataset)",
    ),
    # Absurd sizes and pixel data that does not fit them.
    "Rows and Columns 65535": (
        lambda w: (setattr(w.ds, "Rows", 65535), setattr(w.ds, "Columns", 65535), w.body())[-1],
        PET,
        0xA900,
        "PixelData",
    ),
    "Rows 0": (_set("Rows", 0), PET, 0xA900, "Rows"),
    "zero-length PixelData": (_pixels(b""), PET, 0xA900, "PixelData"),
    "PixelData longer than Rows x Columns": (
        lambda w: (setattr(w.ds, "PixelData", w.ds.PixelData + b"\0" * 64), w.body())[-1],
        PET,
        0xA900,
        "PixelData",
    ),
    "PixelData as a decimal string": (_raw("PixelData", "DS", b"1\\2\\3 "), PET, 0xA900, "PixelData"),
    "BitsAllocated 12": (_set("BitsAllocated", 12), PET, 0xA900, "BitsAllocated"),
    "BitsStored above BitsAllocated": (_set("BitsStored", 17), PET, 0xA900, "BitsStored"),
    "SamplesPerPixel 3": (_set("SamplesPerPixel", 3), PET, 0xA900, "SamplesPerPixel"),
    "NumberOfFrames 2": (_raw("NumberOfFrames", "IS", b"2 "), PET, 0xA900, "NumberOfFrames"),
    # Nesting and size of sequences.
    "sequence nested 5000 deep (defined lengths)": (
        lambda w: _before_pixels(w.body(), _nested(5000, undefined=False)),
        PET,
        0xC000,
        "(0009,1010)",
    ),
    "sequence nested 3000 deep (undefined lengths)": (
        lambda w: _before_pixels(w.body(), _nested(3000, undefined=True)),
        PET,
        0xC210,
        "(dataset)",
    ),
    "sequence of 150000 items": (
        lambda w: _before_pixels(w.body(), _huge_sequence(150_000)),
        PET,
        0xC000,
        "(dataset)",
    ),
    # Wrong VRs.
    "Rows as US of three bytes": (_raw("Rows", "US", b"\x08\x00\x00"), PET, 0xC000, "Rows"),
    "ImagePositionPatient as FD of 7 bytes": (
        _raw("ImagePositionPatient", "FD", b"\0" * 7),
        PET,
        0xC000,
        "ImagePositionPatient",
    ),
    "Rows as UN of one byte": (_raw("Rows", "UN", b"\x08"), PET, 0xC000, "Rows"),
    "SOPClassUID as US": (_raw("SOPClassUID", "US", b"\x01\x00"), PET, 0xA900, "SOPClassUID"),
    # Non-numbers and non-finite numbers in numeric strings.
    "InstanceNumber (IS) abc": (_raw("InstanceNumber", "IS", b"abc "), PET, 0xC000, "InstanceNumber"),
    "PatientWeight (DS) nan": (_raw("PatientWeight", "DS", b"nan "), PET, 0xC000, "PatientWeight"),
    "RescaleSlope inf": (_raw("RescaleSlope", "DS", b"inf "), PET, 0xC000, "RescaleSlope"),
    "ImagePositionPatient with -inf": (
        _raw("ImagePositionPatient", "DS", b"0\\-inf\\0 "),
        PET,
        0xC000,
        "ImagePositionPatient",
    ),
    "DecayFactor 1e999": (_raw("DecayFactor", "DS", b"1e999 "), PET, 0xC000, "DecayFactor"),
    "negative SliceThickness": (_raw("SliceThickness", "DS", b"-3 "), PET, 0xC000, "SliceThickness"),
    "PixelSpacing 0": (_raw("PixelSpacing", "DS", b"0\\0 "), PET, 0xC000, "PixelSpacing"),
    "NumberOfSlices 0": (_raw("NumberOfSlices", "US", b"\0\0"), PET, 0xC000, "NumberOfSlices"),
    # UIDs and SOP class.
    "a 65-character StudyInstanceUID": (
        _raw("StudyInstanceUID", "UI", b"1." + b"2" * 63),
        PET,
        0xA900,
        "StudyInstanceUID",
    ),
    "a SeriesInstanceUID with letters": (
        _raw("SeriesInstanceUID", "UI", b"1.2.abc\0"),
        PET,
        0xA900,
        "SeriesInstanceUID",
    ),
    "PET data sent as CT Image Storage": (
        lambda w: (setattr(w.ds, "SOPClassUID", CTImageStorage), w.body())[-1],
        CTImageStorage,
        0xA900,
        "Modality",
    ),
}


def _file(tmp_path: Path, wire: Wire, body: bytes) -> Path:
    """A DICOM file whose meta announces the case's UIDs; pynetdicom sends the bytes after it as-is."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = wire.sop_class
    meta.MediaStorageSOPInstanceUID = wire.sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = BytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    path = tmp_path / f"{wire.sop_instance}.dcm"
    path.write_bytes(buffer.getvalue() + body)
    return path


def _associate(port: int):
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(PET, [ExplicitVRLittleEndian])
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="UPETE")
    assert assoc.is_established
    return assoc


@pytest.fixture
def chunked_send(monkeypatch: pytest.MonkeyPatch) -> None:
    # pynetdicom then sends a file's bytes as they are, with the file meta's UIDs in the request.
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)


def _status(assoc, path: Path) -> int:
    started = time.monotonic()
    response = assoc.send_c_store(path)
    assert time.monotonic() - started < 30, "the node took too long to answer"
    assert "Status" in response, "no response: the association was dropped"
    return int(response.Status)


@pytest.mark.parametrize("case", list(CORPUS))
def test_hostile_instance_is_refused_and_logged(
    node: NodeProcess, good: Dataset, tmp_path: Path, chunked_send: None, case: str
) -> None:
    build, sop_class, status, attribute = CORPUS[case]
    wire = Wire(good, sop_class=sop_class)
    path = _file(tmp_path, wire, build(wire))
    assoc = _associate(node.port)
    try:
        assert _status(assoc, path) == status
        assert assoc.is_established  # refused, not dropped: the sender may go on
    finally:
        assoc.release()
    lines = [line for line in node.log().splitlines() if wire.sop_instance in line and "refused" in line]
    assert lines, f"no refusal logged for {case}"
    assert f"status=0x{status:04X}" in lines[-1] and f"attribute={attribute}" in lines[-1], lines[-1]


def test_the_whole_corpus_in_one_association_then_a_good_instance(
    node: NodeProcess, good: Dataset, tmp_path: Path, chunked_send: None
) -> None:
    assoc = _associate(node.port)
    try:
        for case, (build, sop_class, status, _attribute) in CORPUS.items():
            wire = Wire(good, sop_class=sop_class)
            assert _status(assoc, _file(tmp_path, wire, build(wire))) == status, case
        wire = Wire(good)
        assert _status(assoc, _file(tmp_path, wire, wire.body())) == 0x0000
    finally:
        assoc.release()
    assert echoscu(node.port).returncode == 0
    assert node.process.poll() is None
    stored = db_rows(node.db_path, "SELECT sop_uid FROM instances")
    assert [row["sop_uid"] for row in stored] == [wire.sop_instance]  # the good one only
    spool = node.db_path.parent
    assert [p.name for p in spool.rglob("*.dcm")] == [f"{wire.sop_instance}.dcm"]
    assert not list((spool / "tmp").iterdir())
