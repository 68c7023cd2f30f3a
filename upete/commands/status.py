"""``upete status``: the node's health, its disk, its jobs (state, reason, durations, study time, UIDs)
and the series it skipped; ``--watch`` redraws until Ctrl-C.

Reads the node database and heartbeat file directly (:mod:`dicomnode.status`), so it works beside a
running node and after it stopped. Shows UIDs, study date/time, counts and times — never patient
names or IDs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from dicomnode.config import Settings
from dicomnode.status import collect_status, render_text
from upete.commands.common import EXIT_FAILED, EXIT_USAGE, add_config_option, load_config, open_node_database

_CLEAR = "\033[H\033[2J"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "status",
        help="show the node's health, disk use, jobs and skipped series",
        description="Show whether a node is serving this spool (its heartbeat), the spool's disk use and "
        "free space, then the jobs, newest first: state (queued, running, sending, done, failed), the "
        "reason of a failure, durations, study date/time, the PET/CT/derived series UIDs, the delivery "
        "to each destination and the preview image; then the PET series that were not processed, with why.",
    )
    add_config_option(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text "
                        "(with --watch: one compact JSON document per line)")
    parser.add_argument(
        "--limit", type=int, default=50, metavar="N", help="show the N newest jobs (default 50)"
    )
    parser.add_argument(
        "--watch", type=float, nargs="?", const=2.0, default=None, metavar="SECONDS",
        help="redraw every SECONDS (default 2) until Ctrl-C",
    )
    parser.add_argument(
        "--count", type=int, default=None, metavar="N", help="with --watch: stop after N reports"
    )
    return parser


def _report(settings: Settings, args: argparse.Namespace) -> dict | None:
    db = open_node_database(settings)
    if db is None:
        return None
    try:
        return collect_status(settings, db, limit=args.limit)
    finally:
        db.close()


def run(args: argparse.Namespace) -> int:
    settings = load_config(args)
    if settings is None:
        return EXIT_USAGE
    if args.watch is not None and args.watch <= 0:
        print("error: --watch SECONDS must be positive", file=sys.stderr)
        return EXIT_USAGE
    try:
        return _loop(settings, args)
    except KeyboardInterrupt:  # Ctrl-C is how --watch is meant to end
        return 0 if args.watch is not None else 130


def _loop(settings: Settings, args: argparse.Namespace) -> int:
    shown = 0
    while True:
        report = _report(settings, args)
        if report is None:
            return EXIT_FAILED
        if args.json:
            print(json.dumps(report, indent=None if args.watch is not None else 2))
        else:
            if args.watch is not None and sys.stdout.isatty():
                sys.stdout.write(_CLEAR)
            elif shown:
                print("\n" + "-" * 100)
            if args.watch is not None:
                now = time.strftime("%Y-%m-%d %H:%M:%S")
                print(f"upete status  {now}  (every {args.watch:g} s, Ctrl-C stops)")
            print(render_text(report))
        sys.stdout.flush()
        shown += 1
        if args.watch is None or (args.count is not None and shown >= args.count):
            return 0
        time.sleep(args.watch)
