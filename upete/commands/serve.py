"""``upete serve``: run the DICOM node in the foreground (systemd runs exactly this)."""

from __future__ import annotations

import argparse
import sys

from dicomnode.config import ConfigError, load_settings
from dicomnode.logs import setup_logging


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "serve",
        help="run the DICOM node (Storage SCP, worker, sender) in the foreground",
        description="Run the node: accept C-ECHO and C-STORE of PET and CT on the configured AE title, "
        "enhance each complete low-dose PET series and send the derived series to the destinations. "
        "Stops gracefully on SIGTERM or Ctrl-C; unfinished work resumes at the next start.",
    )
    parser.add_argument(
        "--config", metavar="FILE", help="config file (default: the embedded config/node.yaml)"
    )
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"error: refusing to start: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.logging.level, settings.logging.format)
    from dicomnode.service import run_node

    return run_node(settings)
