"""The Storage SCP in-process over real loopback associations: transfer syntaxes, TCP_NODELAY, statuses."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEGLSLossless,
    PositronEmissionTomographyImageStorage,
    RLELossless,
)
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicomnode import scp
from dicomnode.audit import AuditLog
from dicomnode.config import AccessSettings, CallerSettings, parse_settings
from dicomnode.db import DB_FILENAME, Database
from dicomnode.scp import ScpContext, accepted_transfer_syntaxes, check_caller, start_server
from dicomnode.store import InstanceStore
from dicomnode.testing.peers import free_port, wait_for
from dicomnode.testing.scanner import StudyInfo, write_pet_series
from dicomnode.validate import InstanceMeta

PET = PositronEmissionTomographyImageStorage


class Server:
    """The node's SCP (no worker threads) on a free loopback port."""

    def __init__(
        self,
        tmp: Path,
        *,
        min_free_mb: int = 0,
        node: dict | None = None,
        allowed_callers: list[dict] | None = None,
    ) -> None:
        self.port = free_port()
        if allowed_callers is None:
            allowed_callers = [{"ae_title": "SCANNER", "host": "127.0.0.1"}]
        self.settings = parse_settings(
            {
                "node": {"ae_title": "UPETE", "port": self.port, **(node or {})},
                "access": {"allowed_callers": allowed_callers},
                "storage": {"root": str(tmp / "spool"), "min_free_mb": min_free_mb},
            }
        )
        self.db = Database(tmp / DB_FILENAME)
        self.audit = AuditLog(tmp / "audit.log")
        self.store = InstanceStore(tmp / "spool", self.db, min_free_mb=min_free_mb)
        self.ctx = ScpContext(
            self.settings,
            self.store,
            self.audit,
            is_derived_by_us=lambda ds: ds.get("Manufacturer") == "uPETe node",
        )
        self.server = start_server(self.ctx)

    def associate(
        self,
        contexts: list[tuple[str, list[str]]],
        *,
        calling: str = "SCANNER",
        called: str = "UPETE",
        source: str = "127.0.0.1",
        established: bool = True,
    ):
        """An association from ``calling``@``source``; asserts it is established (or not)."""
        ae = AE(ae_title=calling)
        for sop_class, syntaxes in contexts:
            ae.add_requested_context(sop_class, syntaxes)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        assoc = ae.associate("127.0.0.1", self.port, ae_title=called, bind_address=(source, 0))
        assert assoc.is_established == established
        return assoc

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def close(self) -> None:
        self.shutdown()
        self.audit.close()
        self.db.close()


@pytest.fixture
def server(tmp_path: Path) -> Server:
    srv = Server(tmp_path)
    yield srv
    srv.close()


def _pet_files(directory: Path, transfer_syntax: str = ExplicitVRLittleEndian, **kwargs) -> list[Path]:
    activity = np.random.default_rng(0).uniform(0, 20000, (3, 8, 8)).astype(np.float32)
    return write_pet_series(
        directory,
        activity,
        spacing_mm=(3.0, 4.0, 4.0),
        study=StudyInfo(),
        transfer_syntax=transfer_syntax,
        **kwargs,
    )


def _dcmtk_compress(tool: str, option: str, paths: list[Path], out: Path) -> list[Path]:
    exe = shutil.which(tool)
    if exe is None:
        pytest.skip(f"{tool} (DCMTK) is missing")
    out.mkdir()
    result = []
    for path in paths:
        subprocess.run(
            [exe, option, str(path), str(out / path.name)], check=True, capture_output=True, timeout=30
        )
        result.append(out / path.name)
    return result


@pytest.mark.parametrize(
    "syntax",
    [
        ImplicitVRLittleEndian,
        ExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
        RLELossless,
        JPEGLSLossless,
        JPEGLosslessSV1,
    ],
)
def test_each_transfer_syntax_is_stored_and_decodes_losslessly(
    server: Server, tmp_path: Path, syntax: str
) -> None:
    if syntax not in accepted_transfer_syntaxes():
        pytest.skip(f"no pydicom decoder for {syntax.name} installed")
    if syntax == JPEGLosslessSV1:  # pydicom cannot encode it; DCMTK can (as scanners do)
        originals = _pet_files(tmp_path / "plain")
        files = _dcmtk_compress("dcmcjpeg", "+e1", originals, tmp_path / "sv1")
    else:
        files = _pet_files(tmp_path / "in", syntax)
        originals = files
    assert str(dcmread(files[0]).file_meta.TransferSyntaxUID) == syntax
    assoc = server.associate([(PET, [syntax])])
    try:
        statuses = [assoc.send_c_store(path).Status for path in files]
    finally:
        assoc.release()
    assert statuses == [0x0000] * len(files)
    stored = server.store.paths(str(dcmread(p).SOPInstanceUID) for p in files)
    for original in originals:
        source = dcmread(original)
        kept = dcmread(stored[str(source.SOPInstanceUID)])
        assert str(kept.file_meta.TransferSyntaxUID) == syntax  # stored as received
        np.testing.assert_array_equal(kept.pixel_array, source.pixel_array)


