"""Retention: what a sweep removes and what it must keep, with times faked in the database.

Rows are written straight into the node's schema (jobs finished N days ago, instances received N days
ago) with real files in a spool, then :func:`sweep` runs with ``now`` fixed.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dicomnode.audit import AuditLog
from dicomnode.db import DB_FILENAME, Database
from dicomnode.retention import Retention, sweep
from dicomnode.store import InstanceStore

DAY = 86400.0
NOW = 1_800_000_000.0


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True)
        self.db = Database(root / DB_FILENAME)
        self.store = InstanceStore(root, self.db)  # makes the layout (instances/, tmp/)
        self._jobs = 0

    def instance(self, study: str, series: str, sop: str, *, days_ago: float, modality: str = "PT") -> Path:
        relative = Path("instances") / study / series / f"{sop}.dcm"
        (self.root / relative).parent.mkdir(parents=True, exist_ok=True)
        (self.root / relative).write_bytes(b"\0" * 1000)
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO instances (sop_uid, study_uid, series_uid, sop_class_uid, modality,"
                " position_x, position_y, position_z, orientation, rows, columns, row_spacing,"
                " col_spacing, received_at, path) VALUES (?, ?, ?, '1.2', ?, 0, 0, 0, '1\\0\\0\\0\\1\\0',"
                " 8, 8, 1, 1, ?, ?)",
                (sop, study, series, modality, NOW - days_ago * DAY, str(relative)),
            )
        return self.root / relative

    def job(
        self, study: str, pet: str, inputs: list[str], *, state: str, finished_days_ago: float | None
    ) -> Path:
        self._jobs += 1
        out = Path("outputs") / f"job-{self._jobs}"
        (self.root / out).mkdir(parents=True)
        (self.root / out / "1.dcm").write_bytes(b"\0" * 500)
        finished = None if finished_days_ago is None else NOW - finished_days_ago * DAY
        with self.db.transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO jobs (pet_series_uid, study_uid, variant, state, output_dir, created_at,"
                " updated_at, finished_at) VALUES (?, ?, 'main', ?, ?, ?, ?, ?)",
                (pet, study, state, str(out), NOW - 30 * DAY, finished or NOW, finished),
            )
            conn.executemany(
                "INSERT INTO job_inputs (job_id, sop_uid, role) VALUES (?, ?, 'pet')",
                [(cursor.lastrowid, sop) for sop in inputs],
            )
        return self.root / out

    def sops(self) -> set[str]:
        return {row[0] for row in self.db.query("SELECT sop_uid FROM instances")}


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool")
    yield s
    s.db.close()


def test_a_finished_job_past_retention_loses_inputs_and_outputs(spool: Spool) -> None:
    old = spool.instance("S1", "PET1", "a", days_ago=10)
    out = spool.job("S1", "PET1", ["a"], state="done", finished_days_ago=9)
    result = sweep(spool.db, spool.root, retention_days=7, now=NOW)
    assert (result.instances, result.outputs) == (1, 1) and result.bytes == 1500
    assert not old.exists() and not out.exists() and spool.sops() == set()
    assert not (spool.root / "instances" / "S1").exists()  # empty directories go too
    assert spool.db.query("SELECT state FROM jobs")[0][0] == "done"  # the history stays
    assert not sweep(spool.db, spool.root, retention_days=7, now=NOW)  # idempotent


def test_recent_and_unfinished_work_is_kept(spool: Spool) -> None:
    recent = spool.job("S2", "PET2", ["b"], state="done", finished_days_ago=2)
    spool.instance("S2", "PET2", "b", days_ago=10)  # old input of a recently finished job
    spool.job("S3", "PET3", ["c"], state="sending", finished_days_ago=None)
    spool.instance("S3", "PET3", "c", days_ago=20)  # a job still under way
    spool.job("S4", "PET4", ["d"], state="failed", finished_days_ago=8)
    spool.instance("S4", "PET4", "d", days_ago=10)
    spool.instance("S4", "CT4", "e", days_ago=1)  # the study is still receiving
    result = sweep(spool.db, spool.root, retention_days=7, now=NOW)
    assert spool.sops() == {"b", "c", "d", "e"}
    assert recent.exists() and result.outputs == 1  # only the failed job's (finished 8 days ago)


def test_a_ct_shared_with_a_later_job_stays_until_that_job_expires(spool: Spool) -> None:
    for sop in ("ct1", "ct2"):
        spool.instance("S5", "CT", sop, days_ago=12)
    spool.instance("S5", "PETa", "p1", days_ago=12)
    spool.instance("S5", "PETb", "p2", days_ago=12)
    spool.job("S5", "PETa", ["p1", "ct1", "ct2"], state="done", finished_days_ago=11)
    spool.job("S5", "PETb", ["p2", "ct1", "ct2"], state="done", finished_days_ago=3)
    sweep(spool.db, spool.root, retention_days=7, now=NOW)
    assert spool.sops() == {"ct1", "ct2", "p2"}
    sweep(spool.db, spool.root, retention_days=7, now=NOW + 5 * DAY)
    assert spool.sops() == set()


def test_orphan_instances_expire_by_their_study(spool: Spool) -> None:
    nac = spool.instance("S6", "NAC", "n", days_ago=8)  # a skipped series: no job ever
    spool.instance("S7", "NAC", "m", days_ago=6)
    sweep(spool.db, spool.root, retention_days=7, now=NOW)
    assert not nac.exists() and spool.sops() == {"m"}


def test_a_row_whose_file_is_already_gone_is_removed(spool: Spool) -> None:
    spool.instance("S8", "PET", "x", days_ago=9).unlink()  # a crash between file and row removal
    assert sweep(spool.db, spool.root, retention_days=7, now=NOW).instances == 1
    assert spool.sops() == set()


def test_retention_sweeps_at_the_first_call_then_per_interval_and_audits(
    spool: Spool, tmp_path: Path
) -> None:
    audit = AuditLog(tmp_path / "audit.log")
    try:
        retention = Retention(spool.db, spool.root, audit, retention_days=7, interval_s=3600)
        # Real clock here: an instance received 8 days before now.
        old = spool.instance("S9", "PET", "y", days_ago=8 + (NOW - time.time()) / DAY)
        assert retention.run_once() is False
        assert not old.exists()
        assert "event=retention_sweep instances=1 outputs=0" in (tmp_path / "audit.log").read_text()
        again = spool.instance("S10", "PET", "z", days_ago=8 + (NOW - time.time()) / DAY)
        retention.run_once()  # not due for another hour
        assert again.exists()
    finally:
        audit.close()
