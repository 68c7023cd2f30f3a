"""The transfer test set's generator: independence from the training simulator, physics and determinism."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

import model.evaluation.transfer as transfer
from model.evaluation.transfer import (
    STYLES,
    Reconstruction,
    ScannerStyle,
    generate_case,
    load_case,
    save_case,
)
from model.evaluation.transfer.acquisition import acquire, poisson_counts, thin
from model.evaluation.transfer.projector import RotateSumProjector
from model.evaluation.transfer.reconstruction import reconstruct

PACKAGE = Path(transfer.__file__).parent
TINY = ScannerStyle("tiny", pixel_mm=6.0, matrix=64, slice_mm=6.0, n_slices=8, n_angles=32,
                    system_fwhm_mm=7.0, trues_per_slice=3e5,
                    recon=Reconstruction("osem", 2, 4, psf_fwhm_mm=7.0, postfilter_fwhm_mm=5.0))


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this package
                base = "model.evaluation.transfer".rsplit(".", node.level - 1)[0]
                names.add(f"{base}.{node.module}" if node.module else base)
            else:
                names.add(node.module or "")
    return names


def test_imports_nothing_from_the_training_simulator() -> None:
    forbidden = ("model.physics", "model.simulation", "model.training", "model.networks", "torch", "pydicom")
    allowed_roots = {"__future__", "collections", "dataclasses", "json", "math", "pathlib", "numpy", "scipy"}
    files = sorted(PACKAGE.glob("*.py"))
    assert len(files) >= 8, f"expected the package's modules, found {[f.name for f in files]}"
    for path in files:
        for name in _imported_modules(path):
            assert not name.startswith(forbidden), f"{path.name} imports {name}"
            if not name.startswith("model.evaluation.transfer"):
                assert name.split(".")[0] in allowed_roots, f"{path.name} imports {name}: NumPy/SciPy only"


def test_styles_are_the_clinical_ones() -> None:
    assert set(STYLES) == {"siemens-like", "ge-like", "philips-like", "fbp-4mm", "mlem-4mm", "2mm-native"}
    assert STYLES["siemens-like"].pixel_mm == pytest.approx(4.07, abs=0.01)
    assert STYLES["siemens-like"].fov_mm == pytest.approx(684, abs=2)
    assert STYLES["ge-like"].pixel_mm == pytest.approx(5.47, abs=0.01) and STYLES["ge-like"].matrix == 128
    assert STYLES["2mm-native"].pixel_mm == 2.0
    assert all(2.0 <= s.slice_mm <= 4.0 and 40 <= s.n_slices <= 64 for s in STYLES.values())
    with pytest.raises(ValueError, match="unknown scanner style 'toshiba'"):
        generate_case("toshiba", 900000)


def test_projector_back_is_the_adjoint() -> None:
    proj = RotateSumProjector(24, 4.0, 10)
    rng = np.random.default_rng(0)
    x = rng.random((3, 24, 24)).astype(np.float32)
    y = rng.random((3, 10, 24)).astype(np.float32)
    assert float((proj.forward(x) * y).sum()) == pytest.approx(float((x * proj.back(y)).sum()), rel=1e-5)
    views = [1, 4, 7]
    assert np.allclose(proj.forward(x, views), proj.forward(x)[:, views])


def _disc_acquisition(matrix: int = 48, trues: float = 2e5, hot: float = 3000.0):
    """A uniform 1000 Bq/ml water disc of radius 60 mm (+ ``hot`` in a 15 mm spot), 4 slices, 6 mm pixels."""
    proj = RotateSumProjector(matrix, 6.0, 24)
    c = (matrix - 1) / 2
    yy, xx = np.mgrid[:matrix, :matrix]
    r = np.hypot(yy - c, xx - c) * 6.0
    disc = (r <= 60).astype(np.float32)
    activity = np.repeat((1000 * disc + hot * (np.hypot(yy - c - 4, xx - c) * 6 <= 15))[None], 4, 0)
    mu = np.repeat((0.0096 * disc)[None], 4, 0).astype(np.float32)
    acq = acquire(activity.astype(np.float32), mu, proj, spacing_mm=(6.0, 6.0, 6.0), trues_per_slice=trues,
                  scatter_fraction=0.3, randoms_fraction=0.2)
    return acq, activity, r <= 45


def test_counts_scale_with_dose() -> None:
    acq, _, _ = _disc_acquisition()
    standard = poisson_counts(acq.mean, np.random.default_rng(1))
    assert standard.sum() == pytest.approx(acq.mean.sum(), rel=0.01)
    for dose in (0.02, 0.1, 0.5):
        low = thin(standard, dose, np.random.default_rng(2))
        assert np.all(low <= standard)
        sd = np.sqrt(standard.sum() * dose * (1 - dose))
        assert abs(low.sum() - dose * standard.sum()) < 5 * sd
    with pytest.raises(ValueError, match="found 1.5"):
        thin(standard, 1.5, np.random.default_rng(0))


def test_fbp_keeps_the_activity_scale() -> None:
    acq, _, centre = _disc_acquisition(hot=0.0)
    image = reconstruct(acq.mean, acq.model, Reconstruction("fbp", window="hann"))
    assert float(image[:, centre].mean()) == pytest.approx(1000, rel=0.03)


@pytest.mark.parametrize("recon, tolerance", [
    (Reconstruction("fbp", window="hann"), 0.2),
    (Reconstruction("osem", 2, 4, postfilter_fwhm_mm=6.0), 0.3),
])
def test_expectation_is_the_mean_of_noisy_reconstructions(recon: Reconstruction, tolerance: float) -> None:
    acq, _, centre = _disc_acquisition(trues=1e6)
    expectation = reconstruct(acq.mean, acq.model, recon)
    rng = np.random.default_rng(3)
    n = 40
    images = np.stack([reconstruct(poisson_counts(acq.mean, rng), acq.model, recon) for _ in range(n)])
    noise = float(images[:, :, centre].std(axis=0).mean())
    error = float(np.sqrt(np.mean((images.mean(0)[:, centre] - expectation[:, centre]) ** 2)))
    # Pure averaging leaves noise/√n (0.16 × noise for n = 40); a biased estimator would leave more.
    assert noise > 0 and error < tolerance * noise


@pytest.mark.parametrize("recon", [Reconstruction("osem", 3, 4),
                                   Reconstruction("osem", 15, 1, psf_fwhm_mm=6.0)])
def test_osem_preserves_the_total_activity(recon: Reconstruction) -> None:
    acq, activity, _ = _disc_acquisition()
    for counts in (acq.mean, poisson_counts(acq.mean, np.random.default_rng(4))):
        image = reconstruct(counts, acq.model, recon)
        assert float(image.sum()) == pytest.approx(float(activity.sum()), rel=0.05)


@pytest.fixture(scope="module")
def tiny_case():
    return generate_case(TINY, 900000, doses=(0.05, 0.5))


def test_case_volumes_and_lesions(tiny_case) -> None:
    case = tiny_case
    shape = (TINY.n_slices, TINY.matrix, TINY.matrix)
    assert case.truth.shape == case.expectation.shape == case.spet.shape == case.lpet[0.05].shape == shape
    assert case.ct_hu.shape == (TINY.n_slices, 256, 256) and case.ct_spacing_mm[1] == pytest.approx(500 / 256)
    assert case.ct_hu.min() >= -1024 and case.ct_hu.max() > 200  # air and bone
    assert case.body.any() and case.lesions
    for lesion in case.lesions:
        mask = case.lesion_labels == lesion.index
        assert mask.sum() == lesion.n_voxels > 0
        assert 6.0 * 0.7 <= lesion.diameter_mm <= 30.0 and 3.0 <= lesion.suv <= 15.0
        assert float(case.truth[mask].max()) > 0.4 * lesion.suv * case.bqml_per_suv
    # Lower dose, noisier image around the same expectation.
    err = {d: float(np.sqrt(np.mean((case.lpet[d][case.body] - case.expectation[case.body]) ** 2)))
           for d in case.lpet}
    spet_err = float(np.sqrt(np.mean((case.spet[case.body] - case.expectation[case.body]) ** 2)))
    assert err[0.05] > err[0.5] > spet_err > 0
    assert float(case.expectation.sum()) == pytest.approx(float(case.truth.sum()), rel=0.1)


def test_cases_are_deterministic_and_doses_independent(tiny_case) -> None:
    again = generate_case(TINY, 900000, doses=(0.5,))
    assert np.array_equal(again.lpet[0.5], tiny_case.lpet[0.5])
    for name in ("truth", "expectation", "spet", "ct_hu", "lesion_labels"):
        assert np.array_equal(getattr(again, name), getattr(tiny_case, name)), name
    other = generate_case(TINY, 900001, doses=(0.5,))
    assert not np.array_equal(other.truth, tiny_case.truth)


def test_save_and_load_round_trip(tiny_case, tmp_path: Path) -> None:
    loaded = load_case(save_case(tiny_case, tmp_path / "case"))
    assert loaded.lesions == tiny_case.lesions and loaded.lpet.keys() == tiny_case.lpet.keys()
    assert np.array_equal(loaded.lpet[0.05], tiny_case.lpet[0.05])
    assert loaded.pet_origin_mm == tiny_case.pet_origin_mm and loaded.bqml_per_suv == tiny_case.bqml_per_suv
    with pytest.raises(FileNotFoundError, match="no saved transfer case"):
        load_case(tmp_path / "missing")
