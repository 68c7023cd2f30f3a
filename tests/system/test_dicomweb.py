"""DICOMweb STOW-RS destinations against a real archive: Orthanc with its DICOMweb plugin (Debian
``orthanc-dicomweb``), started here on loopback with the shipped recipe (dicomnode/testing/orthanc.py).

The scanner sends the study to Orthanc, Orthanc's guarded rule routes it to the node by C-STORE, and
the node sends the derived series back by STOW-RS: it must arrive once, whole, in the same study.
Then a DICOMweb destination where nobody listens: retried, then failed with the reason, as for DIMSE.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dicomnode.testing.orthanc import DICOMWEB_PLUGIN, ORTHANC, RECIPE, OrthancServer
from dicomnode.testing.peers import NodeProcess, db_rows, free_port, storescu, wait_for, write_config
from tests.support.dicomutil import make_study

pytestmark = [
    pytest.mark.network,
    pytest.mark.slow,
    pytest.mark.skipif(not os.access(ORTHANC, os.X_OK), reason=f"{ORTHANC} is not installed (make peers)"),
]


@pytest.mark.skipif(
    not DICOMWEB_PLUGIN.is_file(), reason=f"{DICOMWEB_PLUGIN} is missing (apt-get install orthanc-dicomweb)"
)
def test_derived_series_arrives_once_whole_in_the_study_by_stow(tmp_path: Path) -> None:
    study = make_study(tmp_path / "in", shuffle_seed=4)
    node_port = free_port()
    # The guarded rule (docs/PACS.md) routes the scanner's study to the node, never our output.
    orthanc = OrthancServer(tmp_path / "orthanc", node_port=node_port, rules=[RECIPE / "route-to-upete.lua"],
                            dicomweb=True)
    stow_url = orthanc.dicomweb_url
    config = write_config(
        tmp_path,
        port=node_port,
        series_timeout_s=2,
        allowed_callers=[{"ae_title": "ORTHANC", "host": "127.0.0.1"}],
        destinations=[{"dicomweb": stow_url, "max_retries": 3, "retry_backoff_s": 1.0, "timeout_s": 60}],
    )
    orthanc.start()
    assert "dicom-web" in json.dumps(orthanc.get("/plugins"))
    node = NodeProcess(config)
    try:
        node.start()
        sent = storescu(study.ct_paths + study.pet_paths, orthanc.dicom_port, called="ORTHANC")
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: db_rows(node.db_path, "SELECT * FROM jobs WHERE state IN ('done', 'failed')"),
                 timeout=120, interval=0.5, what="the job to finish")
        [job] = db_rows(node.db_path, "SELECT * FROM jobs")
        [send] = db_rows(node.db_path, "SELECT * FROM job_sends")
        assert job["state"] == "done", (job["reason"], send["last_error"], node.log()[-3000:])
        assert (send["destination"], send["state"], send["attempts"]) == (stow_url, "done", 1)
        assert send["sent"] == job["output_count"] == len(study.pet_paths)

        # Orthanc's own view: one study (the scanner's), three series, the derived one whole.
        [study_id] = orthanc.get("/studies")
        tags = orthanc.get(f"/studies/{study_id}")["MainDicomTags"]
        assert tags["StudyInstanceUID"] == study.study.study_uid
        series = {
            s["MainDicomTags"]["SeriesInstanceUID"]: s for s in orthanc.get(f"/studies/{study_id}/series")
        }
        assert len(series) == 3  # PET, CT, derived: nothing twice
        derived = series[job["derived_series_uid"]]
        assert len(derived["Instances"]) == job["output_count"]
        assert derived["MainDicomTags"].get("Manufacturer") == "uPETe node"
        assert f"destination={stow_url}" in (tmp_path / "audit.log").read_text()
        assert node.stop() == 0
    finally:
        node.kill()
        orthanc.stop()


def test_unreachable_dicomweb_destination_is_retried_then_failed_with_reason(tmp_path: Path) -> None:
    study = make_study(tmp_path / "in", shuffle_seed=5)
    url = f"http://127.0.0.1:{free_port()}/dicom-web"  # nobody listens there
    config = write_config(
        tmp_path,
        port=free_port(),
        destinations=[{"dicomweb": url, "max_retries": 2, "retry_backoff_s": 0.5, "timeout_s": 5}],
    )
    with NodeProcess(config) as node:
        sent = storescu(study.ct_paths + study.pet_paths, node.port)
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: db_rows(node.db_path, "SELECT * FROM jobs WHERE state = 'failed'"),
                 timeout=120, interval=0.5, what="the job to fail after its retries")
        [job] = db_rows(node.db_path, "SELECT * FROM jobs")
        [send] = db_rows(node.db_path, "SELECT * FROM job_sends")
        assert "failed after 3 attempt(s)" in job["reason"]
        assert send["state"] == "failed" and send["attempts"] == 3
        assert send["last_error"].startswith(f"no answer from {url}: ConnectionRefusedError")
        # The derived series stays in the spool for `upete resend`.
        assert job["output_dir"] and job["output_count"] == len(study.pet_paths)
