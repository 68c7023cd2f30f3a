"""The node's one SQLite database (WAL mode): a connection, a transaction helper and the schema.

Every table of the node lives in one file, ``<storage.root>/node.sqlite3``: the instance index
(:mod:`dicomnode.store`), the series decisions (:mod:`dicomnode.assembler`) and the job queue
(:mod:`dicomnode.jobs`). Guarantees:

- a :meth:`Database.transaction` is all or nothing (``BEGIN IMMEDIATE``, rolled back on any error), so
  two threads never interleave a read-modify-write;
- a committed transaction is on disk (``synchronous=FULL``: the WAL is fsynced at every commit), which
  is what lets the SCP answer Success right after its insert;
- other processes (``upete status``, ``upete resend``) may open the same file at the same time; they
  wait up to :data:`BUSY_TIMEOUT_S` for a writer instead of failing.

Within one process all threads share one connection behind a lock: SQLite serialises writers anyway,
and one connection keeps the WAL checkpointing in one place.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["Database", "DB_FILENAME", "BUSY_TIMEOUT_S"]

DB_FILENAME = "node.sqlite3"
BUSY_TIMEOUT_S = 10.0

# Bump when a table changes shape; the node refuses a database of another version instead of
# guessing (a migration is then written, not improvised).
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_uid         TEXT PRIMARY KEY,
    study_uid       TEXT NOT NULL,
    series_uid      TEXT NOT NULL,
    sop_class_uid   TEXT NOT NULL,
    modality        TEXT NOT NULL,
    frame_of_reference_uid TEXT,
    units           TEXT,            -- PET Units (0054,1001), e.g. BQML
    corrected_image TEXT,            -- PET CorrectedImage (0028,0051), values joined by '\\'
    series_type     TEXT,            -- PET SeriesType (0054,1000) value 1, e.g. STATIC
    number_of_slices INTEGER,        -- PET NumberOfSlices (0054,0081)
    position_x      REAL NOT NULL,   -- ImagePositionPatient, mm
    position_y      REAL NOT NULL,
    position_z      REAL NOT NULL,
    orientation     TEXT NOT NULL,   -- ImageOrientationPatient, six numbers joined by '\\'
    rows            INTEGER NOT NULL,
    columns         INTEGER NOT NULL,
    row_spacing     REAL NOT NULL,   -- PixelSpacing[0]: between rows (along the column direction), mm
    col_spacing     REAL NOT NULL,   -- PixelSpacing[1]: between columns (along the row direction), mm
    derived_by_us   INTEGER NOT NULL DEFAULT 0,
    calling_ae      TEXT,
    received_at     REAL NOT NULL,   -- Unix time of the first successful store
    path            TEXT NOT NULL    -- relative to the storage root
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid, received_at);

CREATE TABLE IF NOT EXISTS series_state (
    series_uid  TEXT PRIMARY KEY,
    study_uid   TEXT NOT NULL,
    state       TEXT NOT NULL,       -- skipped | waiting_ct | job | failed
    reason      TEXT,
    complete_at REAL,                -- when the PET series was found complete
    updated_at  REAL NOT NULL
);

CREATE TABLE IF NOT EXISTS jobs (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    pet_series_uid  TEXT NOT NULL UNIQUE,   -- one job per PET series, ever
    study_uid       TEXT NOT NULL,
    ct_series_uid   TEXT,
    variant         TEXT NOT NULL,          -- main | without_ct
    state           TEXT NOT NULL,          -- queued | running | sending | done | failed
    reason          TEXT,
    process_attempts INTEGER NOT NULL DEFAULT 0,
    lease_owner     TEXT,
    lease_until     REAL,
    next_attempt_at REAL,
    plan            TEXT,                   -- DerivedPlan as JSON, fixed before the first processing
    derived_series_uid TEXT,                -- the plan's series UID (loop guard: our own output)
    output_dir      TEXT,                   -- relative to the storage root
    output_count    INTEGER,
    stage_seconds   TEXT,                   -- JSON {stage: seconds}
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL,
    started_at      REAL,
    processed_at    REAL,
    finished_at     REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, next_attempt_at);
CREATE INDEX IF NOT EXISTS jobs_derived ON jobs(derived_series_uid);

CREATE TABLE IF NOT EXISTS job_inputs (
    job_id  INTEGER NOT NULL REFERENCES jobs(id),
    sop_uid TEXT NOT NULL,
    role    TEXT NOT NULL,                  -- pet | ct
    PRIMARY KEY (job_id, sop_uid)
);

CREATE TABLE IF NOT EXISTS job_sends (
    job_id      INTEGER NOT NULL REFERENCES jobs(id),
    destination TEXT NOT NULL,              -- AE@host:port
    state       TEXT NOT NULL,              -- pending | done | failed
    attempts    INTEGER NOT NULL DEFAULT 0,
    sent        INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT,
    next_attempt_at REAL,
    updated_at  REAL NOT NULL,
    PRIMARY KEY (job_id, destination)
);
"""


class Database:
    """One SQLite file in WAL mode, shared by the node's threads through :meth:`transaction`."""

    def __init__(self, path: Path, *, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise FileNotFoundError(f"no node database at {self.path}")
        # isolation_level=None: no implicit transactions; every write goes through transaction().
        self._conn = sqlite3.connect(
            str(self.path), timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        if create:
            self._migrate()

    def _migrate(self) -> None:
        with self.transaction() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise RuntimeError(
                    f"{self.path}: database schema version {version}, this node expects {SCHEMA_VERSION}"
                )
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT``; rolled back (and re-raised) on any exception."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def changes(self) -> int:
        """Rows inserted, updated or deleted through this connection since it opened (every write of
        this process: SQLite's total_changes; a rolled-back change still counts). No lock, no I/O."""
        return self._conn.total_changes

    def query(self, sql: str, params: tuple | dict = ()) -> list[sqlite3.Row]:
        """A read outside any transaction (sees the last committed state)."""
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()
