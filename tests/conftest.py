"""Shared pytest configuration: real peers are required, not mocked.

The helpers that start peers live in :mod:`dicomnode.testing.peers` (the benchmarks use them too) and
raise :class:`~dicomnode.testing.peers.ToolMissing` when a tool is not installed; here that becomes a
skip, or a failure in CI, where every peer must be installed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from dicomnode.testing import peers
from dicomnode.testing.peers import VENV_BIN, ToolMissing

__all__ = ["VENV_BIN", "require_tool"]  # VENV_BIN re-exported for tests/support/dicomutil.py


def pytest_configure(config: pytest.Config) -> None:
    # Nagle's algorithm costs ~40 ms per DIMSE message with DCMTK and Orthanc (ARCHITECTURE.md §6).
    os.environ.setdefault("TCP_NODELAY", "1")
    # Tests and library code must run the same on 2 cores; keep torch from oversubscribing them.
    os.environ.setdefault("OMP_NUM_THREADS", "2")


def _missing(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def require_tool(path: str) -> str:
    """The absolute path of a peer tool, or fail (in CI) / skip (elsewhere) with the install command."""
    try:
        return peers.require_tool(path)
    except ToolMissing as exc:
        _missing(str(exc))
        raise  # not reached: _missing raises pytest's outcome


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    """A helper of dicomnode.testing found a peer tool missing (in a fixture or the test): skip, not error."""
    report = yield
    if call.excinfo is not None and call.excinfo.errisinstance(ToolMissing) and not os.environ.get("CI"):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {call.excinfo.value}")
    return report
