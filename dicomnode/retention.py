"""Retention: inputs and outputs leave the spool ``storage.retention_days`` after they stopped mattering.

What a sweep removes (files first, then their index rows, so a crash in between leaves a row whose
file is gone, which the next sweep finishes, never a file nobody indexes):

- the derived series of every job that finished (``done`` or ``failed``) before the cut-off;
- received instances of studies that received nothing after the cut-off, except the inputs of a job
  that is still under way or finished after the cut-off (a CT two PET series share stays as long as
  the later job needs it). Instances no job used (skipped series, NAC PET, CT without PET, our own
  output coming back) go the same way.

Job rows, their sends and the series decisions stay: ``upete status`` keeps the history and the loop
guard keeps recognising our series. ``upete resend`` of a job whose outputs were removed reports the
missing files. The service sweeps at start and then every hour (:class:`Retention`).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from dicomnode.audit import AuditLog
from dicomnode.db import Database

__all__ = ["Retention", "SweepResult", "sweep"]

log = logging.getLogger("upete.retention")

_FINISHED = "state IN ('done', 'failed') AND COALESCE(finished_at, updated_at) < :cutoff"
_EXPIRED_OUTPUTS = f"SELECT id, output_dir FROM jobs WHERE output_dir IS NOT NULL AND {_FINISHED}"
_OLD_INSTANCES = """
SELECT sop_uid, path FROM instances
WHERE study_uid IN (SELECT study_uid FROM instances GROUP BY study_uid HAVING MAX(received_at) < :cutoff)
  AND sop_uid NOT IN (
    SELECT job_inputs.sop_uid FROM job_inputs JOIN jobs ON jobs.id = job_inputs.job_id
    WHERE NOT (jobs.state IN ('done', 'failed') AND COALESCE(jobs.finished_at, jobs.updated_at) < :cutoff))
"""
_DELETE_INSTANCE = "DELETE FROM instances WHERE sop_uid = ?"
_BATCH = 500  # rows per transaction: short write locks beside a receiving SCP


@dataclass(frozen=True)
class SweepResult:
    instances: int  # received instances removed
    outputs: int  # job output directories removed
    bytes: int  # bytes freed

    def __bool__(self) -> bool:
        return bool(self.instances or self.outputs)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _remove_empty_parents(path: Path, stop: Path) -> None:
    for parent in path.parents:
        if parent == stop or stop not in parent.parents:
            return
        try:
            parent.rmdir()  # only succeeds when empty
        except OSError:
            return


def sweep(db: Database, root: Path, *, retention_days: float, now: float | None = None) -> SweepResult:
    """Remove what expired before ``now - retention_days``; safe to run beside the other threads."""
    root = Path(root)
    cutoff = (time.time() if now is None else now) - retention_days * 86400.0
    freed = outputs = 0
    for row in db.query(_EXPIRED_OUTPUTS, {"cutoff": cutoff}):
        directory = root / row["output_dir"]
        if root not in directory.parents or not directory.is_dir():
            continue  # already removed (or a path we do not own)
        freed += sum(_size(p) for p in directory.rglob("*") if p.is_file())
        shutil.rmtree(directory, ignore_errors=True)
        _remove_empty_parents(directory, root)
        outputs += 1
    rows = db.query(_OLD_INSTANCES, {"cutoff": cutoff})
    for start in range(0, len(rows), _BATCH):
        batch = rows[start : start + _BATCH]
        for row in batch:
            path = root / row["path"]
            freed += _size(path)
            path.unlink(missing_ok=True)
            _remove_empty_parents(path, root)
        with db.transaction() as conn:
            conn.executemany(_DELETE_INSTANCE, [(row["sop_uid"],) for row in batch])
    return SweepResult(instances=len(rows), outputs=outputs, bytes=freed)


class Retention:
    """Sweeps when due: at the first call (the node's start) and every ``interval_s`` after."""

    def __init__(
        self, db: Database, root: Path, audit: AuditLog, *, retention_days: float, interval_s: float = 3600.0
    ) -> None:
        self.db = db
        self.root = Path(root)
        self.audit = audit
        self.retention_days = retention_days
        self.interval_s = interval_s
        self._next = 0.0

    def run_once(self) -> bool:
        """Sweep if due; always False (the service loop then waits its interval)."""
        if time.monotonic() < self._next:
            return False
        self._next = time.monotonic() + self.interval_s
        started = time.monotonic()
        result = sweep(self.db, self.root, retention_days=self.retention_days)
        if result:
            self.audit.record(
                "retention_sweep",
                instances=result.instances,
                outputs=result.outputs,
                freed_mb=round(result.bytes / 1e6, 1),
                retention_days=self.retention_days,
                seconds=round(time.monotonic() - started, 3),
            )
        return False
