"""``upete``: one entry point, one subcommand per module in :mod:`upete.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from upete import __version__

# Order is the order of `upete --help`. A subcommand is listed here only once it works.
COMMANDS = (
    "serve",
    "enhance",
    "train",
    "status",
    "resend",
    "evaluate",
    "simulate",
    "check_config",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="upete",
        description="uPETe node: enhance low-dose PET series with a latent diffusion model, as a DICOM node "
        "beside your PACS or offline from folders.",
    )
    parser.add_argument("--version", action="version", version=f"upete {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"upete.commands.{name}")
        sub_parser = module.add_parser(sub)
        sub_parser.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; ``argv`` without the program name (tests call ``main([...])`` directly)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
