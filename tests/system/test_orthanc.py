"""Orthanc as the PACS: a Lua OnStableStudy rule routes the study to the node, the derived series comes
back into Orthanc (checked through its REST API), and it is not routed to the node again.

Orthanc runs the shipped recipe (config/orthanc/orthanc.json and its Lua rules), with only the ports,
directories and the rule's path substituted (it listens on every interface and has no bind option,
so remote access is off and the ports are ephemeral ones). Two rules: route-to-upete.lua with the loop
guard (skip our output, route each series once) as a site should use it, and route-everything.lua,
the naive "route every stable study" rule, which the node itself must survive (ARCHITECTURE.md §6).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from dicomnode.testing.orthanc import ORTHANC, RECIPE, OrthancServer
from dicomnode.testing.peers import NodeProcess, db_rows, free_port, storescu, wait_for, write_config
from tests.support.dicomutil import make_study

pytestmark = [pytest.mark.network, pytest.mark.slow]

#: The shipped rules (docs/PACS.md): the guarded one a site should use, and the naive one.
RULES = {"guarded": RECIPE / "route-to-upete.lua", "naive": RECIPE / "route-everything.lua"}


def series_of_study(orthanc: OrthancServer) -> list[dict]:
    [study] = orthanc.get("/studies")
    return orthanc.get(f"/studies/{study}/series")


def _node_instances_from(db: Path, series_uid: str) -> int:
    return db_rows(db, "SELECT COUNT(*) AS n FROM instances WHERE series_uid = ?", (series_uid,))[0]["n"]


@pytest.mark.skipif(
    not os.access(ORTHANC, os.X_OK), reason=f"{ORTHANC} is not installed (apt-get install orthanc)"
)
@pytest.mark.parametrize("rule", ["guarded", "naive"])
def test_orthanc_routes_the_study_and_gets_the_derived_series_back(tmp_path: Path, rule: str) -> None:
    study = make_study(tmp_path / "in", shuffle_seed=2)
    node_port = free_port()
    orthanc = OrthancServer(tmp_path, node_port=node_port, rules=[RULES[rule]])
    config = write_config(
        tmp_path,
        port=node_port,
        series_timeout_s=2,
        allowed_callers=[{"ae_title": "ORTHANC", "host": "127.0.0.1"}],
    )
    # The node sends its output to Orthanc's DICOM port, known only once Orthanc has its ports.
    text = config.read_text().replace(
        "destinations: []",
        "destinations:\n- {ae_title: ORTHANC, host: 127.0.0.1, "
        f"port: {orthanc.dicom_port}, max_retries: 3, retry_backoff_s: 1.0}}",
    )
    config.write_text(text)
    orthanc.start()
    node = NodeProcess(config)
    try:
        node.start()
        # The scanner sends to the PACS; the PACS's rule does the rest.
        sent = storescu(study.ct_paths + study.pet_paths, orthanc.dicom_port, called="ORTHANC")
        assert sent.returncode == 0, sent.stderr

        def derived_in_orthanc() -> dict | None:
            for series in series_of_study(orthanc):
                if (
                    series["MainDicomTags"].get("Manufacturer") == "uPETe node"
                    and len(series["Instances"]) == 24
                ):
                    return series
            return None

        derived = wait_for(derived_in_orthanc, timeout=90, interval=0.5, what="the derived series in Orthanc")
        derived_uid = derived["MainDicomTags"]["SeriesInstanceUID"]
        # The derived series made the study change: once stable again, the rule runs a second time.
        wait_for(lambda: (tmp_path / "orthanc.out").read_text().count("upete-rule ran") >= 2, timeout=30,
                 what="Orthanc's rule to run on the study again")
        time.sleep(1)  # whatever that run sent has reached the node
        assert len(series_of_study(orthanc)) == 3  # PET, CT, derived: nothing duplicated
        assert len(db_rows(node.db_path, "SELECT * FROM jobs")) == 1
        [job] = db_rows(node.db_path, "SELECT * FROM jobs")
        assert job["state"] == "done" and job["derived_series_uid"] == derived_uid
        came_back = _node_instances_from(node.db_path, derived_uid)
        if rule == "guarded":
            assert came_back == 0  # Orthanc's rule never routed our output to us
        else:
            # The naive rule sends it back; the node stores it, recognises it and does not process it.
            wait_for(
                lambda: db_rows(
                    node.db_path, "SELECT * FROM series_state WHERE series_uid = ?", (derived_uid,)
                ),
                timeout=30,
                what="the node to decide on its own output",
            )
            [state] = db_rows(node.db_path, "SELECT * FROM series_state WHERE series_uid = ?", (derived_uid,))
            assert state["state"] == "skipped" and "produced by this node" in state["reason"]
        assert node.stop() == 0
    finally:
        node.kill()
        orthanc.stop()
