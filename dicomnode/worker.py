"""The worker: one thread that runs queued jobs through the enhancer, one at a time.

For each claimed job: its fixed input instances from the spool → the derived-series plan (made and
stored in the job row before the first processing, reused by every rerun) → :func:`enhance_series`
into ``<root>/outputs/job-<id>/`` (emptied first, so a rerun after a crash leaves no stale file) →
every output file and the folder fsynced → ``sending``. Unusable input (:class:`VolumeError`) fails
the job with the pipeline's reason; anything unexpected fails it with the exception, logged.

Which model runs is the pipeline's decision, not the job's: the main model when the job's CT covers
the patient (or the model needs none), else the PET-only model. The job row then records the model
that ran (checkpoint file, name, digest), its variant, and why the CT was not used.

Enhancers are built once per process (:class:`Enhancers`): loading a diffusion checkpoint takes
seconds and memory, a job must not pay it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from dicomnode import metrics
from dicomnode.config import ModelSettings, Settings, resolve_checkpoint
from dicomnode.derived import DerivedPlan, plan_derived
from dicomnode.jobs import Job, JobQueue, JobVariant, ModelUsed
from dicomnode.pipeline import enhance_series
from dicomnode.preview import write_job_preview
from dicomnode.store import InstanceStore, fsync_dir
from dicomnode.volume import VolumeError, read_headers
from model.enhance import Enhancer, EnhancerInfo, InferenceOptions, load_enhancer

__all__ = ["Enhancers", "Worker", "LEASE_S", "inference_options", "model_used"]

log = logging.getLogger("upete.worker")

#: A running job's lease; renewed at every progress report, so it only lapses for a stuck worker.
LEASE_S = 600.0


def inference_options(model: ModelSettings, *, device: str | None = None) -> InferenceOptions:
    """The model's inference options from the config's ``model`` section (``device`` overrides it)."""
    return InferenceOptions(device=device or model.device, steps=model.steps,
                            dose_fraction=model.dose_fraction, seed=model.seed)


@dataclass(frozen=True)
class Enhancers:
    """The configured enhancers: ``main`` (model.checkpoint) and the PET-only variant, if configured."""

    main: Enhancer
    without_ct: Enhancer | None = None

    @classmethod
    def load(cls, settings: Settings) -> Enhancers:
        """Build both from ``settings.model`` (raises what :func:`load_enhancer` raises)."""
        model = settings.model
        options = inference_options(model)
        main = load_enhancer(resolve_checkpoint(model.checkpoint), options=options)
        without_ct = None
        if model.checkpoint_without_ct is not None:
            without_ct = load_enhancer(resolve_checkpoint(model.checkpoint_without_ct), options=options)
        return cls(main=main, without_ct=without_ct)

    def is_pet_only(self, info: EnhancerInfo) -> bool:
        """Whether ``info`` is the PET-only model's (model.checkpoint_without_ct)."""
        return self.without_ct is not None and info is self.without_ct.info

    def used(self, info: EnhancerInfo, model: ModelSettings) -> ModelUsed:
        """What a job records of the enhancer with ``info``: checkpoint file name, name, digest."""
        pet_only = self.is_pet_only(info) and model.checkpoint_without_ct is not None
        spec = model.checkpoint_without_ct if pet_only else model.checkpoint
        return model_used(spec, info)


def model_used(spec: str, info: EnhancerInfo) -> ModelUsed:
    """The checkpoint's file name (a classical spec as it is), the model's name and version (digest)."""
    checkpoint = spec if spec.startswith("classical:") else Path(spec).name
    return ModelUsed(checkpoint=checkpoint, name=info.name, version=info.version)


