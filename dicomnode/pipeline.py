"""One PET series (and its CT) through the enhancer into a derived series: the worker's and
``upete enhance``'s shared path.

load PET (+ CT) → CT resampled onto the PET grid → ``enhancer.enhance`` → derived series on disk.
Unusable input raises :class:`~dicomnode.volume.VolumeError` with the reason a job fails for.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset

from dicomnode.config import OutputSettings
from dicomnode.derived import DerivedPlan, is_derived_by_us, plan_derived, write_derived_series
from dicomnode.pet_units import stored_suv_per_bqml
from dicomnode.preview import suv_scale
from dicomnode.volume import SeriesVolume, VolumeError, coverage_fraction, load_series, resample_onto
from model.enhance import Enhancer

__all__ = ["EnhanceResult", "enhance_series", "check_pet_series", "MIN_CT_COVERAGE", "CT_OUTSIDE_HU"]

log = logging.getLogger("upete.pipeline")

#: A CT must cover at least this fraction of the PET volume (voxel centres) to be used.
MIN_CT_COVERAGE = 0.9
#: Value of PET-grid voxels outside the CT: air.
CT_OUTSIDE_HU = -1000.0

# Share of the overall progress each stage reports in (load, resample, enhance, write).
_PROGRESS = {"load": (0.0, 0.1), "resample": (0.1, 0.15), "enhance": (0.15, 0.9), "write": (0.9, 1.0)}


@dataclass(frozen=True)
class EnhanceResult:
    """What one run produced: the derived files (slice order), the plan used, seconds per stage.

    ``enhance_seconds``: the enhancer's own stages within ``enhance`` (encode, sample, …) when it
    records them (a ``timings`` dict, as :class:`~model.enhancers.diffusion.DiffusionEnhancer` does).
    """

    paths: list[Path]
    plan: DerivedPlan
    seconds_by_stage: dict[str, float]
    ct_used: bool = False
    notes: list[str] = field(default_factory=list)
    enhance_seconds: dict[str, float] = field(default_factory=dict)


#: Largest relative difference between the SUVbw the headers give and the one a vendor stored.
SUV_TOLERANCE = 0.01


def check_pet_series(pet: SeriesVolume) -> None:
    """Refuse a PET series the node must not enhance: not PT, not Bq/ml, not attenuation corrected, ours,
    or with headers whose SUVbw contradicts the SUV the vendor stored.

    ``pet`` comes from :func:`load_series`, which has already made counts with their scale factor Bq/ml.
    """
    first = pet.datasets[0]
    if pet.modality != "PT":
        raise VolumeError(f"the PET series has Modality {pet.modality or 'missing'}, expected PT")
    units = str(first.get("Units", "") or "")
    if units == "CNTS":
        raise VolumeError("the PET series has Units CNTS without Philips' Activity Concentration Scale "
                          "Factor (7053,1009); counts cannot be made Bq/ml")
    if units != "BQML":
        raise VolumeError(f"the PET series has Units {units or 'missing'}; only BQML (Bq/ml) can be enhanced")
    corrected = [str(v) for v in (first.get("CorrectedImage") or [])]
    if "ATTN" not in corrected:
        raise VolumeError("the PET series is not attenuation corrected (CorrectedImage lacks ATTN)")
    if is_derived_by_us(first):
        raise VolumeError("the PET series is a derived series this node produced; it is not enhanced again")
    _check_stored_suv(first)


def _check_stored_suv(ds: Dataset) -> None:
    """The derived series carries the SUV the headers give; refuse when the vendor's own SUV differs."""
    stored = stored_suv_per_bqml(ds)
    scale = suv_scale(ds)
    if stored is None or scale.unit != "SUVbw":
        return
    if abs(scale.factor / stored - 1) > SUV_TOLERANCE:
        raise VolumeError(f"the SUV Scale Factor (7053,1000) gives {stored:.6g} SUV per Bq/ml, the headers "
                          f"(PatientWeight, RadionuclideTotalDose, injection and series times) "
                          f"{scale.factor:.6g}: the derived series would show another SUV")


