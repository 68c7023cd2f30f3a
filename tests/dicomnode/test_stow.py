"""STOW-RS delivery (dicomnode/stow.py) and DICOMweb destinations in the sender (dicomnode/sender.py):
the request's shape, the reading of PS3.18 answers, and the same retry / failed-with-reason / resend
path as C-STORE, against an in-process DICOMweb server on 127.0.0.1. Orthanc's real DICOMweb plugin:
tests/system/test_dicomweb.py."""

from __future__ import annotations

import io
import json
import re
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from dicomnode.audit import AuditLog
from dicomnode.config import DicomwebDestinationSettings, load_settings
from dicomnode.db import DB_FILENAME, Database
from dicomnode.jobs import JobQueue, JobState
from dicomnode.sender import Sender, destination_key_of
from dicomnode.stow import parse_stow_response, stow_files
from dicomnode.testing.peers import free_port, wait_for, write_config
from dicomnode.testing.scanner import StudyInfo, write_pet_series
from tests.dicomnode.test_sender import _job_with_output
from tests.dicomnode.test_tls import Pki, pki  # noqa: F401 - pki: the CA and certificates (a fixture)
from upete.cli import main


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    activity = np.random.default_rng(2).uniform(0, 9000, (5, 8, 8)).astype(np.float32)
    return write_pet_series(tmp_path / "series", activity, spacing_mm=(3.0, 4.0, 4.0), study=StudyInfo())


def _uids(paths: list[Path]) -> list[str]:
    return [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]


def _referenced(uids: list[str]) -> dict:
    return {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [uid]}} for uid in uids]}


def _failed(uids: list[str], reason: int) -> dict:
    return {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [uid]},
                                   "00081197": {"vr": "US", "Value": [reason]}} for uid in uids]}


# Answer = (HTTP status, body) for the SOP Instance UIDs a request carried.
Answer = Callable[[list[str]], tuple[int, bytes]]


def store_all(uids: list[str]) -> tuple[int, bytes]:
    return 200, json.dumps({"00081199": _referenced(uids)}).encode()


class FakeDicomweb:
    """A DICOMweb server on 127.0.0.1 that records each STOW-RS request and answers with ``answer``."""

    def __init__(
        self, answer: Answer = store_all, *, root: str = "/dicom-web", port: int = 0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.answer = answer
        self.requests: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                datasets = _parts(self.headers["Content-Type"], body)
                fake.requests.append({"path": self.path, "headers": dict(self.headers), "datasets": datasets})
                status, answer = fake.answer([str(ds.SOPInstanceUID) for ds in datasets])
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self._server.server_address[1]}{root}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _parts(content_type: str, body: bytes) -> list:
    """The application/dicom parts of a multipart/related body, read as datasets."""
    assert content_type.startswith("multipart/related;") and 'type="application/dicom"' in content_type
    boundary = re.search(r"boundary=([^;\s]+)", content_type).group(1).encode()
    assert body.endswith(b"--" + boundary + b"--\r\n")
    datasets = []
    for part in body.split(b"--" + boundary)[1:-1]:
        head, payload = part.split(b"\r\n\r\n", 1)
        assert b"Content-Type: application/dicom" in head
        datasets.append(dcmread(io.BytesIO(payload.removesuffix(b"\r\n"))))
    return datasets


@pytest.fixture
def dicomweb() -> FakeDicomweb:
    server = FakeDicomweb()
    yield server
    server.close()


def _destination(url: str, **fields: object) -> DicomwebDestinationSettings:
    return DicomwebDestinationSettings.model_validate({"dicomweb": url, **fields})


def test_one_multipart_post_to_studies_with_auth(dicomweb: FakeDicomweb, files: list[Path]) -> None:
    result = stow_files(files, _destination(dicomweb.url + "/", auth={"scheme": "bearer", "secret": "tok"}))
    assert result.error is None and result.stored == len(files)
    [request] = dicomweb.requests
    assert request["path"] == "/dicom-web/studies"
    assert request["headers"]["Authorization"] == "Bearer tok"
    assert request["headers"]["Accept"] == "application/dicom+json"
    # Every file, whole, in one request.
    assert [str(ds.SOPInstanceUID) for ds in request["datasets"]] == _uids(files)
    assert [ds.pixel_array.tobytes() for ds in request["datasets"]] == [
        dcmread(p).pixel_array.tobytes() for p in files
    ]


