"""Matching the noise index to the latent noise over scanner styles (model/training/calibration.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model.networks.autoencoder import AutoencoderConfig, AutoencoderKL
from model.networks.noise_level import LATENT_BAND
from model.training.calibration import IndexMatch, match_noise_index
from model.training.data import TrainingCase
from model.training.patches import PatchSampler, PerturbedPool
from tests.support.model_toys import one_thread, tiny_phantom  # noqa: F401 - one_thread: autouse fixture


def test_index_for_inverts_the_fit_and_counts_the_spet_s_own_noise() -> None:
    match = IndexMatch(intercept=math.log(4.0), slope=1.0, spread=0.1, pairs=10)  # σ² = 4 · index
    # At dose d the image carries Σ/d, of which σ_t² = Σ(1/d − 1) was added: σ_t² / (1 − d) in all.
    assert match.index_for([1.0], [0.5]) == [pytest.approx(0.5)]
    assert match.index_for([1.0], [0.01]) == [pytest.approx(0.25 / 0.99)]
    assert match.index_for([1.0], [1.0]) == [pytest.approx(0.25)]  # t = 0: only σ_0 to go by


def _pool(*, with_expectation: bool) -> PerturbedPool:
    pet, ct = tiny_phantom(0, (8, 64, 64))
    rng = np.random.default_rng(1)
    # The SPET is the expectation plus a standard dose's noise.
    spet = np.clip(pet + rng.normal(0.0, 0.05 * pet.max(), pet.shape), 0, None).astype(np.float32)
    case = TrainingCase("c", spet, ct, expectation=pet if with_expectation else None)
    sampler = PatchSampler(
        [case], patch=(8, 32, 32), scale_bqml=4000.0, rng=np.random.default_rng(0), with_ct=True
    )
    return PerturbedPool(
        sampler, timesteps=400, dose_min=1e-3, size=2, generator=torch.Generator().manual_seed(0)
    )


@pytest.mark.parametrize("with_expectation", [True, False])
def test_latent_noise_grows_with_the_index_over_random_styles(with_expectation: bool) -> None:
    torch.manual_seed(0)
    config = AutoencoderConfig(channels=(8, 8), num_res_blocks=(1, 1), latent_channels=4, norm_groups=4)
    autoencoder = AutoencoderKL(config).eval()
    pool = _pool(with_expectation=with_expectation)
    match = match_noise_index(
        autoencoder, pool, latent_scale=1.0, scale_bqml=4000.0, slabs=8, band=LATENT_BAND,
        device=torch.device("cpu"),
    )  # fmt: skip
    assert match.pairs == 8 and match.slope > 0 and match.spread >= 0
    # More latent noise needs a larger index, and the column is finite and positive.
    low, high = match.index_for([0.1, 1.0], [0.5, 0.01])
    assert 0 < low < high < math.inf
