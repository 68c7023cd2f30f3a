"""Bad input against a running `upete serve`: refused associations and refused datasets, each with a
failure status and a log line naming the attribute; the node keeps serving C-ECHO afterwards."""

from __future__ import annotations

import copy
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

from dicomnode.testing.peers import NodeProcess, echoscu, free_port, write_config
from dicomnode.testing.scanner import StudyInfo, write_pet_series

pytestmark = pytest.mark.network

PET = PositronEmissionTomographyImageStorage


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> NodeProcess:
    directory = tmp_path_factory.mktemp("bad-input")
    config = write_config(
        directory,
        port=free_port(),
        series_timeout_s=60,
        allowed_callers=[
            {"ae_title": "SCANNER", "host": "127.0.0.1"},
            {"ae_title": "SITE", "host": "10.1.2.0/24"},
        ],
    )
    with NodeProcess(config) as running:
        yield running


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    activity = np.random.default_rng(2).uniform(0, 9000, (2, 8, 8)).astype(np.float32)
    path = write_pet_series(
        tmp_path_factory.mktemp("good"), activity, spacing_mm=(3.0, 4.0, 4.0), study=StudyInfo()
    )[0]
    return dcmread(path)


@pytest.mark.parametrize(
    ("calling", "called", "why"),
    [
        ("NOBODY", "UPETE", "is not in access.allowed_callers"),
        ("SCANNER", "WRONG", "called AE title 'WRONG' is not ours"),
        ("SITE", "UPETE", "is not allowed from 127.0.0.1"),
    ],
)
def test_association_refused_and_logged(node: NodeProcess, calling: str, called: str, why: str) -> None:
    result = echoscu(node.port, calling=calling, called=called)
    assert result.returncode != 0
    assert "Association Rejected" in result.stdout + result.stderr
    lines = [line for line in node.log().splitlines() if "association refused" in line and why in line]
    assert lines and f"calling_ae={calling}" in lines[-1] and "address=127.0.0.1" in lines[-1]


def _fresh(good: Dataset) -> Dataset:
    ds = copy.deepcopy(good)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _raw(ds: Dataset, tag: int, vr: str, value: bytes) -> None:
    """Put a value the way a broken sender would, bypassing pydicom's checks."""
    ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def _delete(*keywords: str) -> Callable[[Dataset], None]:
    def apply(ds: Dataset) -> None:
        for keyword in keywords:
            del ds[keyword]

    return apply


def _set(keyword: str, value: object) -> Callable[[Dataset], None]:
    def apply(ds: Dataset) -> None:
        setattr(ds, keyword, value)

    return apply


