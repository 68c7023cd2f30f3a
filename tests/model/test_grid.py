"""The model grid covers the input's extent: every input voxel comes back from it."""

from __future__ import annotations

import numpy as np
import pytest

from model.grid import ModelGrid, resample_isotropic


@pytest.mark.parametrize(
    "spacing", [(4.0, 4.0, 4.0), (3.27, 5.47, 5.47), (2.5, 2.0, 2.0), (2.0, 4.07, 4.07), (3.0, 2.6, 2.6)]
)
def test_a_scanner_grid_goes_onto_the_model_grid_and_back_whole(spacing) -> None:
    ones = np.ones((9, 24, 24), np.float32)
    # No voxel of the model grid lies beyond the input (the default would show there) …
    assert resample_isotropic(ones, spacing, 2.0).min() == pytest.approx(1.0)
    # … and none of the input is lost on the way back (a GE-like 5.47 mm study lost its first
    # slice, row and column when the model grid started half a voxel difference late).
    grid = ModelGrid(ones, spacing, 2.0)
    back = grid.back(grid.onto(ones, default=0.0))
    assert back.shape == ones.shape and back.min() == pytest.approx(1.0)


def test_the_model_grid_is_centred_on_the_input() -> None:
    ramp = np.broadcast_to(np.arange(12, dtype=np.float32) * 4.0, (12, 12, 12)).copy()  # x in mm
    out = resample_isotropic(ramp, (4.0, 4.0, 4.0), 2.0)
    # 2 mm centres at −1, 1, 3, … mm from the first 4 mm centre: linear data read back linearly.
    np.testing.assert_allclose(out[6, 6, 1:-1], np.arange(1, 23) * 2.0 - 1.0, atol=1e-4)
