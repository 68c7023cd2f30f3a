"""PET/CT phantom: determinism, anatomy present, uptake and HU per organ, lesions inside the body."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from model.simulation.phantom import (
    HU_RANGE,
    LABELS,
    ORGANS,
    PET_TEXTURE,
    SUV_RANGE,
    Phantom,
    generate_phantom,
)

SEEDS = (3, 11, 25)


@pytest.fixture(scope="module")
def phantoms() -> list[Phantom]:
    return [generate_phantom(seed) for seed in SEEDS]


def test_same_seed_same_phantom_and_different_seed_differs() -> None:
    a = generate_phantom(7, shape=(24, 64, 64))
    b = generate_phantom(7, shape=(24, 64, 64))
    c = generate_phantom(8, shape=(24, 64, 64))
    for name in ("activity_bqml", "ct_hu", "organ_labels", "lesion_labels"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.lesions == b.lesions and a.patient_weight_kg == b.patient_weight_kg
    assert not np.array_equal(a.activity_bqml, c.activity_bqml)


def test_arrays_have_the_requested_grid_and_types(phantoms: list[Phantom]) -> None:
    ph = phantoms[0]
    assert ph.activity_bqml.shape == ph.ct_hu.shape == ph.organ_labels.shape == (160, 256, 256)
    assert ph.activity_bqml.dtype == np.float32 and ph.ct_hu.dtype == np.float32
    assert ph.organ_labels.dtype == np.uint8 and ph.lesion_labels.dtype == np.uint16
    assert ph.spacing_mm == (2.0, 2.0, 2.0)
    small = generate_phantom(1, shape=(20, 48, 40), spacing_mm=(3.0, 2.5, 2.5))
    assert small.activity_bqml.shape == (20, 48, 40) and small.spacing_mm == (3.0, 2.5, 2.5)


def test_default_phantom_is_generated_in_a_few_seconds() -> None:
    start = time.perf_counter()
    generate_phantom(99)
    assert time.perf_counter() - start < 10.0  # ~1.3 s here; slack for a loaded machine


def test_chest_abdomen_organs_are_present(phantoms: list[Phantom]) -> None:
    required = ("fat", "muscle", "lung", "myocardium", "blood_pool", "liver", "spleen", "kidney", "bone")
    for ph in phantoms:
        present = {ORGANS[k] for k in np.unique(ph.organ_labels)}
        missing = [name for name in required if name not in present]
        assert not missing, f"seed {ph.seed}: missing {missing}"
        assert "liver" in ORGANS.values()


def test_body_fits_inside_the_field_of_view() -> None:
    for shape in ((160, 256, 256), (24, 64, 64)):
        ph = generate_phantom(5, shape=shape)
        body = ph.body_mask
        edges = [body[:, 0, :], body[:, -1, :], body[:, :, 0], body[:, :, -1]]
        assert not any(e.any() for e in edges), shape
        assert body.mean() > 0.15


def test_activity_is_fdg_like_per_organ(phantoms: list[Phantom]) -> None:
    for ph in phantoms:
        assert ph.activity_bqml.min() >= 0.0
        assert np.all(ph.activity_bqml[~ph.body_mask] == 0.0)
        suv = ph.activity_bqml / ph.bqml_per_suv
        healthy = ph.lesion_labels == 0
        for name, (lo, hi) in SUV_RANGE.items():
            mask = (ph.organ_labels == LABELS[name]) & healthy
            if name == "air" or mask.sum() < 50:
                continue
            median = float(np.median(suv[mask]))
            slack = 2 * PET_TEXTURE.get(name, 0.0) * hi + 0.05
            assert lo - slack <= median <= hi + slack, f"seed {ph.seed} {name}: SUV {median:.2f}"
        # SUV 1 is the injected activity, decayed, per gram of body weight.
        decay = math.exp(-math.log(2) * ph.uptake_time_s / 6586.2)
        assert ph.bqml_per_suv == pytest.approx(
            ph.injected_activity_bq * decay / (ph.patient_weight_kg * 1000)
        )
        assert 2.0e6 <= ph.injected_activity_bq / ph.patient_weight_kg <= 6.0e6  # 2–6 MBq/kg


def test_ct_is_in_hounsfield_units_consistent_with_anatomy(phantoms: list[Phantom]) -> None:
    for ph in phantoms:
        assert ph.ct_hu.min() >= -1024 and ph.ct_hu.max() <= 3071
        healthy = ph.lesion_labels == 0
        for name, (lo, hi) in HU_RANGE.items():
            mask = (ph.organ_labels == LABELS[name]) & healthy
            if name == "bone" or mask.sum() < 50:
                continue
            median = float(np.median(ph.ct_hu[mask]))
            assert lo - 15 <= median <= hi + 15, f"seed {ph.seed} {name}: {median:.0f} HU"
        bone = ph.ct_hu[ph.organ_labels == LABELS["bone"]]
        assert 150 <= np.median(bone) <= 1200 and np.percentile(bone, 99) > 500
        lung = float(np.median(ph.ct_hu[ph.organ_labels == LABELS["lung"]]))
        liver = float(np.median(ph.ct_hu[ph.organ_labels == LABELS["liver"]]))
        fat = float(np.median(ph.ct_hu[ph.organ_labels == LABELS["fat"]]))
        assert lung < fat < 0 < liver


def test_lesions_are_inside_the_body_with_sizes_and_contrasts_as_drawn() -> None:
    counts = []
    for seed in range(12):
        ph = generate_phantom(seed, shape=(64, 128, 128))
        counts.append(len(ph.lesions))
        assert 0 <= len(ph.lesions) <= 8
        assert np.all(ph.organ_labels[ph.lesion_labels > 0] > 0), "lesion voxels outside the body"
        assert set(np.unique(ph.lesion_labels)) == set(range(len(ph.lesions) + 1))
        suv = ph.activity_bqml / ph.bqml_per_suv
        vox_ml = np.prod(ph.spacing_mm)
        for lesion in ph.lesions:
            assert 4.0 <= lesion.diameter_mm <= 30.0
            assert 2.0 <= lesion.contrast <= 10.0
            mask = ph.lesion_labels == lesion.label
            if lesion.diameter_mm >= 10:
                sphere = math.pi / 6 * lesion.diameter_mm**3
                assert mask.sum() * vox_ml == pytest.approx(sphere, rel=0.35)
                assert np.max(suv[mask]) == pytest.approx(lesion.suv, rel=0.35)
            centre = tuple(int(round(c / s)) for c, s in zip(lesion.center_mm, ph.spacing_mm, strict=True))
            assert ph.lesion_labels[centre] == lesion.label
    assert max(counts) >= 3 and min(counts) <= 2  # 0–8 lesions: the number varies


def test_lesions_land_in_varied_organs() -> None:
    organs = set()
    for seed in range(20):
        organs |= {lesion.organ for lesion in generate_phantom(seed, shape=(48, 96, 96)).lesions}
    assert {"liver", "lung", "bone"} <= organs and len(organs) >= 4


def test_habitus_varies_between_patients(phantoms: list[Phantom]) -> None:
    weights = [ph.patient_weight_kg for ph in phantoms]
    body_area = [ph.body_mask[80].sum() for ph in phantoms]
    assert max(weights) - min(weights) > 5
    assert max(body_area) / min(body_area) > 1.1


@pytest.mark.parametrize("bad", [(0, 64, 64), (8, 4, 64), (32, 64)])
def test_bad_shapes_are_refused(bad) -> None:
    with pytest.raises(ValueError, match="shape"):
        generate_phantom(0, shape=bad)
