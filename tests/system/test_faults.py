"""Faults beyond tests/system/test_crash.py (SIGKILL while receiving, in the model, while sending):

- SIGKILL while the assembler creates the job, and while the derived series is being written →
  after a restart exactly one derived series per PET series, with the planned UIDs;
- SIGTERM: the C-STORE in flight is finished and acknowledged, new associations are refused, the
  state is kept and the next start goes on from it;
- the destination PACS is down: retries with backoff, the job fails with the reason, and
  ``upete resend JOB`` delivers once the PACS is back (against the running node);
- not enough free disk space: 0xA700 with a log line that says why, and Success again by itself as
  soon as space returns (the free space is measured for every instance);
- a spool file corrupted while the node was down: that job fails with a reason, the other study's
  job goes on;
- the same study sent twice: one job, one derived series.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, PositronEmissionTomographyImageStorage
from pynetdicom import AE

import dicomnode.store
from dicomnode.audit import AuditLog
from dicomnode.config import parse_settings
from dicomnode.db import DB_FILENAME, Database
from dicomnode.scp import ScpContext, start_server
from dicomnode.store import InstanceStore
from dicomnode.testing.peers import (
    ROOT,
    NodeProcess,
    StoreSCP,
    db_rows,
    echoscu,
    free_port,
    job_states,
    storescu,
    wait_for,
    write_config,
)
from dicomnode.testing.scanner import StudyInfo, write_pet_series
from tests.support.dicomutil import make_study

PET = PositronEmissionTomographyImageStorage


def _pause_after(target: str, marker: Path, *, calls: int = 1, idle_worker: bool = False) -> str:
    """Preamble: after the ``calls``-th call of ``module:Class.method`` (or ``module:function``)
    returns, create ``marker`` and sleep, so that a kill lands right there. ``idle_worker`` keeps the
    worker from claiming jobs in this process (so a job created before the kill is not run by it)."""
    module, name = target.split(":")
    owner, _, attr = name.rpartition(".")
    code = f"""
import importlib, pathlib, time
_holder = importlib.import_module({module!r})
if {owner!r}:
    _holder = getattr(_holder, {owner!r})
_real = getattr(_holder, {attr!r})
_count = [0]
def _paused(*args, **kwargs):
    result = _real(*args, **kwargs)
    _count[0] += 1
    if _count[0] == {calls}:
        pathlib.Path({str(marker)!r}).touch()
        time.sleep(120)
    return result
setattr(_holder, {attr!r}, _paused)
"""
    if idle_worker:
        code += IDLE_WORKER
    return code


def _one_series_per_pet(pacs: StoreSCP, pet_paths: list[Path], db: Path) -> str:
    derived = pacs.datasets()
    series = {str(ds.SeriesInstanceUID) for ds in derived}
    assert len(series) == 1, f"{len(series)} derived series at the PACS"
    sources = {str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID) for ds in derived}
    assert sources == {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in pet_paths}
    assert len({str(ds.SOPInstanceUID) for ds in derived}) == len(pet_paths)
    [job] = db_rows(db, "SELECT * FROM jobs")
    assert job["state"] == "done" and job["derived_series_uid"] == series.pop()
    return job["derived_series_uid"]


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.parametrize(
    ("where", "target", "calls"),
    [
        # The job row is committed, the series' decision is not yet: the window assembler.py names.
        ("assemble", "dicomnode.jobs:JobQueue.create", 1),
        # Five of the 24 derived instances are on disk.
        ("write", "dicomnode.derived:_write_file", 5),
    ],
)
def test_killed_while_assembling_or_writing(tmp_path: Path, where: str, target: str, calls: int) -> None:
    marker = tmp_path / f"{where}.reached"
    preamble = _pause_after(target, marker, calls=calls, idle_worker=where == "assemble")
    study = make_study(tmp_path / "in", shuffle_seed=6)
    with StoreSCP(tmp_path / "pacs") as pacs:
        config = write_config(
            tmp_path, port=free_port(), destinations=[pacs.destination()], series_timeout_s=2
        )
        node = NodeProcess(config, preamble=preamble).start()
        try:
            assert storescu(study.ct_paths + study.pet_paths, node.port).returncode == 0
            wait_for(marker.exists, timeout=90, what=f"the node to reach the {where} step")
            planned = db_rows(node.db_path, "SELECT derived_series_uid FROM jobs")
            node.kill()
            assert list(pacs.out_dir.iterdir()) == []

            node.preamble = None
            node.start()
            wait_for(
                lambda: set(job_states(node.db_path).values()) == {"done"},
                timeout=90,
                what="the job to finish after the restart",
            )
            assert node.stop() == 0
        finally:
            node.kill()
        series = _one_series_per_pet(pacs, study.pet_paths, node.db_path)
    if where == "write":
        assert planned[0]["derived_series_uid"] == series  # the plan made before the kill was kept
        output = node.db_path.parent / db_rows(node.db_path, "SELECT output_dir FROM jobs")[0][0]
        assert len(list(output.glob("*.dcm"))) == len(study.pet_paths)  # no leftovers of the first run
    else:
        decisions = db_rows(node.db_path, "SELECT state, reason FROM series_state")
        assert [row["state"] for row in decisions if row["state"] == "job"]


IDLE_WORKER = "import dicomnode.worker\ndicomnode.worker.Worker.run_once = lambda self: False\n"

SLOW_PUT = """
import pathlib, time
import dicomnode.store
_real_put = dicomnode.store.InstanceStore.staging  # what the SCP calls to store an instance
def _slow_put(self, *args, **kwargs):
    marker = pathlib.Path({marker!r})
    if not marker.exists():
        marker.touch()
        time.sleep(3)  # SIGTERM arrives while this C-STORE is in flight
    return _real_put(self, *args, **kwargs)
