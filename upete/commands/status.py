"""``upete status``: the node's jobs (state, reason, durations, UIDs) and the series it skipped.

Reads the node database directly, so it works beside a running node (SQLite WAL: readers never block
the writer) and after it stopped. Shows UIDs, counts and times only — never patient names or IDs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from dicomnode.audit import AuditLog
from dicomnode.jobs import Job, JobQueue
from upete.commands.common import EXIT_FAILED, EXIT_USAGE, add_config_option, load_config, open_node_database


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "status",
        help="list the node's jobs and skipped series",
        description="List the node's jobs, newest first: state (queued, running, sending, done, failed), "
        "the reason of a failure, durations, the PET/CT/derived series UIDs and the delivery to each "
        "destination; then the PET series that were not processed, with why.",
    )
    add_config_option(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.add_argument(
        "--limit", type=int, default=50, metavar="N", help="show the N newest jobs (default 50)"
    )
    return parser


def _seconds(start: float | None, end: float | None) -> float | None:
    return round(end - start, 3) if start is not None and end is not None else None


def _job_record(job: Job, queue: JobQueue, now: float) -> dict[str, object]:
    return {
        "id": job.id,
        "state": job.state.value,
        "reason": job.reason,
        "variant": job.variant,
        "study_uid": job.study_uid,
        "pet_series_uid": job.pet_series_uid,
        "ct_series_uid": job.ct_series_uid,
        "derived_series_uid": job.derived_series_uid,
        "output_instances": job.output_count,
        "process_attempts": job.process_attempts,
        "created_at": job.created_at,
        "processing_s": _seconds(job.started_at, job.processed_at),
        "total_s": _seconds(job.created_at, job.finished_at if job.finished_at else now),
        "stage_seconds": job.stage_seconds,
        "next_attempt_at": job.next_attempt_at if job.state.value == "sending" else None,
        "sends": [
            {
                "destination": s.destination,
                "state": s.state,
                "attempts": s.attempts,
                "sent": s.sent,
                "last_error": s.last_error,
            }
            for s in queue.sends(job.id)
        ],
    }


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _print_text(jobs: list[dict], series: list[dict]) -> None:
    if not jobs:
        print("no jobs")
    for job in jobs:
        durations = f"total {job['total_s']:.1f} s" if job["total_s"] is not None else ""
        if job["processing_s"] is not None:
            durations = f"processing {job['processing_s']:.1f} s, {durations}"
        print(f"job {job['id']}  {job['state']}  created {_when(job['created_at'])}  {durations}")
        print(f"  PET series      {job['pet_series_uid']}")
        print(
            f"  CT series       {job['ct_series_uid'] or 'none'}"
            + ("  (PET-only model)" if job["variant"] == "without_ct" else "")
        )
        if job["derived_series_uid"]:
            count = f"  ({job['output_instances']} instances)" if job["output_instances"] is not None else ""
            print(f"  derived series  {job['derived_series_uid']}{count}")
        for send in job["sends"]:
            error = f": {send['last_error']}" if send["last_error"] else ""
            print(
                f"  send            {send['destination']} {send['state']} ({send['attempts']} attempt(s), "
                f"{send['sent']} sent){error}"
            )
        if job["reason"]:
            print(f"  reason          {job['reason']}")
    if series:
        print("\nPET series not processed:")
        for item in series:
            print(f"  {item['series_uid']}  {item['state']}: {item['reason']}")


def run(args: argparse.Namespace) -> int:
    settings = load_config(args)
    if settings is None:
        return EXIT_USAGE
    db = open_node_database(settings)
    if db is None:
        return EXIT_FAILED
    try:
        queue = JobQueue(db, AuditLog(None))  # reads only: no transition to audit
        now = time.time()
        jobs = [_job_record(job, queue, now) for job in queue.list(limit=args.limit)]
        series = [
            dict(row)
            for row in db.query(
                "SELECT series_uid, study_uid, state, reason, updated_at FROM series_state "
                "WHERE state IN ('skipped', 'waiting_ct') ORDER BY updated_at DESC LIMIT ?",
                (args.limit,),
            )
        ]
    finally:
        db.close()
    if args.json:
        json.dump({"database": str(db.path), "jobs": jobs, "series": series}, sys.stdout, indent=2)
        print()
    else:
        _print_text(jobs, series)
    return 0
