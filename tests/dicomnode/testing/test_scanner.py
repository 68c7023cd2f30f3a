"""dicomnode/testing/scanner.py: scanner-like series that dciodvfy accepts and that round-trip values."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    PositronEmissionTomographyImageStorage,
    RLELossless,
)

from dicomnode.testing.scanner import StudyInfo, write_ct_series, write_pet_series
from tests.conftest import require_tool
from tests.support.dicomutil import dcentvfy_errors, dciodvfy_errors


def _activity(shape=(5, 12, 10), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    activity = rng.gamma(2.0, 2000.0, shape).astype(np.float32)
    activity[2] *= 10  # slices of very different range → different slopes
    return activity


def _by_instance(paths: list[Path]) -> list[pydicom.Dataset]:
    return sorted((pydicom.dcmread(p) for p in paths), key=lambda ds: int(ds.InstanceNumber))


def test_pet_series_is_dciodvfy_clean_and_complete(tmp_path: Path) -> None:
    study = StudyInfo()
    activity = _activity()
    paths = write_pet_series(tmp_path, activity, spacing_mm=(3.0, 2.0, 2.5), origin_mm=(-10.0, -20.0, 5.0),
                             study=study, series_number=7)
    assert len(paths) == activity.shape[0]
    for path in paths:
        assert dciodvfy_errors(path) == []
    assert dcentvfy_errors(paths) == []
    datasets = _by_instance(paths)
    first = datasets[0]
    assert first.SOPClassUID == PositronEmissionTomographyImageStorage
    assert first.Modality == "PT" and first.Units == "BQML" and first.DecayCorrection == "START"
    assert "ATTN" in first.CorrectedImage and "DECY" in first.CorrectedImage
    assert int(first.NumberOfSlices) == activity.shape[0]
    assert float(first.PatientWeight) == pytest.approx(study.weight_kg)
    assert float(first.PatientSize) == pytest.approx(study.height_m)
    radio = first.RadiopharmaceuticalInformationSequence[0]
    assert float(radio.RadionuclideTotalDose) == pytest.approx(study.injected_activity_bq)
    assert float(radio.RadionuclideHalfLife) == pytest.approx(study.half_life_s)
    assert radio.RadiopharmaceuticalStartDateTime == study.study_date + study.injection_time
    assert radio.RadionuclideCodeSequence[0].CodeValue == "77004003"
    assert radio.RadiopharmaceuticalCodeSequence[0].CodeValue == "35321007"
    assert float(first.DecayFactor) > 1.0
    assert int(first.ActualFrameDuration) == 180000
    assert "PatientPosition" not in first  # forbidden beside PatientOrientationCodeSequence
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    assert {ds.SeriesInstanceUID for ds in datasets} == {datasets[0].SeriesInstanceUID}
    assert {ds.StudyInstanceUID for ds in datasets} == {study.study_uid}
    assert {ds.FrameOfReferenceUID for ds in datasets} == {study.frame_of_reference_uid}
    assert int(first.SeriesNumber) == 7


def test_pet_pixels_are_uint16_with_a_slope_per_slice(tmp_path: Path) -> None:
    activity = _activity()
    datasets = _by_instance(write_pet_series(tmp_path, activity, study=StudyInfo()))
    slopes = [float(ds.RescaleSlope) for ds in datasets]
    assert len(set(slopes)) == len(slopes)
    for k, ds in enumerate(datasets):
        assert ds.pixel_array.dtype == np.uint16 and ds.PixelRepresentation == 0 and ds.BitsStored == 16
        assert float(ds.RescaleIntercept) == 0
        assert ds.pixel_array.max() == 65535  # the full range is used
        # within half a quantisation step of what was written
        np.testing.assert_allclose(ds.pixel_array * slopes[k], activity[k], atol=slopes[k] / 2 + 1e-6)


def test_geometry_follows_spacing_origin_and_slice_order(tmp_path: Path) -> None:
    datasets = _by_instance(write_pet_series(tmp_path, _activity(), spacing_mm=(3.0, 2.0, 2.5),
                                             origin_mm=(-10.0, -20.0, 5.0), study=StudyInfo()))
    for k, ds in enumerate(datasets):
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], [-10.0, -20.0, 5.0 + 3.0 * k])
        assert [float(v) for v in ds.PixelSpacing] == [2.0, 2.5]  # row spacing (y), column spacing (x)
        assert float(ds.SliceThickness) == 3.0
        assert ds.Rows == 12 and ds.Columns == 10


def test_negative_activity_is_stored_signed(tmp_path: Path) -> None:
    activity = _activity() - 3000.0
    datasets = _by_instance(write_pet_series(tmp_path, activity, study=StudyInfo()))
    assert datasets[0].PixelRepresentation == 1
    assert dciodvfy_errors(datasets[0].filename) == []
    for k, ds in enumerate(datasets):
        slope = float(ds.RescaleSlope)
        np.testing.assert_allclose(ds.pixel_array * slope, activity[k], atol=slope / 2 + 1e-6)


def test_nac_and_units_options(tmp_path: Path) -> None:
    nac = pydicom.dcmread(write_pet_series(tmp_path / "nac", _activity(), study=StudyInfo(),
                                           attenuation_corrected=False)[0])
    assert "ATTN" not in nac.CorrectedImage and "AttenuationCorrectionMethod" not in nac
    assert dciodvfy_errors(Path(nac.filename)) == []
    counts = write_pet_series(tmp_path / "cnts", _activity(), study=StudyInfo(), units="CNTS")
    counts = pydicom.dcmread(counts[0])
    assert counts.Units == "CNTS"


def test_shuffle_hides_the_slice_order(tmp_path: Path) -> None:
    paths = write_pet_series(tmp_path, _activity(shape=(12, 4, 4)), study=StudyInfo(), shuffle_seed=3)
    instances = [int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) for p in paths]
    assert instances != sorted(instances)  # returned order is shuffled
    by_name = [int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) for p in sorted(paths)]
    assert by_name != sorted(by_name)  # and so are the file names
    assert sorted(instances) == list(range(1, 13))
    # deterministic for a seed
    again = write_pet_series(tmp_path / "again", _activity(shape=(12, 4, 4)), study=StudyInfo(),
                             shuffle_seed=3)
    assert [p.name for p in again] == [p.name for p in paths]


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, RLELossless, JPEGLSLossless,
                                    DeflatedExplicitVRLittleEndian])
def test_transfer_syntaxes_round_trip(tmp_path: Path, syntax: str) -> None:
    activity = _activity(shape=(3, 8, 8))
    plain = _by_instance(write_pet_series(tmp_path / "plain", activity, study=StudyInfo()))
    coded = _by_instance(write_pet_series(tmp_path / "coded", activity, study=StudyInfo(),
                                          transfer_syntax=syntax))
    for a, b in zip(plain, coded, strict=True):
        assert b.file_meta.TransferSyntaxUID == syntax
        np.testing.assert_array_equal(a.pixel_array, b.pixel_array)
    path = Path(coded[0].filename)
    if syntax == DeflatedExplicitVRLittleEndian:
        # dciodvfy does not read deflated files: inflate with DCMTK and check what it holds.
        inflated = tmp_path / "inflated.dcm"
        dcmconv = require_tool("/usr/bin/dcmconv")
        subprocess.run([dcmconv, "+te", str(path), str(inflated)], check=True, timeout=30)
        path = inflated
    assert dciodvfy_errors(path) == []


def test_ct_series_is_dciodvfy_clean_and_in_hu(tmp_path: Path) -> None:
    study = StudyInfo()
    hu = np.linspace(-1000, 1500, 3 * 6 * 7).reshape(3, 6, 7).round()
    paths = write_ct_series(tmp_path, hu, spacing_mm=(2.0, 1.0, 1.5), study=study)
    datasets = _by_instance(paths)
    for ds in datasets:
        assert dciodvfy_errors(Path(ds.filename)) == []
    assert datasets[0].SOPClassUID == CTImageStorage and datasets[0].Modality == "CT"
    assert datasets[0].PatientPosition == "HFS" and float(datasets[0].KVP) > 0
    for k, ds in enumerate(datasets):
        values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(values, hu[k])
    assert dcentvfy_errors(paths + write_pet_series(tmp_path / "pt", _activity(), study=study)) == []


@pytest.mark.parametrize(("intercept", "signed", "bits"), [(-1024.0, True, 16), (0.0, True, 16),
                                                        (-1024.0, False, 12)])
def test_ct_pixel_storage_options_keep_hu(tmp_path: Path, intercept: float, signed: bool, bits: int) -> None:
    hu = np.linspace(-1000, 1500, 2 * 6 * 7).reshape(2, 6, 7).round()
    paths = write_ct_series(tmp_path, hu, study=StudyInfo(), rescale_intercept=intercept,
                            signed_pixels=signed, bits_stored=bits)
    for k, ds in enumerate(_by_instance(paths)):
        assert (ds.PixelRepresentation, ds.BitsStored, float(ds.RescaleIntercept)) == (int(signed), bits,
                                                                                    intercept)
        np.testing.assert_array_equal(ds.pixel_array * float(ds.RescaleSlope) + intercept, hu[k])
        assert dciodvfy_errors(Path(ds.filename)) == []


def test_signed_pet_pixels_and_the_edit_hook(tmp_path: Path) -> None:
    def edit(ds: pydicom.Dataset, k: int) -> None:
        ds.Manufacturer = f"vendor {k}"

    paths = write_pet_series(tmp_path, _activity(), study=StudyInfo(), signed_pixels=True, edit=edit)
    datasets = _by_instance(paths)
    assert all(ds.PixelRepresentation == 1 and ds.pixel_array.dtype == np.int16 for ds in datasets)
    assert [ds.Manufacturer for ds in datasets] == [f"vendor {k}" for k in range(len(datasets))]
    with pytest.raises(ValueError, match="negative"):
        write_pet_series(tmp_path / "neg", -_activity(), study=StudyInfo(), signed_pixels=False)


def test_scanner_sins_are_real_errors(tmp_path: Path) -> None:
    path = write_pet_series(tmp_path, _activity(), study=StudyInfo(), scanner_sins=True)[0]
    errors = dciodvfy_errors(path)
    assert any("PatientPosition" in line for line in errors)
    assert any("CollimatorType" in line for line in errors)
    ds = pydicom.dcmread(path)
    assert ds.PatientPosition == "HFS" and "PatientOrientationCodeSequence" in ds


def test_study_info_generates_fresh_uids() -> None:
    a, b = StudyInfo(), StudyInfo()
    assert a.study_uid != b.study_uid and a.frame_of_reference_uid != b.frame_of_reference_uid


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"activity_bqml": np.zeros((4, 4))}, "(z, y, x)"),
        ({"activity_bqml": np.full((2, 4, 4), np.nan)}, "NaN"),
        ({"spacing_mm": (0.0, 1.0, 1.0)}, "spacing_mm"),
        ({"orientation": (1, 0, 0, 1, 0, 0)}, "orthonormal"),
        ({"dose_fraction_note": 1.5}, "dose_fraction_note"),
    ],
)
def test_invalid_arguments_are_refused(tmp_path: Path, kwargs: dict, message: str) -> None:
    arguments = {"activity_bqml": np.ones((2, 4, 4)), "study": StudyInfo(), **kwargs}
    with pytest.raises(ValueError, match=message):
        write_pet_series(tmp_path, **arguments)


def test_dose_fraction_note_and_explicit_series_uid(tmp_path: Path) -> None:
    ds = pydicom.dcmread(write_pet_series(tmp_path, _activity(), study=StudyInfo(), series_uid="1.2.3.4",
                                          dose_fraction_note=0.1, transfer_syntax=ExplicitVRLittleEndian)[0])
    assert ds.SeriesInstanceUID == "1.2.3.4"
    assert "0.1" in ds.ImageComments
