"""Putting back the decoder's error on the LPET: the weight by dose equivalent, the smoothed residual."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from model.enhancers.detail import dose_weight, restore_decoder_detail


def test_the_weight_rises_from_none_to_whole_linearly_in_log_dose() -> None:
    doses = (0.2, 0.4)
    assert dose_weight(0.05, doses) == dose_weight(0.2, doses) == 0.0
    assert dose_weight(0.4, doses) == dose_weight(1.0, doses) == 1.0
    assert dose_weight(math.sqrt(0.2 * 0.4), doses) == pytest.approx(0.5)
    weights = [dose_weight(d, doses) for d in np.linspace(0.2, 0.4, 9)]
    assert weights == sorted(weights)


def test_a_decoder_that_loses_a_lesion_gets_it_back_at_the_filters_scale() -> None:
    lpet = np.full((2, 24, 24, 24), 1.0, dtype=np.float32)
    lpet[:, 10:14, 10:14, 10:14] = 5.0  # an 8 mm "lesion" on a 2 mm grid
    decoded = ndimage.uniform_filter(lpet, (0, 7, 7, 7))  # a decoder that smears it
    output = decoded.copy()  # the sampler's output, with the same loss
    restored = restore_decoder_detail(output, lpet, decoded, weight=1.0, sigma_voxels=0.5)
    assert restored.dtype == np.float32 and restored.shape == lpet.shape
    peak = (slice(None), slice(10, 14), slice(10, 14), slice(10, 14))
    assert output[peak].max() < 2.5 < 4.0 < restored[peak].max()
    smooth = ndimage.gaussian_filter(lpet - decoded, (0, 0.5, 0.5, 0.5), mode="nearest", truncate=3.0)
    expected = output + smooth
    np.testing.assert_allclose(restored, expected, rtol=1e-5, atol=1e-5)  # tiles of a batch kept apart
    half = restore_decoder_detail(output, lpet, decoded, weight=0.5, sigma_voxels=0.5)
    np.testing.assert_allclose(half - output, 0.5 * (restored - output), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="shapes differ"):
        restore_decoder_detail(output, lpet[:1], decoded, weight=1.0, sigma_voxels=0.5)
