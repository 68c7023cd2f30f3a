"""Orthanc as the PACS: a Lua OnStableStudy rule routes the study to the node, the derived series comes
back into Orthanc (checked through its REST API), and it is not routed to the node again.

Orthanc runs the shipped recipe (config/orthanc/orthanc.json and its Lua rules), with only the ports,
directories and the rule's path substituted (it listens on every interface and has no bind option,
so remote access is off and the ports are ephemeral ones). Two rules: route-to-upete.lua with the loop
guard (skip our output, route each series once) as a site should use it, and route-everything.lua,
the naive "route every stable study" rule, which the node itself must survive (ARCHITECTURE.md §6).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from dicomnode.testing.peers import (
    ROOT,
    NodeProcess,
    db_rows,
    free_port,
    peer_env,
    storescu,
    wait_for,
    write_config,
)
from tests.support.dicomutil import make_study

pytestmark = [pytest.mark.network, pytest.mark.slow]

ORTHANC = "/usr/sbin/Orthanc"

RECIPE = ROOT / "config" / "orthanc"
#: The shipped rules (docs/PACS.md): the guarded one a site should use, and the naive one.
RULES = {"guarded": RECIPE / "route-to-upete.lua", "naive": RECIPE / "route-everything.lua"}


class Orthanc:
    def __init__(self, directory: Path, *, node_port: int, rule: Path) -> None:
        self.directory = directory
        self.http_port, self.dicom_port = free_port(), free_port()
        # The shipped config, with only what a test must change: ports, directories, the rule's path.
        config = json.loads((RECIPE / "orthanc.json").read_text())
        assert config["RemoteAccessAllowed"] is False  # the recipe never opens the REST API to the network
        config.update(
            {
                "StorageDirectory": str(directory / "storage"),
                "IndexDirectory": str(directory / "storage"),
                "HttpPort": self.http_port,
                "DicomPort": self.dicom_port,
                "StableAge": 2,
                "LuaScripts": [str(rule)],
            }
        )
        config["DicomModalities"]["upete"][2] = node_port
        (directory / "orthanc.json").write_text(json.dumps(config, indent=2))
        self.process: subprocess.Popen | None = None

    def start(self) -> Orthanc:
        log = open(self.directory / "orthanc.out", "a")  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                [ORTHANC, str(self.directory / "orthanc.json")],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=peer_env(),
            )
        finally:
            log.close()
        wait_for(self._up, timeout=60, interval=0.3, what="Orthanc's REST API")
        return self

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"Orthanc exited: {(self.directory / 'orthanc.out').read_text()[-3000:]}")
        try:
            return bool(self.get("/system"))
        except OSError:
            return False

    def get(self, path: str) -> object:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)  # Orthanc takes a few seconds to stop
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def series_of_study(self) -> list[dict]:
        [study] = self.get("/studies")
        return self.get(f"/studies/{study}/series")


def _node_instances_from(db: Path, series_uid: str) -> int:
    return db_rows(db, "SELECT COUNT(*) AS n FROM instances WHERE series_uid = ?", (series_uid,))[0]["n"]


@pytest.mark.skipif(
    not os.access(ORTHANC, os.X_OK), reason=f"{ORTHANC} is not installed (apt-get install orthanc)"
)
@pytest.mark.parametrize("rule", ["guarded", "naive"])
def test_orthanc_routes_the_study_and_gets_the_derived_series_back(tmp_path: Path, rule: str) -> None:
    study = make_study(tmp_path / "in", shuffle_seed=2)
    node_port = free_port()
    orthanc = Orthanc(tmp_path, node_port=node_port, rule=RULES[rule])
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
            for series in orthanc.series_of_study():
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
        assert len(orthanc.series_of_study()) == 3  # PET, CT, derived: nothing duplicated
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
