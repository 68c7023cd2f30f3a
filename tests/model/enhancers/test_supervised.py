"""The supervised reference U-Net: network, files (no pickles), enhancer contract, training, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from model.enhance import InferenceOptions, load_enhancer
from model.enhancers.supervised import SupervisedEnhancer
from model.evaluation import metrics
from model.networks.supervised_unet import SupervisedConfig, SupervisedUNet, load_supervised, save_supervised
from model.simulation import dataset
from model.training.supervised import (
    CHECKPOINT_NAME,
    PairSampler,
    SupervisedSettings,
    load_pairs,
    train_supervised,
)
from tests.support.model_toys import one_thread, tiny_phantom  # noqa: F401 - one_thread: autouse fixture

TINY = dict(channels=(8, 16), res_blocks=1, norm_groups=4, patch_size=(8, 16, 16))
SHAPE = (16, 32, 32)


def _load(path, **options):  # noqa: ANN001, ANN202
    """The enhancer of checkpoint ``path`` on the CPU."""
    return load_enhancer(str(path), options=InferenceOptions(device="cpu", **options))


@pytest.fixture(autouse=True)
def _no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load must never be used")

    monkeypatch.setattr(torch, "load", refuse)


def _tiny_model(seed: int = 0, *, perturb: bool = True, **overrides) -> SupervisedUNet:
    """A tiny network; ``perturb`` gives its zero-initialised output layer random weights (not identity)."""
    torch.manual_seed(seed)
    model = SupervisedUNet(SupervisedConfig(**{**TINY, "scale_bqml": 4000.0, **overrides}))
    if perturb:
        with torch.no_grad():
            model.out_conv.weight.normal_(0.0, 0.05)
    return model.eval()


def _simulated_pair(root, dose: float, seed: int = 3):
    case = dataset.simulate_case(seed, shape=SHAPE, doses=(dose,))
    dataset.save_case(case, root / "case_0000")
    return case


# --- the network ------------------------------------------------------------------------------------


def test_shapes_for_odd_sizes_and_gradients_reach_every_layer() -> None:
    model = _tiny_model(perturb=True).train()
    x = torch.rand(2, 1, 9, 17, 15)
    y = model(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    (y - 2 * x).abs().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_untrained_network_is_the_identity() -> None:
    model = _tiny_model(perturb=False)
    x = torch.rand(1, 1, 8, 16, 16) * 3
    with torch.no_grad():
        assert torch.allclose(model(x), x, atol=1e-6)
        assert float(model.correction(x).abs().max()) == 0.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(channels=(8, 10)), "channels\\[1\\] = 10 is not a positive multiple of norm_groups = 4"),
        (dict(res_blocks=0), "res_blocks must be ≥ 1"),
        (dict(scale_bqml=0.0), "scale_bqml must be positive"),
        (dict(dose=1.5), "dose must be in"),
        (dict(patch_size=(8, 16)), "patch_size must be 3 positive sizes"),
    ],
)
def test_config_is_validated_up_front(overrides, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SupervisedUNet(SupervisedConfig(**{**TINY, **overrides}))


def test_config_json_round_trip_and_refusals() -> None:
    config = SupervisedConfig(**TINY, scale_bqml=1234.5, training={"steps": 3})
    data = config.to_json()
    assert data["kind"] == "supervised" and data["channels"] == [8, 16]
    assert SupervisedConfig.from_json(json.loads(json.dumps(data))) == config
    with pytest.raises(ValueError, match="kind is 'ldm'"):
        SupervisedConfig.from_json({**data, "kind": "ldm"})
    with pytest.raises(ValueError, match="unknown supervised config key"):
        SupervisedConfig.from_json({**data, "attention": True})


# --- files ------------------------------------------------------------------------------------------


def test_save_load_gives_identical_outputs_from_safetensors_and_json(tmp_path) -> None:
    model = _tiny_model(1)
    path = save_supervised(tmp_path / "sup.safetensors", model)
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert header["__metadata__"] == {"format": "upete", "kind": "supervised"}
    assert json.loads(path.with_suffix(".json").read_text())["kind"] == "supervised"
    loaded = load_supervised(path)
    assert loaded.config == model.config
    x = torch.rand(2, 1, 8, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_a_checkpoint_that_does_not_match_its_config_is_refused(tmp_path) -> None:
    path = save_supervised(tmp_path / "sup.safetensors", _tiny_model())
    data = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".json").write_text(json.dumps({**data, "channels": [8, 16, 32]}))
    with pytest.raises(ValueError, match="does not match its config"):
        load_supervised(path)


# --- the enhancer -----------------------------------------------------------------------------------


def test_load_enhancer_routes_a_supervised_checkpoint(tmp_path) -> None:
    path = save_supervised(tmp_path / "supervised-unet.safetensors", _tiny_model())
    enhancer = _load(path, dose_fraction=0.25)
    assert isinstance(enhancer, SupervisedEnhancer)
    assert enhancer.info.name == "Supervised U-Net" and not enhancer.info.uses_ct
    assert enhancer.info.version in enhancer.info.description


def test_identity_network_returns_the_input_in_bqml_so_normalisation_inverts_exactly() -> None:
    pet, _ = tiny_phantom(0, (20, 40, 36))  # several tiles along every axis
    enhancer = SupervisedEnhancer(_tiny_model(perturb=False), version="test")
    out = enhancer.enhance_array(pet, spacing_mm=(2.0, 2.0, 2.0))
    assert out.dtype == np.float32 and out.shape == pet.shape
    np.testing.assert_allclose(out, pet, rtol=1e-5, atol=1e-2)


def test_enhancer_keeps_the_geometry_and_the_activity_scale() -> None:
    pet, _ = tiny_phantom(0, (12, 24, 24))
    enhancer = SupervisedEnhancer(_tiny_model(2), version="test")
    image = sitk.GetImageFromArray(pet)
    image.SetSpacing((3.0, 3.0, 2.5))  # not the model's 2 mm: resampled there and back
    image.SetOrigin((-30.0, 12.0, 400.0))
    out = enhancer.enhance(image)
    assert out.GetSize() == image.GetSize() and out.GetSpacing() == image.GetSpacing()
    assert out.GetOrigin() == image.GetOrigin() and out.GetDirection() == image.GetDirection()
    array = sitk.GetArrayFromImage(out)
    assert array.min() >= 0.0
    body = pet > 1000
    assert float(array[body].mean()) == pytest.approx(float(pet[body].mean()), rel=0.2)  # Bq/ml, not SUV


def test_tiles_of_pure_air_are_not_run_through_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    enhancer = SupervisedEnhancer(_tiny_model(), version="test")
    pet = np.zeros((8, 16, 64), dtype=np.float32)
    pet[:, :, :16] = tiny_phantom(0, (8, 16, 16))[0]
    calls = []
    forward = enhancer.model.forward
    monkeypatch.setattr(enhancer.model, "forward", lambda x: calls.append(x.shape[0]) or forward(x))
    out = enhancer.enhance_array(pet, spacing_mm=(2.0, 2.0, 2.0))
    assert 0 < sum(calls) == enhancer.tile_counts["run"] < enhancer.tile_counts["tiles"]
    assert enhancer.tile_counts["skipped_air"] > 0
    assert np.all(out[:, :, 40:] == 0)


# --- training ---------------------------------------------------------------------------------------


def test_pairs_share_the_crop_and_the_flips(tmp_path) -> None:
    _simulated_pair(tmp_path, 0.25)
    (pair,) = load_pairs(tmp_path, dose=0.25)
    assert pair.lpet.shape == pair.spet.shape == SHAPE
    sampler = PairSampler([pair], patch=(8, 16, 16), scale_bqml=4000.0, rng=np.random.default_rng(0))
    lpet, spet = sampler.batch(6)
    assert lpet.shape == spet.shape == (6, 1, 8, 16, 16)
    for k in range(6):  # same place and orientation: LPET = SPET + noise
        assert np.corrcoef(lpet[k].flatten(), spet[k].flatten())[0, 1] > 0.8
    with pytest.raises(ValueError, match="no LPET at dose 0.1"):
        load_pairs(tmp_path, dose=0.1)
    with pytest.raises(ValueError, match="no simulated case"):
        load_pairs(tmp_path / "empty", dose=0.25)


def test_a_tiny_run_lowers_the_loss_and_the_enhancer_beats_the_lpet(tmp_path) -> None:
    # 2 % dose: a noise level where a few dozen steps of a tiny network have much to gain.
    dose = 0.02
    case = _simulated_pair(tmp_path / "data", dose)
    settings = SupervisedSettings(
        data_dir=tmp_path / "data", out_dir=tmp_path / "out", dose=dose, steps=100, batch_size=4,
        lr=3e-3, warmup_steps=20, log_every_s=0.0, device="cpu", seed=0, **TINY,
    )  # fmt: skip
    result = train_supervised(settings)
    losses = np.array(result.losses)
    assert len(losses) == 100 and np.isfinite(losses).all()
    assert losses[-20:].mean() < 0.9 * losses[0]  # step 1 is the identity's loss: |LPET − SPET|
    assert result.checkpoint == tmp_path / "out" / CHECKPOINT_NAME
    config = json.loads(result.checkpoint.with_suffix(".json").read_text())
    assert config["kind"] == "supervised" and config["dose"] == dose
    assert config["training"]["steps"] == 100 and config["training"]["cases"] == 1
    assert 1000 < config["scale_bqml"] < 20000  # median body activity, a fixed Bq/ml scale

    lpet = case.lpet_bqml[dose]
    out = _load(result.checkpoint).enhance_array(lpet, spacing_mm=(2.0, 2.0, 2.0))
    for ref in (case.spet_bqml, case.expectation_bqml):
        before = metrics.psnr(lpet, ref, data_range=float(ref.max()))
        after = metrics.psnr(out, ref, data_range=float(ref.max()))
        assert after > before + 1.0, (before, after)


def test_training_resumes_where_it_stopped(tmp_path) -> None:
    _simulated_pair(tmp_path / "data", 0.1)
    common = dict(data_dir=tmp_path / "data", out_dir=tmp_path / "out", batch_size=2, log_every_s=0.0,
                  device="cpu", **TINY)  # fmt: skip
    first = train_supervised(SupervisedSettings(steps=3, **common))
    first_seconds = json.loads(first.checkpoint.with_suffix(".json").read_text())["training"]["seconds"]
    steps: list[int] = []
    second = train_supervised(
        SupervisedSettings(steps=5, resume=True, **common), on_step=lambda step, loss: steps.append(step)
    )
    assert steps == [4, 5]
    assert second.losses[:3] == first.losses and len(second.losses) == 5
    # The training time reported counts both invocations.
    second_seconds = json.loads(second.checkpoint.with_suffix(".json").read_text())["training"]["seconds"]
    assert second_seconds > first_seconds > 0
    # The same five steps in one go give the same losses: the RNG streams came back with the state.
    again = train_supervised(SupervisedSettings(**{**common, "out_dir": tmp_path / "once"}, steps=5))
    np.testing.assert_allclose(again.losses, second.losses, rtol=1e-5)
    with pytest.raises(ValueError, match="trains at dose 0.1, not 0.5"):
        train_supervised(SupervisedSettings(steps=6, resume=True, **{**common, "dose": 0.5}))


def test_upete_train_variant_supervised_simulates_pairs_and_trains(tmp_path, capsys) -> None:
    from upete.cli import main

    out = tmp_path / "out"
    args = ["train", "--variant", "supervised", "--simulate", "1", "--sim-shape", "16,32,32",
            "--dose", "0.25", "--out", str(out), "--steps", "2", "--patch", "8,16,16",
            "--unet-channels", "8,16", "--norm-groups", "4", "--device", "cpu"]  # fmt: skip
    assert main(args) == 0
    assert (out / "sim_data_d0.25" / "case_0000" / "arrays.npz").is_file()
    checkpoint = out / "supervised-unet.safetensors"
    assert isinstance(_load(checkpoint), SupervisedEnhancer)
    assert "--checkpoint" in capsys.readouterr().out
    assert main([*args, "--dose", "1.5"]) == 2
    assert "--dose must be in (0, 1]" in capsys.readouterr().err
