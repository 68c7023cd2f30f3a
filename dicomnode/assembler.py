"""The assembler: decides when a PET series is complete, whether to process it, and with which CT.

Rules (ARCHITECTURE.md §3), applied by :meth:`Assembler.poll` to every PET series that has no decision yet:

- **complete** when no instance of its study arrived for ``assembly.series_timeout_s`` (the quiet
  timer; after a restart it counts from the start, giving senders that time to resend), or as soon as
  the series holds NumberOfSlices (0054,0081) instances;
- **selected** when it is attenuation-corrected, quantitative PET: Modality PT, PET Image Storage,
  Units BQML, CorrectedImage containing ATTN, not dynamic or gated, one Frame of Reference, and not
  produced by this node (our own records and the derivation tags — the loop guard). Anything else is
  skipped with a reason, logged, audited and kept in ``series_state`` for ``upete status``;
- **paired** with a CT series of the same study and Frame of Reference, without missing slices, whose
  box overlaps the PET's. Whether it covers the *patient* needs the pixels, so the pipeline judges
  that (:mod:`dicomnode.ct_coverage`) and runs the PET-only model, with the reason, when it does not;
  the index alone cannot tell a 50 cm CT around the whole body from one that misses part of it. While
  the study is still receiving (the PET complete by NumberOfSlices), a CT is taken only if it arrived
  entirely before the PET and spans every PET slice — one sent alongside the PET may be half-way.
  Among several, the one covering most of the PET's box;
- **no CT** after ``assembly.ct_wait_s`` (counted from the PET's completion): the job runs without CT
  if the configured model can (:class:`CtPolicy`: the PET-only variant when the main model needs a
  CT), with the reason (no CT, another Frame of Reference, missing slices) kept in the job as its
  ``ct_note``; else a job is recorded as failed with the reason. An enhancer that ignores the CT does
  not wait for one.

Each selected series becomes exactly one job (:meth:`JobQueue.create` refuses a second), with the
SOP Instance UIDs present at that moment as its fixed inputs.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from pydicom.uid import PositronEmissionTomographyImageStorage

from dicomnode.audit import AuditLog
from dicomnode.config import AssemblySettings
from dicomnode.db import Database
from dicomnode.jobs import JobQueue, JobVariant

__all__ = ["Assembler", "CtPolicy", "SeriesBox", "ct_coverage"]

log = logging.getLogger("upete.assembler")

# A CT slice gap larger than this multiple of the CT's median slice spacing means missing slices.
_MAX_GAP_FACTOR = 1.5

_UNDECIDED_PET = """
SELECT i.series_uid, i.study_uid, i.sop_uid, i.sop_class_uid, i.frame_of_reference_uid, i.units,
       i.corrected_image, i.series_type, i.number_of_slices, i.position_x, i.position_y, i.position_z,
       i.orientation, i.rows, i.columns, i.row_spacing, i.col_spacing, i.derived_by_us, i.received_at,
       s.state, s.complete_at
FROM instances i LEFT JOIN series_state s ON s.series_uid = i.series_uid
WHERE i.modality = 'PT' AND (s.state IS NULL OR s.state = 'waiting_ct')
"""
_STUDY_LAST = "SELECT MAX(received_at) FROM instances WHERE study_uid = ?"
_STUDY_CT = """
SELECT series_uid, sop_uid, frame_of_reference_uid, position_x, position_y, position_z, orientation,
       rows, columns, row_spacing, col_spacing, derived_by_us, received_at
FROM instances WHERE study_uid = ? AND modality = 'CT'
"""
_DECIDE = """
INSERT INTO series_state (series_uid, study_uid, state, reason, complete_at, updated_at)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT(series_uid) DO UPDATE SET state = excluded.state, reason = excluded.reason,
    complete_at = COALESCE(series_state.complete_at, excluded.complete_at), updated_at = excluded.updated_at
