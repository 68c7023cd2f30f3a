"""``upete status`` and the heartbeat it reads (dicomnode/health.py, dicomnode/status.py), without a
running node: heartbeat rules, disk, job listing, --watch, and no patient data in the output."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dicomnode.audit import AuditLog
from dicomnode.config import parse_settings
from dicomnode.db import DB_FILENAME, Database
from dicomnode.health import HEARTBEAT_FILENAME, STALE_AFTER_S, NodeMonitor, read_heartbeat
from dicomnode.jobs import JobQueue, JobVariant, ModelUsed
from dicomnode.testing.peers import ROOT
from tests.support.dicomutil import make_study
from upete.cli import main


def _beat(root: Path, **fields: object) -> None:
    beat = {"state": "running", "pid": os.getpid(), "hostname": socket.gethostname(), "ae_title": "UPETE",
            "host": "127.0.0.1", "port": 11112, "metrics_url": None, "updated_at": time.time(),
            "threads": {"scp": True, "worker": True}}
    (root / HEARTBEAT_FILENAME).write_text(json.dumps({**beat, **fields}))


def test_heartbeat_rules(tmp_path: Path) -> None:
    assert not read_heartbeat(tmp_path).running  # no file: never started here
    _beat(tmp_path)
    health = read_heartbeat(tmp_path)
    assert health.running and health.summary.startswith("running (pid")
    _beat(tmp_path, updated_at=time.time() - STALE_AFTER_S - 5)
    assert not read_heartbeat(tmp_path).running and "last heartbeat" in read_heartbeat(tmp_path).summary
    _beat(tmp_path, state="stopped")
    assert "stopped at" in read_heartbeat(tmp_path).summary
    _beat(tmp_path, threads={"scp": True, "worker": False})
    health = read_heartbeat(tmp_path)
    assert health.running and "unhealthy: worker not alive" in health.summary
    # A fresh beat from a process that no longer exists (SIGKILL: no chance to mark itself stopped).
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _beat(tmp_path, pid=gone.pid)
    assert not read_heartbeat(tmp_path).running and "is gone" in read_heartbeat(tmp_path).summary
    (tmp_path / HEARTBEAT_FILENAME).write_text("{not json")
    assert read_heartbeat(tmp_path).summary.startswith("unknown")


def test_monitor_writes_beats_and_marks_the_stop(tmp_path: Path) -> None:
    settings = parse_settings({"storage": {"root": str(tmp_path)}, "metrics": {"enabled": False}})
    db = Database(tmp_path / DB_FILENAME)
    try:
        monitor = NodeMonitor(settings, db, alive=lambda: {"scp": True, "worker": True})
        assert read_heartbeat(tmp_path).running
        monitor.close()
        assert not read_heartbeat(tmp_path).running
    finally:
        db.close()


def _spool_with_jobs(tmp_path: Path) -> Path:
    study = make_study(tmp_path / "in")
    root = tmp_path / "spool"
    config = tmp_path / "node.yaml"
    config.write_text(yaml.safe_dump({"storage": {"root": str(root)}, "logging": {"audit_file": None}}))
    root.mkdir()
    db = Database(root / DB_FILENAME)
    # One stored PET instance, so the status can read the study's date and time from it.
    rel = Path("instances") / "x.dcm"
    (root / "instances").mkdir()
    (root / rel).write_bytes(study.pet_paths[0].read_bytes())
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO instances (sop_uid, study_uid, series_uid, sop_class_uid, modality, "
            "position_x, position_y, position_z, orientation, rows, columns, row_spacing, col_spacing, "
            "received_at, path) VALUES ('1.1', '1.2', '1.3', '1.2.840.10008.5.1.4.1.1.128', 'PT', "
            "0, 0, 0, '', 1, 1, 1, 1, 0, ?)",
            (str(rel),),
        )
    queue = JobQueue(db, AuditLog(None))
    done = queue.create(pet_series_uid="1.3", study_uid="1.2", ct_series_uid=None, variant="main",
                        pet_sop_uids=["1.1"])
    queue.create(pet_series_uid="1.4", study_uid="1.2", ct_series_uid=None, variant="main",
                 pet_sop_uids=["1.5"])
    queue.claim_processing(lease_s=60)
    queue.fail(done, "the PET series is not attenuation corrected")
    db.close()
    return config


def test_status_lists_health_disk_and_jobs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _spool_with_jobs(tmp_path)
    assert main(["status", "--config", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["node"]["running"] is False
    assert report["disk"]["spool_bytes"] > 0 and report["disk"]["free_bytes"] > 0
    assert report["job_counts"] == {"queued": 1, "running": 0, "sending": 0, "done": 0, "failed": 1}
    failed = next(job for job in report["jobs"] if job["state"] == "failed")
    assert failed["reason"] == "the PET series is not attenuation corrected"
    assert failed["study_time"] == "2026-01-15 09:30" and failed["processing_s"] is None
    queued = next(job for job in report["jobs"] if job["state"] == "queued")
    assert queued["study_time"] is None and queued["waiting_s"] >= 0

    assert main(["status", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("node      not running: no heartbeat")
    assert "1 queued, 0 running, 0 sending, 0 done, 1 failed" in text
    assert "study           2026-01-15 09:30  1.2" in text
    assert "reason          the PET series is not attenuation corrected" in text
    assert "PHANTOM" not in text and "PH0001" not in text  # no patient name or ID


def test_status_shows_the_model_each_job_ran_and_why_it_had_no_ct(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _spool_with_jobs(tmp_path)
    db = Database(tmp_path / "spool" / DB_FILENAME)
    queue = JobQueue(db, AuditLog(None))
    job_id = queue.create(pet_series_uid="1.6", study_uid="1.2", ct_series_uid="1.7", variant=JobVariant.MAIN,
                          pet_sop_uids=["1.8"], ct_sop_uids=["1.9"])
    while (claimed := queue.claim_processing(lease_s=60)) is not None and claimed.id != job_id:
        pass
    note = "PET-only model: the CT's axial range holds 61% of the patient's body, at least 99% is needed"
    used = ModelUsed("upete-ldm-p.safetensors", "uPETe LDM-P", "0f1e2d3c4b5a")
    queue.processed(job_id, output_dir="outputs/job-3", output_count=24, stage_seconds={"enhance": 1.0},
                    destinations=[], model=used, ct_note=note, variant=JobVariant.WITHOUT_CT)
    db.close()
    assert main(["status", "--config", str(config), "--json"]) == 0
    job = next(job for job in json.loads(capsys.readouterr().out)["jobs"] if job["id"] == job_id)
    assert job["model"] == {"checkpoint": "upete-ldm-p.safetensors", "name": "uPETe LDM-P",
                            "version": "0f1e2d3c4b5a"}
    assert (job["ct_note"], job["variant"]) == (note, "without_ct")
    assert main(["status", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert "CT series       1.7  (PET-only model)" in text
    assert f"CT not used     {note}" in text
    assert "model           uPETe LDM-P: upete-ldm-p.safetensors (version 0f1e2d3c4b5a)" in text


def test_watch_redraws_count_times(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _spool_with_jobs(tmp_path)
    assert main(["status", "--config", str(config), "--watch", "0.05", "--count", "3", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(json.loads(line)["job_counts"]["failed"] == 1 for line in lines)
    assert main(["status", "--config", str(config), "--watch", "0"]) == 2


def test_watch_runs_until_interrupted(tmp_path: Path) -> None:
    config = _spool_with_jobs(tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-m", "upete", "status", "--config", str(config), "--watch", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        # A test run started in the background (nohup … &) inherits SIGINT ignored, and Python then
        # installs no Ctrl-C handler: give the child the terminal's default, as a user's shell does.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 60
        seen = ""
        while seen.count("upete status  ") < 2:  # two redraws: it keeps going
            assert time.monotonic() < deadline, "no second redraw within 60 s"
            seen += process.stdout.readline()
        process.send_signal(signal.SIGINT)  # Ctrl-C
        process.communicate(timeout=30)  # drains the pipes: a redraw must not block on a full one
        assert process.returncode == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def test_spool_size_walks_again_only_when_its_figure_is_older_than_max_age(tmp_path) -> None:
    from dicomnode.status import SpoolSize

    now = [0.0]
    size = SpoolSize(max_age_s=60.0, clock=lambda: now[0])
    (tmp_path / "a").write_bytes(b"x" * 10_000)
    first = size(tmp_path)
    assert first >= 10_000
    (tmp_path / "b").write_bytes(b"x" * 50_000)
    now[0] = 59.0
    assert size(tmp_path) == first  # cached: a page load does not stat the spool again
    now[0] = 61.0
    assert size(tmp_path) >= first + 50_000  # stale: walked again
