"""What several subcommands share: the ``--config`` option, loading it, opening the node database."""

from __future__ import annotations

import argparse
import sys

from dicomnode.config import ConfigError, Settings, load_settings
from dicomnode.db import DB_FILENAME, Database

#: Exit statuses shared by all subcommands.
EXIT_FAILED = 1
EXIT_USAGE = 2


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE",
                        help="config file (default: the embedded config/node.yaml)")


def fail(message: str, status: int = EXIT_FAILED) -> int:
    """Print ``error: message`` on stderr and return ``status`` (for ``return fail(...)``)."""
    print(f"error: {message}", file=sys.stderr)
    return status


def load_config(args: argparse.Namespace, *, action: str | None = None) -> Settings | None:
    """The settings named by ``--config``, or None after printing why they cannot be used."""
    try:
        return load_settings(args.config)
    except ConfigError as exc:
        fail(f"{action}: {exc}" if action else str(exc), EXIT_USAGE)
        return None


def open_node_database(settings: Settings) -> Database | None:
    """The node's existing database, or None after printing that there is none."""
    path = settings.storage.root / DB_FILENAME
    try:
        return Database(path, create=False)
    except FileNotFoundError:
        fail(f"no node database at {path} (has `upete serve` run with this config?)")
        return None
