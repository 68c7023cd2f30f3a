"""The assembler: completion (quiet timer, NumberOfSlices), PET selection, CT pairing, ct_wait, loop guard."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import CTImageStorage, PositronEmissionTomographyImageStorage

from dicomnode.assembler import Assembler, CtPolicy, SeriesBox, ct_coverage
from dicomnode.audit import AuditLog
from dicomnode.config import AssemblySettings
from dicomnode.db import DB_FILENAME, Database
from dicomnode.jobs import JobQueue, JobState, JobVariant
from dicomnode.store import InstanceStore
from dicomnode.validate import InstanceMeta

STUDY, FOR = "1.2.3", "1.2.3.100"
TIMEOUT, CT_WAIT = 30.0, 120.0
USES_CT = CtPolicy(uses_ct=True, requires_ct=False, has_without_ct_variant=False)
IGNORES_CT = CtPolicy(uses_ct=False, requires_ct=False, has_without_ct_variant=False)


class Node:
    """A store, a queue and an assembler on one temporary database."""

    def __init__(self, tmp: Path, policy: CtPolicy) -> None:
        self.db = Database(tmp / DB_FILENAME)
        self.audit = AuditLog(tmp / "audit.log")
        self.store = InstanceStore(tmp / "spool", self.db)
        self.jobs = JobQueue(self.db, self.audit)
        self.assembler = Assembler(
            self.db,
            self.jobs,
            self.audit,
            policy=policy,
            started_at=0.0,
            settings=AssemblySettings(series_timeout_s=TIMEOUT, ct_wait_s=CT_WAIT),
        )

    def pet(
        self, series: str, slices=range(24), *, z0: float = -34.5, dz: float = 3.0, **overrides
    ) -> list[str]:
        fields = dict(
            sop_class_uid=PositronEmissionTomographyImageStorage,
            modality="PT",
            units="BQML",
            corrected_image=("ATTN", "DECY"),
            series_type="WHOLE BODY",
            number_of_slices=24,
            rows=32,
            columns=32,
            pixel_spacing_mm=(4.0, 4.0),
            origin_xy=(-62.0, -62.0),
        )
        fields.update(overrides)
        return self._put(series, slices, z0, dz, fields)

    def ct(
        self, series: str, slices=range(30), *, z0: float = -39.5, dz: float = 3.0, **overrides
    ) -> list[str]:
        fields = dict(
            sop_class_uid=CTImageStorage,
            modality="CT",
            rows=48,
            columns=48,
            pixel_spacing_mm=(3.0, 3.0),
            origin_xy=(-69.0, -72.5),
        )
        fields.update(overrides)
        return self._put(series, slices, z0, dz, fields)

    def _put(self, series: str, slices, z0: float, dz: float, fields: dict) -> list[str]:
        x, y = fields.pop("origin_xy")
        fields.setdefault("frame_of_reference_uid", FOR)
        uids = []
        for k in slices:
            uid = f"{series}.{k + 1}"
            meta = InstanceMeta(
                sop_uid=uid,
                study_uid=STUDY,
                series_uid=series,
                position_mm=(x, y, z0 + k * dz),
                orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
                **fields,
            )
            self.store.put(meta, b"x")
            uids.append(uid)
        return uids

    def state(self, series: str) -> tuple[str, str | None] | None:
        rows = self.db.query("SELECT state, reason FROM series_state WHERE series_uid = ?", (series,))
        return (rows[0]["state"], rows[0]["reason"]) if rows else None

    def job(self, series: str):
        rows = self.db.query("SELECT id FROM jobs WHERE pet_series_uid = ?", (series,))
        return self.jobs.get(rows[0]["id"]) if rows else None


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path, USES_CT)


def later(seconds: float) -> float:
    return time.time() + seconds


def test_complete_as_soon_as_number_of_slices_arrived(node: Node) -> None:
    ct_uids = node.ct("1.2.3.2")  # sent before the PET, as scanners do
    time.sleep(0.01)
    node.pet("1.2.3.3", range(23))
    assert node.assembler.poll() == []  # 23 of 24, study not quiet
    pet_uids = node.pet("1.2.3.3", [23])
    [job_id] = node.assembler.poll()
    job = node.jobs.get(job_id)
    assert (job.ct_series_uid, job.variant, job.state) == ("1.2.3.2", "main", JobState.QUEUED)
    assert sorted(node.jobs.inputs(job_id)[0]) == sorted([f"1.2.3.3.{k + 1}" for k in range(23)] + pet_uids)
    assert sorted(node.jobs.inputs(job_id)[1]) == sorted(ct_uids)
    assert node.assembler.poll() == []  # decided once


def test_without_number_of_slices_the_quiet_timer_completes(node: Node) -> None:
    node.ct("1.2.3.2")
    node.pet("1.2.3.3", number_of_slices=None)
    assert node.assembler.poll(now=later(TIMEOUT - 2)) == []
    [job_id] = node.assembler.poll(now=later(TIMEOUT + 1))
    assert node.jobs.get(job_id).ct_series_uid == "1.2.3.2"
    assert "trigger=quiet_timer" in node.audit.path.read_text()


def test_after_a_restart_the_quiet_timer_counts_from_the_start(tmp_path: Path) -> None:
    node = Node(tmp_path, IGNORES_CT)
    node.pet("1.2.3.3", range(10))  # the rest was unacknowledged when the node died
    node.assembler.started_at = later(100)  # the node restarted long after the last instance
    assert node.assembler.poll(now=later(100 + TIMEOUT - 1)) == []
    assert len(node.assembler.poll(now=later(100 + TIMEOUT + 1))) == 1


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"corrected_image": ("DECY",)}, "not attenuation corrected"),
        ({"units": "CNTS"}, "Units is CNTS, only BQML"),
        ({"series_type": "DYNAMIC"}, "SeriesType DYNAMIC"),
        ({"derived_by_us": True}, "produced by this node"),
    ],
)
def test_unusable_pet_is_skipped_with_a_reason(node: Node, overrides: dict, reason: str) -> None:
    node.ct("1.2.3.2")
    node.pet("1.2.3.3", **overrides)
    assert node.assembler.poll() == []
    state, why = node.state("1.2.3.3")
    assert state == "skipped" and reason in why
    assert node.job("1.2.3.3") is None
    assert "event=series_skipped" in node.audit.path.read_text()


def test_a_series_planned_as_our_output_is_skipped(node: Node) -> None:
    job_id = node.jobs.create(
        pet_series_uid="1.2.3.3",
        study_uid=STUDY,
        ct_series_uid=None,
        variant="main",
        pet_sop_uids=["1.2.3.3.1"],
    )
    node.jobs.set_plan(job_id, "{}", derived_series_uid="1.2.3.77")
    node.pet("1.2.3.77")  # our output, routed back by the PACS without derivation tags
    node.assembler.poll()
    assert node.state("1.2.3.77") == ("skipped", "produced by this node (loop guard)")


def test_ct_of_another_frame_of_reference_is_not_paired(node: Node) -> None:
    node.ct("1.2.3.2", frame_of_reference_uid="9.9.9")
    node.pet("1.2.3.3")
    assert node.assembler.poll() == []
    assert node.state("1.2.3.3")[0] == "waiting_ct"
    [job_id] = node.assembler.poll(now=later(CT_WAIT + 1))
    job = node.jobs.get(job_id)
    assert job.ct_series_uid is None
    assert job.ct_note == ("the study's CT series 1.2.3.2 has another Frame of Reference "
                           "(FrameOfReferenceUID) than the PET")
    assert "another Frame of Reference" in node.audit.path.read_text()


def test_a_ct_narrower_than_the_pet_box_is_paired(node: Node) -> None:
    # A 50 cm CT inside a 70 cm PET field of view: the CT holds a third of the PET's box; whether it
    # holds the patient is the pipeline's judgement, from the pixels.
    node.ct("1.2.3.2", rows=24, columns=24, origin_xy=(-34.5, -34.5))
    time.sleep(0.01)
    node.pet("1.2.3.3")
    [job_id] = node.assembler.poll()
    job = node.jobs.get(job_id)
    assert (job.ct_series_uid, job.variant, job.ct_note) == ("1.2.3.2", JobVariant.MAIN, None)
    assert "box_coverage=0.3" in node.audit.path.read_text()


def test_a_ct_still_arriving_alongside_the_pet_waits_for_the_quiet_timer(node: Node) -> None:
    node.pet("1.2.3.3", range(12))
    node.ct("1.2.3.2", range(0, 30, 2))  # every second CT slice so far, sent in parallel
    node.pet("1.2.3.3", range(12, 24))
    assert node.assembler.poll() == []  # PET complete, but the CT may be half-way
    node.ct("1.2.3.2", range(1, 30, 2))
    [job_id] = node.assembler.poll(now=later(TIMEOUT + 1))
    assert node.jobs.get(job_id).ct_series_uid == "1.2.3.2"
    assert len(node.jobs.inputs(job_id)[1]) == 30


def test_a_ct_with_missing_slices_is_not_paired(node: Node) -> None:
    node.ct("1.2.3.2", [k for k in range(30) if k not in (12, 13, 14)])
    node.pet("1.2.3.3")
    assert node.assembler.poll(now=later(TIMEOUT + 1)) == []
    assert node.state("1.2.3.3")[0] == "waiting_ct"
    [job_id] = node.assembler.poll(now=later(TIMEOUT + CT_WAIT + 2))
    assert node.jobs.get(job_id).ct_note == "the study's CT series 1.2.3.2 has missing slices"


def test_the_best_covering_ct_is_chosen(node: Node) -> None:
    node.ct("1.2.3.2", range(10))  # covers a third of the PET
    node.ct("1.2.3.4")  # covers all of it
    time.sleep(0.01)
    node.pet("1.2.3.3")
    [job_id] = node.assembler.poll()
    assert node.jobs.get(job_id).ct_series_uid == "1.2.3.4"


def test_no_ct_after_ct_wait_runs_without_ct_when_the_model_can(node: Node) -> None:
    node.pet("1.2.3.3")
    assert node.assembler.poll() == []
    assert node.state("1.2.3.3")[0] == "waiting_ct"
    assert node.assembler.poll(now=later(CT_WAIT - 5)) == []
    [job_id] = node.assembler.poll(now=later(CT_WAIT + 1))
    job = node.jobs.get(job_id)
    assert (job.ct_series_uid, job.variant, job.state) == (None, "main", JobState.QUEUED)
    assert "event=ct_missing" in node.audit.path.read_text()


def test_no_ct_uses_the_pet_only_variant_when_configured(tmp_path: Path) -> None:
    node = Node(tmp_path, CtPolicy(uses_ct=True, requires_ct=True, has_without_ct_variant=True))
    node.pet("1.2.3.3")
    node.assembler.poll()
    [job_id] = node.assembler.poll(now=later(CT_WAIT + 1))
    job = node.jobs.get(job_id)
    assert (job.variant, job.ct_note) == (JobVariant.WITHOUT_CT, "the study has no CT series")
    assert node.db.query("SELECT variant FROM jobs")[0]["variant"] == "without_ct"  # the same string


def test_no_ct_fails_the_job_when_the_model_needs_one(tmp_path: Path) -> None:
    node = Node(tmp_path, CtPolicy(uses_ct=True, requires_ct=True, has_without_ct_variant=False))
    node.pet("1.2.3.3")
    node.assembler.poll()
    node.assembler.poll(now=later(CT_WAIT + 1))
    job = node.job("1.2.3.3")
    assert job.state is JobState.FAILED
    assert job.reason.startswith("the study has no CT series (waited assembly.ct_wait_s = 120 s)")
    assert "checkpoint_without_ct" in job.reason


def test_an_enhancer_that_ignores_ct_does_not_wait(tmp_path: Path) -> None:
    node = Node(tmp_path, IGNORES_CT)
    node.pet("1.2.3.3")
    [job_id] = node.assembler.poll()
    assert node.jobs.get(job_id).ct_series_uid is None


def _box(n: int, dz: float, z0: float, size: int, pixel: float, origin: float, skip=()) -> SeriesBox:
    rows = [
        {
            "orientation": "1\\0\\0\\0\\1\\0",
            "position_x": origin,
            "position_y": origin,
            "position_z": z0 + k * dz,
            "rows": size,
            "columns": size,
            "row_spacing": pixel,
            "col_spacing": pixel,
        }
        for k in range(n)
        if k not in skip
    ]
    return SeriesBox.from_rows(rows)


def test_ct_coverage_geometry() -> None:
    pet = _box(24, 3.0, -34.5, 32, 4.0, -62.0)
    assert ct_coverage(pet, _box(30, 3.0, -39.5, 48, 3.0, -70.5)) == (1.0, True)
    half_z, complete = ct_coverage(pet, _box(13, 3.0, -34.5, 48, 3.0, -70.5))
    assert half_z == pytest.approx(13 / 24, abs=0.03) and not complete
    small_xy, complete = ct_coverage(pet, _box(30, 3.0, -39.5, 24, 3.0, -35.0))
    assert complete and small_xy == pytest.approx((72 / 124) ** 2, abs=0.08)
    gap, complete = ct_coverage(pet, _box(30, 3.0, -39.5, 48, 3.0, -70.5, skip=(10, 11, 12)))
    assert gap < 1.0 and not complete
    assert ct_coverage(pet, _box(1, 3.0, 0.0, 48, 3.0, -70.5)) == (0.0, False)
    assert np.allclose(pet.normal, (0, 0, 1))
