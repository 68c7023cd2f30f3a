"""Load generators shared by the system tests and the benchmarks (benchmarks/load.py, receive*.py).

- :func:`make_studies` + :func:`run_load`: several scanners (DCMTK ``storescu``, one association each)
  send whole synthetic PET/CT studies to one ``upete serve`` while its jobs run; every acknowledged
  instance, job and derived series is checked;
- :func:`ct_slices` + :func:`measure`: one series of 512×512 CT slices into a fresh node, with the
  node's peak RSS during the receive (chunked, as shipped, or in memory for comparison);
- :func:`pet_slices`: one PET series of 256×256 slices (the receive-rate benchmark's load);
- :func:`memory_kb`: VmRSS and VmHWM of a process.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.uid import PositronEmissionTomographyImageStorage, generate_uid

from dicomnode.testing.peers import (
    NodeProcess,
    StoreSCP,
    db_rows,
    free_port,
    job_states,
    peer_env,
    require_tool,
    storescu,
    wait_for,
    write_config,
)
from dicomnode.testing.scanner import StudyInfo, write_ct_series, write_pet_series

__all__ = ["Study", "ct_slices", "make_studies", "measure", "memory_kb", "pet_slices", "run_load"]


def memory_kb(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak) of process ``pid`` in kB, from ``/proc/PID/status``."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


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


def run_load(
    studies: list[Study], work: Path, *, stagger_s: float = 1.0, job_timeout_s: float = 600
) -> dict[str, float]:
    """Send every study in its own concurrent association; check everything; return the numbers.

    Association ``i`` starts ``i × stagger_s`` after the first (scanners do not start on the same
    millisecond), so the first studies' jobs run while the later ones are still being received.

    Raises AssertionError naming what went wrong (a lost instance, a second job, a mix-up).
    """
    storescu_exe = require_tool("/usr/bin/storescu")
    with StoreSCP(work / "pacs") as pacs:
        config = write_config(
            work, port=free_port(), destinations=[pacs.destination()], series_timeout_s=5
        )
        with NodeProcess(config) as node:
            pid = node.process.pid
            rss_before = memory_kb(pid)["VmRSS"]
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
            started, started_wall = time.perf_counter(), time.time()
            senders = []
            for i, study in enumerate(studies):
                if i:
                    time.sleep(stagger_s)
                out = open(work / f"storescu-{i}.out", "w")  # noqa: SIM115 - closed below
                command = [storescu_exe, "-aet", "SCANNER", "-aec", "UPETE", "-to", "30", "-ta", "30",
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
            peak = memory_kb(pid)["VmHWM"]
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


# Run in the node process before the CLI: the receive path as it was before chunked receive.
IN_MEMORY = """
import dicomnode.scp, dicomnode.service
_start = dicomnode.scp.start_server
def _in_memory(ctx):
    server = _start(ctx)
    dicomnode.scp.pynetdicom_config.STORE_RECV_CHUNKED_DATASET = False
    return server
dicomnode.scp.start_server = dicomnode.service.start_server = _in_memory
"""


def pet_slices(directory: Path, count: int, *, size: int = 256) -> list[Path]:
    """One synthetic static PET series: ``count`` slices of ``size``×``size``, 16-bit (2·size² bytes each)."""
    rng = np.random.default_rng(0)
    activity = rng.gamma(4.0, 1000.0, (count, size, size)).astype(np.float32)
    return write_pet_series(directory, activity, spacing_mm=(3.0, 2.0, 2.0), study=StudyInfo())


def ct_slices(directory: Path, count: int, *, size: int = 512) -> list[Path]:
    """``count`` slices of one synthetic CT series (one template written by dicomnode.testing.scanner)."""
    rng = np.random.default_rng(0)
    hu = rng.normal(0, 30, (1, size, size)).astype(np.float32)
    [template_path] = write_ct_series(
        directory / "template", hu, spacing_mm=(1.0, 0.8, 0.8), study=StudyInfo()
    )
    template = dcmread(template_path)
    template.SeriesInstanceUID = generate_uid()
    paths = []
    for k in range(count):
        template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        template.InstanceNumber = k + 1
        template.ImagePositionPatient = [-204.8, -204.8, float(k)]
        path = directory / f"ct{k:05d}.dcm"
        template.save_as(path)
        paths.append(path)
    return paths



def measure(count: int, files: list[Path], mode: str, work: Path) -> dict[str, float]:
    directory = work / f"{mode}-{count}"
    directory.mkdir()
    config = write_config(directory, port=free_port(), series_timeout_s=600)
    node = NodeProcess(config, preamble=IN_MEMORY if mode == "in-memory" else None).start()
    try:
        pid = node.process.pid
        time.sleep(1.0)  # let start-up settle
        before = memory_kb(pid)["VmRSS"]
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
        started = time.perf_counter()
        result = storescu(files, node.port, timeout=1800)
        seconds = time.perf_counter() - started
        after = memory_kb(pid)
        if result.returncode != 0:
            raise RuntimeError(f"storescu failed: {result.stderr[-2000:]}")
        stored = db_rows(node.db_path, "SELECT COUNT(*) AS n FROM instances")[0]["n"]
        if stored != count:
            raise RuntimeError(f"{stored} of {count} instances stored")
    finally:
        node.stop(timeout=60)
    return {
        "mode": mode,
        "slices": count,
        "mb_sent": sum(p.stat().st_size for p in files) / 2**20,
        "seconds": seconds,
        "per_s": count / seconds,
        "rss_before_mb": before / 1024,
        "peak_mb": after["VmHWM"] / 1024,
        "rss_after_mb": after["VmRSS"] / 1024,
    }