def test_accepted_sockets_have_tcp_nodelay(server: Server) -> None:
    assoc = server.associate([(Verification, [ImplicitVRLittleEndian])])
    try:
        assert assoc.send_c_echo().Status == 0
        [acceptor] = server.server.active_associations
        sock = acceptor.dul.socket.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        assoc.release()


def test_not_enough_disk_space_answers_out_of_resources(tmp_path: Path) -> None:
    srv = Server(tmp_path, min_free_mb=10**9)
    try:
        files = _pet_files(tmp_path / "in")
        assoc = srv.associate([(PET, [ExplicitVRLittleEndian])])
        try:
            assert assoc.send_c_store(files[0]).Status == 0xA700
        finally:
            assoc.release()
        assert srv.db.query("SELECT * FROM instances") == []
        assert not any(p.is_file() for p in (tmp_path / "spool").rglob("*.dcm"))
    finally:
        srv.close()


def test_compressed_pixels_that_do_not_decode_are_refused(server: Server, tmp_path: Path) -> None:
    ds = dcmread(_pet_files(tmp_path / "in", RLELossless)[0])
    ds.PixelData = encapsulate([b"\x01\x00\x00\x00" + b"\x00" * 60 + b"garbage"])
    assoc = server.associate([(PET, [RLELossless])])
    try:
        assert assoc.send_c_store(ds).Status == 0xC000
    finally:
        assoc.release()
    assert server.db.query("SELECT * FROM instances") == []


