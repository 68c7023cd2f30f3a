"""What ``upete status`` reports: the node's health, its spool's disk, and its jobs — as one dict (the
``--json`` document) and as text.

Reads the database and the heartbeat file only, so it works beside a running node (SQLite WAL:
readers never block the writer) and after it stopped. Shows UIDs, study date/time, counts and
durations — never patient names, IDs or birth dates.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydicom import dcmread

from dicomnode.audit import AuditLog
from dicomnode.config import Settings
from dicomnode.db import Database
from dicomnode.health import read_heartbeat
from dicomnode.jobs import Job, JobQueue, JobState, JobVariant
from dicomnode.preview import PREVIEW_PNG

__all__ = ["SpoolSize", "collect_status", "format_size", "format_time", "render_text", "spool_bytes"]


def _seconds(start: float | None, end: float | None) -> float | None:
    return round(end - start, 3) if start is not None and end is not None else None


def spool_bytes(root: Path) -> int:
    """Bytes of every file under ``root`` (what the spool, database and outputs take on disk)."""
    total = 0
    for directory, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.stat(os.path.join(directory, name), follow_symlinks=False).st_blocks * 512
            except OSError:  # removed by retention while we walk
                continue
    return total


class SpoolSize:
    """:func:`spool_bytes`, walked again only when the last walk is older than ``max_age_s``.

    Walking the spool stats every file (≈0.2 s for 30,000 files): fine once for ``upete status``, too
    slow for a page that reloads itself. The size of a spool moves slowly; a minute-old figure will do.
    """

    def __init__(self, max_age_s: float = 60.0, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._cached: dict[Path, tuple[float, int]] = {}

    def __call__(self, root: Path) -> int:
        with self._lock:  # one walk at a time: concurrent page loads wait for it rather than repeat it
            now = self._clock()
            hit = self._cached.get(root)
            if hit is None or now - hit[0] > self.max_age_s:
                hit = (now, spool_bytes(root))
                self._cached[root] = hit
            return hit[1]


def _disk(settings: Settings, spool_size: Callable[[Path], int]) -> dict[str, object]:
    root = settings.storage.root
    usage = shutil.disk_usage(root)
    return {
        "spool": str(root),
        "spool_bytes": spool_size(root),
        "free_bytes": usage.free,
        "total_bytes": usage.total,
        "min_free_mb": settings.storage.min_free_mb,
        "below_min_free": usage.free < settings.storage.min_free_mb * 1024 * 1024,
    }


def _study_time(db: Database, root: Path, series_uid: str, cache: dict[str, str | None]) -> str | None:
    """"YYYY-MM-DD HH:MM" from StudyDate/StudyTime of one stored instance of the series (no names)."""
    if series_uid in cache:
        return cache[series_uid]
    rows = db.query("SELECT path FROM instances WHERE series_uid = ? LIMIT 1", (series_uid,))
    when = None
    if rows:
        try:
            ds = dcmread(root / rows[0]["path"], stop_before_pixels=True,
                         specific_tags=["StudyDate", "StudyTime"])
            date, clock = str(ds.get("StudyDate", "") or ""), str(ds.get("StudyTime", "") or "")
            if len(date) >= 8:
                when = f"{date[:4]}-{date[4:6]}-{date[6:8]}"
                if len(clock) >= 4:
                    when += f" {clock[:2]}:{clock[2:4]}"
        except (OSError, ValueError, EOFError):
            when = None  # removed by retention: the UIDs still say which study it was
    cache[series_uid] = when
    return when


def _job_record(job: Job, queue: JobQueue, db: Database, root: Path, now: float,
                cache: dict[str, str | None]) -> dict[str, object]:
    preview = root / job.output_dir / PREVIEW_PNG if job.output_dir else None
    return {
        "id": job.id,
        "state": job.state.value,
        "reason": job.reason,
        "variant": job.variant.value,
        "ct_note": job.ct_note,
        "model": None if job.model is None else {
            "checkpoint": job.model.checkpoint, "name": job.model.name, "version": job.model.version},
        "study_uid": job.study_uid,
        "study_time": _study_time(db, root, job.pet_series_uid, cache),
        "pet_series_uid": job.pet_series_uid,
        "ct_series_uid": job.ct_series_uid,
        "derived_series_uid": job.derived_series_uid,
        "output_instances": job.output_count,
        "process_attempts": job.process_attempts,
        "created_at": job.created_at,
        "waiting_s": _seconds(job.created_at, job.started_at if job.started_at else now)
        if job.state is JobState.QUEUED or job.started_at else None,
        "processing_s": _seconds(job.started_at, job.processed_at if job.processed_at else
                                 (now if job.state is JobState.RUNNING else None)),
        "total_s": _seconds(job.created_at, job.finished_at if job.finished_at else now),
        "stage_seconds": job.stage_seconds,
        "next_attempt_at": job.next_attempt_at if job.state is JobState.SENDING else None,
        "preview": str(preview) if preview is not None and preview.is_file() else None,
        "sends": [
            {"destination": s.destination, "state": s.state, "attempts": s.attempts, "sent": s.sent,
             "last_error": s.last_error}
            for s in queue.sends(job.id)
        ],
    }


def collect_status(
    settings: Settings,
    db: Database,
    *,
    limit: int = 50,
    spool_size: Callable[[Path], int] = spool_bytes,
) -> dict[str, object]:
    """The whole report (the ``--json`` document); ``spool_size`` measures the spool (a
    :class:`SpoolSize` for a caller that asks often)."""
    root = settings.storage.root
    now = time.time()
    queue = JobQueue(db, AuditLog(None), migrate=False)  # reads only: no transition, no migration
    cache: dict[str, str | None] = {}
    jobs = [_job_record(job, queue, db, root, now, cache) for job in queue.list(limit=limit)]
    counts = {state.value: 0 for state in JobState}
    for row in db.query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
        counts[row["state"]] = row["n"]
    series = [
        dict(row)
        for row in db.query(
            "SELECT series_uid, study_uid, state, reason, updated_at FROM series_state "
            "WHERE state IN ('skipped', 'waiting_ct') ORDER BY updated_at DESC LIMIT ?",
            (limit,),
        )
    ]
    return {
        "generated_at": now,
        "database": str(db.path),
        "node": read_heartbeat(root, now=now).to_json(),
        "disk": _disk(settings, spool_size),
        "job_counts": counts,
        "jobs": jobs,
        "series": series,
    }


def format_time(timestamp: float) -> str:
    """Local date and time to the second, as the report shows them."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def format_size(count: float) -> str:
    """Bytes in binary units (``1.5 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def _durations(job: dict) -> str:
    parts = []
    if job["waiting_s"] is not None and job["state"] == "queued":
        parts.append(f"waiting {job['waiting_s']:.0f} s")
    if job["processing_s"] is not None:
        parts.append(f"processing {job['processing_s']:.1f} s")
    if job["total_s"] is not None:
        parts.append(f"total {job['total_s']:.1f} s")
    text = ", ".join(parts)
    stages = job["stage_seconds"] or {}
    if stages:
        text += " (" + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()) + ")"
    return text


def render_text(report: dict) -> str:
    """The report as the text ``upete status`` prints."""
    lines = []
    node, disk = report["node"], report["disk"]
    lines.append(f"node      {node['summary']}")
    if node.get("heartbeat") and node["heartbeat"].get("metrics_url") and node["running"]:
        lines.append(f"metrics   {node['heartbeat']['metrics_url']}/metrics  (health: /healthz)")
    warning = "  BELOW storage.min_free_mb: new instances are refused" if disk["below_min_free"] else ""
    lines.append(f"disk      spool {format_size(disk['spool_bytes'])} in {disk['spool']}; "
                 f"{format_size(disk['free_bytes'])} free of {format_size(disk['total_bytes'])}{warning}")
    counts = report["job_counts"]
    states = ("queued", "running", "sending", "done", "failed")
    lines.append("jobs      " + ", ".join(f"{counts.get(s, 0)} {s}" for s in states))
    lines.append("")
    if not report["jobs"]:
        lines.append("no jobs")
    for job in report["jobs"]:
        created = format_time(job["created_at"])
        lines.append(f"job {job['id']}  {job['state']}  created {created}  {_durations(job)}")
        lines.append(f"  study           {job['study_time'] or 'date unknown'}  {job['study_uid']}")
        lines.append(f"  PET series      {job['pet_series_uid']}")
        lines.append(f"  CT series       {job['ct_series_uid'] or 'none'}"
                     + ("  (PET-only model)" if job["variant"] == JobVariant.WITHOUT_CT.value else ""))
        if job["ct_note"]:
            lines.append(f"  CT not used     {job['ct_note']}")
        if job["model"]:
            model = job["model"]
            version = f" (version {model['version']})" if model["version"] else ""
            lines.append(f"  model           {model['name']}: {model['checkpoint']}{version}")
        if job["derived_series_uid"]:
            count = f"  ({job['output_instances']} instances)" if job["output_instances"] is not None else ""
            lines.append(f"  derived series  {job['derived_series_uid']}{count}")
        for send in job["sends"]:
            error = f": {send['last_error']}" if send["last_error"] else ""
            lines.append(f"  send            {send['destination']} {send['state']} ({send['attempts']} "
                         f"attempt(s), {send['sent']} sent){error}")
        if job["preview"]:
            lines.append(f"  preview         {job['preview']}")
        if job["reason"]:
            lines.append(f"  reason          {job['reason']}")
    if report["series"]:
        lines.append("")
        lines.append("PET series not processed:")
        for item in report["series"]:
            lines.append(f"  {item['series_uid']}  {item['state']}: {item['reason']}")
    return "\n".join(lines)