"""


@dataclass(frozen=True)
class CtPolicy:
    """What the configured model does with a CT (from the loaded enhancers' ``info`` and the config)."""

    uses_ct: bool  # the main enhancer looks at a CT: worth waiting ct_wait_s for one
    requires_ct: bool  # the main enhancer cannot run without one
    has_without_ct_variant: bool  # model.checkpoint_without_ct is configured


@dataclass(frozen=True)
class SeriesBox:
    """The geometry of one stack of slices, from the index: axes, pixel grid and slice positions (mm)."""

    row_dir: np.ndarray  # unit vector along a row (increasing column index)
    col_dir: np.ndarray  # unit vector along a column (increasing row index)
    normal: np.ndarray  # row_dir × col_dir
    base: np.ndarray  # ImagePositionPatient of the slice nearest -normal
    rows: int
    columns: int
    row_spacing: float  # mm between rows
    col_spacing: float  # mm between columns
    positions: np.ndarray  # sorted slice positions along ``normal``

    @classmethod
    def from_rows(cls, rows: list) -> SeriesBox:
        """``rows`` of the instances table of one series (one orientation and pixel grid assumed)."""
        orientation = np.array([float(v) for v in rows[0]["orientation"].split("\\")])
        row_dir, col_dir = orientation[:3], orientation[3:]
        normal = np.cross(row_dir, col_dir)
        points = np.array([(r["position_x"], r["position_y"], r["position_z"]) for r in rows], dtype=float)
        along = points @ normal
        order = np.argsort(along)
        return cls(
            row_dir=row_dir,
            col_dir=col_dir,
            normal=normal,
            base=points[order[0]],
            rows=int(rows[0]["rows"]),
            columns=int(rows[0]["columns"]),
            row_spacing=float(rows[0]["row_spacing"]),
            col_spacing=float(rows[0]["col_spacing"]),
            positions=along[order],
        )


@dataclass(frozen=True)
class _FoundCt:
    """The assembler's CT for a PET series (``series_uid`` None: none, and ``why_not`` says why)."""

    series_uid: str | None = None
    sop_uids: list[str] = field(default_factory=list)
    coverage: float = 0.0  # of the PET's box (ranks candidates)
    why_not: str = ""


def _uniform_grid(rows: list) -> bool:
    """One orientation and one pixel grid across the series (else volume.py refuses it anyway)."""
    keys = {(r["orientation"], r["rows"], r["columns"], r["row_spacing"], r["col_spacing"]) for r in rows}
    return len(keys) == 1


def _gap_free_runs(positions: np.ndarray) -> tuple[list[tuple[float, float]], float]:
    """Intervals of ``positions`` without a missing slice, and the median slice step."""
    steps = np.diff(positions)
    median = float(np.median(steps)) if len(steps) else 0.0
    runs, start = [], positions[0]
    for a, b, step in zip(positions[:-1], positions[1:], steps, strict=True):
        if step > _MAX_GAP_FACTOR * median:
            runs.append((float(start), float(a)))
            start = b
    runs.append((float(start), float(positions[-1])))
    return runs, median


def ct_coverage(pet: SeriesBox, ct: SeriesBox) -> tuple[float, bool]:
    """(fraction of the PET box's voxel centres inside the CT, whether every PET slice is inside axially).

    A voxel centre counts when it lies within half a voxel of the CT's grid; computed from the index
    alone and aware of missing CT slices: a gap over 1.5× the CT's median slice step is not covered.
    Sampled on at most 32 points per in-plane axis. It ranks candidate CTs; whether one covers the
    patient is the pipeline's judgement (:func:`dicomnode.ct_coverage.judge_ct`).
    """
    if len(ct.positions) < 2:
        return 0.0, False
    runs, median = _gap_free_runs(ct.positions)
    if median <= 0:
        return 0.0, False
    half = 0.5 * median
    i = np.linspace(0, pet.columns - 1, min(pet.columns, 32))
    j = np.linspace(0, pet.rows - 1, min(pet.rows, 32))
    # Every PET slice: its in-plane origin is the base's, moved along the normal to the slice position.
    offsets = pet.positions - float(pet.base @ pet.normal)
    origins = pet.base[None, :] + offsets[:, None] * pet.normal[None, :]  # (slices, 3)
    plane = (
        i[None, :, None] * pet.col_spacing * pet.row_dir[None, None, :]
        + j[:, None, None] * pet.row_spacing * pet.col_dir[None, None, :]
    )  # (j, i, 3)
    points = origins[:, None, None, :] + plane[None]  # (slices, j, i, 3)
    rel = points - ct.base
    u = rel @ ct.row_dir / ct.col_spacing
    v = rel @ ct.col_dir / ct.row_spacing
    w = points @ ct.normal
    in_plane = (u >= -0.5) & (u <= ct.columns - 0.5) & (v >= -0.5) & (v <= ct.rows - 0.5)
    in_runs = np.zeros(w.shape, dtype=bool)
    for a, b in runs:
        in_runs |= (w >= a - half) & (w <= b + half)
    centre = in_runs[:, in_runs.shape[1] // 2, in_runs.shape[2] // 2]
    return float((in_plane & in_runs).mean()), bool(centre.all())


class Assembler:
    """Turns stored instances into jobs; :meth:`poll` is called periodically by the service thread."""

    def __init__(
        self,
        db: Database,
        jobs: JobQueue,
        audit: AuditLog,
        *,
        settings: AssemblySettings,
        policy: CtPolicy,
        started_at: float | None = None,
    ) -> None:
        self.db = db
        self.jobs = jobs
        self.audit = audit
        self.settings = settings
        self.policy = policy
        # The quiet timer never counts from before this process started (see the module docstring).
        self.started_at = time.time() if started_at is None else started_at

    def poll(self, now: float | None = None) -> list[int]:
        """One pass over undecided PET series; returns the ids of jobs created."""
        now = time.time() if now is None else now
        series: dict[str, list] = defaultdict(list)
        for row in self.db.query(_UNDECIDED_PET):
            series[row["series_uid"]].append(row)
        created = []
        for series_uid, rows in series.items():
            job_id = self._consider(series_uid, rows, now)
            if job_id is not None:
                created.append(job_id)
        return created

    def _study_quiet(self, study_uid: str, now: float) -> bool:
        last = self.db.query(_STUDY_LAST, (study_uid,))[0][0] or 0.0
        return now - max(last, self.started_at) >= self.settings.series_timeout_s

    def _consider(self, series_uid: str, rows: list, now: float) -> int | None:
        study_uid = rows[0]["study_uid"]
        quiet = self._study_quiet(study_uid, now)
        waiting_since = rows[0]["complete_at"] if rows[0]["state"] == "waiting_ct" else None
        if waiting_since is None:
            expected = {row["number_of_slices"] for row in rows}
            by_count = len(expected) == 1 and None not in expected and len(rows) >= expected.pop()
            if not (quiet or by_count):
                return None
            self.audit.record(
                "series_complete",
                study_uid=study_uid,
                series_uid=series_uid,
                instances=len(rows),
                trigger="number_of_slices" if by_count else "quiet_timer",
            )
            reason = _skip_reason(rows, self.jobs.is_our_series(series_uid))
            if reason is not None:
                self._decide(series_uid, study_uid, "skipped", reason, now)
                log.info("PET series skipped", extra={"fields": {"series_uid": series_uid, "reason": reason}})
                self.audit.record("series_skipped", study_uid=study_uid, series_uid=series_uid, reason=reason)
                return None
            waiting_since = now
        pet_uids = [row["sop_uid"] for row in rows]
        found = self._find_ct(study_uid, rows, quiet)
        if found.series_uid is not None:
            self.audit.record(
                "ct_paired",
                study_uid=study_uid,
                series_uid=series_uid,
                ct_series_uid=found.series_uid,
                ct_instances=len(found.sop_uids),
                box_coverage=f"{found.coverage:.3f}",
            )
            return self._create(series_uid, study_uid, found.series_uid, JobVariant.MAIN, pet_uids,
                                found.sop_uids, now)
        if not self.policy.uses_ct:
            return self._create(series_uid, study_uid, None, JobVariant.MAIN, pet_uids, [], now)
        if now - waiting_since < self.settings.ct_wait_s:
            if rows[0]["state"] != "waiting_ct":
                self._decide(series_uid, study_uid, "waiting_ct", "waiting for a CT covering the PET", now)
            return None
        why = found.why_not
        waited = f"{why} (waited assembly.ct_wait_s = {self.settings.ct_wait_s:g} s)"
        self.audit.record("ct_missing", study_uid=study_uid, series_uid=series_uid, reason=waited)
        log.info("no usable CT for the PET series",
                 extra={"fields": {"series_uid": series_uid, "reason": waited}})
        if not self.policy.requires_ct:
            return self._create(series_uid, study_uid, None, JobVariant.MAIN, pet_uids, [], now, why)
        if self.policy.has_without_ct_variant:
            return self._create(series_uid, study_uid, None, JobVariant.WITHOUT_CT, pet_uids, [], now, why)
        job_id = self._create(series_uid, study_uid, None, JobVariant.MAIN, pet_uids, [], now, why)
        if job_id is not None:
            self.jobs.fail(job_id, f"{waited}; the model needs a CT and model.checkpoint_without_ct "
                                   "is not set")
        return job_id

    def _find_ct(self, study_uid: str, pet_rows: list, quiet: bool) -> _FoundCt:
        """The best CT series for this PET, or none with the reason (the last CT's, in series order)."""
        if not _uniform_grid(pet_rows):
            return _FoundCt(why_not="the PET series has no single pixel grid")
        pet = SeriesBox.from_rows(pet_rows)
        pet_for = pet_rows[0]["frame_of_reference_uid"]
        by_series: dict[str, list] = defaultdict(list)
        for row in self.db.query(_STUDY_CT, (study_uid,)):
            if not row["derived_by_us"]:
                by_series[row["series_uid"]].append(row)
        pet_first = min(row["received_at"] for row in pet_rows)
        candidates = []
        why_not = "the study has no CT series"
        for ct_series, rows in sorted(by_series.items()):
            # Only the PET's Frame of Reference: another one's coordinates need a registration.
            if any(row["frame_of_reference_uid"] != pet_for for row in rows):
                why_not = (f"the study's CT series {ct_series} has another Frame of Reference "
                           "(FrameOfReferenceUID) than the PET")
                continue
            if not _uniform_grid(rows):
                why_not = f"the study's CT series {ct_series} has no single pixel grid"
                continue
            box = SeriesBox.from_rows(rows)
            if len(_gap_free_runs(box.positions)[0]) > 1:
                why_not = f"the study's CT series {ct_series} has missing slices"
                continue
            coverage, axially_complete = ct_coverage(pet, box)
            if coverage <= 0:
                why_not = f"the study's CT series {ct_series} does not overlap the PET"
                continue
            # While the study still receives, a CT counts as complete only when it was all there before
            # the PET began to arrive (sent first, as scanners do) and spans every PET slice; a CT sent
            # alongside the PET may still be arriving, so it waits for the quiet timer.
            finished_before_pet = max(row["received_at"] for row in rows) < pet_first
            if quiet or (axially_complete and finished_before_pet):
                candidates.append((coverage, len(rows), ct_series, rows))
        if not candidates:
            return _FoundCt(why_not=why_not)
        coverage, _, ct_series, rows = max(candidates, key=lambda c: c[:2])
        return _FoundCt(ct_series, [row["sop_uid"] for row in rows], coverage)

    def _create(
        self,
        series_uid: str,
        study_uid: str,
        ct_series: str | None,
        variant: JobVariant,
        pet_uids: list[str],
        ct_uids: list[str],
        now: float,
        ct_note: str | None = None,
    ) -> int | None:
        job_id = self.jobs.create(
            pet_series_uid=series_uid,
            study_uid=study_uid,
            ct_series_uid=ct_series,
            variant=variant,
            pet_sop_uids=pet_uids,
            ct_sop_uids=ct_uids,
            ct_note=ct_note,
        )
        # Recorded after the job: a crash in between only re-runs this decision, and create() refuses a
        # second job for the series.
        self._decide(series_uid, study_uid, "job", None if job_id else "job already exists", now)
        return job_id

    def _decide(self, series_uid: str, study_uid: str, state: str, reason: str | None, now: float) -> None:
        with self.db.transaction() as conn:
            conn.execute(_DECIDE, (series_uid, study_uid, state, reason, now, now))


def _skip_reason(rows: list, ours: bool) -> str | None:
    """Why a complete PET series is not processed, or None when it is selected."""
    if ours or any(row["derived_by_us"] for row in rows):
        return "produced by this node (loop guard)"

    def values(column: str) -> set:
        return {row[column] for row in rows}

    if values("sop_class_uid") != {PositronEmissionTomographyImageStorage}:
        return "not PET Image Storage"
    if len(values("frame_of_reference_uid")) != 1:
        return "instances have more than one FrameOfReferenceUID"
    units = values("units")
    if len(units) != 1:
        return f"instances disagree on Units ({', '.join(sorted(str(u) for u in units))})"
    if units != {"BQML"}:
        return f"Units is {units.pop() or 'missing'}, only BQML (activity concentration) is processed"
    if any("ATTN" not in (row["corrected_image"] or "").split("\\") for row in rows):
        return "not attenuation corrected (CorrectedImage lacks ATTN)"
    series_types = values("series_type") - {None}
    if series_types & {"DYNAMIC", "GATED"}:
        return f"SeriesType {'/'.join(sorted(series_types))}: only static and whole-body PET are processed"
    return None
