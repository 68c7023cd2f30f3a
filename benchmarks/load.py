"""Load: several scanners send whole PET/CT studies to one `upete serve` at once, while jobs run.

    .venv/bin/python benchmarks/load.py [--studies 8] [--pet-slices 96] [--pet-size 128]
                                        [--ct-slices 96] [--ct-size 256]

Each of N DCMTK ``storescu`` processes (one association each, started ``--stagger-s`` apart) sends its own
synthetic study (dicomnode.testing.scanner: CT series then PET series, distinct Study/Series/SOP UIDs) to a
node running the ``classical:gaussian`` model, whose destination is DCMTK ``storescp``. A study's
PET is complete as soon as its NumberOfSlices instances are in, so the first jobs run while the other
associations are still sending. Checked, then recorded in benchmarks/results/load.md:

- every instance storescu sent (exit status 0: every C-STORE acknowledged) is in the node's index;
- every study gets exactly one job, and every job ends ``done``;
- no mix-up: each derived series at the PACS is in its own study, references exactly its own PET
  series' SOP Instance UIDs, one derived instance per source slice;
- throughput (instances/s from the first association's start to the last one's end) and the node's
  peak RSS over the whole run (VmHWM, reset just before sending).

tests/system/test_load.py runs the same check on 4 small studies.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from pydicom import dcmread  # noqa: E402
from pydicom.uid import PositronEmissionTomographyImageStorage  # noqa: E402

from dicomnode.testing.scanner import StudyInfo, write_ct_series, write_pet_series  # noqa: E402
from model.evaluation.machine import machine_description  # noqa: E402
from tests.conftest import require_tool  # noqa: E402
from tests.support.nodeutil import (  # noqa: E402
    NodeProcess,
    StoreSCP,
    db_rows,
    free_port,
    job_states,
    peer_env,
    wait_for,
    write_config,
)

RESULTS = ROOT / "benchmarks" / "results" / "load.md"
READING = [
    "Times count from the start of the first association; instances/s is over the whole receive (from",
    "the first association's start to the last one's end, stagger included), with the node storing",
    "durably (fsync per instance) while its worker already runs the first jobs. The CPU (2 cores) was",
    "shared with other work, so treat it as a floor, not a capacity figure.",
]


@dataclass
class Study:
    uid: str
    ct_paths: list[Path]
    pet_paths: list[Path]
    pet_sop_uids: set[str] = field(default_factory=set)

    @property
    def files(self) -> list[Path]:
        return self.ct_paths + self.pet_paths  # CT first, as scanners usually route


def make_studies(
    directory: Path, count: int, *, pet_slices: int, pet_size: int, ct_slices: int, ct_size: int
) -> list[Study]:
    """``count`` distinct synthetic PET/CT studies (own UIDs, own noise) under ``directory``."""
    studies = []
    for i in range(count):
        rng = np.random.default_rng(1000 + i)
        z, y, x = np.mgrid[0:pet_slices, 0:pet_size, 0:pet_size]
        centre = np.array([pet_slices, pet_size, pet_size]) / 2
        r2 = ((z - centre[0]) / (pet_slices / 3)) ** 2 + ((y - centre[1]) / (pet_size / 3)) ** 2
        r2 = r2 + ((x - centre[2]) / (pet_size / 3)) ** 2
        pet = (5000.0 * (r2 < 1) + 500.0) * rng.gamma(8.0, 1 / 8.0, (pet_slices, pet_size, pet_size))
        ct = rng.normal(0.0, 20.0, (ct_slices, ct_size, ct_size)).astype(np.float32)
        info = StudyInfo(patient_id=f"LOAD{i:04d}")
        # The same physical extent: 4 mm PET voxels, CT voxels scaled so both cover one box.
        pet_spacing = (4.0, 4.0, 4.0)
        ct_spacing = (
            4.0 * pet_slices / ct_slices,
            4.0 * pet_size / ct_size,
            4.0 * pet_size / ct_size,
        )
        study_dir = directory / f"study{i:02d}"
        pet_paths = write_pet_series(
            study_dir / "pet", pet.astype(np.float32), spacing_mm=pet_spacing, study=info
        )
        ct_paths = write_ct_series(study_dir / "ct", ct, spacing_mm=ct_spacing, study=info)
        study = Study(info.study_uid, ct_paths, pet_paths)
        study.pet_sop_uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in pet_paths}
        studies.append(study)
    return studies


def _status(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def run_load(
    studies: list[Study], work: Path, *, stagger_s: float = 1.0, job_timeout_s: float = 600
) -> dict[str, float]:
    """Send every study in its own concurrent association; check everything; return the numbers.

    Association ``i`` starts ``i × stagger_s`` after the first (scanners do not start on the same
    millisecond), so the first studies' jobs run while the later ones are still being received.

    Raises AssertionError naming what went wrong (a lost instance, a second job, a mix-up).
    """
    storescu = require_tool("/usr/bin/storescu")
    with StoreSCP(work / "pacs") as pacs:
        config = write_config(
            work, port=free_port(), destinations=[pacs.destination()], series_timeout_s=5
        )
        with NodeProcess(config) as node:
            pid = node.process.pid
            rss_before = _status(pid)["VmRSS"]
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
            started, started_wall = time.perf_counter(), time.time()
            senders = []
            for i, study in enumerate(studies):
                if i:
                    time.sleep(stagger_s)
                out = open(work / f"storescu-{i}.out", "w")  # noqa: SIM115 - closed below
                command = [storescu, "-aet", "SCANNER", "-aec", "UPETE", "-to", "30", "-ta", "30",
                           "-td", "120", "127.0.0.1", str(node.port), *map(str, study.files)]
                senders.append((subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                                 env=peer_env()), out))
            codes = []
            for process, out in senders:
                codes.append(process.wait(timeout=1800))
                out.close()
            receive_s = time.perf_counter() - started
            assert codes == [0] * len(studies), f"storescu exits {codes} (see {work}/storescu-*.out)"
            wait_for(
                lambda: len(job_states(node.db_path)) == len(studies)
                and set(job_states(node.db_path).values()) <= {"done", "failed"},
                timeout=job_timeout_s,
                interval=0.5,
                what="every study's job to finish",
            )
            total_s = time.perf_counter() - started
            peak = _status(pid)["VmHWM"]
            first_job = db_rows(node.db_path, "SELECT MIN(started_at) AS t FROM jobs")[0]["t"]
        _check(studies, node.db_path, pacs)
    instances = sum(len(s.files) for s in studies)
    return {
        "studies": len(studies),
        "instances": instances,
        "mb": sum(p.stat().st_size for s in studies for p in s.files) / 2**20,
        "receive_s": receive_s,
        "per_s": instances / receive_s,
        "total_s": total_s,
        "first_job_s": first_job - started_wall,  # < receive_s: jobs ran while studies arrived
        "rss_before_mb": rss_before / 1024,
        "peak_mb": peak / 1024,
    }


def _check(studies: list[Study], db: Path, pacs: StoreSCP) -> None:
    rows = db_rows(db, "SELECT sop_uid, study_uid FROM instances")
    stored = {row["sop_uid"]: row["study_uid"] for row in rows}
    for study in studies:
        sent = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in study.files}
        missing = [uid for uid in sent if stored.get(uid) != study.uid]
        assert not missing, f"{len(missing)} acknowledged instance(s) of study {study.uid} not stored"
    jobs = db_rows(db, "SELECT * FROM jobs")
    by_study = {}
    for job in jobs:
        assert job["study_uid"] not in by_study, f"two jobs for study {job['study_uid']}"
        by_study[job["study_uid"]] = job
    assert set(by_study) == {s.uid for s in studies}, "a study without a job"
    assert all(job["state"] == "done" for job in jobs), [(j["id"], j["state"], j["reason"]) for j in jobs]
    derived: dict[str, list] = {}
    for ds in pacs.datasets():
        if ds.SOPClassUID != PositronEmissionTomographyImageStorage:
            continue  # a preview Secondary Capture, where configured
        derived.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    assert len(derived) == len(studies), f"{len(derived)} derived series for {len(studies)} studies"
    for study in studies:
        series = by_study[study.uid]["derived_series_uid"]
        instances = derived[series]
        assert {str(ds.StudyInstanceUID) for ds in instances} == {study.uid}, "derived in another study"
        sources = [str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID) for ds in instances]
        assert sorted(set(sources)) == sorted(study.pet_sop_uids), f"study {study.uid}: sources mixed up"
        assert len({str(ds.SOPInstanceUID) for ds in instances}) == len(study.pet_paths)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=8, help="concurrent associations, one study each")
    parser.add_argument("--pet-slices", type=int, default=96)
    parser.add_argument("--pet-size", type=int, default=128, help="PET rows = columns")
    parser.add_argument("--ct-slices", type=int, default=96)
    parser.add_argument("--ct-size", type=int, default=256, help="CT rows = columns")
    parser.add_argument("--stagger-s", type=float, default=1.0, help="seconds between association starts")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="upete-load-") as tmp:
        work = Path(tmp)
        studies = make_studies(
            work / "in", args.studies, pet_slices=args.pet_slices, pet_size=args.pet_size,
            ct_slices=args.ct_slices, ct_size=args.ct_size,
        )
        result = run_load(studies, work / "run", stagger_s=args.stagger_s)
    load_after = os.getloadavg()
    summary = (
        f"{result['studies']} studies, {result['instances']} instances ({result['mb']:.0f} MB) received in "
        f"{result['receive_s']:.1f} s = {result['per_s']:.0f} instances/s; all jobs done after "
        f"{result['total_s']:.1f} s (first job started at {result['first_job_s']:.1f} s); "
        f"node RSS {result['rss_before_mb']:.0f} MB before, peak "
        f"{result['peak_mb']:.0f} MB"
    )
    print(summary)
    command = argv if argv is not None else sys.argv[1:]
    lines = [
        "# Load: concurrent associations, each a whole PET/CT study, while jobs run",
        "",
        f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/load.py', *command])}`  ",
        f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}  ",
        f"Machine: {machine_description()}  ",
        f"Load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in load_before)}; after: "
        f"{', '.join(f'{v:.2f}' for v in load_after)} (the CPU was shared with a model training job)",
        "",
        f"Per study: CT {args.ct_slices} slices of {args.ct_size}², PET {args.pet_slices} slices of "
        f"{args.pet_size}² (CT sent first); association i starts i × {args.stagger_s:g} s after the first. "
        "Model `classical:gaussian`; destination DCMTK storescp.",
        "",
        "| studies (associations) | instances | MB | receive s | instances/s | first job started at s "
        "| all jobs done after s | RSS before (MB) | peak RSS (MB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {result['studies']} | {result['instances']} | {result['mb']:.0f} | {result['receive_s']:.1f} | "
        f"{result['per_s']:.0f} | {result['first_job_s']:.1f} | {result['total_s']:.1f} | "
        f"{result['rss_before_mb']:.0f} | {result['peak_mb']:.0f} |",
        "",
        *READING,
        "",
        "Checked: every acknowledged instance is in the index; exactly one job per study, all `done`; "
        "each derived series is in its own study and references exactly its own PET instances.",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
