"""Checkpoint files: safetensors + JSON, round trips with identical outputs, no unpickling, training state."""

from __future__ import annotations

import json

import pytest
import torch

from model.networks.checkpoint import (
    config_path,
    load_checkpoint,
    load_model_config,
    load_training_state,
    save_checkpoint,
    save_training_state,
    weights_digest,
)
from model.networks.upete_model import ModelConfig, UPETeModel
from tests.support.model_toys import one_thread, tiny_checkpoint, tiny_config  # noqa: F401 - one_thread: autouse fixture


@pytest.fixture(autouse=True)
def _no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load must never be used")

    monkeypatch.setattr(torch, "load", refuse)


@pytest.mark.parametrize("variant", ["ldm", "ldm-p", "ldm-ct", "ldm-p-ct"])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, variant: str) -> None:
    path = tiny_checkpoint(tmp_path, variant, seed=1)
    original = UPETeModel(tiny_config(variant))
    original.load_state_dict(load_checkpoint(path).state_dict())  # same weights, fresh object
    loaded = load_checkpoint(path)
    assert loaded.config == original.config == load_model_config(path)
    torch.manual_seed(0)
    x = torch.rand(1, 1, 16, 32, 32)
    ct = torch.randn(1, 1, 16, 32, 32) * 400 if loaded.config.variant.uses_ct else None
    with torch.no_grad():
        outputs = []
        for model in (original.eval(), loaded):
            z = model.autoencoder.encode(x).mean
            z_ct = model.diffusion.encode_ct(ct)
            sample = model.diffusion.sample(z, 120, z_ct=z_ct, steps=3)
            outputs.append((z, model.autoencoder.decode(sample)))
    for a, b in zip(*outputs, strict=True):
        assert torch.equal(a, b)


def test_files_are_safetensors_and_json(tmp_path) -> None:
    path = tiny_checkpoint(tmp_path, "ldm-p-ct")
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    assert header["__metadata__"]["format"] == "upete"
    document = json.loads(config_path(path).read_text())
    assert document["variant"] == "ldm-p-ct"
    assert set(document) >= {
        "autoencoder", "unet", "ct_encoder", "schedule", "normalisation", "latent_scale", "noise_curve",
        "patch_size", "training", "format_version", "software_version",
    }  # fmt: skip
    assert ModelConfig.from_json(document) == load_model_config(path)
    version = weights_digest(path)
    assert len(version) == 12
    # The config is part of the version: a new noise curve or sampler changes the output as weights do.
    config_path(path).write_text(json.dumps({**document, "latent_scale": 2.0 * document["latent_scale"]}))
    assert weights_digest(path) != version


def test_config_errors_name_the_problem(tmp_path) -> None:
    path = tiny_checkpoint(tmp_path, "ldm")
    cfg = config_path(path)
    document = json.loads(cfg.read_text())
    cfg.write_text(json.dumps({**document, "colour": "blue"}))
    with pytest.raises(ValueError, match="unknown keys \\['colour'\\]"):
        load_checkpoint(path)
    cfg.write_text(json.dumps({**document, "format_version": 99}))
    with pytest.raises(ValueError, match="format 99"):
        load_checkpoint(path)
    cfg.write_text(json.dumps({**document, "unet": {**document["unet"], "channels": [8, 16, 32]}}))
    with pytest.raises(ValueError, match="does not match its config"):
        load_checkpoint(path)
    cfg.unlink()
    with pytest.raises(FileNotFoundError, match="must sit beside"):
        load_checkpoint(path)


def test_model_config_validation_catches_inconsistent_variants() -> None:
    config = tiny_config("ldm-p-ct")
    with pytest.raises(ValueError, match="ct_encoder must be given exactly for CT variants"):
        ModelConfig.from_json({**config.to_json(), "ct_encoder": None})
    with pytest.raises(ValueError, match="cannot use a gaussian schedule"):
        ModelConfig.from_json(
            {**config.to_json(), "schedule": {**config.to_json()["schedule"], "kind": "gaussian"}}
        )
    with pytest.raises(ValueError, match="multiple of 16"):
        ModelConfig.from_json({**config.to_json(), "patch_size": [16, 24, 32]})