class Worker:
    """Claims and processes jobs; :meth:`run_once` is called in a loop by the service thread."""

    def __init__(
        self,
        jobs: JobQueue,
        store: InstanceStore,
        enhancers: Enhancers,
        settings: Settings,
        *,
        destinations: list[str],
    ) -> None:
        self.jobs = jobs
        self.store = store
        self.enhancers = enhancers
        self.settings = settings
        self.destinations = destinations
        self.outputs_dir = store.root / "outputs"
        self.outputs_dir.mkdir(parents=True, exist_ok=True)

    def run_once(self) -> bool:
        """Process one queued job; False when the queue was empty."""
        job = self.jobs.claim_processing(lease_s=LEASE_S)
        if job is None:
            return False
        log.info(
            "job started",
            extra={
                "fields": {
                    "job_id": job.id,
                    "pet_series_uid": job.pet_series_uid,
                    "attempt": job.process_attempts,
                }
            },
        )
        try:
            self._process(job)
        except VolumeError as exc:
            log.warning("job failed", extra={"fields": {"job_id": job.id, "reason": str(exc)}})
            self.jobs.fail(job.id, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug in one job must not stop the queue
            log.exception("job failed unexpectedly", extra={"fields": {"job_id": job.id}})
            self.jobs.fail(job.id, f"internal error: {type(exc).__name__}: {exc}")
        return True

    def _inputs(self, job: Job) -> tuple[list[Path], list[Path] | None]:
        pet_uids, ct_uids = self.jobs.inputs(job.id)
        paths = self.store.paths(pet_uids + ct_uids)
        missing = [uid for uid in pet_uids + ct_uids if uid not in paths or not paths[uid].is_file()]
        if missing:
            raise VolumeError(f"{len(missing)} input instance(s) of the job are missing from the spool")
        return [paths[uid] for uid in pet_uids], ([paths[uid] for uid in ct_uids] or None)

    def _plan(self, job: Job, pet_paths: list[Path]) -> DerivedPlan:
        if job.plan_json:
            return DerivedPlan.from_json(job.plan_json)
        headers = read_headers(pet_paths)  # VolumeError for a damaged spool file: the job's reason
        plan = plan_derived(headers, self.settings.output)
        # Stored before processing: every later run (after a crash, or a manual resend) writes the
        # same series and SOP Instance UIDs, so a receiver replaces instead of duplicating.
        self.jobs.set_plan(job.id, plan.to_json(), derived_series_uid=plan.series_uid)
        return plan

    def _process(self, job: Job) -> None:
        pet_paths, ct_paths = self._inputs(job)
        plan = self._plan(job, pet_paths)
        out_dir = self.outputs_dir / f"job-{job.id}"
        if out_dir.exists():
            shutil.rmtree(out_dir)  # a previous, interrupted run's files
        out_dir.mkdir(parents=True)

        renewed = [time.monotonic()]

        def progress(_fraction: float, _stage: str) -> None:
            # Renewing is a committed write; a model may report many times a second.
            if time.monotonic() - renewed[0] > LEASE_S / 10:
                self.jobs.renew(job.id, lease_s=LEASE_S)
                renewed[0] = time.monotonic()

        # The pipeline decides whether the CT covers the patient and, if not, runs the PET-only model;
        # a job the assembler made without a CT passes its reason on (job.ct_note).
        result = enhance_series(
            pet_paths, ct_paths, self.enhancers.main, out_dir, output=self.settings.output, plan=plan,
            progress=progress, without_ct=self.enhancers.without_ct, no_ct_reason=job.ct_note,
        )
        # The PNG (and, if configured, a Secondary Capture to send along); never fails the job.
        extra = write_job_preview(
            out_dir, pet_paths, ct_paths, result.paths, output=self.settings.output, job_id=job.id
        )
        for path in result.paths + extra:
            _fsync_file(path)
        fsync_dir(out_dir)
        fsync_dir(self.outputs_dir)
        metrics.observe_stages(result.seconds_by_stage)
        self.jobs.processed(
            job.id,
            output_dir=str(out_dir.relative_to(self.store.root)),
            output_count=len(result.paths) + len(extra),
            stage_seconds={k: round(v, 3) for k, v in result.seconds_by_stage.items()},
            destinations=self.destinations,
            model=self.enhancers.used(result.info, self.settings.model),
            ct_note=result.ct_note,
            variant=JobVariant.WITHOUT_CT if self.enhancers.is_pet_only(result.info) else JobVariant.MAIN,
        )
        log.info(
            "job processed",
            extra={
                "fields": {
                    "job_id": job.id,
                    "derived_series_uid": plan.series_uid,
                    "instances": len(result.paths),
                    "ct_used": result.ct_used,
                    "model": result.info.name,
                    "model_version": result.info.version,
                    **({"ct_note": result.ct_note} if result.ct_note else {}),
                }
            },
        )


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
