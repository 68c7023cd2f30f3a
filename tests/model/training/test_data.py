"""Training data from a site's DICOM studies: each case keeps its own reconstruction, counts and grid."""

from __future__ import annotations

import logging

import pytest
from pydicom.dataset import Dataset

from model.physics import ReconSettings
from model.training.data import load_cases
from tests.support.model_toys import tiny_phantom


def test_dicom_cases_carry_the_recon_frame_duration_and_grid_their_headers_say(tmp_path, caplog) -> None:
    from dicomnode.testing.scanner import StudyInfo, write_ct_series, write_pet_series
    from upete.commands.train import _dicom_loader

    def fbp(ds: Dataset, k: int) -> None:
        ds.ReconstructionMethod = "FBP"
        ds.ConvolutionKernel = "Gaussian 6.4 mm"

    def no_method(ds: Dataset, k: int) -> None:
        del ds.ReconstructionMethod

    pet, ct = tiny_phantom(0, (12, 24, 24))
    spacing = (3.27, 4.07, 4.07)  # (z, y, x): a clinical whole-body grid
    # study_a: an FBP study of 120 s beds; study_b: the synthetic scanner's "OSEM 3i21s", 150 s;
    # study_c: a header that names no method (defaults), 90 s beds.
    studies = (("study_a", fbp, 120.0), ("study_b", None, 150.0), ("study_c", no_method, 90.0))
    for name, edit, seconds in studies:
        study = StudyInfo()
        write_pet_series(tmp_path / name / "pet", pet, spacing_mm=spacing, study=study,
                         frame_duration_s=seconds, edit=edit)
        write_ct_series(tmp_path / name / "ct", ct, spacing_mm=spacing, study=study)

    with caplog.at_level(logging.INFO, logger="model.training.data"):
        a, b, c = load_cases(tmp_path, dicom_loader=_dicom_loader, need_ct=True)

    assert ReconSettings.from_dict(a.recon) == ReconSettings(algorithm="fbp", postfilter_fwhm_mm=6.4)
    assert ReconSettings.from_dict(b.recon) == ReconSettings(iterations=3, subsets=21)
    assert c.recon is None  # training's default reconstruction
    assert [case.scanner for case in (a, b, c)] == [{"frame_duration_s": s} for s in (120.0, 150.0, 90.0)]
    for case in (a, b, c):
        assert case.native_spacing_mm == pytest.approx(spacing, abs=1e-3)
        assert case.pet.shape == (20, 49, 49)  # resampled to the model's 2 mm grid

    records = [r for r in caplog.records if r.getMessage() == "DICOM case acquisition"]
    fields = [r.fields for r in records]
    assert [f["case"] for f in fields] == [0, 1, 2]  # folder index, not the folder's name
    assert fields[0]["recon"] == "fbp-hann1-pf6.4 (headers)"
    assert fields[0]["frame_duration_s"] == "120 (headers)"
    assert fields[2]["recon"] == "default" and "no ReconstructionMethod" in fields[2]["notes"]
    assert not any("study_" in str(f) for f in fields)


def test_nifti_cases_keep_the_default_acquisition(tmp_path) -> None:
    from tests.support.model_toys import write_nifti_cases

    (case,) = load_cases(write_nifti_cases(tmp_path, 1, shape=(8, 16, 16)))
    assert case.recon is None and case.scanner is None
    assert case.native_spacing_mm == (2.0, 2.0, 2.0)
