"""Small lesions added to a validation expectation: inside their host, apart from other lesions, with
the uptake asked for, and the inputs untouched."""

from __future__ import annotations

import numpy as np
import pytest

from model.evaluation.lesion_insertion import insert_lesions

ORGANS = {0: "air", 1: "liver", 2: "lung", 3: "bone"}
SUV = {"air": 0.0, "liver": 2.0, "lung": 0.5, "bone": 1.0}
BQML_PER_SUV = 5000.0


def _phantom() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    organs = np.zeros((40, 60, 60), dtype=np.uint8)
    organs[2:38, 5:55, 5:30] = 1  # liver: room for 14 mm spheres (7 voxels of 2 mm)
    organs[2:38, 5:55, 32:55] = 2  # lung
    organs[18:21, 28:31, 28:31] = 3  # bone: too small for any 10 mm sphere
    expectation = np.array([SUV[ORGANS[k]] for k in range(4)], dtype=np.float32)[organs] * BQML_PER_SUV
    lesions = np.zeros(organs.shape, dtype=np.uint16)
    lesions[18:22, 28:32, 14:18] = 1  # an existing lesion in the liver
    return expectation, organs, lesions


def _insert(seed: int = 0, resolution_fwhm_mm: float = 0.0, **kwargs):  # noqa: ANN202
    expectation, organs, lesions = _phantom()
    return insert_lesions(
        expectation, organs, lesions, organs=ORGANS, organ_suv=SUV, bqml_per_suv=BQML_PER_SUV,
        spacing_mm=2.0, resolution_fwhm_mm=resolution_fwhm_mm, rng=np.random.default_rng(seed),
        hosts=("liver", "lung", "bone", "liver"), **kwargs,
    )


def test_spheres_in_their_host_with_the_contrast_asked_for() -> None:
    expectation, organs, lesions = _phantom()
    out, labels, inserted = _insert(contrast=(4.0, 4.0), diameter_mm=(12.0, 12.0))
    assert [lesion.host for lesion in inserted] == ["liver", "lung", "liver"]  # no room in the bone
    assert [lesion.label for lesion in inserted] == [2, 3, 4]  # after the existing lesion
    assert (labels[lesions > 0] == 1).all()
    for lesion in inserted:
        mask = labels == lesion.label
        host = next(k for k, name in ORGANS.items() if name == lesion.host)
        assert (organs[mask] == host).all()
        assert 0.9 < mask.sum() * 8.0 / (np.pi / 6 * 12.0**3) < 1.1  # the sphere's volume in 2 mm voxels
        # Unblurred: the centre holds contrast × the host's uptake.
        assert out[lesion.center_voxel] == pytest.approx(4.0 * SUV[lesion.host] * BQML_PER_SUV, rel=1e-5)
        assert lesion.suv == pytest.approx(4.0 * SUV[lesion.host])
    # Apart from each other and from the existing lesion: at least 6 mm (3 voxels) between edges.
    from scipy import ndimage

    for lesion in inserted:
        others = (labels > 0) & (labels != lesion.label)
        distance = ndimage.distance_transform_edt(~others)
        assert distance[labels == lesion.label].min() > 3
    # Outside the spheres and their one-voxel rim nothing changed; the inputs were not modified.
    rim = ndimage.binary_dilation(labels > 1, iterations=1)
    assert np.array_equal(out[~rim], expectation[~rim])
    assert np.array_equal(_phantom()[0], expectation)


def test_blurred_by_the_resolution_and_drawn_from_the_generator() -> None:
    sharp, _, inserted = _insert(seed=3)
    blurred, _, again = _insert(seed=3, resolution_fwhm_mm=6.0)
    assert inserted == again  # the same draws: placement does not depend on the blur
    for lesion in inserted:
        assert blurred[lesion.center_voxel] < sharp[lesion.center_voxel]
    assert blurred.sum() == pytest.approx(sharp.sum(), rel=1e-3)  # the blur moves activity, adds none
    assert _insert(seed=4)[2] != inserted


def test_shapes_must_match() -> None:
    expectation, organs, lesions = _phantom()
    with pytest.raises(ValueError, match="shapes differ"):
        insert_lesions(expectation[1:], organs, lesions, organs=ORGANS, organ_suv=SUV, bqml_per_suv=1.0,
                       spacing_mm=2.0, resolution_fwhm_mm=4.0, rng=np.random.default_rng(0))