def test_answers_of_ps3_18(files: list[Path]) -> None:
    uids = ["1.1", "1.2", "1.3"]
    assert parse_stow_response(*store_all(uids), uids).error is None
    # 202: stored with some failures, named with their Failure Reason.
    partial = {"00081199": _referenced(uids[:2]), "00081198": _failed(uids[2:], 0xA700)}
    result = parse_stow_response(202, json.dumps(partial).encode(), uids)
    assert (result.stored, result.refused) == (2, 1) and result.error == (
        "HTTP 202: 1 instance(s) refused (failure reason 0xA700)"
    )
    # 409: none stored.
    result = parse_stow_response(409, json.dumps({"00081198": _failed(uids, 0xC000)}).encode(), uids)
    assert (result.stored, result.refused) == (0, 3) and "0xC000" in result.error
    # A 200 that does not name every instance is not taken on trust.
    result = parse_stow_response(*store_all(uids[:1]), uids)
    assert result.unacknowledged == 2 and "2 instance(s) not named as stored" in result.error
    result = parse_stow_response(401, b"<html>login</html>", uids, reason="Unauthorized")
    assert result.error == "HTTP 401 Unauthorized (check the destination's auth)"
    assert "unreadable answer" in parse_stow_response(200, b"{not json", uids).error
    # An error page's body never reaches the reason (it may echo patient data back).
    echoed = parse_stow_response(400, b"bad instance of PHANTOM^ONE", uids, reason="Bad Request")
    assert echoed.error == "HTTP 400 Bad Request" and echoed.unacknowledged == 3


def test_nobody_listening_is_a_failed_attempt(files: list[Path]) -> None:
    result = stow_files(files, _destination(f"http://127.0.0.1:{free_port()}/dicom-web", timeout_s=5))
    assert result.unacknowledged == len(files) and result.error.startswith("no answer from http://127.0.0.1:")
    unreadable = _destination("http://127.0.0.1:1/dw",
                              auth={"scheme": "bearer", "secret_env": "UPETE_NO_SUCH_VAR"})
    assert "UPETE_NO_SUCH_VAR" in stow_files(files, unreadable).error


def test_dicomweb_destination_retries_fails_with_reason_then_resend_delivers(
    tmp_path: Path, files: list[Path], capsys: pytest.CaptureFixture
) -> None:
    port = free_port()  # nobody listens there yet: the archive is down
    url = f"http://127.0.0.1:{port}/dicom-web"
    config = write_config(tmp_path, port=free_port(), destinations=[
        {"dicomweb": url, "max_retries": 1, "retry_backoff_s": 0.3, "timeout_s": 5}])
    settings = load_settings(config)
    root = settings.storage.root
    root.mkdir(parents=True)
    db = Database(root / DB_FILENAME)
    audit = AuditLog(settings.logging.audit_file)
    queue = JobQueue(db, audit)
    sender = Sender(queue, audit, settings, storage_root=root)
    archive: FakeDicomweb | None = None
    try:
        assert sender.destination_keys() == [url] == [destination_key_of(settings.destinations[0])]
        job_id = _job_with_output(queue, root, files, url)
        assert sender.run_once()  # attempt 1: connection refused, retried after the backoff
        assert queue.get(job_id).state is JobState.SENDING
        assert not sender.run_once()
        wait_for(sender.run_once, timeout=5, what="the retry to become due")  # attempt 2: the last
        job = queue.get(job_id)
        assert job.state is JobState.FAILED and "failed after 2 attempt(s)" in job.reason
        [send] = queue.sends(job_id)
        assert send.attempts == 2 and send.last_error.startswith(f"no answer from {url}")

        archive = FakeDicomweb(port=port)  # the archive is back
        assert main(["resend", str(job_id), "--config", str(config)]) == 0
        assert "sending again to 1 destination(s)" in capsys.readouterr().out
        assert sender.run_once()
        assert queue.get(job_id).state is JobState.DONE
        [request] = archive.requests
        assert sorted(str(ds.SOPInstanceUID) for ds in request["datasets"]) == sorted(_uids(files))
    finally:
        if archive is not None:
            archive.close()
        audit.close()
        db.close()
    lines = settings.logging.audit_file.read_text()
    assert lines.count("event=send ") == 3 and "result=ok" in lines


def test_https_verifies_the_server_against_the_configured_ca(pki: Pki, files: list[Path]) -> None:  # noqa: F811
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.path("server.pem"), pki.path("server.key"))
    server = FakeDicomweb(tls=context)
    try:
        trusted = _destination(server.url, tls={"ca_certificates": pki.path("ca.pem")})
        assert stow_files(files, trusted).error is None and len(server.requests) == 1
        # A server whose certificate does not chain to the configured CA gets nothing.
        other = _destination(server.url, tls={"ca_certificates": pki.path("rogue-ca.pem")}, timeout_s=5)
        result = stow_files(files, other)
        assert "CERTIFICATE_VERIFY_FAILED" in result.error and result.unacknowledged == len(files)
        assert len(server.requests) == 1
    finally:
        server.close()
