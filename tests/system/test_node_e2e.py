"""End to end with real peers: DCMTK storescu (the scanner) → `upete serve` → DCMTK storescp (the PACS).

The study: PET 24×32×32 and a CT on another grid, slices sent in shuffled order, plus an NAC PET
series that must be skipped. The derived series must arrive complete, pass dciodvfy, keep the input's
geometry, reference every source slice and keep the total activity within 2 %.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomnode.testing.peers import (
    ROOT,
    NodeProcess,
    StoreSCP,
    db_rows,
    free_port,
    storescu,
    wait_for,
    write_config,
)
from tests.support.dicomutil import dciodvfy_errors, make_study

pytestmark = [pytest.mark.network, pytest.mark.slow]


def _activity_bq(datasets: list[Dataset]) -> float:
    """Σ voxel Bq/ml over the series (the same voxel volume on both sides, so it compares totals)."""
    return float(
        sum((ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)).sum() for ds in datasets)
    )


def _status(config: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "upete", "status", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=True,
    )
    return json.loads(result.stdout)


def test_study_comes_back_as_one_complete_derived_series(tmp_path: Path) -> None:
    study = make_study(tmp_path / "in", with_nac=True, shuffle_seed=7)
    sources = {str(ds.SOPInstanceUID): ds for ds in (dcmread(p) for p in study.pet_paths)}
    ct_series = str(dcmread(study.ct_paths[0], stop_before_pixels=True).SeriesInstanceUID)
    with StoreSCP(tmp_path / "pacs") as pacs:
        config = write_config(
            tmp_path, port=free_port(), destinations=[pacs.destination()], series_timeout_s=2
        )
        with NodeProcess(config) as node:
            started = time.monotonic()
            # One association, as a scanner sends: CT first, then the NAC and AC PET, files shuffled.
            sent = storescu(study.ct_paths + study.nac_paths + study.pet_paths, node.port)
            assert sent.returncode == 0, sent.stderr
            received = time.monotonic() - started
            wait_for(
                lambda: (
                    len(list(pacs.out_dir.iterdir())) >= 24
                    and db_rows(node.db_path, "SELECT 1 FROM jobs WHERE state = 'done'")
                ),
                timeout=60,
                what="the derived series at the PACS",
            )
            turnaround = time.monotonic() - started
            print(f"78 instances in {received:.2f} s; derived series at the PACS after {turnaround:.2f} s")
            status = _status(config)

            # The PACS sends the study again (a routing rule, an operator): nothing is made twice.
            again = storescu(study.pet_paths, node.port)
            assert again.returncode == 0
            time.sleep(3)  # longer than the quiet timer
        assert node.process.returncode == 0, node.log()

    derived = pacs.datasets()
    assert len(derived) == 24
    assert len(db_rows(node.db_path, "SELECT * FROM jobs")) == 1

    [job] = status["jobs"]
    assert job["state"] == "done" and job["ct_series_uid"] == ct_series and job["output_instances"] == 24
    assert job["sends"][0]["state"] == "done" and job["sends"][0]["sent"] == 24
    [skipped] = status["series"]
    assert skipped["state"] == "skipped" and "not attenuation corrected" in skipped["reason"]
    assert skipped["series_uid"] == str(
        dcmread(study.nac_paths[0], stop_before_pixels=True).SeriesInstanceUID
    )

    first_source = next(iter(sources.values()))
    assert {str(ds.SeriesInstanceUID) for ds in derived} == {job["derived_series_uid"]}
    assert job["derived_series_uid"] != str(first_source.SeriesInstanceUID)
    referenced = []
    for ds in derived:
        assert str(ds.SOPClassUID) == str(first_source.SOPClassUID)
        assert str(ds.StudyInstanceUID) == str(first_source.StudyInstanceUID)
        assert str(ds.FrameOfReferenceUID) == str(first_source.FrameOfReferenceUID)
        assert list(ds.ImageType)[:2] == ["DERIVED", "PRIMARY"]
        assert ds.Units == "BQML"
        [reference] = ds.SourceImageSequence
        source = sources[str(reference.ReferencedSOPInstanceUID)]
        referenced.append(str(reference.ReferencedSOPInstanceUID))
        assert str(ds.SOPInstanceUID) not in sources
        np.testing.assert_allclose(
            [float(v) for v in ds.ImagePositionPatient],
            [float(v) for v in source.ImagePositionPatient],
            atol=1e-3,
        )
        np.testing.assert_allclose(
            [float(v) for v in ds.ImageOrientationPatient],
            [float(v) for v in source.ImageOrientationPatient],
            atol=1e-6,
        )
        np.testing.assert_allclose(
            [float(v) for v in ds.PixelSpacing], [float(v) for v in source.PixelSpacing]
        )
        assert (ds.Rows, ds.Columns) == (source.Rows, source.Columns)
    assert sorted(referenced) == sorted(sources)

    total_in, total_out = _activity_bq(list(sources.values())), _activity_bq(derived)
    assert total_out == pytest.approx(total_in, rel=0.02)

    for path in sorted(pacs.out_dir.iterdir()):
        assert dciodvfy_errors(path) == [], path.name

    for text in (node.log(), (tmp_path / "audit.log").read_text()):
        for phi in (study.study.patient_name, study.study.patient_id, study.study.birth_date):
            assert phi not in text


def test_serve_refuses_to_start_when_the_model_does_not_load(tmp_path: Path) -> None:
    config = write_config(tmp_path, port=free_port(), model={"checkpoint": "classical:nonsense"})
    result = subprocess.run(
        [sys.executable, "-m", "upete", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "refusing to start: the model does not load" in result.stderr