def test_an_unexpected_error_gives_a_failure_status_and_the_association_goes_on(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = _pet_files(tmp_path / "in")
    real_staging = server.store.staging
    calls = []

    def flaky_staging(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return real_staging(*args, **kwargs)

    monkeypatch.setattr(server.store, "staging", flaky_staging)
    assoc = server.associate([(PET, [ExplicitVRLittleEndian])])
    try:
        assert [assoc.send_c_store(p).Status for p in files] == [0xC211, 0x0000, 0x0000]
        assert assoc.is_established
    finally:
        assoc.release()


def test_a_wrong_peek_is_corrected_by_the_full_read(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The UIDs peeked from the first bytes only name the file early; the full read decides.
    monkeypatch.setattr(scp, "peek_instance_uids", lambda path, sop: ("9.9", "9.9.9", sop))
    ds = dcmread(_pet_files(tmp_path / "in")[0])
    assoc = server.associate([(PET, [ExplicitVRLittleEndian])])
    try:
        assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()
    [row] = server.db.query("SELECT study_uid, series_uid, path FROM instances")
    assert (row["study_uid"], row["series_uid"]) == (ds.StudyInstanceUID, ds.SeriesInstanceUID)
    stored = [p.relative_to(tmp_path / "spool").as_posix() for p in (tmp_path / "spool").rglob("*.dcm")]
    assert stored == [row["path"]]
    assert dcmread(tmp_path / "spool" / row["path"]).SOPInstanceUID == ds.SOPInstanceUID


def test_the_loop_guard_asks_once_per_series_until_the_database_changes_otherwise(tmp_path: Path) -> None:
    asked: list[str] = []
    planned: set[str] = set()
    db, audit = Database(tmp_path / DB_FILENAME), AuditLog(tmp_path / "audit.log")
    try:
        store = InstanceStore(tmp_path / "spool", db)
        ctx = ScpContext(parse_settings({}), store, audit,
                         is_our_series=lambda uid: asked.append(uid) or uid in planned)
        assert not ctx.our_series("1.2.3") and not ctx.our_series("1.2.3")
        assert asked == ["1.2.3"]
        meta = InstanceMeta(sop_uid="1.2.3.4.5", study_uid="1.2", series_uid="1.2.3", sop_class_uid=PET,
                            modality="PT", frame_of_reference_uid="1.2.9", position_mm=(0.0, 0.0, 0.0),
                            orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), rows=8, columns=8,
                            pixel_spacing_mm=(4.0, 4.0))
        store.put(meta, b"DICM")  # instance rows leave the answers as they were
        assert not ctx.our_series("1.2.3") and asked == ["1.2.3"]
        planned.add("1.2.3")  # a job plans the series as its output: a write of this process
        with db.transaction() as conn:
            conn.execute("INSERT INTO series_state (series_uid, study_uid, state, updated_at) "
                         "VALUES ('9.9', '9', 'job', 0)")
        assert ctx.our_series("1.2.3") and asked == ["1.2.3", "1.2.3"]
    finally:
        audit.close()
        db.close()


def test_our_own_output_is_stored_but_flagged(server: Server, tmp_path: Path) -> None:
    ds = dcmread(_pet_files(tmp_path / "in")[0])
    ds.Manufacturer = "uPETe node"
    assoc = server.associate([(PET, [ExplicitVRLittleEndian])])
    try:
        assert assoc.send_c_store(ds).Status == 0
    finally:
        assoc.release()
    assert server.db.query("SELECT derived_by_us FROM instances")[0][0] == 1


def test_audit_has_one_line_per_association_and_series_without_patient_data(
    server: Server, tmp_path: Path
) -> None:
    files = _pet_files(tmp_path / "in")
    assoc = server.associate([(PET, [ExplicitVRLittleEndian])])
    try:
        for path in files + files[:1]:  # one duplicate
            assoc.send_c_store(path)
    finally:
        assoc.release()
    text = wait_for(
        lambda: "event=association_closed" in server.audit.path.read_text() and server.audit.path.read_text(),
        timeout=10,
        what="the association's audit line",
    )
    assert text.count("event=series_stored") == 1 and "instances=3 duplicates=1" in text
    assert text.count("event=association_closed") == 1 and "stored=3 duplicates=1 refused=0" in text
    for phi in ("PHANTOM", "PH0001", "19700101"):
        assert phi not in text


@pytest.mark.parametrize(
    ("calling", "called", "address", "refusal"),
    [
        ("SCANNER", "UPETE", "127.0.0.1", None),
        ("SCANNER", "OTHER", "127.0.0.1", "called AE title 'OTHER' is not ours"),
        ("NOBODY", "UPETE", "127.0.0.1", "not in access.allowed_callers"),
        ("SCANNER", "UPETE", "10.0.0.7", "not allowed from 10.0.0.7"),
        ("SITE", "UPETE", "10.1.2.3", None),
        ("SITE", "UPETE", "10.1.3.3", "not allowed from 10.1.3.3"),
        ("ANYHOST", "UPETE", "192.168.1.1", None),
    ],
)
def test_access_rules(calling: str, called: str, address: str, refusal: str | None) -> None:
    access = AccessSettings(
        allowed_callers=(
            CallerSettings(ae_title="SCANNER", host="127.0.0.1"),
            CallerSettings(ae_title="SITE", host="10.1.2.0/24"),
            CallerSettings(ae_title="ANYHOST"),
        )
    )
    reason = check_caller(calling, called, address, access=access, our_ae="UPETE")
    assert reason == refusal if refusal is None else refusal in reason


def test_an_empty_allow_list_accepts_any_caller_but_still_checks_the_called_title() -> None:
    access = AccessSettings()
    assert check_caller("ANYONE", "UPETE", "127.0.0.1", access=access, our_ae="UPETE") is None
    assert check_caller("ANYONE", "NOTUS", "127.0.0.1", access=access, our_ae="UPETE") is not None
    unchecked = AccessSettings(check_called_ae_title=False)
    assert check_caller("ANYONE", "NOTUS", "127.0.0.1", access=unchecked, our_ae="UPETE") is None


ECHO = [(Verification, [ImplicitVRLittleEndian])]


def _rejection(assoc) -> tuple[int, int, int]:
    rsp = assoc.acceptor.primitive
    return rsp.result, rsp.result_source, rsp.diagnostic


@pytest.mark.parametrize(
    ("calling", "called", "source", "diagnostic", "reason"),
    [
        ("NOBODY", "UPETE", "127.0.0.1", 0x03, "not in access.allowed_callers"),
        ("SCANNER", "OTHER", "127.0.0.1", 0x07, "called AE title 'OTHER' is not ours"),
        ("SCANNER", "UPETE", "127.0.0.2", 0x03, "not allowed from 127.0.0.2"),
        ("SITE", "UPETE", "127.0.0.5", 0x03, "not allowed from 127.0.0.5"),
    ],
)
def test_refused_callers_get_a_permanent_rejection_and_an_audit_line(
    tmp_path: Path, calling: str, called: str, source: str, diagnostic: int, reason: str
) -> None:
    # 127.0.0.0/8 is loopback on Linux: binding the SCU to 127.0.0.2 gives the node a second host.
    srv = Server(
        tmp_path,
        allowed_callers=[
            {"ae_title": "SCANNER", "host": "127.0.0.1"},
            {"ae_title": "SITE", "host": "127.0.0.0/30"},
        ],
    )
    try:
        assoc = srv.associate(ECHO, calling=calling, called=called, source=source, established=False)
        assert assoc.is_rejected
        assert _rejection(assoc) == (0x01, 0x01, diagnostic)  # permanent, service user (PS3.8 9.3.4)
        text = wait_for(
            lambda: "event=association_refused" in srv.audit.path.read_text() and srv.audit.path.read_text(),
            timeout=10,
            what="the association_refused line",
        )
        assert f"address={source}" in text and reason in text
        # The allowed ones still get in: the same network rule from inside it.
        ok = srv.associate(ECHO, calling="SITE", source="127.0.0.3")
        ok.release()
    finally:
        srv.close()


def test_associations_beyond_max_associations_are_rejected_transiently(tmp_path: Path) -> None:
    srv = Server(tmp_path, node={"max_associations": 2})
    held = []
    try:
        held = [srv.associate(ECHO), srv.associate(ECHO)]
        extra = srv.associate(ECHO, established=False)
        assert extra.is_rejected
        # rejected-transient, service provider (presentation), local-limit-exceeded (PS3.8 9.3.4)
        assert _rejection(extra) == (0x02, 0x03, 0x02)
        assert all(a.is_established for a in held) and held[0].send_c_echo().Status == 0
        held.pop().release()
        # One slot free again: the next caller gets in (the count is of live associations).
        wait_for(lambda: len(srv.server.active_associations) < 2, timeout=10, what="the release")
        again = srv.associate(ECHO)
        again.release()
        text = srv.audit.path.read_text()
        assert "more than node.max_associations (2) at once" in text
    finally:
        for assoc in held:
            assoc.release()
        srv.close()


def test_a_connection_without_an_association_request_is_closed_after_acse_timeout(tmp_path: Path) -> None:
    srv = Server(tmp_path, node={"acse_timeout_s": 1.0})
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as sock:
            started = time.monotonic()
            assert sock.recv(1) == b""  # closed by the node, not by our own timeout
            assert 0.8 < time.monotonic() - started < 8.0
    finally:
        srv.close()


def test_an_idle_association_is_aborted_after_network_timeout(tmp_path: Path) -> None:
    srv = Server(tmp_path, node={"network_timeout_s": 1.5})
    try:
        assoc = srv.associate(ECHO)
        started = time.monotonic()
        wait_for(lambda: assoc.is_aborted, timeout=15, what="the node to abort the idle association")
        assert 1.2 < time.monotonic() - started < 10.0
    finally:
        srv.close()


def test_a_message_stalled_halfway_is_aborted_after_network_timeout(tmp_path: Path) -> None:
    # A Storage SCP never waits for a DIMSE response, so its dimse_timeout bounds nothing; what
    # closes a peer that stops in the middle of a C-STORE is the idle (network) timeout.
    srv = Server(tmp_path, node={"network_timeout_s": 1.5, "dimse_timeout_s": 600})
    try:
        assoc = srv.associate([(PET, [ExplicitVRLittleEndian])])
        context_id = assoc.accepted_contexts[0].context_id
        # P-DATA-TF with the first fragment of a command set, "last fragment" bit clear (PS3.8 9.3.5,
        # E.2): the node now waits for the rest of the message, which never comes.
        pdv = bytes([context_id, 0x01]) + b"\x00" * 12
        pdu = b"\x04\x00" + struct.pack(">L", 4 + len(pdv)) + struct.pack(">L", len(pdv)) + pdv
        assoc.dul.socket.send(pdu)
        started = time.monotonic()
        wait_for(lambda: assoc.is_aborted, timeout=15, what="the node to abort the stalled association")
        assert 1.2 < time.monotonic() - started < 10.0
    finally:
        srv.close()