def test_training_state_round_trip_restores_modules_optimizers_and_rng(tmp_path) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    data = torch.randn(8, 3)
    for _ in range(3):
        opt.zero_grad()
        net(data).pow(2).mean().backward()
        opt.step()
    rng = {"torch_cpu": torch.get_rng_state()}
    save_training_state(tmp_path / "state.safetensors", modules={"net": net}, optimizers={"opt": opt},
                        meta={"stage": "ae", "step": 3}, rng=rng)  # fmt: skip

    clone = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    clone_opt = torch.optim.AdamW(clone.parameters(), lr=1.0)
    meta, rng_back = load_training_state(tmp_path / "state.safetensors", modules={"net": clone},
                                         optimizers={"opt": clone_opt})  # fmt: skip
    assert meta == {"stage": "ae", "step": 3}
    assert torch.equal(rng_back["torch_cpu"], rng["torch_cpu"])
    assert clone_opt.param_groups[0]["lr"] == 1e-2
    # One more identical step on both gives identical weights: the Adam moments came back too.
    for model, optimizer in ((net, opt), (clone, clone_opt)):
        optimizer.zero_grad()
        model(data).pow(2).mean().backward()
        optimizer.step()
    for a, b in zip(net.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)


def test_save_refuses_other_suffixes(tmp_path) -> None:
    with pytest.raises(ValueError, match="safetensors"):
        save_checkpoint(tmp_path / "model.pt", UPETeModel(tiny_config("ldm")))


def test_the_decoder_detail_setting_round_trips_and_is_checked() -> None:
    document = tiny_config("ldm-p").to_json()
    sampler = {**document["sampler"], "decoder_detail_fwhm_mm": 5.0, "decoder_detail_doses": [0.2, 0.4]}
    config = ModelConfig.from_json({**document, "sampler": sampler})
    assert config.sampler.decoder_detail_doses == (0.2, 0.4) and config.sampler.decoder_detail_fwhm_mm == 5.0
    assert ModelConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    old = {k: v for k, v in document["sampler"].items() if not k.startswith("decoder_detail")}
    assert ModelConfig.from_json({**document, "sampler": old}).sampler.decoder_detail_fwhm_mm == 0.0  # off
    for bad, message in (({"decoder_detail_doses": [0.4, 0.2]}, "0 < low < high"),
                         ({"decoder_detail_fwhm_mm": -1.0}, "must be ≥ 0")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            ModelConfig.from_json({**document, "sampler": {**document["sampler"], **bad}})


def test_the_significance_setting_round_trips_and_is_checked() -> None:
    document = tiny_config("ldm-p").to_json()
    sampler = {**document["sampler"], "significance_fwhm_mm": 5.0, "significance_threshold": 3.5}
    config = ModelConfig.from_json({**document, "sampler": sampler})
    assert config.sampler.significance_fwhm_mm == 5.0 and config.sampler.significance_threshold == 3.5
    assert ModelConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    old = {k: v for k, v in document["sampler"].items() if not k.startswith("significance")}
    assert ModelConfig.from_json({**document, "sampler": old}).sampler.significance_fwhm_mm == 0.0  # off
    for bad, message in (({"significance_fwhm_mm": -1.0}, "must be ≥ 0"),
                         ({"significance_threshold": 1.0}, "above 1"),
                         ({"significance_window_mm": 0.0}, "positive"),
                         ({"significance_doses": [0.2, 0.1]}, "0 < low < high")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            ModelConfig.from_json({**document, "sampler": {**document["sampler"], **bad}})


def test_the_low_dose_significance_setting_round_trips_and_is_checked() -> None:
    document = tiny_config("ldm-p").to_json()
    sampler = {**document["sampler"], "significance_fwhm_mm": 5.0, "significance_low_fwhm_mm": 7.0,
               "significance_low_threshold": 5.0}
    config = ModelConfig.from_json({**document, "sampler": sampler})
    assert (config.sampler.significance_low_fwhm_mm, config.sampler.significance_low_threshold) == (7.0, 5.0)
    assert ModelConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    assert ModelConfig.from_json(document).sampler.significance_low_fwhm_mm == 0.0  # off by default
    for bad, message in (({"significance_low_fwhm_mm": -1.0}, "must be ≥ 0"),
                         ({"significance_low_threshold": 0.5}, "above 1"),
                         ({"significance_fwhm_mm": 0.0}, "needs significance_fwhm_mm")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            ModelConfig.from_json({**document, "sampler": {**sampler, **bad}})
