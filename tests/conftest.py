"""Shared pytest configuration: real peers are required, not mocked."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"


def pytest_configure(config: pytest.Config) -> None:
    # Nagle's algorithm costs ~40 ms per DIMSE message with DCMTK and Orthanc (ARCHITECTURE.md §6).
    os.environ.setdefault("TCP_NODELAY", "1")
    # Tests and library code must run the same on 2 cores; keep torch from oversubscribing them.
    os.environ.setdefault("OMP_NUM_THREADS", "2")


def require_tool(path: str) -> str:
    """The absolute path of a peer tool, or fail (in CI) / skip (elsewhere) with the install command."""
    if os.path.isabs(path) and os.access(path, os.X_OK):
        return path
    found = shutil.which(path)
    if found:
        return found
    message = f"{path} is missing: run `make test` (installs DCMTK, Orthanc and dicom3tools)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
