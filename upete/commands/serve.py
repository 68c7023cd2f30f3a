"""``upete serve``: run the DICOM node in the foreground (systemd runs exactly this)."""

from __future__ import annotations

import argparse

from dicomnode.logs import setup_logging
from upete.commands.common import EXIT_USAGE, add_config_option, load_config


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "serve",
        help="run the DICOM node (Storage SCP, worker, sender) in the foreground",
        description="Run the node: accept C-ECHO and C-STORE of PET and CT on the configured AE title, "
        "enhance each complete low-dose PET series and send the derived series to the destinations. "
        "Stops gracefully on SIGTERM or Ctrl-C; unfinished work resumes at the next start.",
    )
    add_config_option(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    settings = load_config(args, action="refusing to start")
    if settings is None:
        return EXIT_USAGE
    setup_logging(settings.logging.level, settings.logging.format, settings.logging.levels)
    from dicomnode.service import run_node

    return run_node(settings)
