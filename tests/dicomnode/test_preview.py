"""Job previews (dicomnode/preview.py): SUVbw from the header, the PNG, the optional Secondary
Capture (dciodvfy-clean, recognised as ours), and never an exception out of write_job_preview."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomnode.config import OutputSettings
from dicomnode.derived import is_derived_by_us
from dicomnode.pipeline import enhance_series
from dicomnode.preview import PREVIEW_PNG, PREVIEW_SC, suv_scale, write_job_preview
from model.enhance import load_enhancer
from tests.support.dicomutil import dciodvfy_errors, make_study


def _header(**overrides: object) -> Dataset:
    ds = Dataset()
    ds.PatientWeight = "80"
    ds.SeriesDate, ds.SeriesTime = "20260115", "103000"
    ds.DecayCorrection = "START"
    radio = Dataset()
    radio.RadionuclideTotalDose = "300000000"
    radio.RadionuclideHalfLife = "6586.2"
    radio.RadiopharmaceuticalStartDateTime = "20260115093000"
    ds.RadiopharmaceuticalInformationSequence = [radio]
    for key, value in overrides.items():
        setattr(ds, key, value)
    return ds


def test_suvbw_decays_the_dose_to_the_series_time() -> None:
    scale = suv_scale(_header())
    decayed = 300e6 * 2 ** (-3600 / 6586.2)
    assert scale.unit == "SUVbw" and math.isclose(scale.factor, 80_000 / decayed, rel_tol=1e-9)
    assert "60 min" in scale.note
    # Decay corrected to the administration time: no further decay.
    assert math.isclose(suv_scale(_header(DecayCorrection="ADMIN")).factor, 80_000 / 300e6, rel_tol=1e-9)


@pytest.mark.parametrize(
    ("overrides", "why"),
    [({"PatientWeight": ""}, "PatientWeight missing"), ({"PatientWeight": "0"}, "PatientWeight missing"),
     ({"RadiopharmaceuticalInformationSequence": []}, "dose or half-life missing"),
     ({"SeriesTime": ""}, "series time missing")],
)
def test_without_what_suv_needs_the_scale_is_bqml_and_says_why(overrides: dict, why: str) -> None:
    scale = suv_scale(_header(**overrides))
    assert (scale.unit, scale.factor) == ("Bq/ml", 1.0) and why in scale.note


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, object]:
    tmp = tmp_path_factory.mktemp("preview")
    study = make_study(tmp / "in")
    enhancer = load_enhancer("classical:gaussian")
    result = enhance_series(study.pet_paths, study.ct_paths, enhancer, tmp / "job", output=OutputSettings())
    return tmp / "job", study, result


def test_png_with_secondary_capture(job: tuple) -> None:
    out, study, result = job
    extra = write_job_preview(out, study.pet_paths, study.ct_paths, result.paths,
                              output=OutputSettings(preview_secondary_capture=True), job_id=5)
    png = out / PREVIEW_PNG
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert extra == [out / PREVIEW_SC]
    assert dciodvfy_errors(extra[0]) == []
    sc = dcmread(extra[0])
    derived = dcmread(result.paths[0], stop_before_pixels=True)
    assert sc.StudyInstanceUID == derived.StudyInstanceUID
    assert sc.SeriesInstanceUID != derived.SeriesInstanceUID
    assert is_derived_by_us(sc)  # the loop guard knows it when a PACS sends it back
    assert sc.SeriesDescription == "PET AC uPETe preview"
    rgb = sc.pixel_array
    assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.std() > 10  # a picture, not a blank page
    # A rerun writes the same UIDs: a PACS replaces the preview instead of adding another.
    write_job_preview(out, study.pet_paths, study.ct_paths, result.paths,
                      output=OutputSettings(preview_secondary_capture=True), job_id=5)
    assert dcmread(extra[0]).SOPInstanceUID == sc.SOPInstanceUID


def test_preview_off_and_failures_never_raise(job: tuple, tmp_path: Path) -> None:
    out, study, result = job
    assert write_job_preview(tmp_path, study.pet_paths, None, result.paths,
                             output=OutputSettings(preview=False)) == []
    assert not (tmp_path / PREVIEW_PNG).exists()
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"not dicom")
    assert write_job_preview(tmp_path, [garbage], None, [garbage], output=OutputSettings()) == []
    assert not (tmp_path / PREVIEW_PNG).exists()
    # Without a CT the PET rows are still drawn.
    assert write_job_preview(tmp_path, study.pet_paths, None, result.paths, output=OutputSettings()) == []
    assert (tmp_path / PREVIEW_PNG).stat().st_size > 20_000
