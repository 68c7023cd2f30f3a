"""``upete check-config``: validate a config file and say what it would do."""

from __future__ import annotations

import argparse
import sys

from dicomnode.config import ConfigError, load_settings


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "check-config",
        help="validate a YAML config file",
        description="Validate a config file: unknown keys, wrong types, bad ports and unreadable paths are "
        "reported with the file and key; exit status 0 when the file is usable, 2 when not.",
    )
    parser.add_argument("--config", metavar="FILE",
                        help="config file (default: the embedded config/node.yaml)")
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    node = settings.node
    print(f"ok: AE {node.ae_title} on {node.host}:{node.port}, spool {settings.storage.root}, "
          f"model {settings.model.checkpoint} on {settings.model.device}, "
          f"{len(settings.destinations)} destination(s)")
    return 0
