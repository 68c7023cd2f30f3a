"""``upete enhance``: the offline path from folders to a derived series."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dicomnode.volume import load_series
from tests.support.dicomutil import dciodvfy_errors, make_study
from upete.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _total(paths: list[Path]) -> float:
    return float(sitk.GetArrayFromImage(load_series(paths).image).astype(np.float64).sum())


def _config(tmp_path: Path, checkpoint: str = "classical:gaussian") -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(f"model: {{checkpoint: '{checkpoint}', device: cpu}}\n"
                    "output: {series_description_suffix: ' test', series_number_offset: 500}\n")
    return path


def test_enhance_writes_the_derived_series(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = make_study(tmp_path / "in")
    (study.pet_dir / "README.txt").write_text("not DICOM, ignored")
    nested = study.ct_dir / "sub"
    nested.mkdir()
    for path in study.ct_paths[:10]:  # recursive search
        shutil.move(path, nested / path.name)
    out = tmp_path / "out"
    status = main(["enhance", "--pet", str(study.pet_dir), "--ct", str(study.ct_dir), "--out", str(out),
                   "--config", str(_config(tmp_path, "classical:gaussian:4")), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert status == 0
    written = sorted(out.glob("*.dcm"))
    assert len(written) == len(study.pet_paths)
    assert f"wrote {len(written)} file(s)" in printed and "time: load" in printed and "enhance" in printed
    ds = pydicom.dcmread(written[0])
    assert ds.SeriesInstanceUID in printed
    assert ds.SeriesDescription == "PET AC test" and int(ds.SeriesNumber) == 503
    assert "fwhm4mm" in ds.DerivationDescription
    assert dciodvfy_errors(written[0]) == []
    # total activity of the Gaussian enhancer's output within 2 % of the input
    assert _total(written) == pytest.approx(_total(study.pet_paths), rel=0.02)


def test_enhance_without_ct(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = make_study(tmp_path / "in")
    out = tmp_path / "out"
    assert main(["enhance", "--pet", str(study.pet_dir), "--no-ct", "--out", str(out),
                 "--config", str(_config(tmp_path))]) == 0
    assert len(list(out.glob("*.dcm"))) == len(study.pet_paths)
    assert "with a CT" not in capsys.readouterr().out


def test_folder_with_several_or_no_series_is_refused(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    study = make_study(tmp_path / "in", with_nac=True)
    config = str(_config(tmp_path))
    # tmp/in holds the AC and the NAC PET series
    status = main(["enhance", "--pet", str(tmp_path / "in"), "--ct", str(study.ct_dir), "--out",
                   str(tmp_path / "out"), "--config", config])
    error = capsys.readouterr().err
    assert status == 1 and "holds 2 PT series" in error and "PET NAC" in error
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("nothing here")
    status = main(["enhance", "--pet", str(empty), "--no-ct", "--out", str(tmp_path / "out"),
                   "--config", config])
    error = capsys.readouterr().err
    assert status == 1 and "no PT series" in error and "1 other file(s) ignored" in error
    assert not (tmp_path / "out").exists()


def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = make_study(tmp_path / "in")
    base = ["enhance", "--pet", str(study.pet_dir), "--out", str(tmp_path / "out")]
    assert main(base) == 2
    assert "--no-ct" in capsys.readouterr().err
    assert main([*base, "--ct", str(study.ct_dir), "--no-ct"]) == 2
    capsys.readouterr()
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {checkpoint: 'classical:median'}\n")
    assert main([*base, "--no-ct", "--config", str(bad)]) == 2
    assert "classical:median" in capsys.readouterr().err


def test_unusable_input_exits_1_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    study = make_study(tmp_path / "in", with_nac=True)
    status = main(["enhance", "--pet", str(tmp_path / "in" / "nac"), "--no-ct",
                   "--out", str(tmp_path / "out"), "--config", str(_config(tmp_path))])
    assert status == 1
    assert "not attenuation corrected" in capsys.readouterr().err
    assert study.nac_paths


def test_enhance_runs_as_a_program(tmp_path: Path) -> None:
    study = make_study(tmp_path / "in")
    command = [sys.executable, "-m", "upete", "enhance", "--pet", str(study.pet_dir),
               "--ct", str(study.ct_dir), "--out", str(tmp_path / "out"),
               "--config", str(_config(tmp_path)), "--verbose"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 24 file(s)" in proc.stdout
    # no patient identifiers in what the command prints or logs
    for secret in (study.study.patient_name, study.study.patient_id, study.study.birth_date):
        assert secret not in proc.stdout + proc.stderr


def test_a_ct_around_the_body_is_used_and_one_that_misses_part_of_it_is_not(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.support.model_toys import tiny_checkpoint

    main_model = tiny_checkpoint(tmp_path / "models", "ldm-p-ct")
    pet_only = tiny_checkpoint(tmp_path / "models", "ldm-p")
    config = tmp_path / "tiny.yaml"
    config.write_text(f"model: {{checkpoint: '{main_model}', checkpoint_without_ct: '{pet_only}', "
                      "device: cpu, steps: 1}\n")
    # PET 128 mm across, CT 120 mm across around the 110 mm body: 88 % of the PET's box, all the body.
    study = make_study(tmp_path / "in", ct_shape=(30, 40, 40), ct_centre=(0.0, 0.0, 0.0))
    arguments = ["enhance", "--pet", str(study.pet_dir), "--config", str(config), "--device", "cpu"]
    assert main([*arguments, "--ct", str(study.ct_dir), "--out", str(tmp_path / "with")]) == 0
    printed = capsys.readouterr().out
    assert "with a CT of 30 slice(s)" in printed and "CT not used" not in printed
    assert "enhancer: uPETe LDM-P-CT" in printed
    ds = pydicom.dcmread(next((tmp_path / "with").glob("*.dcm")), stop_before_pixels=True)
    assert ds.SeriesDescription.endswith(" uPETe") and "PET-only model" not in ds.DerivationDescription

    # A CT of 10 slices (30 mm) for 72 mm of body: the PET-only model runs, and says why.
    short = make_study(tmp_path / "short", ct_shape=(10, 48, 48), ct_centre=(0.0, 0.0, 0.0),
                       study=study.study)
    assert main([*arguments, "--ct", str(short.ct_dir), "--out", str(tmp_path / "without")]) == 0
    printed = capsys.readouterr().out
    assert "enhancer: uPETe LDM-P," in printed
    assert "CT not used: PET-only model: the CT's axial range holds 4" in printed
    ds = pydicom.dcmread(next((tmp_path / "without").glob("*.dcm")), stop_before_pixels=True)
    assert ds.DerivationDescription.startswith("PET-only model: the CT's axial range holds 4")
