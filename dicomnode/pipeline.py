"""One PET series (and its CT) through the enhancer into a derived series: the worker's and
``upete enhance``'s shared path.

load PET (+ CT) → is the CT usable? → CT resampled onto the PET grid → ``enhancer.enhance`` →
derived series on disk. Unusable input raises :class:`~dicomnode.volume.VolumeError` with the reason a
job fails for.

A CT is used when it shares the PET's Frame of Reference and covers the patient's body
(:mod:`dicomnode.ct_coverage`: judged over the body the PET shows, not over the PET's box); outside its
field of view the model sees air (``CT_OUTSIDE_HU``, −1000 HU, as in training). A CT that misses part
of the patient is not used: a model that needs one is replaced by the PET-only model, and the reason
("PET-only model: …") goes into the result, the log and the derived series' DerivationDescription.
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
from dicomnode.ct_coverage import CT_OUTSIDE_HU, judge_ct
from dicomnode.derived import DerivedPlan, is_derived_by_us, plan_derived, write_derived_series
from dicomnode.pet_units import stored_suv_per_bqml
from dicomnode.preview import suv_scale
from dicomnode.volume import SeriesVolume, VolumeError, load_series, resample_onto
from model.enhance import Enhancer, EnhancerInfo

__all__ = ["EnhanceResult", "enhance_series", "check_pet_series", "CT_OUTSIDE_HU"]

log = logging.getLogger("upete.pipeline")

# Share of the overall progress each stage reports in (load, resample, enhance, write).
_PROGRESS = {"load": (0.0, 0.1), "resample": (0.1, 0.15), "enhance": (0.15, 0.9), "write": (0.9, 1.0)}


@dataclass(frozen=True)
class EnhanceResult:
    """What one run produced: the derived files (slice order), the plan used, seconds per stage.

    ``enhance_seconds``: the enhancer's own stages within ``enhance`` (encode, sample, …) when it
    records them (a ``timings`` dict, as :class:`~model.enhancers.diffusion.DiffusionEnhancer` does).
    ``info``: the model that ran; ``ct_note``: why a model that looks at a CT ran without one
    ("PET-only model: …"), None when the CT was used or the model never looks at one.
    """

    paths: list[Path]
    plan: DerivedPlan
    seconds_by_stage: dict[str, float]
    info: EnhancerInfo
    ct_used: bool = False
    ct_note: str | None = None
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


def _usable_ct(
    ct_paths: Sequence[str | os.PathLike[str]], pet: SeriesVolume
) -> tuple[SeriesVolume | None, str]:
    """(the CT, "") when it covers the patient, else (None, why not). Unreadable files raise VolumeError."""
    ct = load_series(ct_paths)
    if ct.modality != "CT":
        raise VolumeError(f"the CT series has Modality {ct.modality or 'missing'}, expected CT")
    if ct.frame_of_reference_uid != pet.frame_of_reference_uid:
        return None, ("the CT has another Frame of Reference (FrameOfReferenceUID) than the PET: their "
                      "coordinates cannot be matched without a registration")
    coverage = judge_ct(pet.image, ct.image)
    fields = {"pet_series_uid": pet.series_uid, "ct_series_uid": ct.series_uid,
              "body_axial": f"{coverage.axial:.3f}", "body_inside": f"{coverage.inside:.3f}"}
    log.info("CT coverage of the patient", extra={"fields": fields})
    refusal = coverage.refusal
    return (None, refusal) if refusal else (ct, "")


# How a note begins: the PET-only model ran, or the main model ran without the CT it could use.
_PET_ONLY, _NO_CT = "PET-only model: ", "without the CT: "


def _choose_model(main: Enhancer, without_ct: Enhancer | None, why_no_ct: str) -> tuple[Enhancer, str]:
    """The model to run when no usable CT is there, and the note saying so (VolumeError if none can)."""
    # A rerun passes the note the first run stored: its reason, not a second prefix.
    why_no_ct = why_no_ct.removeprefix(_PET_ONLY).removeprefix(_NO_CT)
    if not main.info.requires_ct:
        return main, f"{_NO_CT}{why_no_ct}"
    if without_ct is None:
        raise VolumeError(f"{main.info.name} needs a CT and none is usable ({why_no_ct}); "
                          "model.checkpoint_without_ct is not set")
    return without_ct, f"{_PET_ONLY}{why_no_ct}"


def enhance_series(
    pet_paths: Sequence[str | os.PathLike[str]],
    ct_paths: Sequence[str | os.PathLike[str]] | None,
    enhancer: Enhancer,
    out_dir: str | os.PathLike[str],
    *,
    output: OutputSettings,
    plan: DerivedPlan | None = None,
    progress: Callable[[float, str], None] | None = None,
    without_ct: Enhancer | None = None,
    no_ct_reason: str | None = None,
) -> EnhanceResult:
    """Enhance the PET series in ``pet_paths`` and write its derived series into ``out_dir``.

    ``ct_paths`` (or None) is the CT of the same study; it is loaded only when the enhancer uses a CT,
    and used only when it covers the patient (module doc). When it is absent or not usable, an
    ``enhancer`` that needs a CT is replaced by ``without_ct`` (the PET-only model), and the reason —
    ``no_ct_reason`` when the caller had no CT to give, else the coverage rule's — is recorded as the
    result's ``ct_note`` and in the derived series. ``plan`` fixes the derived UIDs (a rerun passes the
    job's stored plan); None plans fresh ones. ``progress(fraction, stage)`` gets 0 ≤ fraction ≤ 1 for
    the whole run. Raises :class:`VolumeError` for unusable input.
    """
    seconds: dict[str, float] = {}
    notes: list[str] = []
    started = time.perf_counter()
    _reporter(progress, "load")(0.0, "load")
    pet = load_series(pet_paths)
    check_pet_series(pet)
    ct, ct_note = None, None
    if enhancer.info.uses_ct:
        if ct_paths:
            ct, why_no_ct = _usable_ct(ct_paths, pet)
        else:
            why_no_ct = no_ct_reason or "no CT of the study was given"
        if ct is None:
            enhancer, ct_note = _choose_model(enhancer, without_ct, why_no_ct)
            log.warning("enhancing without the CT", extra={"fields": {"pet_series_uid": pet.series_uid,
                                                                      "reason": ct_note}})
    elif ct_paths:
        notes.append(f"{enhancer.info.name} does not use a CT; the CT was not loaded")
    info = enhancer.info
    seconds["load"] = time.perf_counter() - started

    ct_on_pet = None
    if ct is not None:
        started = time.perf_counter()
        _reporter(progress, "resample")(0.0, "resample")
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
    paths = write_derived_series(pet.datasets, enhanced, plan, info=info, output=output, out_dir=out_dir,
                                 note=ct_note)
    seconds["write"] = time.perf_counter() - started
    _reporter(progress, "write")(1.0, "done")
    fields = {"pet_series_uid": pet.series_uid, "derived_series_uid": plan.series_uid,
              "instances": len(paths), "ct_used": ct is not None, "model": info.name,
              "model_version": info.version, **{f"{k}_s": f"{v:.3f}" for k, v in seconds.items()}}
    log.info("series enhanced", extra={"fields": fields})
    return EnhanceResult(paths=paths, plan=plan, seconds_by_stage=seconds, info=info, ct_used=ct is not None,
                         ct_note=ct_note, notes=notes, enhance_seconds=enhance_seconds)
