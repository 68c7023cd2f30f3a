"""The job queue's records: a job's row and its send targets, and the states they move through.

Read by the queue (:mod:`dicomnode.jobs`), the worker, the sender and ``upete status``; written only by
the queue. The states are stored in the database as their text values.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from enum import Enum

__all__ = [
    "ADDED_COLUMNS",
    "Job",
    "JobState",
    "JobVariant",
    "ModelUsed",
    "SendState",
    "SendTarget",
    "destination_key",
]


class _Text(str, Enum):
    """A str Enum that reads as its value in text (``f"{state}"`` is ``done``, not ``SendState.DONE``).

    What ``enum.StrEnum`` does from Python 3.11; written out because the node supports 3.10.
    """

    def __str__(self) -> str:
        return str(self.value)

    __format__ = str.__format__


class JobState(_Text):
    QUEUED = "queued"
    RUNNING = "running"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"


class JobVariant(_Text):
    """Which configured model a job is for (stored as its value in ``jobs.variant``)."""

    MAIN = "main"  # model.checkpoint
    WITHOUT_CT = "without_ct"  # model.checkpoint_without_ct: the study has no CT that covers the patient


class SendState(_Text):
    """One destination's delivery state (stored as its value in ``job_sends.state``)."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


# Columns added to ``jobs`` after the first schema shipped. A spool written by an older node lacks them:
# :meth:`JobQueue.migrate` adds them (ALTER TABLE ADD COLUMN: old rows read NULL), readers tolerate
# their absence, so ``upete status`` also reads an old spool without writing to it.
ADDED_COLUMNS = {
    "ct_note": "TEXT",  # why the job ran without the study's CT (None: the CT was used, or none needed)
    "model_checkpoint": "TEXT",  # file name of the checkpoint (or the classical spec) that ran
    "model_name": "TEXT",  # EnhancerInfo.name of that model
    "model_version": "TEXT",  # EnhancerInfo.version: the checkpoint's digest
}


@dataclass(frozen=True)
class ModelUsed:
    """The model a job ran: checkpoint file name (or classical spec), name and version (digest)."""

    checkpoint: str
    name: str
    version: str


@dataclass(frozen=True)
class Job:
    """A row of ``jobs``; times are Unix seconds."""

    id: int
    pet_series_uid: str
    study_uid: str
    ct_series_uid: str | None
    variant: JobVariant
    state: JobState
    reason: str | None
    process_attempts: int
    plan_json: str | None  # the DerivedPlan (dicomnode.derived.DerivedPlan.to_json)
    derived_series_uid: str | None
    output_dir: str | None
    output_count: int | None
    stage_seconds: dict[str, float]
    created_at: float
    updated_at: float
    started_at: float | None
    processed_at: float | None
    finished_at: float | None
    next_attempt_at: float | None
    ct_note: str | None = None  # why the study's CT was not used ("PET-only model: …"), if it was not
    model: ModelUsed | None = None  # the model that produced the output (None until processed)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        added = {key: row[key] if key in row.keys() else None for key in ADDED_COLUMNS}
        model = None
        if added["model_checkpoint"] is not None:
            model = ModelUsed(
                added["model_checkpoint"], added["model_name"] or "", added["model_version"] or ""
            )
        return cls(
            id=row["id"],
            pet_series_uid=row["pet_series_uid"],
            study_uid=row["study_uid"],
            ct_series_uid=row["ct_series_uid"],
            variant=JobVariant(row["variant"]),
            state=JobState(row["state"]),
            reason=row["reason"],
            process_attempts=row["process_attempts"],
            plan_json=row["plan"],
            derived_series_uid=row["derived_series_uid"],
            output_dir=row["output_dir"],
            output_count=row["output_count"],
            stage_seconds=json.loads(row["stage_seconds"]) if row["stage_seconds"] else {},
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            started_at=row["started_at"],
            processed_at=row["processed_at"],
            finished_at=row["finished_at"],
            next_attempt_at=row["next_attempt_at"],
            ct_note=added["ct_note"],
            model=model,
        )


@dataclass(frozen=True)
class SendTarget:
    """One destination's delivery state for a job (a row of ``job_sends``)."""

    job_id: int
    destination: str  # "AE@host:port"
    state: SendState
    attempts: int
    sent: int
    last_error: str | None
    next_attempt_at: float | None


def destination_key(ae_title: str, host: str, port: int) -> str:
    return f"{ae_title}@{host}:{port}"
