"""dicomnode/pipeline.py: PET (+ CT) files → enhancer → derived series, as the worker runs it."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dicomnode.config import OutputSettings
from dicomnode.derived import DerivedPlan, plan_derived
from dicomnode.pipeline import CT_OUTSIDE_HU, enhance_series
from dicomnode.testing.scanner import StudyInfo, write_ct_series
from dicomnode.volume import VolumeError, load_series
from model.enhance import Enhancer, EnhancerInfo, GaussianEnhancer
from model.grid import AIR_HU
from tests.support.dicomutil import (
    CT_SHAPE,
    CT_SPACING,
    PET_SHAPE,
    PET_SPACING,
    dciodvfy_errors,
    make_study,
    origin_for,
    patient_points,
    phantom_hu,
)

OUTPUT = OutputSettings()


class CtRecorder(Enhancer):
    """Returns the PET unchanged and keeps the CT it was given (to check resampling)."""

    def __init__(self, *, requires_ct: bool = False) -> None:
        self.info = EnhancerInfo(name="CT recorder", version="0", description="identity, records the CT",
                                 uses_ct=True, requires_ct=requires_ct)
        self.ct: np.ndarray | None = None
        self.calls = 0

    def enhance_array(self, pet_bqml, ct_hu=None, *, spacing_mm, progress=None):
        self.calls += 1
        self.ct = None if ct_hu is None else ct_hu.copy()
        if progress:
            progress(0.5, "recording")
        return pet_bqml.copy()


def _bqml_sum(paths: list[Path]) -> float:
    return float(sitk.GetArrayFromImage(load_series(paths).image).astype(np.float64).sum())


def test_gaussian_enhancement_end_to_end(tmp_path: Path) -> None:
    study = make_study(tmp_path / "in")
    seen: list[tuple[float, str]] = []
    result = enhance_series(study.pet_paths, study.ct_paths, GaussianEnhancer(), tmp_path / "out",
                            output=OUTPUT, progress=lambda fraction, stage: seen.append((fraction, stage)))
    assert len(result.paths) == len(study.pet_paths)
    assert set(result.seconds_by_stage) == {"load", "enhance", "write"}  # the Gaussian needs no CT
    assert not result.ct_used and result.notes
    assert all(seconds >= 0 for seconds in result.seconds_by_stage.values())
    fractions = [fraction for fraction, _ in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    # total activity is kept (the filter smooths, it does not create or remove activity)
    assert _bqml_sum(result.paths) == pytest.approx(_bqml_sum(study.pet_paths), rel=0.02)
    derived = load_series(result.paths)
    assert derived.series_uid == result.plan.series_uid
    assert dciodvfy_errors(result.paths[0]) == []
    # smoother than the noisy input inside the uniform body region
    before = sitk.GetArrayFromImage(load_series(study.pet_paths).image)
    after = sitk.GetArrayFromImage(derived.image)
    body = (study.pet_bqml > 0) & (np.abs(study.pet_bqml - 5000) < 5000)
    assert after[12][body[12]].std() < before[12][body[12]].std()


def test_ct_is_resampled_onto_the_pet_grid(tmp_path: Path) -> None:
    study = make_study(tmp_path / "in")
    recorder = CtRecorder()
    result = enhance_series(study.pet_paths, study.ct_paths, recorder, tmp_path / "out", output=OUTPUT)
    assert result.ct_used and "resample" in result.seconds_by_stage
    assert recorder.ct is not None and recorder.ct.shape == PET_SHAPE
    # the CT seen by the model is the phantom's HU at the PET voxel centres (same anatomy, other grid)
    expected = phantom_hu(*patient_points(PET_SHAPE, PET_SPACING, study.pet_origin))
    agree = np.isclose(recorder.ct, expected, atol=1.0)
    assert agree.mean() > 0.9  # only voxels at tissue borders differ (interpolation)
    # identity enhancer → the derived series holds the input values
    np.testing.assert_allclose(sitk.GetArrayFromImage(load_series(result.paths).image),
                               sitk.GetArrayFromImage(load_series(study.pet_paths).image),
                               rtol=1e-4, atol=1e-3 * study.pet_bqml.max())


def test_stored_plan_is_reused_and_checked(tmp_path: Path) -> None:
    study = make_study(tmp_path / "in")
    plan = plan_derived(load_series(study.pet_paths).datasets, OUTPUT)
    first = enhance_series(study.pet_paths, None, GaussianEnhancer(), tmp_path / "out", output=OUTPUT,
                           plan=DerivedPlan.from_json(plan.to_json()))
    second = enhance_series(study.pet_paths, None, GaussianEnhancer(), tmp_path / "out", output=OUTPUT,
                            plan=plan)
    assert first.plan == second.plan == plan and first.paths == second.paths
    assert len(list((tmp_path / "out").iterdir())) == len(study.pet_paths)  # replaced, not duplicated
    foreign = DerivedPlan(plan.series_uid, {"1.2.3": "4.5.6"}, plan.series_number)
    with pytest.raises(VolumeError, match="plan does not match"):
        enhance_series(study.pet_paths, None, GaussianEnhancer(), tmp_path / "out2", output=OUTPUT,
                       plan=foreign)


def test_an_enhancer_that_needs_a_ct_fails_without_one(tmp_path: Path) -> None:
    study = make_study(tmp_path / "in")
    recorder = CtRecorder(requires_ct=True)
    with pytest.raises(VolumeError, match="needs a CT and none is usable .no CT of the study was given"):
        enhance_series(study.pet_paths, None, recorder, tmp_path / "out", output=OUTPUT)
    assert recorder.calls == 0
    result = enhance_series(study.pet_paths, None, recorder, tmp_path / "out", output=OUTPUT,
                            without_ct=GaussianEnhancer(), no_ct_reason="the study has no CT series")
    assert result.ct_note == "PET-only model: the study has no CT series" and recorder.calls == 0
    # A rerun of the job passes the note its first run stored.
    rerun = enhance_series(study.pet_paths, None, recorder, tmp_path / "out", output=OUTPUT,
                           without_ct=GaussianEnhancer(), no_ct_reason=result.ct_note)
    assert rerun.ct_note == result.ct_note
    optional = enhance_series(study.pet_paths, None, CtRecorder(), tmp_path / "out", output=OUTPUT,
                              no_ct_reason=result.ct_note)
    assert optional.ct_note == "without the CT: the study has no CT series"


def test_a_ct_narrower_than_the_pet_box_but_around_the_body_is_used(tmp_path: Path) -> None:
    # PET 128 mm across, CT 120 mm: the CT holds 88 % of the PET's box (refused by a box rule) and the
    # whole 110 mm body. Outside the CT's field of view the model sees air, as in training.
    study = make_study(tmp_path / "in", ct_shape=(30, 40, 40), ct_centre=(0.0, 0.0, 0.0))
    recorder = CtRecorder(requires_ct=True)
    result = enhance_series(study.pet_paths, study.ct_paths, recorder, tmp_path / "out", output=OUTPUT,
                            without_ct=GaussianEnhancer())
    assert result.ct_used and result.ct_note is None and result.info is recorder.info
    assert recorder.ct is not None and recorder.ct[:, 0, 0].tolist() == [CT_OUTSIDE_HU] * PET_SHAPE[0]
    assert CT_OUTSIDE_HU == AIR_HU
    ds = pydicom.dcmread(result.paths[0], stop_before_pixels=True)
    assert "PET-only" not in ds.DerivationDescription


def test_a_ct_that_misses_part_of_the_patient_runs_the_pet_only_model(tmp_path: Path) -> None:
    study = make_study(tmp_path / "in")
    other_frame = StudyInfo(study_uid=study.study.study_uid)  # same study, new frame of reference
    ct = phantom_hu(*patient_points(CT_SHAPE, CT_SPACING, origin_for(CT_SHAPE, CT_SPACING)))
    ct_paths = write_ct_series(tmp_path / "ct_for", ct, spacing_mm=CT_SPACING,
                               origin_mm=origin_for(CT_SHAPE, CT_SPACING), study=other_frame)
    recorder = CtRecorder(requires_ct=True)
    result = enhance_series(study.pet_paths, ct_paths, recorder, tmp_path / "for", output=OUTPUT,
                            without_ct=GaussianEnhancer())
    assert recorder.calls == 0 and not result.ct_used and result.info.name == "Gaussian filter"
    assert result.ct_note.startswith("PET-only model: the CT has another Frame of Reference")
    ds = pydicom.dcmread(result.paths[0], stop_before_pixels=True)
    assert ds.DerivationDescription.startswith(result.ct_note)
    assert ds.SeriesDescription.endswith(" Gaussian")
    assert dciodvfy_errors(result.paths[0]) == []

    short = (8, 48, 48)  # 24 mm of CT for the 72 mm of body the PET shows: cut axially
    ct_paths = write_ct_series(tmp_path / "ct_short", np.zeros(short), spacing_mm=CT_SPACING,
                               origin_mm=origin_for(short, CT_SPACING), study=study.study)
    result = enhance_series(study.pet_paths, ct_paths, recorder, tmp_path / "short", output=OUTPUT,
                            without_ct=GaussianEnhancer())
    assert recorder.calls == 0 and not result.ct_used
    assert result.ct_note.startswith("PET-only model: the CT's axial range holds 3")
    with pytest.raises(VolumeError, match="needs a CT and none is usable .the CT's axial range.*"
                                          "checkpoint_without_ct is not set"):
        enhance_series(study.pet_paths, ct_paths, recorder, tmp_path / "none", output=OUTPUT)


def test_pet_selection_rules(tmp_path: Path) -> None:
    study = make_study(tmp_path / "in", with_nac=True)
    with pytest.raises(VolumeError, match="not attenuation corrected"):
        enhance_series(study.nac_paths, None, GaussianEnhancer(), tmp_path / "out", output=OUTPUT)
    with pytest.raises(VolumeError, match="expected PT"):
        enhance_series(study.ct_paths, None, GaussianEnhancer(), tmp_path / "out", output=OUTPUT)
    # our own output is never enhanced again (loop guard)
    result = enhance_series(study.pet_paths, None, GaussianEnhancer(), tmp_path / "once", output=OUTPUT)
    with pytest.raises(VolumeError, match="this node produced"):
        enhance_series(result.paths, None, GaussianEnhancer(), tmp_path / "twice", output=OUTPUT)
    # units other than Bq/ml
    for path in study.pet_paths:
        ds = pydicom.dcmread(path)
        ds.Units = "CNTS"
        ds.save_as(path)
    with pytest.raises(VolumeError, match="Units CNTS"):
        enhance_series(study.pet_paths, None, GaussianEnhancer(), tmp_path / "out", output=OUTPUT)


def test_unusable_geometry_fails_with_the_reason(tmp_path: Path) -> None:
    study = make_study(tmp_path / "in")
    ds = pydicom.dcmread(study.pet_paths[0])
    position = copy.deepcopy(ds.ImagePositionPatient)
    position[2] = float(position[2]) + 1.3
    ds.ImagePositionPatient = position
    ds.save_as(study.pet_paths[0])
    with pytest.raises(VolumeError, match="uneven slice spacing"):
        enhance_series(study.pet_paths, study.ct_paths, GaussianEnhancer(), tmp_path / "out", output=OUTPUT)
    assert not (tmp_path / "out").exists()
