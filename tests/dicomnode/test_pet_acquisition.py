"""Reconstruction and frame duration from PET headers: real files written and read back, vendor strings."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicomnode.pet_acquisition import acquisition_from_headers, parse_convolution_kernel
from dicomnode.pet_units import GE_PET_CREATOR
from dicomnode.testing.scanner import StudyInfo, write_pet_series
from model.physics import ReconSettings, ScannerModel


def _header(tmp_path: Path, edit: Callable[[Dataset], None], **kw) -> Dataset:
    """The header of the first instance of a two-slice PET series written with ``edit`` applied."""
    activity = np.full((2, 4, 4), 5000.0, dtype=np.float32)
    paths = write_pet_series(tmp_path / "pet", activity, study=StudyInfo(), edit=lambda ds, k: edit(ds), **kw)
    return pydicom.dcmread(sorted(paths)[0], stop_before_pixels=True)


def _with(**attributes: object) -> Callable[[Dataset], None]:
    def edit(ds: Dataset) -> None:
        for keyword, value in attributes.items():
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)

    return edit


@pytest.mark.parametrize(
    ("method", "algorithm", "iterations", "subsets", "psf"),
    [
        ("OSEM3D 3i21s", "osem", 3, 21, 0.0),  # Siemens
        ("OSEM 2i24s", "osem", 2, 24, 0.0),
        ("OP-OSEM3i21s", "osem", 3, 21, 0.0),
        ("PSF+TOF 3i21s", "osem", 3, 21, 4.0),  # Siemens TrueX + TOF, no "OSEM" in the text
        ("OSEM3D HD 4 iterations 8 subsets", "osem", 4, 8, 4.0),  # HD·PET
        ("VPFXS", "osem", 3, 8, 4.0),  # GE: VUE Point FX with SharpIR
        ("VPHDS", "osem", 3, 8, 4.0),
        ("VPHD", "osem", 3, 8, 0.0),
        ("QCFX", "osem", 3, 8, 4.0),  # GE Q.Clear: penalised likelihood, PSF built in
        ("FBP", "fbp", 3, 8, 0.0),
        ("3D-RAMLA", "osem", 3, 8, 0.0),  # Philips
        ("BLOB-OS-TF", "osem", 3, 8, 0.0),
        ("MLEM", "osem", 3, 8, 0.0),
        ("TOF-OSEM", "osem", 3, 8, 0.0),
    ],
)
def test_vendor_reconstruction_methods_become_recon_settings(
    tmp_path, method, algorithm, iterations, subsets, psf
) -> None:
    ds = _header(tmp_path, _with(ReconstructionMethod=method, ConvolutionKernel="XYZGAUSSIAN5.00"))
    recon = acquisition_from_headers(ds)["recon"]
    settings = ReconSettings.from_dict(recon)  # valid as training will build it
    assert settings.algorithm.value == algorithm
    assert (settings.iterations, settings.subsets) == (iterations, subsets)
    assert settings.psf_fwhm_mm == psf
    assert settings.postfilter_fwhm_mm == 5.0


@pytest.mark.parametrize(
    ("kernel", "fwhm", "cutoff"),
    [
        ("XYZGAUSSIAN5.00", 5.0, None),
        ("XYZ Gaussian2.00", 2.0, None),
        ("Gaussian 6.4 mm", 6.4, None),
        ("3D Gaussian 5mm", 5.0, None),
        ("ALL-PASS", 0.0, None),
        ("All-pass", 0.0, None),
        ("Hann 0.5", 0.0, 0.5),
        ("B30f", None, None),  # a CT kernel says nothing about a PET post-filter
        ("GAUSSIAN", None, None),  # no width
        ("Gaussian 250 mm", None, None),  # not a clinical filter: a misread name
    ],
)
def test_convolution_kernels(kernel, fwhm, cutoff) -> None:
    assert parse_convolution_kernel(kernel) == (fwhm, cutoff)


def test_fbp_takes_its_filter_and_hann_cutoff_from_the_kernel(tmp_path) -> None:
    ds = _header(tmp_path, _with(ReconstructionMethod="FBP", ConvolutionKernel="Hann 0.7"))
    found = acquisition_from_headers(ds)
    assert found["recon"]["algorithm"] == "fbp"
    assert found["recon"]["fbp_cutoff"] == 0.7 and found["recon"]["postfilter_fwhm_mm"] == 0.0
    assert found["notes"] == []


def test_a_multi_valued_kernel_is_read_as_one_text(tmp_path) -> None:
    edit = _with(ReconstructionMethod="OSEM3D 2i21s", ConvolutionKernel=["XYZ", "GAUSSIAN6.00"])
    assert acquisition_from_headers(_header(tmp_path, edit))["recon"]["postfilter_fwhm_mm"] == 6.0


def test_frame_duration_comes_from_actual_frame_duration_in_ms(tmp_path) -> None:
    found = acquisition_from_headers(_header(tmp_path, _with(), frame_duration_s=120.0))
    assert found["scanner"] == {"frame_duration_s": 120.0}
    assert ScannerModel(**found["scanner"]).frame_duration_s == 120.0
    # The synthetic scanner writes OSEM 3i21s and no kernel: recon taken, post-filter defaulted.
    assert found["recon"]["iterations"] == 3 and found["recon"]["subsets"] == 21
    assert "postfilter_fwhm_mm" not in found["recon"]  # ReconSettings' default (4 mm) applies
    assert ReconSettings.from_dict(found["recon"]).postfilter_fwhm_mm == 4.0
    assert found["notes"] == ["no ConvolutionKernel: the default post-filter (4 mm) is used"]


def test_missing_attributes_leave_the_defaults_and_say_so(tmp_path) -> None:
    edit = _with(ReconstructionMethod=None, ConvolutionKernel=None, ActualFrameDuration=None)
    found = acquisition_from_headers(_header(tmp_path, edit))
    assert "recon" not in found and "scanner" not in found
    assert any("no ReconstructionMethod" in n and "default" in n for n in found["notes"])
    assert any("no positive ActualFrameDuration" in n for n in found["notes"])


def test_an_unknown_method_or_zero_duration_is_not_guessed(tmp_path) -> None:
    edit = _with(ReconstructionMethod="VENDOR MAGIC", ConvolutionKernel="XYZGAUSSIAN5.00",
                 ActualFrameDuration=0)
    found = acquisition_from_headers(_header(tmp_path, edit))
    assert "recon" not in found and "scanner" not in found
    assert found["notes"][0] == (
        "ReconstructionMethod 'VENDOR MAGIC' not recognised: the default reconstruction "
        "(OSEM 3x8, 4 mm post-filter) is used"
    )


def test_ge_private_iterations_subsets_and_post_filter(tmp_path) -> None:
    def ge(ds: Dataset) -> None:
        ds.ReconstructionMethod = "VPFXS"
        assert "ConvolutionKernel" not in ds  # GE PET leaves it out, as the synthetic scanner does
        block = ds.private_block(0x0009, GE_PET_CREATOR, create=True)
        block.add_new(0xB2, "SL", 2)
        block.add_new(0xB3, "SL", 16)
        block.add_new(0xBA, "SL", 1)
        block.add_new(0xBB, "FL", 6.4)

    found = acquisition_from_headers(_header(tmp_path, ge))
    recon = found["recon"]
    assert (recon["iterations"], recon["subsets"], recon["psf_fwhm_mm"]) == (2, 16, 4.0)
    assert recon["postfilter_fwhm_mm"] == pytest.approx(6.4)
    assert not any("post-filter" in n or "subsets" in n for n in found["notes"])


def test_ge_private_tags_survive_an_implicit_vr_hop(tmp_path) -> None:
    # Through a PACS that stores implicit VR without the private dictionary, SL/FL arrive as bytes
    # (VR UN); built in memory, as pydicom's own dictionary would type them on reading a file.
    ds = Dataset()
    ds.ReconstructionMethod = "VPHDS"
    block = ds.private_block(0x0009, GE_PET_CREATOR, create=True)
    block.add_new(0xB2, "UN", (4).to_bytes(4, "little"))
    block.add_new(0xB3, "UN", (12).to_bytes(4, "little"))
    recon = acquisition_from_headers(ds)["recon"]
    assert (recon["iterations"], recon["subsets"]) == (4, 12)


def test_nothing_about_the_patient_is_returned(tmp_path) -> None:
    study = StudyInfo()
    ds = _header(tmp_path, _with(ConvolutionKernel="not a kernel"))
    assert ds.PatientName == study.patient_name  # the header has them …
    text = repr(acquisition_from_headers(ds))
    for value in (study.patient_name, study.patient_id, study.birth_date):
        assert value not in text  # … the result does not