dicomnode.store.InstanceStore.staging = _slow_put
"""


@pytest.mark.network
@pytest.mark.slow
def test_sigterm_finishes_the_instance_in_flight_refuses_new_work_and_keeps_state(tmp_path: Path) -> None:
    study = make_study(tmp_path / "in", shuffle_seed=7)
    marker = tmp_path / "put.reached"
    config = write_config(tmp_path, port=free_port(), series_timeout_s=600)
    node = NodeProcess(config, preamble=SLOW_PUT.format(marker=str(marker))).start()
    try:
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(PET, [ExplicitVRLittleEndian])
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
        assoc = ae.associate("127.0.0.1", node.port, ae_title="UPETE")
        assert assoc.is_established
        statuses: list[int] = []
        in_flight = threading.Thread(
            target=lambda: statuses.append(int(assoc.send_c_store(study.pet_paths[0]).Status))
        )
        in_flight.start()
        wait_for(marker.exists, timeout=20, what="the C-STORE to be in flight")
        node.process.send_signal(15)  # SIGTERM
        time.sleep(0.5)
        assert echoscu(node.port).returncode != 0  # no new associations
        in_flight.join(timeout=30)
        assert statuses == [0x0000]  # the instance in flight was stored and acknowledged
        assoc.release()
        assert node.process.wait(timeout=30) == 0
    finally:
        node.kill()
    sop = str(dcmread(study.pet_paths[0], stop_before_pixels=True).SOPInstanceUID)
    assert [r["sop_uid"] for r in db_rows(node.db_path, "SELECT sop_uid FROM instances")] == [sop]
    assert "event=node_stopped" in (tmp_path / "audit.log").read_text()

    # The next start goes on from there: the rest of the study completes the series and a job runs.
    config.write_text(config.read_text().replace("series_timeout_s: 600", "series_timeout_s: 2"))
    node.preamble = None
    with node:
        assert storescu(study.ct_paths + study.pet_paths[1:], node.port).returncode == 0
        wait_for(
            lambda: set(job_states(node.db_path).values()) == {"done"}, timeout=90, what="the job"
        )
    [job] = db_rows(node.db_path, "SELECT * FROM jobs")
    assert job["output_count"] >= len(study.pet_paths)


@pytest.mark.network
@pytest.mark.slow
def test_pacs_down_retries_then_fails_then_resend_delivers(tmp_path: Path) -> None:
    study = make_study(tmp_path / "in", shuffle_seed=8)
    pacs = StoreSCP(tmp_path / "pacs")  # not started: the PACS is down
    config = write_config(
        tmp_path,
        port=free_port(),
        destinations=[pacs.destination(max_retries=2, retry_backoff_s=0.5)],
        series_timeout_s=2,
    )
    with NodeProcess(config) as node:
        assert storescu(study.ct_paths + study.pet_paths, node.port).returncode == 0
        wait_for(
            lambda: set(job_states(node.db_path).values()) == {"failed"},
            timeout=90,
            what="the job to fail after its retries",
        )
        [job] = db_rows(node.db_path, "SELECT * FROM jobs")
        assert "failed after 3 attempt(s)" in job["reason"]
        sends = (tmp_path / "audit.log").read_text().count("event=send ")
        assert sends == 3  # the first attempt and two retries, with backoff between them
        with pacs:
            resend = subprocess.run(
                [sys.executable, "-m", "upete", "resend", str(job["id"]), "--config", str(config)],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=ROOT,
            )
            assert resend.returncode == 0, resend.stderr
            wait_for(
                lambda: set(job_states(node.db_path).values()) == {"done"},
                timeout=60,
                what="the resent job to be delivered",
            )
            _one_series_per_pet(pacs, study.pet_paths, node.db_path)


def _pet_files(directory: Path, count: int = 3) -> list[Path]:
    activity = np.random.default_rng(0).uniform(0, 20000, (count, 8, 8)).astype(np.float32)
    return write_pet_series(directory, activity, spacing_mm=(3.0, 4.0, 4.0), study=StudyInfo())


def test_disk_nearly_full_refuses_with_a_reason_and_recovers_by_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    settings = parse_settings(
        {
            "node": {"ae_title": "UPETE", "port": port},
            "storage": {"root": str(tmp_path / "spool"), "min_free_mb": 500},
        }
    )
    db = Database(tmp_path / DB_FILENAME)
    audit = AuditLog(tmp_path / "audit.log")
    store = InstanceStore(tmp_path / "spool", db, min_free_mb=500)
    server = start_server(ScpContext(settings, store, audit))
    free = {"bytes": 100 * 1024 * 1024}  # 100 MB: below the 500 MB the config asks for
    monkeypatch.setattr(dicomnode.store, "free_bytes", lambda _path: free["bytes"])
    files = _pet_files(tmp_path / "in")
    try:
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(PET, [ExplicitVRLittleEndian])
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        assoc = ae.associate("127.0.0.1", port, ae_title="UPETE")
        try:
            with caplog.at_level(logging.ERROR, logger="upete.scp"):
                assert assoc.send_c_store(files[0]).Status == 0xA700
            [record] = [r for r in caplog.records if r.getMessage() == "instance not stored"]
            fields = record.fields  # type: ignore[attr-defined]
            assert fields["status"] == "0xA700"
            assert fields["reason"] == "100 MB free, below storage.min_free_mb (500)"
            free["bytes"] = 10 * 1024**3  # space returns: no restart, no config change
            assert [assoc.send_c_store(p).Status for p in files] == [0x0000] * 3
        finally:
            assoc.release()
        assert len(db.query("SELECT * FROM instances")) == 3
    finally:
        server.shutdown()
        audit.close()
        db.close()


@pytest.mark.network
@pytest.mark.slow
def test_a_corrupt_spool_file_fails_its_job_and_the_other_study_goes_on(tmp_path: Path) -> None:
    broken, intact = (make_study(tmp_path / name, shuffle_seed=9) for name in ("a", "b"))
    with StoreSCP(tmp_path / "pacs") as pacs:
        config = write_config(
            tmp_path, port=free_port(), destinations=[pacs.destination()], series_timeout_s=600
        )
        # Receive both studies with the worker idle (the series complete by NumberOfSlices at once),
        # then stop: two queued jobs wait in the database.
        node = NodeProcess(config, preamble=IDLE_WORKER)
        with node:
            for study in (broken, intact):
                assert storescu(study.ct_paths + study.pet_paths, node.port).returncode == 0
            wait_for(lambda: len(job_states(node.db_path)) == 2, timeout=30, what="two queued jobs")
        sop = str(dcmread(broken.pet_paths[5], stop_before_pixels=True).SOPInstanceUID)
        [row] = db_rows(node.db_path, "SELECT path FROM instances WHERE sop_uid = ?", (sop,))
        spooled = node.db_path.parent / row["path"]
        spooled.write_bytes(spooled.read_bytes()[:300])  # a disk fault while the node was down

        assert sorted(job_states(node.db_path).values()) == ["queued", "queued"]
        node.preamble = None
        with node:
            wait_for(
                lambda: sorted(job_states(node.db_path).values()) == ["done", "failed"],
                timeout=120,
                what="one job done and one failed",
            )
        jobs = {row["study_uid"]: row for row in db_rows(node.db_path, "SELECT * FROM jobs")}
        failed = jobs[broken.study.study_uid]
        assert failed["state"] == "failed" and f"{sop}.dcm" in failed["reason"]
        assert jobs[intact.study.study_uid]["state"] == "done"
        derived = pacs.datasets()
        assert {str(ds.StudyInstanceUID) for ds in derived} == {intact.study.study_uid}
        assert len(derived) == len(intact.pet_paths)


@pytest.mark.network
@pytest.mark.slow
def test_the_same_study_sent_twice_gives_one_job_and_one_series(tmp_path: Path) -> None:
    study = make_study(tmp_path / "in", shuffle_seed=10)
    with StoreSCP(tmp_path / "pacs") as pacs:
        config = write_config(
            tmp_path, port=free_port(), destinations=[pacs.destination()], series_timeout_s=1.5
        )
        with NodeProcess(config) as node:
            assert storescu(study.ct_paths + study.pet_paths, node.port).returncode == 0
            wait_for(lambda: set(job_states(node.db_path).values()) == {"done"}, timeout=90, what="job 1")
            # The PACS routes the study again (e.g. on a second "stable" event).
            assert storescu(study.ct_paths + study.pet_paths, node.port).returncode == 0
            time.sleep(4)  # more than the quiet timer: a second job would be created by now
            assert len(db_rows(node.db_path, "SELECT * FROM jobs")) == 1
        _one_series_per_pet(pacs, study.pet_paths, node.db_path)
    audit = (tmp_path / "audit.log").read_text()
    assert f"duplicates={len(study.pet_paths)}" in audit
