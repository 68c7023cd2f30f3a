"""Crash safety: `upete serve` is killed with SIGKILL while receiving, while a job runs and while it
sends; after a restart, sending the unacknowledged instances again yields exactly one complete
derived series, with the UIDs planned before the crash."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PositronEmissionTomographyImageStorage
from pynetdicom import AE, evt

from dicomnode.testing.peers import (
    NodeProcess,
    StoreSCP,
    db_rows,
    free_port,
    job_states,
    storescu,
    wait_for,
    write_config,
)
from tests.support.dicomutil import make_study

pytestmark = [pytest.mark.network, pytest.mark.slow]

# Run in the node's process before the CLI: the enhancer takes a minute, so the kill lands mid-job.
SLOW_ENHANCER = """
import time
from model.enhance import GaussianEnhancer
_enhance = GaussianEnhancer.enhance_array
def _slow(self, *args, **kwargs):
    time.sleep(60)
    return _enhance(self, *args, **kwargs)
GaussianEnhancer.enhance_array = _slow
"""


def _uid(path: Path, keyword: str = "SOPInstanceUID") -> str:
    return str(dcmread(path, stop_before_pixels=True).get(keyword))


def _assert_one_complete_series(pacs: StoreSCP, pet_paths: list[Path], db: Path) -> str:
    derived = pacs.datasets()
    series = {str(ds.SeriesInstanceUID) for ds in derived}
    assert len(series) == 1, f"{len(series)} derived series at the PACS"
    sources = sorted(str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID) for ds in derived)
    # Duplicates (a resend replacing what the PACS had) are fine only with the same SOP UIDs.
    assert sorted(set(sources)) == sorted(_uid(p) for p in pet_paths)
    assert len({str(ds.SOPInstanceUID) for ds in derived}) == len(pet_paths)
    [job] = db_rows(db, "SELECT * FROM jobs")
    assert job["state"] == "done" and job["derived_series_uid"] == series.pop()
    return job["derived_series_uid"]


def test_killed_while_receiving(tmp_path: Path) -> None:
    study = make_study(tmp_path / "in", shuffle_seed=3)
    with StoreSCP(tmp_path / "pacs") as pacs:
        config = write_config(
            tmp_path, port=free_port(), destinations=[pacs.destination()], series_timeout_s=3
        )
        node = NodeProcess(config).start()
        try:
            ae = AE(ae_title="SCANNER")
            ae.add_requested_context(PositronEmissionTomographyImageStorage, [ExplicitVRLittleEndian])
            ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
            assoc = ae.associate("127.0.0.1", node.port, ae_title="UPETE")
            assert assoc.is_established
            files = study.ct_paths + study.pet_paths
            acknowledged = []
            for path in files[:40]:
                if assoc.send_c_store(path).get("Status") == 0:
                    acknowledged.append(path)
            # One more C-STORE in flight, and the node dies under it.
            in_flight = threading.Thread(target=assoc.send_c_store, args=(files[40],))
            in_flight.start()
            time.sleep(0.005)
            node.kill()
            in_flight.join(timeout=30)
            assoc.abort()
            assert len(acknowledged) == 40
            assert job_states(node.db_path) == {}

            node.start()  # the same spool, a new process
            unacknowledged = [p for p in files if p not in acknowledged]
            assert storescu(unacknowledged, node.port).returncode == 0
            wait_for(
                lambda: set(job_states(node.db_path).values()) == {"done"},
                timeout=60,
                what="the job to finish after the restart",
            )
        finally:
            node.kill()
        _assert_one_complete_series(pacs, study.pet_paths, node.db_path)
    stored = db_rows(node.db_path, "SELECT COUNT(*) AS n FROM instances")[0]["n"]
    assert stored == len(files)
    assert not list((node.db_path.parent / "tmp").iterdir())


def test_killed_while_a_job_runs(tmp_path: Path) -> None:
    study = make_study(tmp_path / "in", shuffle_seed=4)
    with StoreSCP(tmp_path / "pacs") as pacs:
        config = write_config(
            tmp_path, port=free_port(), destinations=[pacs.destination()], series_timeout_s=3
        )
        node = NodeProcess(config, preamble=SLOW_ENHANCER).start()
        try:
            assert storescu(study.ct_paths + study.pet_paths, node.port).returncode == 0
            # Running with its plan stored: the model is at work (it sleeps in there).
            [before] = wait_for(
                lambda: db_rows(
                    node.db_path,
                    "SELECT * FROM jobs WHERE state = 'running' AND derived_series_uid IS NOT NULL",
                ),
                timeout=30,
                what="the job to run",
            )
            time.sleep(0.5)
            node.kill()
            assert list(pacs.out_dir.iterdir()) == []

            node.preamble = None  # restart without the slow enhancer
            node.start()
            wait_for(
                lambda: set(job_states(node.db_path).values()) == {"done"},
                timeout=60,
                what="the resumed job to finish",
            )
            assert node.stop() == 0
        finally:
            node.kill()
        series = _assert_one_complete_series(pacs, study.pet_paths, node.db_path)
    assert series == before["derived_series_uid"]
    [after] = db_rows(node.db_path, "SELECT * FROM jobs")
    assert after["process_attempts"] == 2 and after["plan"] == before["plan"]
    assert 'reason="resumed after a restart"' in (tmp_path / "audit.log").read_text()


def test_killed_while_sending_resends_the_same_uids(tmp_path: Path) -> None:
    study = make_study(tmp_path / "in", shuffle_seed=5)
    pacs_port = free_port()
    arrived: list[str] = []
    half_way, release = threading.Event(), threading.Event()

    def slow_pacs(event):
        arrived.append(str(event.request.AffectedSOPInstanceUID))
        if len(arrived) == 10:
            half_way.set()
            release.wait(30)  # the node is killed while it waits for this response
        return 0x0000

    ae = AE(ae_title="PACS")
    ae.add_supported_context(PositronEmissionTomographyImageStorage, [ExplicitVRLittleEndian])
    server = ae.start_server(
        ("127.0.0.1", pacs_port), block=False, evt_handlers=[(evt.EVT_C_STORE, slow_pacs)]
    )
    pacs = StoreSCP(tmp_path / "pacs", port=pacs_port)
    config = write_config(tmp_path, port=free_port(), destinations=[pacs.destination()], series_timeout_s=3)
    node = NodeProcess(config).start()
    try:
        assert storescu(study.ct_paths + study.pet_paths, node.port).returncode == 0
        assert half_way.wait(timeout=60)
        planned = db_rows(node.db_path, "SELECT derived_series_uid FROM jobs")[0][0]
        node.kill()
        release.set()
        server.shutdown()
        with pacs:  # the real PACS comes up on the same port
            node.start()
            wait_for(
                lambda: set(job_states(node.db_path).values()) == {"done"},
                timeout=60,
                what="the resent job to finish",
            )
            node.stop()
            series = _assert_one_complete_series(pacs, study.pet_paths, node.db_path)
        assert series == planned
        assert set(arrived[:10]) <= {str(ds.SOPInstanceUID) for ds in pacs.datasets()}
    finally:
        release.set()
        node.kill()