BROKEN = {
    "no pixel data": (_delete("PixelData"), 0xA900, "PixelData"),
    "pixel data shorter than Rows x Columns": (
        lambda ds: setattr(ds, "PixelData", ds.PixelData[:-10]),
        0xA900,
        "PixelData",
    ),
    "BitsAllocated does not match the pixel data": (_set("BitsAllocated", 32), 0xA900, "PixelData"),
    "Rows does not match the pixel data": (_set("Rows", 9), 0xA900, "PixelData"),
    "no ImagePositionPatient": (_delete("ImagePositionPatient"), 0xA900, "ImagePositionPatient"),
    "no ImageOrientationPatient": (_delete("ImageOrientationPatient"), 0xA900, "ImageOrientationPatient"),
    "no PixelSpacing": (_delete("PixelSpacing"), 0xA900, "PixelSpacing"),
    "no FrameOfReferenceUID": (_delete("FrameOfReferenceUID"), 0xA900, "FrameOfReferenceUID"),
    "no StudyInstanceUID": (_delete("StudyInstanceUID"), 0xA900, "StudyInstanceUID"),
    "no SeriesInstanceUID": (_delete("SeriesInstanceUID"), 0xA900, "SeriesInstanceUID"),
    "a UID that climbs out of the spool": (
        lambda ds: _raw(ds, 0x0020000E, "UI", b"1.2.3/../../../etc\0"),
        0xA900,
        "SeriesInstanceUID",
    ),
    "RescaleSlope is not a number": (lambda ds: _raw(ds, 0x00281053, "DS", b"abc "), 0xC000, "RescaleSlope"),
    "RescaleIntercept is not a number": (
        lambda ds: _raw(ds, 0x00281052, "DS", b"1.0.0 "),
        0xC000,
        "RescaleIntercept",
    ),
    "ImagePositionPatient has text": (
        lambda ds: _raw(ds, 0x00200032, "DS", b"0\\0\\zz"),
        0xC000,
        "ImagePositionPatient",
    ),
    "ImageOrientationPatient not unit vectors": (
        _set("ImageOrientationPatient", [2, 0, 0, 0, 1, 0]),
        0xC000,
        "ImageOrientationPatient",
    ),
    "Modality CT in a PET object": (_set("Modality", "CT"), 0xA900, "Modality"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_dataset_is_refused_with_the_attribute_logged(
    node: NodeProcess, good: Dataset, case: str
) -> None:
    breaker, status, attribute = BROKEN[case]
    ds = _fresh(good)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid values we put in on purpose
        breaker(ds)
    assert _send(node.port, ds) == status
    _assert_refusal_logged(node, str(ds.SOPInstanceUID), status, attribute)


def _send(port: int, ds: Dataset) -> int:
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(PET, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="UPETE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def _send_raw(port: int, tmp_path: Path, *, sop_instance: str, body: bytes) -> int:
    """C-STORE ``body`` (bytes as they go on the wire) announced as PET instance ``sop_instance``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = PET
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = BytesIO()
    buffer.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    path = tmp_path / "raw.dcm"
    path.write_bytes(buffer.getvalue() + body)
    # pynetdicom then sends the file's bytes as they are, with the file meta's UIDs in the request.
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    try:
        return _send_path(port, path)
    finally:
        pynetdicom_config.STORE_SEND_CHUNKED_DATASET = False


def _send_path(port: int, path: Path) -> int:
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(PET, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="UPETE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(path).Status)
    finally:
        assoc.release()


def test_dataset_whose_sop_instance_uid_differs_from_the_request(
    node: NodeProcess, good: Dataset, tmp_path: Path
) -> None:
    ds = _fresh(good)
    announced = generate_uid()
    status = _send_raw(node.port, tmp_path, sop_instance=announced, body=encode(ds, False, True))
    assert status == 0xA900
    _assert_refusal_logged(node, announced, 0xA900, "SOPInstanceUID")


def test_dataset_of_another_sop_class_than_the_request(
    node: NodeProcess, good: Dataset, tmp_path: Path
) -> None:
    ds = _fresh(good)
    ds.SOPClassUID = CTImageStorage
    status = _send_raw(node.port, tmp_path, sop_instance=str(ds.SOPInstanceUID), body=encode(ds, False, True))
    assert status == 0xA900
    _assert_refusal_logged(node, str(ds.SOPInstanceUID), 0xA900, "SOPClassUID")


def test_bytes_that_are_not_a_dataset(node: NodeProcess, tmp_path: Path) -> None:
    # A tag, VR "OB" and a 4 GB length over a 10-byte stream: no parser can read it.
    garbage = b"\x08\x00\x16\x00OB\x00\x00\xf0\xff\xff\xff" + b"\x01" * 10
    status = _send_raw(node.port, tmp_path, sop_instance="1.2.3.4.5.6", body=garbage)
    assert status != 0x0000 and status >> 12 in (0xA, 0xC)


def _assert_refusal_logged(node: NodeProcess, sop_uid: str, status: int, attribute: str) -> None:
    lines = [line for line in node.log().splitlines() if "instance refused" in line and sop_uid in line]
    assert lines, f"no refusal logged for {sop_uid}"
    assert f"status=0x{status:04X}" in lines[-1] and f"attribute={attribute}" in lines[-1]


def test_the_node_still_serves_and_stored_nothing_broken(node: NodeProcess, good: Dataset) -> None:
    # Runs after the cases above (pytest keeps the file's order).
    assert echoscu(node.port).returncode == 0
    assert _send(node.port, _fresh(good)) == 0x0000
    assert node.process.poll() is None
    spool = node.db_path.parent
    stored = [p for p in spool.rglob("*.dcm")]
    assert len(stored) == 1, stored  # only the good instance
    assert not list((spool / "tmp").iterdir())
    assert not (spool.parent / "etc").exists()
    for phi in ("PHANTOM", "PH0001", "19700101"):
        assert phi not in node.log()
        assert phi not in (node.directory / "audit.log").read_text()
