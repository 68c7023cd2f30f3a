"""Memory-bounded receive: the node's peak RSS does not grow with the size of a series it receives.

A leak that kept each received 512×512 CT slice (0.5 MB) would add ~75 MB between 50 and 200 slices;
the bound leaves room for allocator noise. benchmarks/receive_memory.py is the full run (up to 1000)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.testing.load import ct_slices, measure

pytestmark = [pytest.mark.network, pytest.mark.slow]


def test_peak_rss_stays_flat_from_50_to_200_slices(tmp_path: Path) -> None:
    files = ct_slices(tmp_path / "ct", 200)
    small = measure(50, files[:50], "chunked", tmp_path)
    large = measure(200, files, "chunked", tmp_path)
    assert large["peak_mb"] - small["peak_mb"] < 25, (small, large)
    assert large["peak_mb"] - large["rss_before_mb"] < 40, large
