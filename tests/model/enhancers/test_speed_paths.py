"""The fast inference path gives the unoptimised path's output ; its timing hooks report stages.

No timing is asserted here: speed is measured by benchmarks/speed.py, correctness by these tests.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.enhance import InferenceOptions, load_enhancer
from model.enhancers.tiling import Blender, split_air, split_air_by_ct, tile_windows
from model.evaluation.metrics import psnr
from model.networks.unet import RelativePositionBias
from tests.support.model_toys import one_thread, tiny_checkpoint, tiny_phantom  # noqa: F401 - one_thread: autouse fixture

STAGES = {"resample", "normalise", "encode", "sample", "decode", "resample_back"}


def patient_in_air(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A tiny phantom with 48 voxels of air on both sides in x: tiles of pure air (by the CT) exist.

    The air holds low PET noise, as an MLEM reconstruction does, so no tile is exactly zero.
    """
    pet, ct = tiny_phantom(seed, (16, 48, 48))
    rng = np.random.default_rng(seed)
    big_pet = np.abs(rng.normal(0.0, 30.0, (16, 48, 144))).astype(np.float32)
    big_ct = np.full((16, 48, 144), -1000.0, dtype=np.float32)
    big_pet[:, :, 48:96] += pet
    big_ct[:, :, 48:96] = ct
    return big_pet, big_ct


def _enhance(path: str, pet: np.ndarray, ct: np.ndarray, **settings):  # noqa: ANN202
    enhancer = load_enhancer(path, options=InferenceOptions(device="cpu", steps=3, seed=1, **settings))
    out = enhancer.enhance_array(pet, ct if enhancer.info.uses_ct else None, spacing_mm=(2.0, 2.0, 2.0))
    return out, enhancer


def test_optimised_path_matches_the_unoptimised_one_inside_the_body(tmp_path) -> None:
    path = str(tiny_checkpoint(tmp_path, "ldm-p-ct"))
    pet, ct = patient_in_air()
    slow, slow_enhancer = _enhance(path, pet, ct, tile_batch=1, skip_air_ct=False)
    fast, fast_enhancer = _enhance(path, pet, ct)  # the defaults: batched tiles, CT-air tiles skipped
    assert slow_enhancer.tile_counts["skipped_air"] == 0
    assert fast_enhancer.tile_counts["skipped_air"] > 0  # the check below covers a real skip
    assert fast_enhancer.tile_counts["run"] + fast_enhancer.tile_counts["skipped_air"] == (
        fast_enhancer.tile_counts["tiles"]
    )
    body = ct > -900.0
    span = float(slow.max() - slow.min())
    # Inside the patient only batching differs: the same tiles, the same numbers up to float rounding.
    assert float(np.abs(fast - slow)[body].max()) <= 1e-4 * span
    reference = tiny_phantom(3, (16, 48, 48))[0]
    truth = np.zeros_like(pet)
    truth[:, :, 48:96] = reference
    lo, hi = float(truth[body].min()), float(truth[body].max())
    # The paper's PSNR (inside the body, model.metrics.paper_psnr_ssim): the quality budget is 0.2 dB.
    scores = [psnr(x, truth, data_range=hi - lo, mask=body) for x in (fast, slow)]
    drop = abs(scores[0] - scores[1])
    assert drop < 0.2
    # Far out in the air only skipped tiles cover a voxel: it keeps its input value.
    np.testing.assert_allclose(fast[:, :, :8], pet[:, :, :8], rtol=1e-5)


def test_batch_size_does_not_change_a_gaussian_variant(tmp_path) -> None:
    # LDM re-noises the LPET latent: the noise is drawn per tile, so batching leaves it as it was.
    path = str(tiny_checkpoint(tmp_path, "ldm"))
    pet, _ = tiny_phantom(4, (16, 48, 80))
    one, _ = _enhance(path, pet, None, tile_batch=1)
    many, enhancer = _enhance(path, pet, None, tile_batch=8)
    assert enhancer.tile_counts["run"] > 1
    np.testing.assert_allclose(many, one, rtol=0, atol=1e-4 * float(one.max()))


