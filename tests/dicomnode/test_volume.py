"""dicomnode/volume.py: series → image in physical units, geometry checks, CT → PET resampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from dicomnode.testing.scanner import StudyInfo, write_ct_series, write_pet_series
from dicomnode.validate import read_received, validate_instance
from dicomnode.volume import VolumeError, load_series, resample_onto
from tests.support.dicomutil import PET_SPACING, make_study


def _array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def _rewrite(path: Path, **changes: object) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


def _write_raw(path: Path, keyword: str, vr: str, raw: bytes) -> None:
    """Put bytes that pydicom would refuse to encode (e.g. DS "abc") into a file, as a broken scanner does."""
    ds = pydicom.dcmread(path)
    tag = pydicom.datadict.tag_for_keyword(keyword)
    ds._dict[tag] = RawDataElement(Tag(tag), vr, len(raw), raw, 0, False, True)
    ds.save_as(path)


def _pet(tmp_path: Path, shape=(6, 5, 7), **kwargs) -> tuple[list[Path], np.ndarray]:
    rng = np.random.default_rng(1)
    activity = rng.gamma(2.0, 1000.0, shape).astype(np.float32) * np.arange(1, shape[0] + 1)[:, None, None]
    kwargs.setdefault("study", StudyInfo())
    return write_pet_series(tmp_path, activity, **kwargs), activity


def test_shuffled_pet_loads_in_bqml_on_its_grid(tmp_path: Path) -> None:
    study = make_study(tmp_path)
    volume = load_series(study.pet_paths)  # paths in shuffled order
    image = volume.image
    assert image.GetSize() == (32, 32, 24)
    np.testing.assert_allclose(image.GetSpacing(), (PET_SPACING[2], PET_SPACING[1], PET_SPACING[0]))
    np.testing.assert_allclose(image.GetOrigin(), study.pet_origin)
    np.testing.assert_allclose(image.GetDirection(), np.eye(3).ravel())
    assert image.GetPixelID() == sitk.sitkFloat32
    # per-slice slopes applied: within half a 16-bit step of the slice maximum
    expected = study.pet_bqml
    step = expected.max(axis=(1, 2)) / 65535
    assert np.all(np.abs(_array(image) - expected).max(axis=(1, 2)) <= step / 2 + 1e-3)
    assert [int(ds.InstanceNumber) for ds in volume.datasets] == list(range(1, 25))
    assert all("PixelData" not in ds for ds in volume.datasets)
    assert volume.modality == "PT" and volume.frame_of_reference_uid == study.study.frame_of_reference_uid


def test_sorting_uses_positions_not_instance_numbers(tmp_path: Path) -> None:
    paths, activity = _pet(tmp_path)
    for path in paths:  # scramble InstanceNumber: it must not matter
        ds = pydicom.dcmread(path)
        _rewrite(path, InstanceNumber=(int(ds.InstanceNumber) * 7) % 11)
    volume = load_series(list(reversed(paths)))
    np.testing.assert_allclose(_array(volume.image), activity, rtol=1e-4, atol=1e-3 * activity.max())
    z = [float(ds.ImagePositionPatient[2]) for ds in volume.datasets]
    assert z == sorted(z)


def test_oblique_orientation_maps_voxels_to_patient_positions(tmp_path: Path) -> None:
    angle = np.deg2rad(30)
    orientation = (np.cos(angle), np.sin(angle), 0.0, 0.0, 0.0, -1.0)  # oblique coronal-ish slices
    paths, activity = _pet(tmp_path, orientation=orientation, origin_mm=(5.0, -3.0, 40.0),
                           spacing_mm=(2.5, 3.0, 2.0))
    volume = load_series(paths)
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, col)
    # voxel (x=i, y=j, z=k) sits at origin + i·dx·row + j·dy·col + k·dz·normal
    i, j, k = 3, 2, 4
    expected = np.array([5.0, -3.0, 40.0]) + i * 2.0 * row + j * 3.0 * col + k * 2.5 * normal
    np.testing.assert_allclose(volume.image.TransformIndexToPhysicalPoint((i, j, k)), expected, atol=1e-6)
    assert _array(volume.image)[k, j, i] == pytest.approx(activity[k, j, i], rel=1e-3)


def test_ct_rescale_gives_hu(tmp_path: Path) -> None:
    hu = np.arange(-1000, -1000 + 4 * 5 * 6).reshape(4, 5, 6).astype(float)
    volume = load_series(write_ct_series(tmp_path, hu, study=StudyInfo()))
    np.testing.assert_array_equal(_array(volume.image), hu)
    assert volume.modality == "CT"


def test_uneven_spacing_is_refused(tmp_path: Path) -> None:
    paths, _ = _pet(tmp_path)
    ds = pydicom.dcmread(paths[3])
    _rewrite(paths[3], ImagePositionPatient=[ds.ImagePositionPatient[0], ds.ImagePositionPatient[1],
                                             float(ds.ImagePositionPatient[2]) + 1.0])
    with pytest.raises(VolumeError, match="uneven slice spacing"):
        load_series(paths)


def test_missing_slice_is_refused(tmp_path: Path) -> None:
    paths, _ = _pet(tmp_path)
    by_position = sorted(paths, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    with pytest.raises(VolumeError, match="missing"):
        load_series([p for p in by_position if p != by_position[2]])
    # the last slice missing leaves even spacing; NumberOfSlices tells
    with pytest.raises(VolumeError, match="5 of the 6 slices"):
        load_series(by_position[:-1])


def test_mixed_orientation_is_refused(tmp_path: Path) -> None:
    paths, _ = _pet(tmp_path)
    _rewrite(paths[2], ImageOrientationPatient=[1, 0, 0, 0, 0.9950042, 0.0998334])
    with pytest.raises(VolumeError, match="mixed orientation"):
        load_series(paths)


def test_different_rows_columns_are_refused(tmp_path: Path) -> None:
    paths, _ = _pet(tmp_path)
    other = write_pet_series(tmp_path / "other", np.ones((1, 6, 7), np.float32), study=StudyInfo())[0]
    ds = pydicom.dcmread(paths[0])
    replacement = pydicom.dcmread(other)
    replacement.SeriesInstanceUID = ds.SeriesInstanceUID
    replacement.ImagePositionPatient = ds.ImagePositionPatient
    replacement.save_as(paths[0])
    with pytest.raises(VolumeError, match="Rows differs"):
        load_series(paths)


def test_duplicate_position_mixed_series_and_junk_are_refused(tmp_path: Path) -> None:
    paths, _ = _pet(tmp_path / "a")
    copy = tmp_path / "copy.dcm"
    ds = pydicom.dcmread(paths[0])
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(copy)
    with pytest.raises(VolumeError, match="same position"):
        load_series([*paths, copy])
    others, _ = _pet(tmp_path / "b")
    with pytest.raises(VolumeError, match="SeriesInstanceUID differs"):
        load_series([*paths, others[0]])
    junk = tmp_path / "notes.txt"
    junk.write_text("not DICOM")
    with pytest.raises(VolumeError, match="cannot read as DICOM"):
        load_series([*paths, junk])
    with pytest.raises(VolumeError, match="no files"):
        load_series([])


def test_broken_pixel_data_and_rescale_are_refused(tmp_path: Path) -> None:
    paths, _ = _pet(tmp_path)
    _write_raw(paths[1], "RescaleSlope", "DS", b"abc ")
    with pytest.raises(VolumeError, match="RescaleSlope"):
        load_series(paths)
    paths, _ = _pet(tmp_path / "b")
    ds = pydicom.dcmread(paths[0])
    ds.PixelData = ds.PixelData[:-10]
    ds.save_as(paths[0])
    with pytest.raises(VolumeError, match="PixelData"):
        load_series(paths)


def test_resample_ct_onto_pet_through_patient_coordinates(tmp_path: Path) -> None:
    """A CT holding a linear function of patient position is reproduced exactly on the PET grid."""
    study = StudyInfo()
    ct_shape, ct_spacing, ct_origin = (20, 24, 22), (2.0, 2.5, 3.0), (-30.0, -28.0, -15.0)
    z, y, x = np.meshgrid(np.arange(ct_shape[0]) * ct_spacing[0] + ct_origin[2],
                          np.arange(ct_shape[1]) * ct_spacing[1] + ct_origin[1],
                          np.arange(ct_shape[2]) * ct_spacing[2] + ct_origin[0], indexing="ij")

    def field(x, y, z):
        return 2.0 * x - 3.0 * y + 5.0 * z  # within ±500 HU on this grid: no clipping

    ct_paths = write_ct_series(tmp_path / "ct", field(x, y, z), spacing_mm=ct_spacing, origin_mm=ct_origin,
                               study=study)
    ct = load_series(ct_paths)
    pet_paths, _ = _pet(tmp_path / "pet", shape=(8, 10, 12), spacing_mm=(4.0, 4.0, 4.0),
                        origin_mm=(-20.0, -18.0, 2.0), study=study)
    pet = load_series(pet_paths)
    on_pet = resample_onto(ct.image, pet.image, default_value=-1000.0)
    assert on_pet.GetSize() == pet.image.GetSize() and on_pet.GetOrigin() == pet.image.GetOrigin()
    pz, py, px = np.meshgrid(np.arange(8) * 4.0 + 2.0, np.arange(10) * 4.0 - 18.0,
                             np.arange(12) * 4.0 - 20.0, indexing="ij")
    expected = field(px, py, pz)
    values = _array(on_pet)
    inside = (pz <= ct_origin[2] + (ct_shape[0] - 1) * ct_spacing[0])
    np.testing.assert_allclose(values[inside], np.round(expected[inside]), atol=1.0)  # CT stores whole HU
    assert np.all(values[~inside] == -1000.0)  # beyond the CT: air


def _drop_half_life(ds: pydicom.Dataset, k: int) -> None:
    del ds.RadiopharmaceuticalInformationSequence[0].RadionuclideHalfLife


@pytest.mark.parametrize(("correction", "edit", "attribute"), [
    ("ADMIN", _drop_half_life, "RadionuclideHalfLife"),
    ("NONE", lambda ds, k: delattr(ds, "ActualFrameDuration"), "ActualFrameDuration"),
    ("ADMIN", lambda ds, k: delattr(ds.RadiopharmaceuticalInformationSequence[0],
                                    "RadiopharmaceuticalStartDateTime"), None),  # StartTime suffices
    ("LATER", None, "DecayCorrection"),
])
def test_decay_correction_conversion_needs_its_attributes(tmp_path: Path, correction, edit,
                                                          attribute) -> None:
    def change(ds: pydicom.Dataset, k: int) -> None:
        ds.DecayCorrection = correction
        if edit is not None:
            edit(ds, k)

    paths, _ = _pet(tmp_path, edit=change)
    if attribute is None:
        assert load_series(paths).datasets[0].DecayCorrection == "START"
        return
    with pytest.raises(VolumeError, match=attribute):
        load_series(paths)


def test_admin_decay_correction_becomes_start_with_the_same_suv(tmp_path: Path) -> None:
    study = StudyInfo()  # injection 08:30, scan 09:30: an hour of 18F decay
    paths, activity = _pet(tmp_path, edit=lambda ds, k: setattr(ds, "DecayCorrection", "ADMIN"), study=study)
    volume = load_series(paths)
    decay = 0.5 ** (3600.0 / study.half_life_s)
    np.testing.assert_allclose(_array(volume.image), activity * decay, rtol=1e-4, atol=1e-3 * activity.max())
    first = volume.datasets[0]
    assert (first.DecayCorrection, first.Units) == ("START", "BQML")
    assert first.SeriesTime.startswith(study.acquisition_time)  # the decay reference SUV tools use


# Total-body PET/CT: 600 slices at 2–3 mm, PET 256² or 360² of 2 mm pixels, CT 600 × 512² over a
# 500–700 mm field. No size rule meant for hostile input may refuse it.
TOTAL_BODY_SLICES = 600


def test_total_body_instances_pass_the_receive_checks(tmp_path: Path) -> None:
    study = StudyInfo()
    top = (TOTAL_BODY_SLICES - 1) * 3.0
    pet = write_pet_series(tmp_path / "pet", np.full((1, 360, 360), 5000.0, np.float32),
                           spacing_mm=(3.0, 2.0, 2.0), origin_mm=(-359.0, -359.0, top), study=study)
    ct = write_ct_series(tmp_path / "ct", np.zeros((1, 512, 512), np.float32), spacing_mm=(3.0, 1.367, 1.367),
                         origin_mm=(-349.6, -349.6, top), study=study)
    for path in pet + ct:
        ds = read_received(path)
        meta = validate_instance(ds, sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID)
        assert (meta.rows, meta.columns) in ((360, 360), (512, 512))


def test_total_body_extents_load_and_absurd_extents_are_still_refused(tmp_path: Path) -> None:
    # The volume rules look at extents (count × spacing), not at bytes: a few pixels of the real
    # pixel spacing × matrix test the same rules as the full matrix, without 1 GB of test files.
    study = StudyInfo()
    pet = write_pet_series(tmp_path / "pet", np.full((TOTAL_BODY_SLICES, 2, 2), 5000.0, np.float32),
                           spacing_mm=(3.0, 360.0, 360.0), study=study)  # 1800 mm long, 720 mm across
    ct = write_ct_series(tmp_path / "ct", np.zeros((TOTAL_BODY_SLICES, 2, 2), np.float32),
                         spacing_mm=(3.0, 350.0, 350.0), study=study)  # a 700 mm CT field of view
    assert load_series(pet).image.GetSize() == (2, 2, TOTAL_BODY_SLICES)
    assert load_series(ct).image.GetSize() == (2, 2, TOTAL_BODY_SLICES)
    absurd = write_pet_series(tmp_path / "absurd", np.full((2, 2, 2), 5000.0, np.float32),
                              spacing_mm=(3.0, 2000.0, 2000.0), study=study)  # 4 m across
    with pytest.raises(VolumeError, match="spans 4000 mm along its rows"):
        load_series(absurd)


def test_a_later_reconstruction_keeps_the_scan_start_as_decay_reference(tmp_path: Path) -> None:
    # SeriesTime 11:00 for a scan at 09:30 without GE's private scan time: the earliest acquisition.
    study = StudyInfo()
    paths, activity = _pet(tmp_path, edit=lambda ds, k: setattr(ds, "SeriesTime", "110000"), study=study)
    volume = load_series(paths)
    assert volume.datasets[0].SeriesTime.startswith(study.acquisition_time)
    np.testing.assert_allclose(_array(volume.image), activity, rtol=1e-4, atol=1e-3 * activity.max())
