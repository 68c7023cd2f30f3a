"""The sender against real peers: DCMTK storescp, a refusing SCP, one that loses a response; retries,
failure after the last retry, and `upete resend` / `upete status` on the same database."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, PositronEmissionTomographyImageStorage
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification

from dicomnode.audit import AuditLog
from dicomnode.config import DestinationSettings, load_settings
from dicomnode.db import DB_FILENAME, Database
from dicomnode.jobs import JobQueue, JobState
from dicomnode.sender import Sender, _keep_stolen_responses, send_files
from dicomnode.testing.peers import StoreSCP, free_port, wait_for, write_config
from dicomnode.testing.scanner import StudyInfo, write_pet_series
from upete.cli import main


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    activity = np.random.default_rng(1).uniform(0, 9000, (6, 8, 8)).astype(np.float32)
    return write_pet_series(tmp_path / "series", activity, spacing_mm=(3.0, 4.0, 4.0), study=StudyInfo())


def _dest(port: int, ae: str = "PACS", **kw: object) -> DestinationSettings:
    return DestinationSettings(ae_title=ae, host="127.0.0.1", port=port, **kw)


def _uids(paths) -> set[str]:
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


def test_send_to_dcmtk_storescp(tmp_path: Path, files: list[Path]) -> None:
    with StoreSCP(tmp_path / "pacs") as pacs:
        outcome = send_files(files, _dest(pacs.port), calling_ae="UPETE")
        assert outcome.ok and outcome.sent == len(files)
        assert {str(ds.SOPInstanceUID) for ds in pacs.datasets()} == _uids(files)


def test_nobody_listening_is_a_failed_attempt(files: list[Path]) -> None:
    outcome = send_files(files, _dest(free_port()), calling_ae="UPETE", acse_timeout_s=3)
    assert not outcome.ok and outcome.unacknowledged == len(files) and "association failed" in outcome.error


class PynetdicomSCP:
    """An in-process Storage SCP whose answer the test chooses: ``handler(event, calls) -> status``."""

    def __init__(self, handler) -> None:
        self.port = free_port()
        self.calls: list[str] = []
        self.lock = threading.Lock()
        ae = AE(ae_title="PACS")
        ae.add_supported_context(PositronEmissionTomographyImageStorage, [ExplicitVRLittleEndian])

        def on_store(event):
            with self.lock:
                self.calls.append(str(event.request.AffectedSOPInstanceUID))
                count = len(self.calls)
            return handler(event, count)

        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
        )

    def close(self) -> None:
        self.server.shutdown()


def test_failure_statuses_are_counted_as_refused(files: list[Path]) -> None:
    scp = PynetdicomSCP(lambda event, count: 0xA700 if count == 2 else 0x0000)
    try:
        outcome = send_files(files, _dest(scp.port), calling_ae="UPETE")
    finally:
        scp.close()
    assert not outcome.ok and (outcome.sent, outcome.refused) == (len(files) - 1, 1)
    assert "0xA700" in outcome.error


def test_a_lost_response_is_sent_again_on_a_new_association(files: list[Path]) -> None:
    # The first response comes after the sender's DIMSE timeout: as if pynetdicom's reader had
    # swallowed it (ARCHITECTURE.md §6). The sender must re-associate and resend the unacknowledged ones.
    def slow_first(event, count):
        if count == 1:
            time.sleep(2.5)
        return 0x0000

    scp = PynetdicomSCP(slow_first)
    try:
        started = time.monotonic()
        outcome = send_files(files, _dest(scp.port), calling_ae="UPETE", dimse_timeout_s=1.0)
        elapsed = time.monotonic() - started
    finally:
        scp.close()
    assert outcome.ok and outcome.sent == len(files) and outcome.unacknowledged == 0
    assert set(scp.calls) == _uids(files) and scp.calls.count(scp.calls[0]) == 2
    assert elapsed < 10


def test_a_response_taken_by_the_reactor_is_handed_back(tmp_path: Path) -> None:
    # The pynetdicom 3.0.4 race (ARCHITECTURE.md §6), made deterministic: the reactor thread calls
    # _serve_request with the C-STORE response that send_c_store is waiting for.
    with StoreSCP(tmp_path / "pacs") as pacs:
        ae = AE(ae_title="UPETE")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", pacs.port, ae_title="PACS")
        assert assoc.is_established
        try:
            _keep_stolen_responses(assoc)
            response = C_STORE()
            response.MessageIDBeingRespondedTo = 1
            response.Status = 0x0000
            assert not response.is_valid_request
            assoc._serve_request(response, 1)
            assert assoc.dimse.get_msg(block=False) == (1, response)
        finally:
            assoc.release()


def _job_with_output(queue: JobQueue, root: Path, files: list[Path], destination: str) -> int:
    job_id = queue.create(
        pet_series_uid="1.2.3.4", study_uid="1.2.3", ct_series_uid=None, variant="main", pet_sop_uids=["1.1"]
    )
    queue.claim_processing(lease_s=60)
    queue.set_plan(job_id, "{}", derived_series_uid="1.2.3.99")
    out = root / "outputs" / f"job-{job_id}"
    out.mkdir(parents=True)
    for path in files:
        shutil.copy(path, out / path.name)
    queue.processed(
        job_id,
        output_dir=f"outputs/job-{job_id}",
        output_count=len(files),
        stage_seconds={},
        destinations=[destination],
    )
    return job_id


def test_retries_then_fails_then_resend_delivers(
    tmp_path: Path, files: list[Path], capsys: pytest.CaptureFixture
) -> None:
    pacs = StoreSCP(tmp_path / "pacs")  # not started yet: the PACS is down
    config = write_config(
        tmp_path, port=free_port(), destinations=[pacs.destination(max_retries=1, retry_backoff_s=0.3)]
    )
    settings = load_settings(config)
    root = settings.storage.root
    root.mkdir(parents=True)
    db = Database(root / DB_FILENAME)
    audit = AuditLog(settings.logging.audit_file)
    queue = JobQueue(db, audit)
    sender = Sender(queue, audit, settings, storage_root=root)
    try:
        job_id = _job_with_output(queue, root, files, sender.destination_keys()[0])
        assert sender.run_once()  # attempt 1 fails
        assert queue.get(job_id).state is JobState.SENDING
        assert not sender.run_once()  # backoff: not due yet
        wait_for(sender.run_once, timeout=5, what="the retry to become due")  # attempt 2 fails: last retry
        job = queue.get(job_id)
        assert job.state is JobState.FAILED and "failed after 2 attempt(s)" in job.reason
        assert len(list((root / job.output_dir).glob("*.dcm"))) == len(files)  # kept for a resend

        assert main(["status", "--config", str(config), "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        [listed] = report["jobs"]
        assert (listed["id"], listed["state"], listed["derived_series_uid"]) == (job_id, "failed", "1.2.3.99")
        assert (
            listed["sends"][0]["attempts"] == 2 and "association failed" in listed["sends"][0]["last_error"]
        )

        pacs.start()
        assert main(["resend", str(job_id), "--config", str(config)]) == 0
        assert "sending again" in capsys.readouterr().out
        assert sender.run_once()
        assert queue.get(job_id).state is JobState.DONE
        assert {str(ds.SOPInstanceUID) for ds in pacs.datasets()} == _uids(files)

        assert main(["status", "--config", str(config)]) == 0
        text = capsys.readouterr().out
        assert f"job {job_id}  done" in text and "1.2.3.99" in text
        assert main(["resend", "999", "--config", str(config)]) == 1
    finally:
        pacs.stop()
        audit.close()
        db.close()
    lines = settings.logging.audit_file.read_text()
    assert lines.count("event=send ") == 3 and "result=ok" in lines
