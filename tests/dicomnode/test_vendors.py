"""Studies shaped like Siemens, GE, Philips, United Imaging and Canon write them
(dicomnode/testing/vendors.py) go through the node: accepted at receive time, derived series
dciodvfy-clean in Units BQML with a RescaleSlope per slice, SUVbw from the derived headers within 1 %
of the truth (and of the vendor's own stored SUV) in the body — or refused with a reason that names
the attribute."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.config import OutputSettings
from dicomnode.pet_units import philips_scale_factors
from dicomnode.pipeline import enhance_series
from dicomnode.testing.peers import NodeProcess, StoreSCP, free_port, storescu, wait_for, write_config
from dicomnode.testing.vendors import REFUSED_STYLES, VENDOR_STYLES, VendorStudy, write_vendor_study
from dicomnode.validate import read_received, validate_instance
from dicomnode.volume import VolumeError
from model.enhance import Enhancer, EnhancerInfo
from tests.support.dicomutil import dciodvfy_errors, origin_for, patient_points, phantom_activity, phantom_hu

OUTPUT = OutputSettings(series_description_suffix=" uPETe", series_number_offset=1000)
PET_SHAPE, PET_SPACING = (12, 32, 32), (3.0, 4.0, 4.0)
CT_SHAPE, CT_SPACING = (16, 48, 48), (3.0, 3.0, 3.0)
SOFT_TISSUE_HU = 40.0  # phantom_hu's body
BODY_BQML = 500.0  # phantom_activity: body 5000, lungs 1000, air 0


class IdentityWithCT(Enhancer):
    """Returns the PET unchanged (so SUV can be compared voxel by voxel) and keeps the CT it was given."""

    def __init__(self) -> None:
        self.info = EnhancerInfo(name="identity", version="test", description="PET unchanged, CT kept",
                                 uses_ct=True, requires_ct=True)
        self.ct: np.ndarray | None = None

    def enhance_array(self, pet_bqml, ct_hu=None, *, spacing_mm, progress=None):
        self.ct = ct_hu
        return pet_bqml.copy()


def _write(tmp_path: Path, style) -> tuple[VendorStudy, np.ndarray, tuple[float, float, float]]:
    pet_origin = origin_for(PET_SHAPE, PET_SPACING)
    truth = phantom_activity(*patient_points(PET_SHAPE, PET_SPACING, pet_origin))
    ct_origin = origin_for(CT_SHAPE, CT_SPACING, centre=(1.5, -2.0, 0.0))
    hu = phantom_hu(*patient_points(CT_SHAPE, CT_SPACING, ct_origin))
    study = write_vendor_study(tmp_path / "in", style, truth, hu, pet_spacing_mm=PET_SPACING,
                               pet_origin_mm=pet_origin, ct_spacing_mm=CT_SPACING, ct_origin_mm=ct_origin)
    return study, truth, pet_origin


def _moment(text: str) -> datetime:
    return datetime.strptime(text[:14], "%Y%m%d%H%M%S")


def _suv_per_bqml(ds: pydicom.Dataset) -> float:
    """SUVbw per Bq/ml as a standard SUV tool reads a START-corrected header (PS3.3 C.8.9.1.1.3)."""
    assert ds.DecayCorrection == "START"
    radio = ds.RadiopharmaceuticalInformationSequence[0]
    injected = _moment(str(radio.RadiopharmaceuticalStartDateTime))
    elapsed = (_moment(str(ds.SeriesDate) + str(ds.SeriesTime)) - injected).total_seconds()
    dose = float(radio.RadionuclideTotalDose) * 0.5 ** (elapsed / float(radio.RadionuclideHalfLife))
    return float(ds.PatientWeight) * 1000.0 / dose


def _rescaled(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_corpus_breaks_the_rules_it_is_meant_to() -> None:
    # The corpus must hold the habits the node is tested against, not a clean series in disguise.
    styles = list(VENDOR_STYLES.values())
    assert {"START", "ADMIN", "NONE"} <= {s.decay_correction for s in styles}
    assert "CNTS" in {s.units for s in styles}
    assert any(s.signed_pet for s in styles) and any(s.descending for s in styles)
    assert any(s.reconstructed_after_s > 0 for s in styles)
    assert any(s.ct_intercept == 0 for s in styles) and any(s.ct_signed for s in styles)


@pytest.mark.parametrize("name", list(VENDOR_STYLES))
def test_vendor_study_is_received_enhanced_and_keeps_suv(tmp_path: Path, name: str) -> None:
    study, truth, pet_origin = _write(tmp_path, VENDOR_STYLES[name])
    sources = {}
    for path in study.pet_paths + study.ct_paths:  # the receive-time checks accept every instance
        ds = read_received(path)
        meta = validate_instance(ds, sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID)
        assert meta.modality == "CT" or meta.units == "BQML"  # selected for processing, CNTS too
        sources[str(ds.SOPInstanceUID)] = path
    input_errors = {line for p in study.pet_paths[:1] for line in dciodvfy_errors(p)}

    enhancer = IdentityWithCT()
    result = enhance_series(study.pet_paths, study.ct_paths, enhancer, tmp_path / "out", output=OUTPUT)

    assert result.ct_used and enhancer.ct is not None
    body = enhancer.ct[truth == 5000.0]  # soft tissue: the CT's rescale habit read as HU
    assert abs(float(np.median(body)) - SOFT_TISSUE_HU) < 5.0, np.median(body)
    assert len(result.paths) == PET_SHAPE[0]
    slopes = set()
    for path in result.paths:
        assert dciodvfy_errors(path) == [], (path, input_errors)
        ds = pydicom.dcmread(path)
        assert (ds.Units, ds.DecayCorrection, ds.RescaleIntercept) == ("BQML", "START", 0)
        slopes.add(str(ds.RescaleSlope))
        k = round((float(ds.ImagePositionPatient[2]) - pet_origin[2]) / PET_SPACING[0])
        inside = truth[k] >= BODY_BQML
        suv = _rescaled(ds) * _suv_per_bqml(ds)
        expected = truth[k].astype(np.float64) * study.suv_per_bqml
        assert np.abs(suv[inside] / expected[inside] - 1).max() < 0.01, (name, k)
        source = pydicom.dcmread(sources[str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)])
        vendor_factor, _ = philips_scale_factors(source)
        if vendor_factor is not None:  # the vendor's own SUV, from its stored counts
            vendor_suv = _rescaled(source) * vendor_factor
            assert np.abs(suv[inside] / vendor_suv[inside] - 1).max() < 0.01, (name, k)
    assert len(slopes) > 1  # a RescaleSlope per slice, not one for the series


@pytest.mark.parametrize("name", list(REFUSED_STYLES))
def test_unusable_vendor_study_is_refused_naming_the_attribute(tmp_path: Path, name: str) -> None:
    style, attribute = REFUSED_STYLES[name]
    study, _, _ = _write(tmp_path, style)
    ds = read_received(study.pet_paths[0])
    meta = validate_instance(ds, sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID)
    assert meta.units == ("CNTS" if style.units == "CNTS" and not style.activity_factor else "BQML")
    with pytest.raises(VolumeError, match=re.escape(attribute)):
        enhance_series(study.pet_paths, study.ct_paths, IdentityWithCT(), tmp_path / "out", output=OUTPUT)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.parametrize("name", ["philips", "ge"])
def test_vendor_study_through_the_running_node(tmp_path: Path, name: str) -> None:
    """storescu → `upete serve` (Gaussian filter) → storescp: Philips counts are selected, a GE series
    reconstructed after the scan keeps its decay reference; the series at the PACS is clean and its
    headers give the true SUVbw per Bq/ml."""
    study, truth, _ = _write(tmp_path, VENDOR_STYLES[name])
    with StoreSCP(tmp_path / "pacs") as pacs:
        config = write_config(tmp_path, port=free_port(), destinations=[pacs.destination()],
                              series_timeout_s=2)
        with NodeProcess(config) as node:
            sent = storescu(study.ct_paths + study.pet_paths, node.port)
            assert sent.returncode == 0, sent.stderr
            wait_for(lambda: len(list(pacs.out_dir.iterdir())) >= PET_SHAPE[0], timeout=90,
                     what="the derived series at the PACS")
    derived = pacs.datasets()
    assert len(derived) == PET_SHAPE[0]
    total = 0.0
    for ds in derived:
        assert dciodvfy_errors(Path(ds.filename)) == []
        assert (ds.Units, ds.DecayCorrection) == ("BQML", "START")
        assert abs(_suv_per_bqml(ds) / study.suv_per_bqml - 1) < 0.01
        total += float(_rescaled(ds).sum())
    assert abs(total / float(truth.sum()) - 1) < 0.02  # the filter moves activity, it does not lose it
