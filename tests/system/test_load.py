"""Load, small: 4 concurrent DCMTK storescu associations, each a distinct PET/CT study, to one running
node while its jobs run — nothing acknowledged lost, one job per study, no mix-up between studies.
benchmarks/load.py is the full-size run (8 studies) with throughput and memory recorded."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.testing.load import make_studies, run_load

pytestmark = [pytest.mark.network, pytest.mark.slow]


def test_four_concurrent_studies_each_get_one_job_and_their_own_derived_series(tmp_path: Path) -> None:
    studies = make_studies(tmp_path / "in", 4, pet_slices=24, pet_size=32, ct_slices=24, ct_size=64)
    assert len({s.uid for s in studies}) == 4
    result = run_load(studies, tmp_path / "run", job_timeout_s=180)
    assert result["instances"] == 4 * 48
