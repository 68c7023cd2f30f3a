"""The status page and DICOMweb delivery: how fast the page renders a full job history, and STOW-RS
against C-STORE to the same Orthanc.

    .venv/bin/python benchmarks/web.py [--jobs 50] [--requests 30] [--files-per-job 620]
        [--slices 160] [--repeat 3]

**page**: a spool made here with ``--jobs`` finished jobs (each with a stored PET instance to read the
study time from, a preview PNG, a delivery row and ``--files-per-job`` files on disk: what a week of
studies leaves in the spool, since the page reports the spool's size), served by the node's own
listener (:class:`dicomnode.metrics.MetricsServer` with :class:`dicomnode.web.StatusPages`) on
127.0.0.1; ``--requests`` GETs of ``/`` over HTTP, timed from request to last byte.

**delivery**: one ``--slices``-slice 256×256 PET series (the size and form of a derived series; written
by dicomnode/testing/scanner.py) sent by the node's sender (:func:`dicomnode.sender.deliver_files`)
to one Orthanc with its DICOMweb plugin, by C-STORE and by STOW-RS, ``--repeat`` times each,
alternating, each send a fresh copy (new UIDs) so neither finds the series already stored.

Writes ``benchmarks/results/web.md`` and ``web.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from dicomnode.audit import AuditLog  # noqa: E402
from dicomnode.config import Settings, parse_settings  # noqa: E402
from dicomnode.db import DB_FILENAME, Database  # noqa: E402
from dicomnode.jobs import JobQueue  # noqa: E402
from dicomnode.metrics import MetricsServer  # noqa: E402
from dicomnode.preview import PREVIEW_PNG  # noqa: E402
from dicomnode.sender import deliver_files  # noqa: E402
from dicomnode.status import SpoolSize, collect_status, spool_bytes  # noqa: E402
from dicomnode.testing.orthanc import OrthancServer  # noqa: E402
from dicomnode.testing.scanner import StudyInfo, write_pet_series  # noqa: E402
from dicomnode.web import StatusPages, render_page  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DESTINATION = "PACS@127.0.0.1:104"


def make_history(root: Path, jobs: int, files_per_job: int) -> None:
    """``jobs`` done jobs in a node database under ``root``, with what the page reads for each."""
    root.mkdir(parents=True)
    db = Database(root / DB_FILENAME)
    queue = JobQueue(db, AuditLog(None))
    png = b"\x89PNG\r\n\x1a\n" + bytes(60_000)  # the page only links it: its content does not matter
    for index in range(jobs):
        study = StudyInfo()
        [instance] = write_pet_series(root / "instances" / f"s{index}", np.ones((1, 8, 8), np.float32) * 100,
                                      spacing_mm=(2.0, 2.0, 2.0), study=study)
        series_uid = f"2.25.{index}1"
        with db.transaction() as conn:
            conn.execute(
                "INSERT INTO instances (sop_uid, study_uid, series_uid, sop_class_uid, modality, position_x, "
                "position_y, position_z, orientation, rows, columns, row_spacing, col_spacing, received_at, "
                "path) VALUES (?, ?, ?, '1.2.840.10008.5.1.4.1.1.128', 'PT', 0, 0, 0, '', 8, 8, 2, 2, 0, ?)",
                (f"2.25.{index}2", study.study_uid, series_uid, str(instance.relative_to(root))),
            )
        job_id = queue.create(pet_series_uid=series_uid, study_uid=study.study_uid, ct_series_uid=None,
                              variant="main", pet_sop_uids=[f"2.25.{index}2"])
        queue.claim_processing(lease_s=60)
        queue.set_plan(job_id, "{}", derived_series_uid=f"2.25.{index}3")
        out = root / "outputs" / f"job-{job_id}"
        out.mkdir(parents=True)
        (out / PREVIEW_PNG).write_bytes(png)
        for number in range(files_per_job):
            (out / f"{number:04d}.dcm").write_bytes(bytes(512))
        queue.processed(job_id, output_dir=f"outputs/job-{job_id}", output_count=files_per_job,
                        stage_seconds={"load": 0.4, "enhance": 40.0, "write": 1.2, "preview": 0.8},
                        destinations=[DESTINATION])
        queue.claim_sending(lease_s=60)
        queue.record_send(job_id, DESTINATION, ok=True, sent=files_per_job, error=None, max_retries=3,
                          backoff_s=1)
        queue.settle_sending(job_id)
    db.close()


def time_page(root: Path, requests: int) -> dict:
    settings = parse_settings({"storage": {"root": str(root)}, "logging": {"audit_file": None}})
    db = Database(root / DB_FILENAME)
    server = MetricsServer("127.0.0.1", 0, health=lambda: {"scp": True})
    server.mount(StatusPages(settings, db))
    seconds, size = [], 0
    try:
        for _ in range(requests + 1):
            started = time.perf_counter()
            with urllib.request.urlopen(server.url + "/", timeout=30) as response:
                body = response.read()
            seconds.append(time.perf_counter() - started)
            size = len(body)
    finally:
        server.close()
        db.close()
    seconds = seconds[1:]  # the first warms the page cache and imports
    p95 = sorted(seconds)[int(0.95 * (len(seconds) - 1))]
    return {"median_ms": statistics.median(seconds) * 1000, "p95_ms": p95 * 1000,
            "max_ms": max(seconds) * 1000, "bytes": size, "rows": body.count(b'<tr id="job-'),
            "parts_ms": _parts(settings, root, requests)}


def _parts(settings: Settings, root: Path, requests: int) -> dict[str, float]:
    """Median milliseconds of the page's parts, in process: where its time goes."""
    db = Database(root / DB_FILENAME)
    try:
        spool_size = SpoolSize()  # as the page holds it: the walk is repeated at most once a minute
        report = collect_status(settings, db, limit=50, spool_size=spool_size)
        calls = {
            "report as the page makes it (collect_status, spool size cached)":
                lambda: collect_status(settings, db, limit=50, spool_size=spool_size),
            "spool walk, at most once a minute (status.spool_bytes)": lambda: spool_bytes(root),
            "HTML (render_page)": lambda: render_page(report),
        }
        medians = {}
        for name, call in calls.items():
            seconds = []
            for _ in range(max(5, requests // 3)):
                started = time.perf_counter()
                call()
                seconds.append(time.perf_counter() - started)
            medians[name] = statistics.median(seconds) * 1000
        return medians
    finally:
        db.close()


def time_delivery(work: Path, slices: int, repeat: int) -> dict:
    orthanc = OrthancServer(work, dicomweb=True).start()  # no Lua rule: Orthanc only stores what it gets
    settings = parse_settings({"logging": {"audit_file": None}, "destinations": [
        {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port, "dimse_timeout_s": 60},
        {"dicomweb": orthanc.dicomweb_url, "timeout_s": 300},
    ]})
    dimse, web = settings.destinations
    rng = np.random.default_rng(0)
    activity = rng.uniform(0, 20000, (slices, 256, 256)).astype(np.float32)
    times: dict[str, list[float]] = {"C-STORE": [], "STOW-RS": []}
    try:
        for round_ in range(repeat):
            order = [("C-STORE", dimse), ("STOW-RS", web)]
            for name, destination in order if round_ % 2 == 0 else order[::-1]:
                files = write_pet_series(work / f"{name}-{round_}", activity, spacing_mm=(2.0, 2.7, 2.7),
                                         study=StudyInfo())
                started = time.perf_counter()
                outcome = deliver_files(files, destination, settings)
                elapsed = time.perf_counter() - started
                if not outcome.ok or outcome.sent != len(files):
                    raise SystemExit(f"{name} delivery failed: {outcome}")
                times[name].append(elapsed)
        instances = orthanc.instances()
        megabytes = sum(os.path.getsize(p) for p in files) / 1e6
    finally:
        orthanc.stop()
    if instances != 2 * repeat * slices:
        raise SystemExit(f"Orthanc holds {instances} instances, expected {2 * repeat * slices}")
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"seconds": times, "median_s": medians, "megabytes": megabytes, "orthanc_instances": instances,
            "ratio_stow_over_cstore": medians["STOW-RS"] / medians["C-STORE"]}


def _page_verdict(page: dict) -> str:
    walk = page["parts_ms"]["spool walk, at most once a minute (status.spool_bytes)"]
    verdict = "Target met." if page["median_ms"] < 200 else "**Target missed.**"
    return (f"{verdict} The spool walk (a stat of every file under storage.root, {walk:.0f} ms) is done "
            f"at most once a minute by the page (status.SpoolSize), not at each request; the HTML takes "
            f"{page['parts_ms']['HTML (render_page)']:.1f} ms.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--files-per-job", type=int, default=620,
                        help="files per job on disk (160 PET + 300 CT received + 160 derived)")
    parser.add_argument("--slices", type=int, default=160)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="upete-web-bench-") as tmp:
        make_history(Path(tmp) / "spool", args.jobs, args.files_per_job)
        page = time_page(Path(tmp) / "spool", args.requests)
        delivery = time_delivery(Path(tmp) / "orthanc", args.slices, args.repeat)
    report = {
        "command": " ".join(["python", "benchmarks/web.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
        "args": vars(args), "page": page, "delivery": delivery,
    }
    (RESULTS / "web.json").write_text(json.dumps(report, indent=1) + "\n")
    med = delivery["median_s"]
    lines = [
        "# Status page and DICOMweb delivery",
        "",
        f"Command: `.venv/bin/{report['command']}`",
        "",
        f"Machine: {report['machine']}; load average before {load_before}, after {report['load_after']} "
        f"(a shared machine: other jobs add to the load); {report['date']}.",
        "",
        "## The status page",
        "",
        f"`GET /` of the node's listener on 127.0.0.1 with {args.jobs} finished jobs in the database "
        f"({page['rows']} rows on the page, {page['bytes'] / 1024:.0f} KiB of HTML) and "
        f"{args.jobs * args.files_per_job} files in the spool; {args.requests} requests after one warm-up, "
        "request to last byte:",
        "",
        "| median | p95 | max | target |",
        "|---:|---:|---:|---:|",
        f"| **{page['median_ms']:.1f} ms** | {page['p95_ms']:.1f} ms | {page['max_ms']:.1f} ms | < 200 ms |",
        "",
        "Where the time goes (in process, medians): "
        + "; ".join(f"{name} {ms:.1f} ms" for name, ms in page["parts_ms"].items()) + ".",
        "",
        _page_verdict(page),
        "",
        "## STOW-RS against C-STORE to the same Orthanc",
        "",
        f"One {args.slices}-slice 256×256 PET series ({delivery['megabytes']:.1f} MB), sent by "
        f"`dicomnode.sender.deliver_files` to Orthanc with its DICOMweb plugin on loopback, "
        f"{args.repeat} times per transport, alternating, each a fresh copy (Orthanc held "
        f"{delivery['orthanc_instances']} instances at the end, as expected). Seconds per delivery:",
        "",
        "| transport | runs | median |",
        "|---|---|---:|",
        *[f"| {name} | {', '.join(f'{s:.2f}' for s in delivery['seconds'][name])} | **{med[name]:.2f}** |"
          for name in ("C-STORE", "STOW-RS")],
        "",
        f"Ratio STOW-RS / C-STORE (medians): **{delivery['ratio_stow_over_cstore']:.2f}** "
        "(below 1: STOW-RS is faster; target: no slower, ≤ 1).",
    ]
    (RESULTS / "web.md").write_text("\n".join(lines) + "\n")
    print((RESULTS / "web.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
