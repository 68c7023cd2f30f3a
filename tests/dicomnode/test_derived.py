"""dicomnode/derived.py: the derived PET series — valid, same geometry, referenced, quantitative."""

from __future__ import annotations

import copy
import logging
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dicomnode.config import OutputSettings
from dicomnode.derived import DerivedPlan, is_derived_by_us, plan_derived, write_derived_series
from dicomnode.volume import load_series
from model.enhance import EnhancerInfo, GaussianEnhancer
from tests.support.dicomutil import dcentvfy_errors, dciodvfy_errors, make_study

INFO = EnhancerInfo(name="Test enhancer", version="v1.2", description="test enhancement, scaled copy",
                    uses_ct=False, requires_ct=False)
OUTPUT = OutputSettings(series_description_suffix=" uPETe", series_number_offset=1000)


def _derive(tmp_path: Path, *, scanner_sins: bool = False, enhance=None, plan: DerivedPlan | None = None,
            sources=None):
    study = make_study(tmp_path / "in", scanner_sins=scanner_sins)
    volume = load_series(study.pet_paths)
    sources = sources if sources is not None else volume.datasets
    enhanced = enhance(volume.image) if enhance else GaussianEnhancer().enhance(volume.image)
    plan = plan or plan_derived(sources, OUTPUT)
    paths = write_derived_series(sources, enhanced, plan, info=INFO, output=OUTPUT, out_dir=tmp_path / "out")
    return study, volume, enhanced, plan, paths


