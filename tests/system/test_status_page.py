"""The status page in a real browser: ``upete serve`` runs a study (DCMTK storescu in, storescp as the
PACS, the classical enhancer), then headless Chromium opens ``/`` of the node's HTTP listener.

The job and its preview must be on the page (the dumped DOM) and the preview's URL must answer
200 image/png; the screenshot is kept under the test's tmp dir (its path is printed). A second check:
the study's patient name, ID and birth date appear nowhere in what the listener serves — the page's
HTML as the browser got it, as HTTP returns it, and the preview route's answers.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dicomnode.testing.peers import (
    NodeProcess,
    StoreSCP,
    db_rows,
    free_port,
    storescu,
    wait_for,
    write_config,
)
from dicomnode.testing.scanner import StudyInfo
from tests.support.dicomutil import make_study

pytestmark = [pytest.mark.network, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
#: Debian's chromium, headless, with nothing that phones home (the node and its tests run offline).
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1400,1600",
)
#: Identifying values no page may show, in the forms they could take.
PATIENT = StudyInfo(patient_name="QXPRIVATE^NAMEFORTEST", patient_id="QX-ID-77316", birth_date="19450316")
FORBIDDEN = ("QXPRIVATE", "NAMEFORTEST", "QX-ID-77316", "19450316", "1945-03-16", "16.03.1945")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One node that has run one study to done; what the browser and HTTP got from its page."""
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium; `make peers` does it as root)")
    tmp = tmp_path_factory.mktemp("status_page")
    study = make_study(tmp / "in", study=PATIENT)
    with StoreSCP(tmp / "pacs") as pacs:
        config = write_config(tmp, port=free_port(), destinations=[pacs.destination()])
        with NodeProcess(config) as node:
            sent = storescu(study.ct_paths + study.pet_paths, node.port)
            assert sent.returncode == 0, sent.stderr
            wait_for(lambda: _done(node), timeout=120, interval=0.5, what="the job to be done")
            # The listener is on any free port (write_config): the heartbeat file says which.
            base = json.loads((tmp / "spool" / "heartbeat.json").read_text())["metrics_url"]
            shot = tmp / "status-page.png"
            browser = subprocess.run(
                [str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'chromium-profile'}",
                 f"--screenshot={shot}", "--dump-dom", base + "/"],
                capture_output=True, text=True, timeout=120,
            )
            print(f"status page screenshot: {shot}")
            assert browser.returncode == 0, browser.stderr[-3000:]
            with urllib.request.urlopen(base + "/", timeout=10) as response:
                html = response.read().decode()
            [job_id] = _done(node)
            preview = _get(f"{base}/jobs/{job_id}/preview.png")
            missing = _get(f"{base}/jobs/{job_id + 1000}/preview.png")
            traversal = _get(f"{base}/jobs/{job_id}/../../node.sqlite3")
    return {"dom": browser.stdout, "html": html, "shot": shot, "job_id": job_id, "preview": preview,
            "missing": missing, "traversal": traversal}


def _done(node: NodeProcess) -> list[int]:
    return [row["id"] for row in db_rows(node.db_path, "SELECT id FROM jobs WHERE state = 'done'")]


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


def test_browser_shows_the_job_and_its_preview(served: dict) -> None:
    dom, job_id = served["dom"], served["job_id"]
    assert "<title>uPETe node status</title>" in dom
    assert f'id="job-{job_id}"' in dom
    row = dom.split(f'id="job-{job_id}"', 1)[1].split("</tr>", 1)[0]
    assert "done" in row and f'src="/jobs/{job_id}/preview.png"' in row
    status, content_type, body = served["preview"]
    assert (status, content_type) == (200, "image/png") and body.startswith(b"\x89PNG\r\n\x1a\n")
    assert served["missing"][0] == 404 and served["traversal"][0] == 404
    shot: Path = served["shot"]
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 10_000  # a page, not a blank


def test_no_patient_name_id_or_birth_date_anywhere(served: dict) -> None:
    texts = {"DOM": served["dom"], "HTML": served["html"]}
    for name, (_, _, body) in (("preview", served["preview"]), ("404", served["missing"]),
                               ("traversal", served["traversal"])):
        texts[name] = body.decode("latin-1")  # PNG text chunks would be readable here
    for where, text in texts.items():
        for value in FORBIDDEN:
            assert value.lower() not in text.lower(), f"{value!r} found in the {where}"
