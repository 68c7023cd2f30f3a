"""``upete resend JOB``: send a job's derived series again (or rerun it when it has none).

Only changes the job's row in the node database; a running node's sender (or the worker, for a job
without output) picks it up within a second, a stopped node at its next start. The derived series
keeps its UIDs, so a PACS replaces what it already has instead of storing a second copy.
"""

from __future__ import annotations

import argparse
import sys

from dicomnode.audit import AuditLog
from dicomnode.jobs import JobQueue, JobState
from dicomnode.sender import destination_key_of
from upete.commands.common import EXIT_FAILED, EXIT_USAGE, add_config_option, load_config, open_node_database


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "resend",
        help="send a job's derived series again",
        description="Put a job back to sending (to every configured destination, retries reset); a job "
        "that failed before producing its derived series is queued to run again with the same UIDs. "
        "Exit status 0 when done, 1 for an unknown or running job, 2 for a bad config.",
    )
    parser.add_argument("job", type=int, metavar="JOB", help="job id, as `upete status` shows it")
    add_config_option(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    settings = load_config(args)
    if settings is None:
        return EXIT_USAGE
    db = open_node_database(settings)
    if db is None:
        return EXIT_FAILED
    audit = AuditLog(settings.logging.audit_file)
    try:
        destinations = [destination_key_of(d) for d in settings.destinations]
        state = JobQueue(db, audit).resend(args.job, destinations)
    except (KeyError, ValueError) as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 1
    finally:
        audit.close()
        db.close()
    if state is JobState.SENDING:
        print(f"job {args.job}: sending again to {len(destinations)} destination(s)")
    else:
        print(f"job {args.job}: queued to run again (same derived series UIDs)")
    return 0
