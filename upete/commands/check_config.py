"""``upete check-config``: validate a config file and say what it would do."""

from __future__ import annotations

import argparse

from dicomnode.config import resolve_checkpoint
from upete.commands.common import EXIT_USAGE, add_config_option, load_config


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "check-config",
        help="validate a YAML config file",
        description="Validate a config file: unknown keys, wrong types, bad ports and unreadable paths are "
        "reported with the file and key; exit status 0 when the file is usable, 2 when not.",
    )
    add_config_option(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    settings = load_config(args)
    if settings is None:
        return EXIT_USAGE
    node, model = settings.node, settings.model
    pet_only = resolve_checkpoint(model.checkpoint_without_ct) if model.checkpoint_without_ct else "none"
    print(f"ok: AE {node.ae_title} on {node.host}:{node.port}, spool {settings.storage.root}, "
          f"model {resolve_checkpoint(model.checkpoint)} (PET-only model: {pet_only}) on {model.device}, "
          f"{len(settings.destinations)} destination(s)")
    return 0