def _reporter(progress: Callable[[float, str], None] | None, stage: str) -> Callable[[float, str], None]:
    low, high = _PROGRESS[stage]

    def report(fraction: float, detail: str) -> None:
        if progress is not None:
            progress(low + (high - low) * min(max(fraction, 0.0), 1.0), detail)

    return report


def _load_ct(ct_paths: Sequence[str | os.PathLike[str]], pet: SeriesVolume) -> SeriesVolume:
    ct = load_series(ct_paths)
    if ct.modality != "CT":
        raise VolumeError(f"the CT series has Modality {ct.modality or 'missing'}, expected CT")
    if ct.frame_of_reference_uid != pet.frame_of_reference_uid:
        raise VolumeError("the CT and the PET have different Frames of Reference; their coordinates "
                          "cannot be matched without a registration")
    return ct


def enhance_series(
    pet_paths: Sequence[str | os.PathLike[str]],
    ct_paths: Sequence[str | os.PathLike[str]] | None,
    enhancer: Enhancer,
    out_dir: str | os.PathLike[str],
    *,
    output: OutputSettings,
    plan: DerivedPlan | None = None,
    progress: Callable[[float, str], None] | None = None,
) -> EnhanceResult:
    """Enhance the PET series in ``pet_paths`` and write its derived series into ``out_dir``.

    ``ct_paths`` (or None) is the CT of the same study and frame of reference; it is loaded only when
    the enhancer uses a CT. ``plan`` fixes the derived UIDs (a rerun passes the job's stored plan);
    None plans fresh ones. ``progress(fraction, stage)`` gets 0 ≤ fraction ≤ 1 for the whole run.
    Raises :class:`VolumeError` for unusable input.
    """
    seconds: dict[str, float] = {}
    notes: list[str] = []
    started = time.perf_counter()
    _reporter(progress, "load")(0.0, "load")
    pet = load_series(pet_paths)
    check_pet_series(pet)
    info = enhancer.info
    ct = None
    if ct_paths and info.uses_ct:
        ct = _load_ct(ct_paths, pet)
    elif ct_paths:
        notes.append(f"{info.name} does not use a CT; the CT was not loaded")
    if info.requires_ct and ct is None:
        raise VolumeError(f"{info.name} needs a CT and none is available for this PET series")
    seconds["load"] = time.perf_counter() - started

    ct_on_pet = None
    if ct is not None:
        started = time.perf_counter()
        _reporter(progress, "resample")(0.0, "resample")
        coverage = coverage_fraction(ct.image, pet.image)
        if coverage < MIN_CT_COVERAGE:
            raise VolumeError(f"the CT covers {coverage:.0%} of the PET volume, at least "
                              f"{MIN_CT_COVERAGE:.0%} is needed")
        ct_on_pet = resample_onto(ct.image, pet.image, default_value=CT_OUTSIDE_HU)
        seconds["resample"] = time.perf_counter() - started

    if plan is None:
        plan = plan_derived(pet.datasets, output)
    elif set(plan.sop_uids) != {str(ds.SOPInstanceUID) for ds in pet.datasets}:
        raise VolumeError("the stored derived-series plan does not match the PET instances on disk")

    started = time.perf_counter()
    enhanced = enhancer.enhance(pet.image, ct_on_pet, progress=_reporter(progress, "enhance"))
    seconds["enhance"] = time.perf_counter() - started
    enhance_seconds = dict(getattr(enhancer, "timings", None) or {})

    started = time.perf_counter()
    _reporter(progress, "write")(0.0, "write")
    paths = write_derived_series(pet.datasets, enhanced, plan, info=info, output=output, out_dir=out_dir)
    seconds["write"] = time.perf_counter() - started
    _reporter(progress, "write")(1.0, "done")
    fields = {"pet_series_uid": pet.series_uid, "derived_series_uid": plan.series_uid,
              "instances": len(paths), "ct_used": ct is not None,
              **{f"{k}_s": f"{v:.3f}" for k, v in seconds.items()}}
    log.info("series enhanced", extra={"fields": fields})
    return EnhanceResult(paths=paths, plan=plan, seconds_by_stage=seconds, ct_used=ct is not None,
                         notes=notes, enhance_seconds=enhance_seconds)