def _bqml(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _suv_factor(ds: pydicom.Dataset) -> float:
    """SUVbw per Bq/ml (decay to the series start, DecayCorrection START), as SUV tools compute it."""
    radio = ds.RadiopharmaceuticalInformationSequence[0]
    injected = datetime.strptime(str(radio.RadiopharmaceuticalStartDateTime)[:14], "%Y%m%d%H%M%S")
    start = datetime.strptime(str(ds.SeriesDate) + str(ds.SeriesTime)[:6], "%Y%m%d%H%M%S")
    dose = float(radio.RadionuclideTotalDose) * 0.5 ** ((start - injected).total_seconds()
                                                      / float(radio.RadionuclideHalfLife))
    return float(ds.PatientWeight) * 1000.0 / dose


@pytest.mark.parametrize("scanner_sins", [False, True], ids=["clean-input", "input-with-scanner-sins"])
def test_every_instance_passes_dciodvfy(tmp_path: Path, scanner_sins: bool) -> None:
    study, _, _, _, paths = _derive(tmp_path, scanner_sins=scanner_sins)
    if scanner_sins:
        assert dciodvfy_errors(study.pet_paths[0])  # the input really is broken
    assert len(paths) == 24
    for path in paths:
        assert dciodvfy_errors(path) == [], path
    # consistent with its study: same patient/study attributes as the source and the CT
    assert dcentvfy_errors(paths + study.pet_paths + study.ct_paths) == []
    ds = pydicom.dcmread(paths[0])
    assert "PatientPosition" not in ds
    assert ds.PatientGantryRelationshipCodeSequence[0].CodeValue == "102540008"  # from HFS when missing
    radionuclide = ds.RadiopharmaceuticalInformationSequence[0].RadionuclideCodeSequence[0]
    assert (radionuclide.CodingSchemeDesignator, radionuclide.CodeValue) == ("SCT", "77004003")


def test_geometry_uids_and_references(tmp_path: Path) -> None:
    study, volume, _, plan, paths = _derive(tmp_path)
    derived = [pydicom.dcmread(p) for p in paths]
    assert len({ds.SOPInstanceUID for ds in derived}) == len(derived)
    for source, ds in zip(volume.datasets, derived, strict=True):
        # same geometry, slice for slice
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            np.testing.assert_allclose([float(v) for v in ds[keyword].value],
                                       [float(v) for v in source[keyword].value])
        assert float(ds.SliceThickness) == float(source.SliceThickness)
        assert (ds.Rows, ds.Columns) == (source.Rows, source.Columns)
        # new series, same study / patient / frame of reference
        assert ds.SeriesInstanceUID == plan.series_uid != source.SeriesInstanceUID
        assert ds.SOPInstanceUID == plan.sop_uids[source.SOPInstanceUID]
        assert ds.SOPClassUID == source.SOPClassUID == pydicom.uid.PositronEmissionTomographyImageStorage
        for keyword in ("StudyInstanceUID", "FrameOfReferenceUID", "PatientID", "PatientName",
                        "AccessionNumber"):
            assert ds[keyword].value == source[keyword].value
        assert int(ds.InstanceNumber) == int(source.InstanceNumber)
        # references and derivation
        assert list(ds.ImageType) == ["DERIVED", "PRIMARY"]
        reference = ds.SourceImageSequence[0]
        assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert reference.ReferencedSOPClassUID == source.SOPClassUID
        assert reference.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        assert ds.DerivationCodeSequence[0].CodeValue == "113087"
        assert "Test enhancer" in ds.DerivationDescription and "v1.2" in ds.DerivationDescription
    first = derived[0]
    assert int(first.SeriesNumber) == 3 + 1000
    assert first.SeriesDescription == "PET AC uPETe"
    assert int(first.NumberOfSlices) == 24
    equipment = first.ContributingEquipmentSequence
    purposes = [item.PurposeOfReferenceCodeSequence[0].CodeValue for item in equipment]
    assert purposes == ["109101", "109102"]
    assert first.ContributingEquipmentSequence[1].Manufacturer == "uPETe node"
    assert first.ContributingEquipmentSequence[0].Manufacturer == volume.datasets[0].Manufacturer


def test_suv_attributes_are_preserved(tmp_path: Path) -> None:
    _, volume, _, _, paths = _derive(tmp_path)
    for source, path in zip(volume.datasets, paths, strict=True):
        ds = pydicom.dcmread(path)
        for keyword in ("Units", "DecayCorrection", "SeriesDate", "SeriesTime", "AcquisitionDate",
                        "AcquisitionTime", "PatientWeight", "PatientSize", "PatientSex", "CorrectedImage",
                        "DecayFactor", "FrameReferenceTime", "ActualFrameDuration", "ImageIndex",
                        "CountsSource", "SeriesType"):
            assert ds[keyword].value == source[keyword].value, keyword
        source_radio = source.RadiopharmaceuticalInformationSequence[0]
        radio = ds.RadiopharmaceuticalInformationSequence[0]
        for keyword in ("RadionuclideTotalDose", "RadionuclideHalfLife", "RadiopharmaceuticalStartDateTime",
                        "RadiopharmaceuticalStartTime"):
            assert radio[keyword].value == source_radio[keyword].value, keyword
        assert _suv_factor(ds) == _suv_factor(source)


def test_quantitation_pixel_times_slope_reproduces_the_enhanced_values(tmp_path: Path) -> None:
    _, _, enhanced, _, paths = _derive(tmp_path)
    expected = sitk.GetArrayFromImage(enhanced).astype(np.float64)
    stored = np.stack([_bqml(pydicom.dcmread(p)) for p in paths])
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        assert ds.pixel_array.dtype == np.uint16 and ds.BitsStored == 16 and float(ds.RescaleIntercept) == 0
        assert ds.pixel_array.max() == 65535
        assert np.abs(stored[k] - expected[k]).max() <= 1e-3 * expected[k].max()  # 0.1 % of the slice range
    assert stored.sum() == pytest.approx(expected.sum(), rel=1e-3)
    # and loading the derived series gives the same volume back
    reloaded = sitk.GetArrayFromImage(load_series(paths).image)
    np.testing.assert_allclose(reloaded, stored, rtol=1e-5, atol=1e-3)


def test_negative_values_are_clipped_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def with_negatives(image: sitk.Image) -> sitk.Image:
        out = sitk.GetArrayFromImage(image) - 2000.0
        result = sitk.GetImageFromArray(out.astype(np.float32))
        result.CopyInformation(image)
        return result

    with caplog.at_level(logging.INFO, logger="upete.derived"):
        _, _, enhanced, _, paths = _derive(tmp_path, enhance=with_negatives)
    values = np.stack([_bqml(pydicom.dcmread(p)) for p in paths])
    assert values.min() == 0
    expected = np.clip(sitk.GetArrayFromImage(enhanced), 0, None)
    assert values.sum() == pytest.approx(expected.sum(), rel=1e-3)
    records = [r for r in caplog.records if r.getMessage() == "negative activity clipped to 0"]
    assert records and int(records[0].fields["voxels"]) == int((sitk.GetArrayFromImage(enhanced) < 0).sum())


def test_rerun_with_the_same_plan_replaces_the_files(tmp_path: Path) -> None:
    _, volume, enhanced, plan, paths = _derive(tmp_path)
    again = write_derived_series(volume.datasets, enhanced, DerivedPlan.from_json(plan.to_json()), info=INFO,
                                 output=OUTPUT, out_dir=tmp_path / "out")
    assert again == paths
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)


def test_plan_json_round_trip_and_fresh_uids(tmp_path: Path) -> None:
    study = make_study(tmp_path)
    sources = load_series(study.pet_paths).datasets
    plan = plan_derived(sources, OUTPUT)
    assert DerivedPlan.from_json(plan.to_json()) == plan
    other = plan_derived(sources, OUTPUT)
    assert other.series_uid != plan.series_uid
    assert set(other.sop_uids.values()).isdisjoint(plan.sop_uids.values())
    assert set(plan.sop_uids) == {ds.SOPInstanceUID for ds in sources}


