"""The shipped weights (model/weights/): they are the node's default, they load, and they enhance.

A phantom case of 16 slices at the training field of view (192 × 192 voxels of 2 mm), simulated here
with a seed no training, validation or test case uses, at 10 % dose: uPETe (LDM-P-CT) and its PET-only
fallback (LDM-P) must each raise the paper's PSNR and SSIM against the SPET well above the LPET's, keep
the activity in Bq/ml (mean inside the body within a few per cent) and keep lesions better than the
tuned Gaussian filter does. (The held-out test set's numbers are in benchmarks/results/quality.md.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dicomnode.config import DEFAULT_CONFIG, load_settings, resolve_checkpoint
from model.enhance import InferenceOptions, load_enhancer
from model.enhancers.classical import make_baseline
from model.evaluation.metrics import paper_psnr_ssim
from tests.support.model_toys import one_thread  # noqa: F401 - autouse fixture

ROOT = Path(__file__).resolve().parents[3]
WEIGHTS = ROOT / "model" / "weights"
SHIPPED = {"ldm-p-ct": WEIGHTS / "upete-ldm-p-ct.safetensors", "ldm-p": WEIGHTS / "upete-ldm-p.safetensors"}
DOSE = 0.1


def test_the_default_config_enhances_with_the_shipped_models() -> None:
    model = load_settings(DEFAULT_CONFIG).model
    assert Path(resolve_checkpoint(model.checkpoint)).resolve() == SHIPPED["ldm-p-ct"]
    assert Path(resolve_checkpoint(model.checkpoint_without_ct)).resolve() == SHIPPED["ldm-p"]
    assert model.steps is None  # the checkpoint's default, chosen from the steps curve


@pytest.mark.parametrize("variant", sorted(SHIPPED))
def test_shipped_checkpoint_is_a_trained_model_of_its_variant(variant: str) -> None:
    config = json.loads(SHIPPED[variant].with_suffix(".json").read_text())
    assert config["variant"] == variant
    denoiser = config["training"]["denoiser"]
    assert denoiser.get("steps_total", denoiser["steps"]) >= 1000  # fine-tuned: all runs' steps
    assert config["training"]["autoencoder"]["steps"] >= 1000
    assert 1 <= config["sampler"]["steps"] <= 50


def test_shipped_weights_fit_the_budget() -> None:
    total = sum(p.stat().st_size for p in WEIGHTS.iterdir() if p.is_file())
    assert total <= 50 * 1024 * 1024
    assert "not for clinical use" in (WEIGHTS / "README.md").read_text().lower()


@pytest.fixture(scope="module")
def case():
    from model.simulation.dataset import simulate_case

    # Seeds: training 0–99, validation 100000+, test 200000+, held-out reconstructions 300000+;
    # this one: OSEM, five lesions inside its 16 slices.
    return simulate_case(987_650, shape=(16, 192, 192), doses=[DOSE])


@pytest.mark.parametrize("variant", sorted(SHIPPED))
def test_shipped_model_improves_psnr_on_a_small_phantom(case, variant: str) -> None:
    options = InferenceOptions(device="cpu", dose_fraction=DOSE)
    enhancer = load_enhancer(str(SHIPPED[variant]), options=options)
    lpet = case.lpet_bqml[DOSE]
    ct = case.ct_hu if enhancer.info.uses_ct else None
    out = enhancer.enhance_array(lpet, ct, spacing_mm=case.spacing_mm)
    body = case.organ_labels > 0
    psnr_lpet, ssim_lpet = paper_psnr_ssim(lpet, case.spet_bqml, body)
    psnr_out, ssim_out = paper_psnr_ssim(out, case.spet_bqml, body)
    assert out.shape == lpet.shape and np.isfinite(out).all()
    assert psnr_out >= psnr_lpet + 2.0, (psnr_lpet, psnr_out)
    assert ssim_out >= ssim_lpet + 0.05, (ssim_lpet, ssim_out)
    # Quantitation: activity stays in Bq/ml.
    assert abs(out[body].mean() / case.spet_bqml[body].mean() - 1) < 0.05
    # Lesions kept better than by the best classical filter at this dose (a 13 mm Gaussian, tuned on
    # the validation cases), which halves these small lesions' mean activity (0.53 of the truth).
    # The retrained uPETe keeps 0.61 (the weights before it over 0.63): lesion contrast is the model's
    # weakest point, so the margin is kept tight enough to catch a further loss.
    lesions = case.lesion_labels > 0
    assert lesions.any()
    gaussian = make_baseline("gaussian", fwhm_mm=13.0).enhance_array(lpet, spacing_mm=case.spacing_mm)
    truth = case.expectation_bqml[lesions].mean()
    assert out[lesions].mean() / truth > gaussian[lesions].mean() / truth + 0.05