def test_timings_name_every_stage_of_the_last_call(tmp_path) -> None:
    path = str(tiny_checkpoint(tmp_path, "ldm-p-ct"))
    pet, ct = tiny_phantom(0, (16, 32, 32))
    _, enhancer = _enhance(path, pet, ct)
    assert set(enhancer.timings) == STAGES
    assert all(v >= 0.0 for v in enhancer.timings.values())
    enhancer.enhance_array(pet, ct, spacing_mm=(3.0, 2.0, 2.0))
    assert set(enhancer.timings) == STAGES  # reset per call, not accumulated across calls


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"tile_batch": 0}, "tile_batch must be ≥ 1, found 0"),
        ({"tile_overlap": 1.0}, r"tile_overlap must be in \[0, 1\), found 1.0"),
        ({"tiling": "slices"}, "tiling must be one of auto, whole, found 'slices'"),
        ({"dose_fraction": 0.0}, r"dose_fraction must be in \(0, 1\], found 0.0"),
        ({"steps": 0}, "steps must be ≥ 1, found 0"),
    ],
)
def test_settings_are_checked_when_the_options_are_built(setting: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        InferenceOptions(**setting)


def test_split_air_and_blender() -> None:
    x = np.zeros((4, 4, 8), dtype=np.float32)
    x[:, :, 5] = 1.0
    ct = np.full_like(x, -1000.0)
    ct[:, :, 1] = 0.0
    windows = tile_windows([(0, 0, 0), (0, 0, 4)], (4, 4, 4))
    busy, air = split_air(x, windows)
    assert busy == [windows[1]] and air == [windows[0]]
    busy, air = split_air_by_ct(ct, windows)
    assert busy == [windows[0]] and air == [windows[1]]
    blend = Blender(x.shape, np.full((4, 4, 4), 2.0, dtype=np.float32))
    blend.add(windows[0], np.full((4, 4, 4), 3.0, dtype=np.float32))
    blend.add(windows[1], np.full((4, 4, 4), 5.0, dtype=np.float32))
    blend.add(windows[1], np.full((4, 4, 4), 7.0, dtype=np.float32))
    out = blend.result()
    assert out[0, 0, 0] == 3.0 and out[0, 0, 7] == 6.0


def test_position_bias_is_kept_without_gradients_and_follows_weight_updates() -> None:
    bias = RelativePositionBias(2)
    torch.nn.init.normal_(bias.mlp[2].weight)
    with torch.no_grad():
        first = bias((2, 3, 3), device=torch.device("cpu"), dtype=torch.float32)
        assert bias((2, 3, 3), device=torch.device("cpu"), dtype=torch.float32) is first
        bias.mlp[2].bias.add_(1.0)  # an optimiser step updates in place
        second = bias((2, 3, 3), device=torch.device("cpu"), dtype=torch.float32)
    torch.testing.assert_close(second, first + 1.0)
    with_grad = bias((2, 3, 3), device=torch.device("cpu"), dtype=torch.float32)
    assert with_grad.requires_grad  # training never gets the cached tensor


def test_a_patient_beyond_the_ct_field_of_view_is_still_enhanced(tmp_path) -> None:
    # The CT grid is air where the CT did not reach; PET activity there is a patient, not air.
    path = str(tiny_checkpoint(tmp_path, "ldm-p-ct"))
    pet, ct = patient_in_air()
    pet[:, 10:30, 4:20] += 4000.0  # an arm the CT does not show
    _, enhancer = _enhance(path, pet, ct)
    _, unaware = _enhance(path, pet, ct, air_max_bqml=float("inf"))
    assert enhancer.tile_counts["skipped_air"] < unaware.tile_counts["skipped_air"]
    arm_tile_skipped = split_air_by_ct(ct, tile_windows([(0, 0, 0)], (16, 32, 32)), pet=pet, pet_limit=1500.0)
    assert arm_tile_skipped == ([tile_windows([(0, 0, 0)], (16, 32, 32))[0]], [])
