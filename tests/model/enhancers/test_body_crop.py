"""The model grid cropped to the body (model.grid.ModelGrid with a body mask) leaves the body's output as
it was and keeps the input beyond the crop; the tile grid is anchored so that a crop meets the same tiles.
"""

from __future__ import annotations

import numpy as np
import pytest

from model.enhance import InferenceOptions, load_enhancer
from model.enhancers.tiling import body_mask, tile_starts, tile_stride
from model.grid import ModelGrid, bounding_box
from model.networks.upete_model import SamplerConfig
from tests.support.model_toys import one_thread, tiny_checkpoint, tiny_phantom  # noqa: F401 - one_thread: autouse fixture


def patient_in_wide_air(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """A tiny phantom 80 voxels from one side of a wide field of view, MLEM-like noise in the air."""
    pet, ct = tiny_phantom(seed, (16, 32, 40))
    rng = np.random.default_rng(seed)
    big_pet = np.abs(rng.normal(0.0, 30.0, (40, 40, 200))).astype(np.float32)
    big_ct = np.full(big_pet.shape, -1000.0, dtype=np.float32)
    big_pet[12:28, 4:36, 80:120] += pet
    big_ct[12:28, 4:36, 80:120] = ct
    return big_pet, big_ct


@pytest.mark.parametrize("spacing", [(2.0, 2.0, 2.0), (2.5, 2.0, 1.6)])
def test_the_crop_leaves_the_bodys_output_as_it_was(tmp_path, spacing: tuple[float, float, float]) -> None:
    # With the local-mean filter on: its reach is part of the margin the crop keeps.
    path = str(tiny_checkpoint(tmp_path, "ldm-p-ct", sampler=SamplerConfig(steps=2, local_mean_fwhm_mm=12.0)))
    pet, ct = patient_in_wide_air()
    runs = {}
    for crop in (False, True):
        options = InferenceOptions(device="cpu", dose_fraction=0.1, seed=1, crop_to_body=crop)
        enhancer = load_enhancer(path, options=options)
        runs[crop] = enhancer.enhance_array(pet, ct, spacing_mm=spacing), enhancer.tile_counts["tiles"]
    (whole, whole_tiles), (cropped, cropped_tiles) = runs[False], runs[True]
    assert cropped_tiles < whole_tiles  # the crop took effect
    body = ct > -900.0
    span = float(whole.max() - whole.min())
    # Float rounding only: the untrained toy's output nears zero in places, where the local-mean step's
    # ratio (floored at 1e-3 of its largest local mean) magnifies a rounding difference of the filters
    # near the crop's edge into ~3e-4 of that voxel's value on some CPUs; a misplaced crop or tile would
    # be off by its whole value.
    error = np.abs(cropped - whole)[body]
    assert float(np.max(error - 1e-3 * np.abs(whole[body]))) <= 1e-5 * span
    # Far from the body, beyond any margin, the output is the input: what a tile of air keeps.
    np.testing.assert_array_equal(cropped[:, :, -4:], pet[:, :, -4:])


def test_the_crop_starts_on_the_tile_grid_and_keeps_a_margin() -> None:
    pet = np.zeros((20, 30, 200), dtype=np.float32)
    pet[5:15, 10:20, 100:110] = 1.0
    grid = ModelGrid(pet, (2.0, 2.0, 2.0), 2.0, body=body_mask(pet), margin=(0, 0, 30), align=(1, 1, 24))
    # One voxel more on each side (what the resampling may reach); 100 - 1 - 30 = 69, down to 2 × 24.
    assert grid.box == (slice(4, 16), slice(9, 21), slice(48, 141))
    assert grid.onto(pet, default=0.0).shape == (12, 12, 93)
    out = grid.back(np.full((12, 12, 93), 7.0, dtype=np.float32), outside=pet + 3.0)
    assert np.all(out[4:16, 9:21, 48:141] == 7.0)
    assert np.all(out[:, :, :48] == 3.0) and np.all(out[:, :, 141:] == 3.0) and np.all(out[:4] == 3.0)


def test_a_body_filling_the_field_of_view_or_none_at_all_crops_nothing() -> None:
    pet = np.ones((8, 8, 8), dtype=np.float32)
    assert ModelGrid(pet, (2.0, 2.0, 2.0), 2.0, body=pet > 0).box is None
    assert ModelGrid(pet, (2.0, 2.0, 2.0), 2.0, body=pet > 1).box is None  # no body: the whole FOV
    assert bounding_box(np.zeros((3, 3), dtype=bool)) is None


def test_body_mask_follows_the_tiles_air_rules() -> None:
    pet = np.array([[[0.0, 10.0, 2000.0, 10.0]]], dtype=np.float32)
    ct = np.array([[[-1000.0, -1000.0, -1000.0, 0.0]]], dtype=np.float32)
    assert body_mask(pet).tolist() == [[[False, True, True, True]]]
    assert body_mask(pet, ct, air_hu=-900.0, pet_limit=1500.0).tolist() == [[[False, False, True, True]]]


def test_tiles_start_at_multiples_of_the_stride_and_the_last_is_flush() -> None:
    assert tile_stride(48, 0.25) == 36
    assert tile_starts(150, 48, 0.25) == [0, 36, 72, 102]
    assert tile_starts(108, 48, 0.25) == [0, 36, 60]
