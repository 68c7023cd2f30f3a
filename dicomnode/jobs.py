"""The persistent job queue (tables ``jobs``, ``job_inputs``, ``job_sends`` of the node database).

States: ``queued → running → sending → done | failed`` (``failed`` always with a reason). Guarantees:

- **one job per PET series, ever**: ``pet_series_uid`` is unique; :meth:`JobQueue.create` returns None
  for a series that already has one;
- **nothing acknowledged vanishes**: a job is claimed with a lease and finished explicitly (never
  deleted on claim); :meth:`JobQueue.recover` at start puts ``running`` jobs back to ``queued`` and
  releases every lease, so a restart resumes whatever was unfinished;
- **same UIDs on a rerun**: the derived series plan is stored in the row (:meth:`set_plan`) before the
  first processing and reused by every later attempt, so a resend replaces rather than duplicates;
- a job that keeps killing the process is not retried forever: after :data:`MAX_PROCESS_ATTEMPTS`
  interrupted runs it fails with a reason;
- every transition writes one audit line (job id, PET series UID, from, to, reason).

All methods are atomic (one :meth:`Database.transaction` each).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

from dicomnode.audit import AuditLog
from dicomnode.db import Database
from dicomnode.job_records import (
    ADDED_COLUMNS,
    Job,
    JobState,
    JobVariant,
    ModelUsed,
    SendState,
    SendTarget,
    destination_key,
)

__all__ = [
    "Job",
    "JobQueue",
    "JobState",
    "JobVariant",
    "ModelUsed",
    "SendState",
    "SendTarget",
    "destination_key",
    "MAX_PROCESS_ATTEMPTS",
    "MAX_BACKOFF_S",
]

MAX_PROCESS_ATTEMPTS = 3
MAX_BACKOFF_S = 3600.0


_SELECT_JOB = "SELECT * FROM jobs WHERE id = ?"
_NEXT_QUEUED = "SELECT * FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1"
_NEXT_SENDING = """
SELECT * FROM jobs WHERE state = 'sending' AND (lease_until IS NULL OR lease_until < :now)
    AND (next_attempt_at IS NULL OR next_attempt_at <= :now)
