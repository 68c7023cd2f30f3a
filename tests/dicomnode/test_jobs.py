"""The job queue: states, leases, one job per PET series, the plan fixed once, retries, audit lines."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dicomnode.audit import AuditLog
from dicomnode.db import DB_FILENAME, Database
from dicomnode.jobs import MAX_PROCESS_ATTEMPTS, JobQueue, JobState, JobVariant, ModelUsed, SendState

DEST = "PACS@127.0.0.1:4242"


@pytest.fixture
def queue(tmp_path: Path) -> JobQueue:
    db = Database(tmp_path / DB_FILENAME)
    audit = AuditLog(tmp_path / "audit.log")
    yield JobQueue(db, audit, owner="test")
    audit.close()
    db.close()


def _create(queue: JobQueue, series: str = "1.2.3.1") -> int:
    job_id = queue.create(
        pet_series_uid=series,
        study_uid="1.2.3",
        ct_series_uid="1.2.3.2",
        variant="main",
        pet_sop_uids=["1.1", "1.2"],
        ct_sop_uids=["2.1"],
    )
    assert job_id is not None
    return job_id


def _audit(queue: JobQueue) -> list[str]:
    return queue.audit.path.read_text().splitlines()


def test_happy_path_and_its_audit_lines(queue: JobQueue) -> None:
    job_id = _create(queue)
    assert queue.inputs(job_id) == (["1.1", "1.2"], ["2.1"])
    job = queue.claim_processing(lease_s=60)
    assert (job.id, job.state, job.process_attempts) == (job_id, JobState.RUNNING, 1)
    assert queue.claim_processing(lease_s=60) is None  # nothing else queued
    queue.set_plan(job_id, '{"series_uid": "9.9"}', derived_series_uid="9.9")
    queue.processed(
        job_id,
        output_dir="outputs/job-1",
        output_count=2,
        stage_seconds={"enhance": 0.5},
        destinations=[DEST],
    )
    claimed = queue.claim_sending(lease_s=60)
    assert claimed.id == job_id and claimed.output_count == 2
    assert queue.claim_sending(lease_s=60) is None  # leased
    queue.record_send(job_id, DEST, ok=True, sent=2, error=None, max_retries=3, backoff_s=1)
    assert queue.settle_sending(job_id) is JobState.DONE
    done = queue.get(job_id)
    assert done.state is JobState.DONE and done.reason is None and done.finished_at is not None
    assert done.stage_seconds == {"enhance": 0.5}
    transitions = [line for line in _audit(queue) if "event=job_state" in line]
    assert [line.split(" to=")[1].split()[0] for line in transitions] == [
        "queued",
        "running",
        "sending",
        "done",
    ]
    assert all(f"job_id={job_id}" in line and "pet_series_uid=1.2.3.1" in line for line in transitions)


def test_one_job_per_pet_series_ever(queue: JobQueue) -> None:
    job_id = _create(queue)
    queue.fail(job_id, "whatever")
    assert (
        queue.create(
            pet_series_uid="1.2.3.1",
            study_uid="1.2.3",
            ct_series_uid=None,
            variant="main",
            pet_sop_uids=["1.1"],
        )
        is None
    )
    assert len(queue.list()) == 1


def test_the_plan_is_fixed_once(queue: JobQueue) -> None:
    job_id = _create(queue)
    queue.set_plan(job_id, '{"series_uid": "9.9"}', derived_series_uid="9.9")
    with pytest.raises(RuntimeError, match="already has a plan"):
        queue.set_plan(job_id, '{"series_uid": "8.8"}', derived_series_uid="8.8")
    assert queue.get(job_id).derived_series_uid == "9.9"
    assert queue.is_our_series("9.9") and not queue.is_our_series("8.8")


def test_restart_requeues_running_jobs_and_keeps_the_plan(queue: JobQueue) -> None:
    job_id = _create(queue)
    queue.claim_processing(lease_s=60)
    queue.set_plan(job_id, '{"series_uid": "9.9"}', derived_series_uid="9.9")
    # The process dies here; a new one starts:
    assert queue.recover() == 1
    job = queue.get(job_id)
    assert job.state is JobState.QUEUED and job.reason == "resumed after a restart"
    again = queue.claim_processing(lease_s=60)
    assert again.id == job_id and again.process_attempts == 2 and again.plan_json == '{"series_uid": "9.9"}'


def test_a_job_that_keeps_crashing_the_node_fails(queue: JobQueue) -> None:
    job_id = _create(queue)
    for _ in range(MAX_PROCESS_ATTEMPTS):
        assert queue.claim_processing(lease_s=60) is not None
        queue.recover()
    assert queue.claim_processing(lease_s=60) is None
    job = queue.get(job_id)
    assert job.state is JobState.FAILED and "interrupted 3 times" in job.reason


def test_send_retries_with_backoff_then_fails_and_keeps_the_output(queue: JobQueue) -> None:
    job_id = _create(queue)
    queue.claim_processing(lease_s=60)
    queue.processed(job_id, output_dir="outputs/job-1", output_count=2, stage_seconds={}, destinations=[DEST])
    before = time.time()
    first = queue.record_send(
        job_id, DEST, ok=False, sent=0, error="association rejected", max_retries=2, backoff_s=10
    )
    assert first.state == "pending" and 10 <= first.next_attempt_at - before <= 11
    assert queue.settle_sending(job_id) is JobState.SENDING
    assert queue.claim_sending(lease_s=60) is None  # not due yet
    second = queue.record_send(
        job_id, DEST, ok=False, sent=0, error="association rejected", max_retries=2, backoff_s=10
    )
    assert 20 <= second.next_attempt_at - before <= 21  # doubled
    third = queue.record_send(
        job_id, DEST, ok=False, sent=1, error="1 instance(s) refused", max_retries=2, backoff_s=10
    )
    assert third.state == "failed" and third.attempts == 3
    assert queue.settle_sending(job_id) is JobState.FAILED
    job = queue.get(job_id)
    assert job.state is JobState.FAILED and job.output_dir == "outputs/job-1"
    assert f"send to {DEST} failed after 3 attempt(s): 1 instance(s) refused" in job.reason


def test_resend_of_a_job_with_output_goes_back_to_sending(queue: JobQueue) -> None:
    job_id = _create(queue)
    queue.claim_processing(lease_s=60)
    queue.processed(job_id, output_dir="outputs/job-1", output_count=2, stage_seconds={}, destinations=[DEST])
    queue.record_send(job_id, DEST, ok=False, sent=0, error="down", max_retries=0, backoff_s=0)
    assert queue.settle_sending(job_id) is JobState.FAILED
    assert queue.resend(job_id, [DEST, "OTHER@127.0.0.1:104"]) is JobState.SENDING
    sends = queue.sends(job_id)
    assert [(s.destination, s.state, s.attempts) for s in sends] == [
        ("OTHER@127.0.0.1:104", "pending", 0),
        (DEST, "pending", 0),
    ]
    assert queue.claim_sending(lease_s=60).id == job_id


def test_resend_of_a_job_without_output_requeues_it(queue: JobQueue) -> None:
    job_id = _create(queue)
    queue.claim_processing(lease_s=60)
    queue.fail(job_id, "the series has 23 of the 24 slices")
    assert queue.resend(job_id, [DEST]) is JobState.QUEUED
    assert queue.claim_processing(lease_s=60).id == job_id
    with pytest.raises(ValueError, match="running"):
        queue.resend(job_id, [DEST])
    with pytest.raises(KeyError):
        queue.resend(999, [DEST])


def test_no_destinations_means_done_with_a_note(queue: JobQueue) -> None:
    job_id = _create(queue)
    queue.claim_processing(lease_s=60)
    queue.processed(job_id, output_dir="outputs/job-1", output_count=2, stage_seconds={}, destinations=[])
    assert queue.settle_sending(job_id) is JobState.DONE
    assert "no destinations" in queue.get(job_id).reason


def test_illegal_transitions_are_refused(queue: JobQueue) -> None:
    job_id = _create(queue)
    with pytest.raises(ValueError, match="is queued, expected running"):
        queue.processed(job_id, output_dir="x", output_count=1, stage_seconds={}, destinations=[])
    queue.fail(job_id, "because")
    with pytest.raises(ValueError):
        queue.fail(job_id, "twice")


def test_variant_and_send_state_are_enums_stored_as_their_strings(queue: JobQueue) -> None:
    job_id = queue.create(pet_series_uid="1.2.3.9", study_uid="1.2.3", ct_series_uid=None,
                          variant=JobVariant.WITHOUT_CT, pet_sop_uids=["9.1"],
                          ct_note="the study has no CT series")
    job = queue.get(job_id)
    assert job.variant is JobVariant.WITHOUT_CT and job.ct_note == "the study has no CT series"
    assert queue.claim_processing(lease_s=60).id == job_id
    used = ModelUsed("upete-ldm-p.safetensors", "uPETe LDM-P", "abc123")
    queue.processed(job_id, output_dir="outputs/job-1", output_count=1, stage_seconds={}, destinations=[DEST],
                    model=used, ct_note="PET-only model: the study has no CT series",
                    variant=JobVariant.WITHOUT_CT)
    job = queue.get(job_id)
    assert job.model == used and job.ct_note == "PET-only model: the study has no CT series"
    [target] = queue.sends(job_id)
    assert target.state is SendState.PENDING
    assert queue.record_send(job_id, DEST, ok=True, sent=1, error=None, max_retries=1,
                             backoff_s=1).state is SendState.DONE
    rows = queue.db.query("SELECT j.variant, s.state FROM jobs j JOIN job_sends s ON s.job_id = j.id")
    assert [tuple(row) for row in rows] == [("without_ct", "done")]
    assert 'to=sending reason="PET-only model: the study has no CT series"' in _audit(queue)[-1]
    with pytest.raises(ValueError, match="'other' is not a valid JobVariant"):
        queue.create(pet_series_uid="1.2.3.10", study_uid="1.2.3", ct_series_uid=None, variant="other",
                     pet_sop_uids=["10.1"])


def test_a_spool_of_an_older_node_gains_the_new_columns(tmp_path: Path) -> None:
    db = Database(tmp_path / DB_FILENAME)  # the tables as the first schema made them
    columns = {row["name"] for row in db.query("PRAGMA table_info(jobs)")}
    assert "ct_note" not in columns
    reader = JobQueue(db, AuditLog(None), migrate=False)  # upete status: reads, never writes
    with db.transaction() as conn:
        conn.execute("INSERT INTO jobs (pet_series_uid, study_uid, variant, state, created_at, updated_at) "
                     "VALUES ('1.9', '1.2', 'main', 'queued', 0, 0)")
    assert reader.list()[0].model is None and reader.list()[0].ct_note is None
    JobQueue(db, AuditLog(None))
    JobQueue(db, AuditLog(None))  # twice: nothing left to add
    columns = {row["name"] for row in db.query("PRAGMA table_info(jobs)")}
    assert {"ct_note", "model_checkpoint", "model_name", "model_version"} <= columns
    assert reader.list()[0].variant is JobVariant.MAIN
    db.close()
