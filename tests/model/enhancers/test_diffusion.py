"""The uPETe Enhancer on tiny checkpoints: end to end in seconds, deterministic, exact normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from model.enhance import InferenceOptions, load_enhancer
from model.enhancers.diffusion import DiffusionEnhancer
from model.enhancers.tiling import gaussian_weights, tile_starts
from model.networks.upete_model import NormalisationConfig
from model.units import FWHM_PER_SIGMA
from tests.support.model_toys import one_thread, tiny_checkpoint, tiny_phantom  # noqa: F401 - one_thread: autouse fixture


def _load(path, **options):  # noqa: ANN001, ANN202
    """The enhancer of checkpoint ``path`` on the CPU."""
    return load_enhancer(str(path), options=InferenceOptions(device="cpu", **options))


@pytest.mark.parametrize("variant", ["ldm", "ldm-p", "ldm-ct", "ldm-p-ct"])
def test_enhancer_runs_end_to_end_on_a_small_volume(tmp_path, variant: str) -> None:
    enhancer = _load(tiny_checkpoint(tmp_path, variant), steps=3)
    assert isinstance(enhancer, DiffusionEnhancer)
    assert enhancer.info.uses_ct == enhancer.info.requires_ct == variant.endswith("ct")
    assert enhancer.info.name == f"uPETe {variant.upper()}" and len(enhancer.info.version) == 12
    pet, ct = tiny_phantom(1, (40, 48, 56))
    stages = []
    out = enhancer.enhance_array(pet, ct if enhancer.info.uses_ct else None, spacing_mm=(2.0, 2.0, 2.0),
                                 progress=lambda f, s: stages.append((f, s)))  # fmt: skip
    assert out.shape == pet.shape and out.dtype == np.float32
    assert np.isfinite(out).all() and (out >= 0).all()
    assert stages[0][0] == 0.0 and stages[-1] == (1.0, "done")
    assert [f for f, s in stages if s == "diffusion"] == sorted(f for f, s in stages if s == "diffusion")


def test_same_seed_same_output_and_the_gaussian_variant_depends_on_the_seed(tmp_path) -> None:
    path = str(tiny_checkpoint(tmp_path, "ldm"))
    pet, _ = tiny_phantom(2, (16, 32, 32))
    a = _load(path, steps=2, seed=5).enhance_array(pet, spacing_mm=(2.0, 2.0, 2.0))
    b = _load(path, steps=2, seed=5).enhance_array(pet, spacing_mm=(2.0, 2.0, 2.0))
    c = _load(path, steps=2, seed=6).enhance_array(pet, spacing_mm=(2.0, 2.0, 2.0))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)  # LDM noises the LPET latent to t*


def test_ct_variant_needs_the_ct(tmp_path) -> None:
    enhancer = _load(tiny_checkpoint(tmp_path, "ldm-p-ct"))
    pet, _ = tiny_phantom(0, (16, 32, 32))
    with pytest.raises(ValueError, match="needs a CT"):
        enhancer.enhance_array(pet, None, spacing_mm=(2.0, 2.0, 2.0))


@pytest.mark.parametrize("mode", ["fixed", "minmax"])
def test_normalisation_is_inverted_exactly(tmp_path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    path = tiny_checkpoint(tmp_path, "ldm-p", normalisation=NormalisationConfig(mode=mode, scale_bqml=3000.0))
    enhancer = _load(path)
    seen = {}

    def identity(x, ct, t_poisson, progress, *_):  # the model as the identity: what goes in must come out
        seen["x"] = x
        return x

    monkeypatch.setattr(enhancer, "_run_tiles", identity)
    pet, _ = tiny_phantom(0, (16, 32, 32))
    out = enhancer.enhance_array(pet, spacing_mm=(2.0, 2.0, 2.0))
    np.testing.assert_allclose(out, pet, rtol=1e-6, atol=1e-3)
    if mode == "fixed":
        np.testing.assert_allclose(seen["x"], pet / 3000.0, rtol=1e-6)
    else:
        assert seen["x"].min() == pytest.approx(0.0) and seen["x"].max() == pytest.approx(1.0)


def test_other_spacings_are_resampled_to_2mm_and_back(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    enhancer = _load(tiny_checkpoint(tmp_path, "ldm-p"))
    shapes = []
    monkeypatch.setattr(enhancer, "_run_tiles", lambda x, ct, t, p, *_: shapes.append(x.shape) or x)
    pet, _ = tiny_phantom(0, (20, 32, 32))
    out = enhancer.enhance_array(pet, spacing_mm=(3.0, 4.0, 4.0))
    assert shapes == [(30, 64, 64)]  # same extent on the 2 mm grid
    assert out.shape == pet.shape
    body = pet > 1000
    assert (
        np.abs(out - pet)[body].mean() < 0.05 * pet[body].mean()
    )  # linear there and back: smooth image kept


def test_dose_fraction_or_noise_places_the_lpet_on_the_schedule(tmp_path) -> None:
    path = str(tiny_checkpoint(tmp_path, "ldm-p"))
    known = _load(path, dose_fraction=0.1)
    assert known.poisson_step(np.zeros((4, 4, 4))) == pytest.approx(400 / 3)
    estimated = _load(path)
    quiet, noisy = np.full((8, 16, 16), 1.0), np.random.default_rng(0).poisson(10.0, (8, 16, 16)) / 10.0
    assert estimated.poisson_step(quiet) == 0.0
    assert 0 < estimated.poisson_step(noisy) <= 400


def test_tiles_cover_the_volume_and_blend_smoothly() -> None:
    assert tile_starts(32, 32, 0.25) == [0]
    starts = tile_starts(100, 32, 0.25)
    assert starts[0] == 0 and starts[-1] == 68
    assert all(b - a <= 24 for a, b in zip(starts, starts[1:], strict=False))
    w = gaussian_weights((16, 32, 32))
    assert w.max() == pytest.approx(1.0) and w.min() >= 1e-3
    assert w[8, 16, 16] > w[0, 16, 16]


def test_tiled_and_whole_volume_inference_agree_on_a_one_patch_volume(tmp_path) -> None:
    path = tiny_checkpoint(tmp_path, "ldm-p-ct")
    pet, ct = tiny_phantom(0, (16, 32, 32))
    tiled = _load(path, steps=2)
    whole = _load(path, steps=2, tiling="whole")
    a = tiled.enhance_array(pet, ct, spacing_mm=(2.0, 2.0, 2.0))
    b = whole.enhance_array(pet, ct, spacing_mm=(2.0, 2.0, 2.0))
    np.testing.assert_array_equal(a, b)


def test_sitk_interface_keeps_the_geometry(tmp_path) -> None:
    enhancer = _load(tiny_checkpoint(tmp_path, "ldm-p"), steps=2)
    pet, _ = tiny_phantom(0, (16, 32, 32))
    image = sitk.GetImageFromArray(pet)
    image.SetSpacing((2.0, 2.0, 2.0))
    image.SetOrigin((-30.0, 12.0, 400.0))
    out = enhancer.enhance(image)
    assert out.GetSize() == image.GetSize() and out.GetOrigin() == image.GetOrigin()


def test_a_checkpoint_without_a_trained_denoiser_is_refused(tmp_path) -> None:
    path = tiny_checkpoint(tmp_path, "ldm-p", training={"denoiser": {"steps": 0}})
    with pytest.raises(ValueError, match="autoencoder only"):
        _load(path)


def test_tiles_of_pure_air_are_not_run_through_the_model(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    enhancer = _load(tiny_checkpoint(tmp_path, "ldm-p"), steps=2)
    pet = np.zeros((16, 32, 96), dtype=np.float32)
    pet[:, :, :32] = tiny_phantom(0, (16, 32, 32))[0]  # activity in the first third only
    calls = []
    encode = enhancer.model.autoencoder.encode
    monkeypatch.setattr(enhancer.model.autoencoder, "encode", lambda x: calls.append(x.shape[0]) or encode(x))
    out = enhancer.enhance_array(pet, spacing_mm=(2.0, 2.0, 2.0))
    assert sum(calls) < len(tile_starts(96, 32, 0.25))  # the air tiles were skipped
    assert np.all(out[:, :, 72:] == 0)


def test_local_mean_setting_keeps_the_lpets_activity_at_that_scale(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scipy import ndimage

    from model.networks.upete_model import SamplerConfig

    path = tiny_checkpoint(tmp_path, "ldm-p", sampler=SamplerConfig(steps=2, local_mean_fwhm_mm=20.0))
    enhancer = _load(path)
    assert "local mean kept at 20 mm" in enhancer.info.description

    def drifting(x, ct, t_poisson, progress, *_):  # a "model" that raises the hot half by 30 %
        out = x.copy()
        out[:, :, x.shape[2] // 2 :] *= 1.3
        return out

    monkeypatch.setattr(enhancer, "_run_tiles", drifting)
    pet, _ = tiny_phantom(0, (24, 48, 48))
    out = enhancer.enhance_array(pet, spacing_mm=(2.0, 2.0, 2.0))
    sigma = 20.0 / FWHM_PER_SIGMA / 2.0
    local = ndimage.gaussian_filter(out, sigma, mode="nearest", truncate=3.0)
    expected = ndimage.gaussian_filter(pet, sigma, mode="nearest", truncate=3.0)
    body = expected > 0.2 * expected.max()
    np.testing.assert_allclose(local[body], expected[body], rtol=0.05)
    drift = drifting(pet, None, 0.0, None)
    assert np.abs(out - pet)[body].mean() < 0.25 * np.abs(drift - pet)[body].mean()


def test_decoder_detail_is_put_back_for_a_clean_lpet_only(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from model.networks.upete_model import SamplerConfig

    plain_path = tiny_checkpoint(tmp_path / "plain", "ldm-p", sampler=SamplerConfig(steps=2))
    detail_path = tiny_checkpoint(
        tmp_path / "detail", "ldm-p", sampler=SamplerConfig(steps=2, decoder_detail_fwhm_mm=4.0)
    )
    pet, _ = tiny_phantom(3, (24, 48, 48))
    spacing = (2.0, 2.0, 2.0)
    # A noisy LPET (5 % dose equivalent, below the default 18 %): nothing added, nothing decoded twice.
    noisy = [
        _load(p, dose_fraction=0.05).enhance_array(pet, spacing_mm=spacing) for p in (plain_path, detail_path)
    ]
    np.testing.assert_array_equal(*noisy)

    # A clean one, with the sampler left out: the untrained decoder's error on the image is put back.
    outputs = {}
    for name, path in (("plain", plain_path), ("detail", detail_path)):
        enhancer = _load(path, dose_fraction=0.8)
        monkeypatch.setattr(enhancer.model.diffusion, "sample", lambda z, t, **_: z)
        outputs[name] = enhancer.enhance_array(pet, spacing_mm=spacing)
    assert "decoder detail restored at 4 mm" in _load(detail_path).info.description
    body = pet > 0.2 * pet.max()
    plain_error = np.abs(outputs["plain"] - pet)[body].mean()
    assert np.abs(outputs["detail"] - pet)[body].mean() < 0.5 * plain_error


def test_significance_setting_puts_back_a_lesion_the_model_flattened(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scipy import ndimage

    from model.networks.upete_model import SamplerConfig

    path = tiny_checkpoint(tmp_path, "ldm-p", sampler=SamplerConfig(steps=2, significance_fwhm_mm=5.0))
    enhancer = _load(path)
    assert "LPET differences beyond 4 σ kept at 5 mm" in enhancer.info.description
    pet = np.full((24, 48, 48), 1000.0, dtype=np.float32)
    pet[10:14, 22:26, 22:26] = 5000.0  # a lesion of 8 mm, 5× its background, in a noiseless LPET
    flattening = lambda x, *_: ndimage.median_filter(x, size=9)  # noqa: E731 - a "model" that erases it
    monkeypatch.setattr(enhancer, "_run_tiles", flattening)
    out = enhancer.enhance_array(pet, spacing_mm=(2.0, 2.0, 2.0))
    lesion = pet > 2000
    assert flattening(pet)[lesion].max() < 1500  # the model lost it (a median filter commutes with scale)
    assert out[lesion].max() > 3000  # it came back (as seen at 5 mm)
    assert np.abs(out - pet)[~ndimage.binary_dilation(lesion, iterations=6)].max() < 1.0  # nothing else moved
    # Placed at a 2 % dose equivalent (below significance_doses' 6 %): the step is off.
    plain = tiny_checkpoint(tmp_path / "plain", "ldm-p", sampler=SamplerConfig(steps=2))
    noisy = []
    for checkpoint in (plain, path):
        low = _load(checkpoint, dose_fraction=0.02)
        monkeypatch.setattr(low, "_run_tiles", flattening)
        noisy.append(low.enhance_array(pet, spacing_mm=(2.0, 2.0, 2.0)))
    np.testing.assert_array_equal(*noisy)
    # With a low-dose setting the rest of the weight goes to it there: the lesion comes back, coarser.
    coarse = tiny_checkpoint(tmp_path / "coarse", "ldm-p", sampler=SamplerConfig(
        steps=2, significance_fwhm_mm=5.0, significance_low_fwhm_mm=7.0, significance_low_threshold=5.0))
    low = _load(coarse, dose_fraction=0.02)
    assert "(5 σ at 7 mm where the LPET is placed low)" in low.info.description
    monkeypatch.setattr(low, "_run_tiles", flattening)
    restored = low.enhance_array(pet, spacing_mm=(2.0, 2.0, 2.0))
    assert restored[lesion].max() > noisy[0][lesion].max() + 500
    assert np.abs(restored - pet)[~ndimage.binary_dilation(lesion, iterations=8)].max() < 1.0