def test_is_derived_by_us(tmp_path: Path) -> None:
    _, volume, _, _, paths = _derive(tmp_path)
    derived = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert is_derived_by_us(derived)
    assert not is_derived_by_us(volume.datasets[0])
    # a PACS that rewrote General Equipment still leaves the contributing equipment
    derived.Manufacturer = "SomePACS"
    assert is_derived_by_us(derived)
    del derived.ContributingEquipmentSequence
    assert is_derived_by_us(derived)  # DerivationDescription still names us
    del derived.DerivationDescription
    assert not is_derived_by_us(derived)


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_broken_source_values_are_repaired(tmp_path: Path) -> None:
    """Scanner sins beyond the synthetic ones: bad VR values, PatientPosition without orientation codes."""
    study = make_study(tmp_path / "in")
    volume = load_series(study.pet_paths)
    sources = []
    for ds in volume.datasets:
        ds = copy.deepcopy(ds)
        del ds.PatientOrientationCodeSequence
        del ds.PatientGantryRelationshipCodeSequence
        del ds.DecayFactor
        ds.PatientPosition = "FFP"
        ds.CollimatorType = "none"  # CS must be upper case
        ds["PatientAge"] = pydicom.DataElement(0x00101010, "AS", "45")  # AS needs "045Y": dropped (Type 3)
        ds.SeriesDescription = "A" * 64
        sources.append(ds)
    enhanced = GaussianEnhancer().enhance(volume.image)
    plan = plan_derived(sources, OUTPUT)
    paths = write_derived_series(sources, enhanced, plan, info=INFO, output=OUTPUT, out_dir=tmp_path / "out")
    assert dciodvfy_errors(paths[0]) == []
    ds = pydicom.dcmread(paths[0])
    assert "PatientPosition" not in ds and "PatientAge" not in ds
    orientation = ds.PatientOrientationCodeSequence[0]
    assert orientation.PatientOrientationModifierCodeSequence[0].CodeMeaning == "prone"
    assert ds.PatientGantryRelationshipCodeSequence[0].CodeMeaning == "feet-first"
    assert ds.CollimatorType == "NONE"
    assert float(ds.DecayFactor) == pytest.approx(float(volume.datasets[0].DecayFactor), rel=1e-6)
    assert len(ds.SeriesDescription) == 64 and ds.SeriesDescription.endswith(" uPETe")


def test_mismatches_are_refused(tmp_path: Path) -> None:
    study = make_study(tmp_path / "in")
    volume = load_series(study.pet_paths)
    enhanced = GaussianEnhancer().enhance(volume.image)
    plan = plan_derived(volume.datasets, OUTPUT)
    kwargs = {"info": INFO, "output": OUTPUT, "out_dir": tmp_path / "out"}
    with pytest.raises(ValueError, match="slices"):
        write_derived_series(volume.datasets[:-1], enhanced, plan, **kwargs)
    shifted = sitk.Image(enhanced)
    shifted.SetOrigin((0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="not on the source grid"):
        write_derived_series(volume.datasets, shifted, plan, **kwargs)
    partial = DerivedPlan(plan.series_uid, dict(list(plan.sop_uids.items())[:-1]), plan.series_number)
    with pytest.raises(ValueError, match="no derived UID"):
        write_derived_series(volume.datasets, enhanced, partial, **kwargs)
    broken = sitk.GetArrayFromImage(enhanced)
    broken[0, 0, 0] = np.nan
    nan_image = sitk.GetImageFromArray(broken)
    nan_image.CopyInformation(enhanced)
    with pytest.raises(ValueError, match="NaN"):
        write_derived_series(volume.datasets, nan_image, plan, **kwargs)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_series_number_offset_and_missing_source_number(tmp_path: Path) -> None:
    study = make_study(tmp_path)
    sources = load_series(study.pet_paths).datasets
    assert plan_derived(sources, OutputSettings(series_number_offset=50)).series_number == 53
    without = [copy.deepcopy(ds) for ds in sources]
    for ds in without:
        del ds.SeriesNumber
    assert plan_derived(without, OutputSettings(series_number_offset=50)).series_number == 50


@pytest.mark.filterwarnings("ignore:The value length")
def test_patient_and_study_identity_is_copied_verbatim(tmp_path: Path) -> None:
    """Even an over-long PatientID stays as it is: the PACS must file the series with its source."""
    study = make_study(tmp_path / "in")
    volume = load_series(study.pet_paths)
    sources = [copy.deepcopy(ds) for ds in volume.datasets]
    for ds in sources:
        ds.PatientID = "ID-" + "7" * 70  # LO allows 64
    enhanced = GaussianEnhancer().enhance(volume.image)
    paths = write_derived_series(sources, enhanced, plan_derived(sources, OUTPUT), info=INFO, output=OUTPUT,
                                 out_dir=tmp_path / "out")
    assert pydicom.dcmread(paths[0]).PatientID == sources[0].PatientID