ORDER BY next_attempt_at, id LIMIT 1
"""


class JobQueue:
    """The job table behind a small API; see the module docstring for the guarantees."""

    def __init__(
        self, db: Database, audit: AuditLog, *, owner: str | None = None, migrate: bool = True
    ) -> None:
        """``migrate=False`` for readers (``upete status``): they never write to the node's database."""
        self.db = db
        self.audit = audit
        self._audit_lines: list[dict[str, object]] | None = None
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        if migrate:
            self.migrate()

    def migrate(self) -> None:
        """Add the columns of :data:`ADDED_COLUMNS` that the ``jobs`` table lacks (idempotent)."""
        with self.db.transaction() as conn:
            present = {row["name"] for row in conn.execute("PRAGMA table_info(jobs)")}
            for column, kind in ADDED_COLUMNS.items():
                if column not in present:
                    conn.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")

    # -- transitions -------------------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """A transaction whose audit lines (queued by :meth:`_transition`) are written after COMMIT,
        so the audit never reports a transition that was rolled back."""
        lines: list[dict[str, object]] = []
        with self.db.transaction() as conn:
            self._audit_lines = lines
            try:
                yield conn
            finally:
                self._audit_lines = None
        for fields in lines:
            self.audit.record("job_state", **fields)

    def _transition(
        self, conn: sqlite3.Connection, job: sqlite3.Row, to: JobState, reason: str | None, **columns: object
    ) -> None:
        now = time.time()
        sets = {"state": to.value, "reason": reason, "updated_at": now, **columns}
        assignments = ", ".join(f"{key} = :{key}" for key in sets)
        conn.execute(f"UPDATE jobs SET {assignments} WHERE id = :id", {**sets, "id": job["id"]})
        fields: dict[str, object] = {
            "job_id": job["id"],
            "pet_series_uid": job["pet_series_uid"],
            "from": job["state"],
            "to": to.value,
        }
        if reason:
            fields["reason"] = reason
        if self._audit_lines is None:  # the database lock held by _tx makes this attribute safe to share
            raise RuntimeError("JobQueue._transition called outside _tx()")
        self._audit_lines.append(fields)

    def create(
        self,
        *,
        pet_series_uid: str,
        study_uid: str,
        ct_series_uid: str | None,
        variant: JobVariant,
        pet_sop_uids: Sequence[str],
        ct_sop_uids: Sequence[str] = (),
        ct_note: str | None = None,
    ) -> int | None:
        """Queue a job for a PET series with exactly these inputs; None if the series already has one.

        ``ct_note``: why the job runs without the study's CT, when the assembler already knows.
        """
        if not pet_sop_uids:
            raise ValueError("a job needs at least one PET instance")
        variant = JobVariant(variant)
        now = time.time()
        with self.db.transaction() as conn:
            cursor = conn.execute(
                "INSERT OR IGNORE INTO jobs (pet_series_uid, study_uid, ct_series_uid, variant, state, "
                "ct_note, created_at, updated_at) VALUES (?, ?, ?, ?, 'queued', ?, ?, ?)",
                (pet_series_uid, study_uid, ct_series_uid, variant.value, ct_note, now, now),
            )
            if cursor.rowcount == 0:
                return None
            job_id = int(cursor.lastrowid)
            conn.executemany(
                "INSERT INTO job_inputs (job_id, sop_uid, role) VALUES (?, ?, ?)",
                [(job_id, uid, "pet") for uid in pet_sop_uids] + [(job_id, uid, "ct") for uid in ct_sop_uids],
            )
        self.audit.record(
            "job_state",
            job_id=job_id,
            pet_series_uid=pet_series_uid,
            ct_series_uid=ct_series_uid,
            variant=variant.value,
            to=JobState.QUEUED.value,
            pet_instances=len(pet_sop_uids),
            ct_instances=len(ct_sop_uids),
        )
        return job_id

    def recover(self) -> int:
        """At start: ``running`` → ``queued`` and all leases released. Returns how many jobs moved."""
        with self._tx() as conn:
            running = conn.execute("SELECT * FROM jobs WHERE state = 'running'").fetchall()
            for job in running:
                self._transition(
                    conn, job, JobState.QUEUED, "resumed after a restart", lease_owner=None, lease_until=None
                )
            conn.execute(
                "UPDATE jobs SET lease_owner = NULL, lease_until = NULL WHERE lease_owner IS NOT NULL"
            )
        return len(running)

    def claim_processing(self, *, lease_s: float) -> Job | None:
        """Atomically claim the oldest queued job (→ running, lease for ``lease_s``), or None."""
        now = time.time()
        with self._tx() as conn:
            while True:
                row = conn.execute(_NEXT_QUEUED).fetchone()
                if row is None:
                    return None
                if row["process_attempts"] >= MAX_PROCESS_ATTEMPTS:
                    self._transition(
                        conn,
                        row,
                        JobState.FAILED,
                        f"processing was interrupted {row['process_attempts']} times "
                        "(the node stopped or crashed while running it)",
                        finished_at=now,
                    )
                    continue
                self._transition(
                    conn,
                    row,
                    JobState.RUNNING,
                    None,
                    lease_owner=self.owner,
                    lease_until=now + lease_s,
                    process_attempts=row["process_attempts"] + 1,
                    started_at=now,
                )
                return Job.from_row(conn.execute(_SELECT_JOB, (row["id"],)).fetchone())

    def renew(self, job_id: int, *, lease_s: float) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE jobs SET lease_until = ? WHERE id = ? AND lease_owner = ?",
                (time.time() + lease_s, job_id, self.owner),
            )

    def set_plan(self, job_id: int, plan_json: str, *, derived_series_uid: str) -> None:
        """Store the derived series plan; refuses to replace an existing one (UIDs are fixed once)."""
        with self.db.transaction() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET plan = ?, derived_series_uid = ?, updated_at = ? "
                "WHERE id = ? AND plan IS NULL",
                (plan_json, derived_series_uid, time.time(), job_id),
            )
            if cursor.rowcount != 1:
                raise RuntimeError(f"job {job_id} already has a plan (or does not exist)")

    def processed(
        self,
        job_id: int,
        *,
        output_dir: str,
        output_count: int,
        stage_seconds: dict[str, float],
        destinations: Iterable[str],
        model: ModelUsed | None = None,
        ct_note: str | None = None,
        variant: JobVariant | None = None,
    ) -> None:
        """running → sending, with one pending delivery per destination key (``AE@host:port``).

        ``model``: what produced the output; ``ct_note``: why the study's CT was not used (the
        assembler's note stays when None); ``variant``: which configured model ran, when known.
        """
        recorded: dict[str, object] = {}
        if model is not None:
            recorded = {"model_checkpoint": model.checkpoint, "model_name": model.name,
                        "model_version": model.version}
        if ct_note is not None:
            recorded["ct_note"] = ct_note
        if variant is not None:
            recorded["variant"] = JobVariant(variant).value
        now = time.time()
        with self._tx() as conn:
            job = self._require(conn, job_id, JobState.RUNNING)
            # The CT note as the transition's reason: the audit line says why the CT was not used.
            self._transition(
                conn,
                job,
                JobState.SENDING,
                ct_note,
                lease_owner=None,
                lease_until=None,
                output_dir=output_dir,
                output_count=output_count,
                processed_at=now,
                stage_seconds=json.dumps(stage_seconds),
                next_attempt_at=now,
                **recorded,
            )
            self._reset_sends(conn, job_id, destinations, now)

    @staticmethod
    def _reset_sends(conn: sqlite3.Connection, job_id: int, destinations: Iterable[str], now: float) -> None:
        conn.execute("DELETE FROM job_sends WHERE job_id = ?", (job_id,))
        conn.executemany(
            "INSERT INTO job_sends (job_id, destination, state, attempts, sent, next_attempt_at, updated_at) "
            "VALUES (?, ?, ?, 0, 0, ?, ?)",
            [(job_id, key, SendState.PENDING.value, now, now) for key in destinations],
        )

    def fail(self, job_id: int, reason: str) -> None:
        """Any unfinished state → failed with ``reason`` (inputs and outputs stay on disk)."""
        with self._tx() as conn:
            job = self._require(conn, job_id, JobState.QUEUED, JobState.RUNNING, JobState.SENDING)
            self._transition(
                conn,
                job,
                JobState.FAILED,
                reason,
                lease_owner=None,
                lease_until=None,
                finished_at=time.time(),
            )

    def claim_sending(self, *, lease_s: float) -> Job | None:
        """Atomically claim a sending job whose next attempt is due (lease for ``lease_s``), or None."""
        now = time.time()
        with self.db.transaction() as conn:
            row = conn.execute(_NEXT_SENDING, {"now": now}).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE jobs SET lease_owner = ?, lease_until = ? WHERE id = ?",
                (self.owner, now + lease_s, row["id"]),
            )
            return Job.from_row(conn.execute(_SELECT_JOB, (row["id"],)).fetchone())

    def sends(self, job_id: int) -> list[SendTarget]:
        rows = self.db.query("SELECT * FROM job_sends WHERE job_id = ? ORDER BY destination", (job_id,))
        return [
            SendTarget(
                job_id=r["job_id"],
                destination=r["destination"],
                state=SendState(r["state"]),
                attempts=r["attempts"],
                sent=r["sent"],
                last_error=r["last_error"],
                next_attempt_at=r["next_attempt_at"],
            )
            for r in rows
        ]

    def record_send(
        self,
        job_id: int,
        destination: str,
        *,
        ok: bool,
        sent: int,
        error: str | None,
        max_retries: int,
        backoff_s: float,
    ) -> SendTarget:
        """Record one delivery attempt; a failure is retried after ``backoff_s · 2^(attempt-1)`` (capped)
        until ``max_retries`` retries are spent, then the destination is failed."""
        now = time.time()
        with self.db.transaction() as conn:
            row = conn.execute(
                "SELECT * FROM job_sends WHERE job_id = ? AND destination = ?", (job_id, destination)
            ).fetchone()
            if row is None:
                raise KeyError(f"job {job_id} has no destination {destination}")
            attempts = row["attempts"] + 1
            if ok:
                state, retry_at = SendState.DONE, None
            elif attempts > max_retries:
                state, retry_at = SendState.FAILED, None
            else:
                state = SendState.PENDING
                retry_at = now + min(backoff_s * 2 ** (attempts - 1), MAX_BACKOFF_S)
            conn.execute(
                "UPDATE job_sends SET state = ?, attempts = ?, sent = ?, last_error = ?, "
                "next_attempt_at = ?, updated_at = ? WHERE job_id = ? AND destination = ?",
                (state.value, attempts, sent, None if ok else error, retry_at, now, job_id, destination),
            )
        return SendTarget(job_id, destination, state, attempts, sent, None if ok else error, retry_at)

    def settle_sending(self, job_id: int) -> JobState:
        """After a sending round: all destinations done → done; any failed and none pending → failed;
        otherwise stays sending until the earliest retry. Releases the lease. Returns the state."""
        now = time.time()
        with self._tx() as conn:
            job = self._require(conn, job_id, JobState.SENDING)
            sends = conn.execute("SELECT * FROM job_sends WHERE job_id = ?", (job_id,)).fetchall()
            pending = [s for s in sends if s["state"] == SendState.PENDING.value]
            failed = [s for s in sends if s["state"] == SendState.FAILED.value]
            if pending:
                conn.execute(
                    "UPDATE jobs SET lease_owner = NULL, lease_until = NULL, next_attempt_at = ?, "
                    "updated_at = ? WHERE id = ?",
                    (min(s["next_attempt_at"] or now for s in pending), now, job_id),
                )
                return JobState.SENDING
            if failed:
                reason = "; ".join(
                    f"send to {s['destination']} failed after {s['attempts']} attempt(s): {s['last_error']}"
                    for s in failed
                )
                self._transition(
                    conn, job, JobState.FAILED, reason, lease_owner=None, lease_until=None, finished_at=now
                )
                return JobState.FAILED
            reason = None if sends else "no destinations configured; the derived series stays in the spool"
            self._transition(
                conn,
                job,
                JobState.DONE,
                reason,
                lease_owner=None,
                lease_until=None,
                finished_at=now,
                next_attempt_at=None,
            )
            return JobState.DONE

    def resend(self, job_id: int, destinations: Iterable[str]) -> JobState:
        """Manual retry (``upete resend``): a job with its output goes back to sending (to every current
        destination, attempts reset); one without output goes back to the queue (same plan, same UIDs).
        """
        now = time.time()
        with self._tx() as conn:
            job = conn.execute(_SELECT_JOB, (job_id,)).fetchone()
            if job is None:
                raise KeyError(f"no job {job_id}")
            if job["state"] == JobState.RUNNING.value:
                raise ValueError(f"job {job_id} is running; wait until it is sending, done or failed")
            if job["output_dir"]:
                self._transition(
                    conn,
                    job,
                    JobState.SENDING,
                    "manual resend",
                    lease_owner=None,
                    lease_until=None,
                    next_attempt_at=now,
                    finished_at=None,
                )
                self._reset_sends(conn, job_id, destinations, now)
                return JobState.SENDING
            self._transition(
                conn,
                job,
                JobState.QUEUED,
                "manual resend",
                lease_owner=None,
                lease_until=None,
                process_attempts=0,
                finished_at=None,
            )
            return JobState.QUEUED

    # -- reads -------------------------------------------------------------------------------------

    @staticmethod
    def _require(conn: sqlite3.Connection, job_id: int, *states: JobState) -> sqlite3.Row:
        job = conn.execute(_SELECT_JOB, (job_id,)).fetchone()
        if job is None:
            raise KeyError(f"no job {job_id}")
        if job["state"] not in {s.value for s in states}:
            raise ValueError(f"job {job_id} is {job['state']}, expected {'/'.join(s.value for s in states)}")
        return job

    def get(self, job_id: int) -> Job | None:
        rows = self.db.query(_SELECT_JOB, (job_id,))
        return Job.from_row(rows[0]) if rows else None

    def list(self, *, limit: int = 100) -> list[Job]:
        rows = self.db.query("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,))
        return [Job.from_row(row) for row in rows]

    def inputs(self, job_id: int) -> tuple[list[str], list[str]]:
        """(PET SOP Instance UIDs, CT SOP Instance UIDs) the job was created with."""
        rows = self.db.query(
            "SELECT sop_uid, role FROM job_inputs WHERE job_id = ? ORDER BY sop_uid", (job_id,)
        )
        return (
            [r["sop_uid"] for r in rows if r["role"] == "pet"],
            [r["sop_uid"] for r in rows if r["role"] == "ct"],
        )

    def is_our_series(self, series_uid: str) -> bool:
        """True for a series UID this node planned for its output (the loop guard's own records)."""
        return bool(self.db.query("SELECT 1 FROM jobs WHERE derived_series_uid = ?", (series_uid,)))
