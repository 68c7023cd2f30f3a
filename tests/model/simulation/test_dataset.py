"""Simulated dataset: case physics, save/load round trip, resumable `upete simulate`, DICOM output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dicomnode.volume import load_series
from model.physics import ReconSettings
from model.simulation.dataset import (
    HOLDOUT_RECONS,
    RECON_PRESETS,
    STANDARD_RECONS,
    list_cases,
    load_case,
    recon_for_case,
    save_case,
    simulate_case,
)
from tests.support.dicomutil import dciodvfy_errors
from upete.cli import main

TINY = (12, 48, 48)
DOSES = (1.0, 0.5, 0.1, 0.02)


@pytest.fixture(scope="module")
def case():
    return simulate_case(
        4, shape=TINY, doses=DOSES, recon=ReconSettings(iterations=3, postfilter_fwhm_mm=4.0)
    )


def test_case_holds_every_volume_on_one_grid(case) -> None:
    shapes = {
        a.shape
        for a in (
            case.ct_hu,
            case.truth_bqml,
            case.expectation_bqml,
            case.spet_bqml,
            case.organ_labels,
            case.lesion_labels,
            *case.lpet_bqml.values(),
        )
    }
    assert shapes == {TINY}
    assert sorted(case.lpet_bqml) == sorted(DOSES)
    assert case.lpet_bqml[1.0] is case.spet_bqml
    assert case.meta["seed"] == 4 and case.meta["recon_name"] == "osem-i3s8-psf0-pf4"
    assert case.meta["bqml_per_suv"] > 0 and case.meta["patient_weight_kg"] > 0


def test_lower_doses_are_noisier_and_keep_the_mean(case) -> None:
    body = case.organ_labels > 0
    ref = case.expectation_bqml
    errors = []
    for dose in DOSES:
        volume = case.lpet_bqml[dose]
        assert volume[body].mean() == pytest.approx(ref[body].mean(), rel=0.05), dose
        errors.append(float(np.sqrt(((volume - ref)[body] ** 2).mean())))
    assert errors == sorted(errors) and errors[-1] > 3 * errors[0]
    # The noiseless reconstruction keeps the truth's activity (resolution moves it, does not lose it).
    assert ref.sum() == pytest.approx(case.truth_bqml.sum(), rel=0.04)


def test_same_seed_same_case(case) -> None:
    again = simulate_case(
        4, shape=TINY, doses=DOSES, recon=ReconSettings(iterations=3, postfilter_fwhm_mm=4.0)
    )
    np.testing.assert_array_equal(again.lpet_bqml[0.1], case.lpet_bqml[0.1])
    np.testing.assert_array_equal(again.ct_hu, case.ct_hu)


def test_recon_pools_are_disjoint_and_draws_deterministic() -> None:
    assert not set(STANDARD_RECONS) & set(HOLDOUT_RECONS)
    assert set(STANDARD_RECONS) | set(HOLDOUT_RECONS) == set(RECON_PRESETS)
    draws = [recon_for_case(seed).name for seed in range(40)]
    assert draws == [recon_for_case(seed).name for seed in range(40)]
    assert set(draws) <= set(STANDARD_RECONS) and len(set(draws)) >= 4
    algorithms = {RECON_PRESETS[name].algorithm.value for name in draws}
    assert algorithms == {"osem", "fbp"}
    assert {recon_for_case(s, HOLDOUT_RECONS).name for s in range(20)} <= set(HOLDOUT_RECONS)
    with pytest.raises(ValueError, match="unknown"):
        recon_for_case(0, ("osem-i99",))


def test_save_load_round_trip(case, tmp_path: Path) -> None:
    folder = save_case(case, tmp_path / "case_0004")
    assert list_cases(tmp_path) == [folder]
    loaded = load_case(folder)
    for name in ("ct_hu", "truth_bqml", "expectation_bqml", "spet_bqml", "organ_labels", "lesion_labels"):
        original, back = getattr(case, name), getattr(loaded, name)
        assert back.dtype == original.dtype
        np.testing.assert_array_equal(back, original)
    assert sorted(loaded.lpet_bqml) == sorted(case.lpet_bqml)
    for dose, volume in case.lpet_bqml.items():
        np.testing.assert_array_equal(loaded.lpet_bqml[dose], volume)
    assert loaded.spacing_mm == case.spacing_mm
    assert loaded.meta["lesions"] == case.meta["lesions"] and loaded.recon == case.recon


def test_incomplete_case_folders_are_not_listed(case, tmp_path: Path) -> None:
    save_case(case, tmp_path / "a")
    (tmp_path / "b").mkdir()
    np.savez(tmp_path / "b" / "arrays.npz", x=np.zeros(1))  # no meta.json: interrupted
    assert [p.name for p in list_cases(tmp_path)] == ["a"]
    with pytest.raises(FileNotFoundError):
        load_case(tmp_path / "b")


def test_odd_dose_fractions_round_trip(tmp_path: Path) -> None:
    case = simulate_case(1, shape=(8, 32, 32), doses=(1 / 3,), recon=ReconSettings(algorithm="fbp"))
    loaded = load_case(save_case(case, tmp_path / "c"))
    assert list(loaded.lpet_bqml) == [1 / 3]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="square"):
        simulate_case(0, shape=(8, 32, 40))
    with pytest.raises(ValueError, match="dose"):
        simulate_case(0, shape=(8, 32, 32), doses=(0.0,))


@pytest.mark.slow
def test_standard_dose_count_level_is_clinical() -> None:
    # Full in-plane size (256² at 2 mm, 3 slices through the trunk): 10⁵–10⁶ trues per slice.
    case = simulate_case(2, shape=(3, 256, 256), doses=(), recon=ReconSettings(algorithm="fbp"))
    level = case.meta["standard_dose_trues_per_slice"]["median"]
    assert 5e4 <= level <= 1e6


# -- the command -------------------------------------------------------------------------------------
def _simulate(out: Path, *extra: str) -> int:
    return main(["simulate", "--out", str(out), "--shape", "10,32,32", "--seed", "5", "--quiet", *extra])


def test_simulate_is_resumable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sim"
    assert _simulate(out, "--cases", "2", "--doses", "1,0.1", "--no-dicom") == 0
    first = (out / "case_0000" / "arrays.npz").stat().st_mtime_ns
    (out / "case_0001" / "DONE").unlink()  # as if interrupted before the case finished
    capsys.readouterr()
    assert _simulate(out, "--cases", "3", "--doses", "1,0.1", "--no-dicom") == 0
    assert "2 case(s) simulated, 1 already complete" in capsys.readouterr().out
    assert (out / "case_0000" / "arrays.npz").stat().st_mtime_ns == first
    assert [p.name for p in list_cases(out)] == ["case_0000", "case_0001", "case_0002"]
    seeds = [load_case(p).meta["seed"] for p in list_cases(out)]
    assert seeds == [500000, 500001, 500002]


def test_simulate_refuses_bad_arguments(tmp_path: Path) -> None:
    assert _simulate(tmp_path, "--cases", "1", "--doses", "1,2") == 2
    assert main(["simulate", "--out", str(tmp_path), "--cases", "1", "--shape", "10,32,30"]) == 2
    assert _simulate(tmp_path, "--cases", "1", "--recon-pool", "nonsense") == 2


def test_simulate_writes_readable_valid_dicom(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    assert _simulate(out, "--cases", "1", "--doses", "1,0.25", "--recon-pool", "holdout") == 0
    folder = out / "case_0000"
    case = load_case(folder)
    assert case.meta["recon_name"] in HOLDOUT_RECONS
    dicom = folder / "dicom"
    assert sorted(p.name for p in dicom.iterdir()) == ["CT", "PET_D100", "PET_D25"]
    summary = json.loads((folder / "DONE").read_text())
    assert summary["series"] == {"CT": 10, "PET_D100": 10, "PET_D25": 10}

    pet = load_series(sorted((dicom / "PET_D25").glob("*.dcm")))
    values = sitk.GetArrayFromImage(pet.image)
    expected = case.lpet_bqml[0.25]
    scale = np.abs(expected).max()
    np.testing.assert_allclose(values, expected, atol=scale / 30000 + 1e-3)
    header = pet.datasets[0]
    assert header.Units == "BQML" and "ATTN" in header.CorrectedImage
    assert float(header.PatientWeight) == pytest.approx(case.meta["patient_weight_kg"])
    dose_item = header.RadiopharmaceuticalInformationSequence[0]
    assert float(dose_item.RadionuclideTotalDose) == pytest.approx(case.meta["injected_activity_bq"])
    full = pydicom.dcmread(sorted((dicom / "PET_D100").glob("*.dcm"))[0], stop_before_pixels=True)
    assert float(header.ActualFrameDuration) == pytest.approx(
        0.25 * float(full.ActualFrameDuration), rel=1e-3
    )
    assert header.StudyInstanceUID == full.StudyInstanceUID != ""

    ct = load_series(sorted((dicom / "CT").glob("*.dcm")))
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(ct.image), np.clip(np.round(case.ct_hu), -1024, 3071), atol=0.51
    )
    assert ct.frame_of_reference_uid == pet.frame_of_reference_uid
    assert dciodvfy_errors(sorted((dicom / "PET_D25").glob("*.dcm"))[0]) == []
    assert dciodvfy_errors(sorted((dicom / "CT").glob("*.dcm"))[0]) == []
