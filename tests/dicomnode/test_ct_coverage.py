"""dicomnode/ct_coverage.py: the CT is judged over the patient's body, not over the PET's box."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from dicomnode.ct_coverage import MIN_AXIAL_COVERAGE, MIN_BODY_COVERAGE, body_mask, judge_ct

# A PET of a 60 cm field of view (4 mm × 150) and 40 slices of 4 mm, with a 36 × 24 cm elliptic body
# running the whole length of the PET; centred on the origin.
PET_SIZE, PET_MM, SLICES = 150, 4.0, 40
BODY_A, BODY_B = 180.0, 120.0  # semi-axes, mm


def _grid(size: int, mm: float, slices: int, slice_mm: float, centre_z: float = 0.0) -> sitk.Image:
    image = sitk.Image(size, size, slices, sitk.sitkFloat32)
    image.SetSpacing((mm, mm, slice_mm))
    half = (size - 1) * mm / 2
    image.SetOrigin((-half, -half, centre_z - (slices - 1) * slice_mm / 2))
    return image


def _pet(seed: int = 0) -> sitk.Image:
    """Body 5 kBq/ml with noise, a hot 40 kBq/ml lesion, low-dose speckle (up to 300 Bq/ml) in air."""
    rng = np.random.default_rng(seed)
    y, x = (np.mgrid[:PET_SIZE, :PET_SIZE] - (PET_SIZE - 1) / 2) * PET_MM
    body = (x / BODY_A) ** 2 + (y / BODY_B) ** 2 <= 1
    array = np.where(body, 5000.0, 0.0)[None].repeat(SLICES, axis=0) * rng.gamma(8, 1 / 8, (SLICES, 1, 1))
    array[18:22, 70:78, 70:78] = 40000.0
    array += rng.exponential(30.0, array.shape) * (rng.random(array.shape) < 0.05) * 10
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.CopyInformation(_grid(PET_SIZE, PET_MM, SLICES, 4.0))
    return image


def _ct(fov_mm: float, length_mm: float, centre_z: float = 0.0) -> sitk.Image:
    """An empty CT grid of ``fov_mm`` across (512-ish pixels would change nothing) and ``length_mm`` long."""
    size, slices = 128, max(int(round(length_mm / 2.5)), 1)
    return _grid(size, fov_mm / size, slices, 2.5, centre_z)


def test_the_body_mask_is_the_body_and_not_the_speckle_in_air() -> None:
    pet = _pet()
    mask = body_mask(sitk.GetArrayFromImage(pet))
    y, x = (np.mgrid[:PET_SIZE, :PET_SIZE] - (PET_SIZE - 1) / 2) * PET_MM
    body = (x / BODY_A) ** 2 + (y / BODY_B) ** 2 <= 1
    assert mask[:, body].mean() == 1.0  # every body voxel
    grown = (x / (BODY_A + 4 * PET_MM)) ** 2 + (y / (BODY_B + 4 * PET_MM)) ** 2 <= 1
    assert not mask[:, ~grown].any()  # the speckle in air beyond the (smoothed, dilated) outline stays out
    assert not body_mask(np.zeros((4, 8, 8), np.float32)).any()


def test_a_50cm_ct_around_the_body_covers_the_patient_though_not_the_60cm_box() -> None:
    coverage = judge_ct(_pet(), _ct(500.0, 200.0))
    assert coverage.axial == 1.0 and coverage.inside == 1.0 and coverage.refusal is None
    assert coverage.body_voxels > 0


@pytest.mark.parametrize(
    ("fov_mm", "length_mm", "used"),
    [
        (500.0, 200.0, True),
        # 10 % of the body's length beyond the CT: refused however wide the CT is
        (500.0, 144.0, False),
        # cut axially by less than one percent (within half a CT slice of the last PET slice): used
        (500.0, 160.0, True),
        # a CT narrower than the body: 350 mm across a 360 mm body cuts ~3 %: used (arms at a 50 cm edge)
        (350.0, 200.0, True),
        # 280 mm across a 360 mm body leaves > 10 % of it outside: refused
        (280.0, 200.0, False),
    ],
)
def test_both_sides_of_the_thresholds(fov_mm: float, length_mm: float, used: bool) -> None:
    coverage = judge_ct(_pet(), _ct(fov_mm, length_mm))
    assert (coverage.refusal is None) is used, coverage
    if not used:
        assert coverage.axial < MIN_AXIAL_COVERAGE or coverage.inside < MIN_BODY_COVERAGE


def test_the_reasons_name_what_is_missing() -> None:
    short = judge_ct(_pet(), _ct(500.0, 80.0))
    assert short.axial == pytest.approx(0.5, abs=0.04)
    assert short.refusal.startswith("the CT's axial range holds 5")
    assert "of the patient's body, at least 99% is needed (the CT is shorter than the PET)" in short.refusal
    narrow = judge_ct(_pet(), _ct(200.0, 200.0))
    assert narrow.axial == 1.0 and narrow.refusal.startswith("the CT's field of view holds")
    empty = sitk.Image(8, 8, 4, sitk.sitkFloat32)
    assert "no body found" in judge_ct(empty, _ct(1.0, 2.5)).refusal


def test_large_volumes_are_judged_on_a_sample() -> None:
    pet = sitk.Image(256, 256, 64, sitk.sitkFloat32)  # 4.2 M voxels: judged on every second one
    pet.SetSpacing((2.0, 2.0, 2.0))
    pet.SetOrigin((-255.0, -255.0, -63.0))
    pet[100:156, 100:156, :] = 1000.0
    coverage = judge_ct(pet, _ct(500.0, 130.0))
    assert coverage.refusal is None and 0 < coverage.body_voxels < 100 * 100 * 64 // 8
