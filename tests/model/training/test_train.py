"""Training on CPU with tiny settings: losses fall, Poisson slabs, calibration, resume, `upete train`."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from model.networks.checkpoint import load_checkpoint, load_model_config, read_training_meta
from model.networks.diffusion import Variant
from model.networks.noise_level import FINE_BAND, LATENT_BAND
from model.training.data import TrainingCase, load_cases
from model.training.diffusion import TrainSettings, train
from model.training.patches import PatchSampler, PerturbedPool
from model.training.settings import ForwardProcess, TrainStage
from tests.support.model_toys import one_thread, tiny_phantom, write_nifti_cases  # noqa: F401 - one_thread: autouse fixture

#: Two-level autoencoder (f = 2) and U-Net on 8×16×16 patches: a training step takes milliseconds.
FAST = dict(
    ae_channels=(8, 8),
    unet_channels=(8, 16),
    latent_channels=4,
    norm_groups=4,
    head_channels=8,
    patch_size=(8, 16, 16),
    curve_points=3,
    curve_slabs=1,
    index_slabs=4,
    pool_size=2,
    log_every_s=0.0,
)
SHAPE = (16, 32, 32)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):
    return write_nifti_cases(tmp_path_factory.mktemp("nifti"), 3, shape=SHAPE)


def _settings(variant: str, data, out, **kw) -> TrainSettings:
    return TrainSettings(variant=Variant(variant), out_dir=out, data_dir=data, device="cpu", **{**FAST, **kw})


def test_the_stage_is_an_enum_built_from_its_cli_spelling(tmp_path) -> None:
    assert _settings("ldm", tmp_path, tmp_path, stage="ae").stage is TrainStage.AE
    assert _settings("ldm", tmp_path, tmp_path).stage is TrainStage.BOTH
    with pytest.raises(ValueError, match="stage must be one of ae, denoiser, both, index, found 'all'"):
        _settings("ldm", tmp_path, tmp_path, stage="all")
    assert _settings("ldm", tmp_path, tmp_path, forward="perturb").forward is ForwardProcess.PERTURB
    with pytest.raises(ValueError, match="forward must be one of inject, perturb, found 'thin'"):
        _settings("ldm", tmp_path, tmp_path, forward="thin")


def test_a_tiny_model_trains_on_tiny_phantoms_and_its_losses_fall(data, tmp_path) -> None:
    settings = _settings(
        "ldm",
        data,
        tmp_path,
        ae_steps=40,
        denoiser_steps=40,
        ae_lr=2e-3,
        unet_lr=2e-3,
        noisy_fraction=0.0,
        ae_gain_max=1.0,  # a random gain per patch would make the loss curve too noisy to compare
        seed=1,
    )
    result = train(settings)
    ae, dn = np.array(result.losses["ae"]), np.array(result.losses["denoiser"])
    assert len(ae) == 40 and len(dn) == 40 and np.isfinite(ae).all() and np.isfinite(dn).all()
    assert ae[-10:].mean() < 0.8 * ae[:10].mean()
    assert dn[-10:].mean() < 0.9 * dn[:10].mean()
    config = load_model_config(result.checkpoint)
    assert config.variant is Variant.LDM and config.training["denoiser"]["steps"] == 40
    assert config.training["autoencoder"]["cases"] == 3
    assert 0.1 < config.latent_scale < 100
    assert 1000 < config.normalisation.scale_bqml < 8000  # median body activity of the phantoms
    assert result.autoencoder_checkpoint.is_file()


def test_poisson_ct_variant_calibrates_its_noise_curve(data, tmp_path) -> None:
    result = train(_settings("ldm-p-ct", data, tmp_path, ae_steps=3, denoiser_steps=3, curve_points=4))
    curve = load_model_config(result.checkpoint).noise_curve
    assert curve.t == (0.0, 133.0, 267.0, 400.0)
    assert curve.dose[0] == 1.0 and curve.dose[-1] == pytest.approx(1e-3)
    # The image noise grows with t on any model (up to d = 1e-3, where a 6 cm phantom has no counts left).
    assert curve.noise_index[0] < curve.noise_index[1] < curve.noise_index[2]
    assert all(s > 0 for s in curve.latent_sigma)
    # Injection adds nothing at dose 1, yet t = 0 labels every image as clean as the SPET: σ_0 is
    # floored at half of σ at the next point, so the loss weight 1/σ_0² stays finite.
    assert curve.latent_sigma[0] >= 0.5 * curve.latent_sigma[1]


def test_init_denoiser_fine_tunes_the_checkpoint_s_denoiser(data, tmp_path) -> None:
    first = train(_settings("ldm-p-ct", data, tmp_path / "a", ae_steps=2, denoiser_steps=2, curve_points=2))
    tuned = train(
        _settings(
            "ldm-p-ct", data, tmp_path / "b", stage="denoiser", init=first.checkpoint,
            init_denoiser=first.checkpoint,
            denoiser_steps=0, unet_channels=(8, 8, 8),
        )
    )  # fmt: skip
    before, after = load_checkpoint(first.checkpoint), load_checkpoint(tuned.checkpoint)
    for name, weight in before.diffusion.state_dict().items():
        assert torch.equal(weight, after.diffusion.state_dict()[name]), name  # its U-Net, not --unet-channels
    training = load_model_config(tuned.checkpoint).training["denoiser"]
    assert training["forward_process"] == "inject" and training["scanner_styles"] is True
    assert training["steps_total"] == 2  # the checkpoint's 2 steps, then 0 more here
    assert training["init_denoiser"] is True
    with pytest.raises(ValueError, match="is ldm-p-ct, not ldm-p"):
        train(_settings("ldm-p", data, tmp_path / "c", init=first.checkpoint, init_denoiser=first.checkpoint))
    with pytest.raises(ValueError, match="init_denoiser needs --init"):
        train(_settings("ldm-p", data, tmp_path / "d", init_denoiser=first.checkpoint))


def test_stage_index_matches_the_noise_index_again_and_keeps_everything_else(data, tmp_path) -> None:
    first = train(_settings("ldm-p-ct", data, tmp_path / "a", ae_steps=2, denoiser_steps=2, curve_points=3))
    # A checkpoint calibrated before the index was matched: its curve names no band (the fine one).
    config_file = first.checkpoint.with_suffix(".json")
    legacy = json.loads(config_file.read_text())
    del legacy["noise_curve"]["index_band"]
    config_file.write_text(json.dumps(legacy))
    assert load_model_config(first.checkpoint).noise_curve.index_band == FINE_BAND
    again = train(
        _settings("ldm-p-ct", data, tmp_path / "b", stage="index", init=first.checkpoint,
                  init_denoiser=first.checkpoint)
    )  # fmt: skip
    before, after = load_checkpoint(first.checkpoint), load_checkpoint(again.checkpoint)
    for name, weight in before.state_dict().items():
        assert torch.equal(weight, after.state_dict()[name]), name
    old, new = before.config.noise_curve, after.config.noise_curve
    assert new.index_band == LATENT_BAND and (new.t, new.latent_sigma) == (old.t, old.latent_sigma)
    assert new.noise_index[0] < new.noise_index[1] < new.noise_index[2]
    assert after.config.latent_scale == before.config.latent_scale
    training = after.config.training
    assert training["denoiser"] == before.config.training["denoiser"]  # no step was trained
    assert training["noise_index"] == {"slabs": 4, "band": list(LATENT_BAND)}
    assert after.config.software_version == before.config.software_version != ""
    with pytest.raises(ValueError, match="--stage index re-matches"):
        train(_settings("ldm-p-ct", data, tmp_path / "c", stage="index", init=first.checkpoint))


def test_stage_ae_with_init_trains_that_autoencoder_further_and_calibrates_again(data, tmp_path) -> None:
    first = train(_settings("ldm-p", data, tmp_path / "a", ae_steps=2, denoiser_steps=1, curve_points=2))
    steps: list[tuple[str, int]] = []
    settings = _settings("ldm-p", data, tmp_path / "b", stage="ae", init=first.checkpoint, ae_steps=3)
    again = train(
        dataclasses.replace(settings, curve_points=3),
        on_step=lambda stage, step, loss: steps.append((stage, step)),
    )
    assert steps == [("ae", 1), ("ae", 2), ("ae", 3)]  # trained, from step 0, on the reused weights
    before = load_checkpoint(first.checkpoint).autoencoder.state_dict()
    after = load_checkpoint(again.autoencoder_checkpoint).autoencoder.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert len(load_model_config(again.autoencoder_checkpoint).noise_curve.t) == 3  # calibrated again


def test_training_resumes_where_it_stopped(data, tmp_path) -> None:
    train(_settings("ldm", data, tmp_path, ae_steps=4, denoiser_steps=0, stage="ae"))
    first = read_training_meta(tmp_path / "train_state.safetensors")
    assert first["stage"] == "denoiser" and first["seconds"] > 0
    steps: list[tuple[str, int]] = []
    result = train(
        _settings("ldm", data, tmp_path, ae_steps=4, denoiser_steps=5, resume=True),
        on_step=lambda stage, step, loss: steps.append((stage, step)),
    )
    assert steps == [("denoiser", k) for k in range(1, 6)]  # the autoencoder was not trained again
    assert len(result.losses["ae"]) == 4  # the losses of the first run came back with the state
    # The training time reported counts every invocation, not only the one that finished.
    config = json.loads(result.checkpoint.with_suffix(".json").read_text())
    assert config["training"]["seconds"] > first["seconds"]
    # Interrupted in the middle of a stage: resume continues from the saved step.
    out2 = tmp_path / "again"
    train(_settings("ldm", data, out2, ae_steps=3, denoiser_steps=0, stage="ae"))
    steps.clear()
    train(
        _settings("ldm", data, out2, ae_steps=3, denoiser_steps=2, resume=True),
        on_step=lambda *a: steps.append(a[:2]),
    )
    assert steps == [("denoiser", 1), ("denoiser", 2)]
    # A finished run resumed with more steps continues where it ended.
    steps.clear()
    train(
        _settings("ldm", data, out2, ae_steps=3, denoiser_steps=4, resume=True),
        on_step=lambda *a: steps.append(a[:2]),
    )
    assert steps == [("denoiser", 3), ("denoiser", 4)]


def test_denoiser_stage_needs_a_trained_autoencoder(data, tmp_path) -> None:
    with pytest.raises(ValueError, match="--init"):
        train(_settings("ldm", data, tmp_path, stage="denoiser"))


def _crop_of(patch: np.ndarray, patch_ct: np.ndarray, pet: np.ndarray, ct: np.ndarray) -> bool:
    """Whether ``patch`` and ``patch_ct`` are one crop (flipped in x or not) of ``pet`` and ``ct``."""
    pz, py, px = patch.shape
    for flip in (False, True):
        a, b = (patch[..., ::-1], patch_ct[..., ::-1]) if flip else (patch, patch_ct)
        for z in range(pet.shape[0] - pz + 1):
            for y in range(pet.shape[1] - py + 1):
                for x in range(pet.shape[2] - px + 1):
                    window = np.s_[z : z + pz, y : y + py, x : x + px]
                    if np.allclose(pet[window], a, rtol=1e-5, atol=1e-2) and np.array_equal(ct[window], b):
                        return True
    return False


def test_patches_and_perturbed_slabs_line_up() -> None:
    pet, ct = tiny_phantom(0, SHAPE)
    case = TrainingCase("c", pet, ct)
    rng = np.random.default_rng(0)
    sampler = PatchSampler([case], patch=(8, 16, 16), scale_bqml=4000.0, rng=rng, with_ct=True)
    batch = sampler.clean_batch(3)
    assert batch.clean.shape == batch.ct.shape == (3, 1, 8, 16, 16)
    assert batch.clean.dtype == torch.float32 and batch.clean.max() > 0.5  # body-centred, fixed scale
    pool = PerturbedPool(sampler, timesteps=400, dose_min=1e-3, size=2, refresh=0.5,
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    noisy = pool.batch(4)
    assert noisy.noisy.shape == noisy.clean.shape == noisy.ct.shape and noisy.t.shape == (4,)
    assert set(noisy.t.tolist()) <= {s.t for s in pool.slabs}
    # Same crop, same flip: the clean patch is a crop of the SPET, the CT the same crop of its
    # anatomy, and the noisy patch the clean one plus noise.
    for k in range(4):
        assert _crop_of(noisy.clean[k, 0].numpy() * 4000.0, noisy.ct[k, 0].numpy(), pet, ct)
        correlation = np.corrcoef(noisy.clean[k].flatten(), noisy.noisy[k].flatten())[0, 1]
        assert correlation > 0.3
    first = [id(s) for s in pool.slabs]
    pool.batch(1)  # refresh 0.5: nothing replaced yet
    assert [id(s) for s in pool.slabs] == first
    pool.batch(1)  # … one slab now
    assert sum(a != id(b) for a, b in zip(first, pool.slabs, strict=True)) == 1


def test_nifti_cases_load_on_the_2mm_grid_and_shard(data) -> None:
    cases = load_cases(data)
    assert [c.name for c in cases] == ["case_00", "case_01", "case_02"]
    assert cases[0].pet.shape == SHAPE and cases[0].ct.shape == SHAPE
    assert [c.name for c in load_cases(data, shard=(1, 2))] == ["case_01"]
    with pytest.raises(ValueError, match="no case for rank 5 of 6"):
        load_cases(data, shard=(5, 6))


def test_an_empty_folder_is_not_training_data(tmp_path) -> None:
    with pytest.raises(ValueError, match="no simulated case, NIfTI pair or DICOM"):
        load_cases(tmp_path)


def _tiny_cli(*extra: str) -> list[str]:
    return [
        "train", "--device", "cpu", "--patch", "8,16,16", "--steps", "2", "--ae-channels", "8,8",
        "--unet-channels", "8,16", "--norm-groups", "4", "--head-channels", "8", "--curve-points", "3",
        "--curve-slabs", "1", "--pool-size", "2", "--log-every", "0", *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_upete_train_makes_all_four_variants_and_upete_enhance_uses_them(tmp_path, capsys) -> None:
    from dicomnode.config import load_settings
    from dicomnode.testing.scanner import StudyInfo, write_ct_series, write_pet_series
    from model.enhance import InferenceOptions, load_enhancer
    from upete.cli import main

    # uPETe itself from two simulated phantoms; the other variants reuse its autoencoder (--init), as
    # the paper's ablation shares one compression model.
    first = tmp_path / "ldm-p-ct"
    sim = ["--simulate", "2", "--sim-shape", "16,32,32"]
    assert main(_tiny_cli("--variant", "ldm-p-ct", *sim, "--out", str(first))) == 0
    init = first / "autoencoder.safetensors"
    for variant in ("ldm", "ldm-p", "ldm-ct"):
        out = tmp_path / variant
        args = ["--variant", variant, "--data", str(first / "sim_data"), "--out", str(out)]
        assert main(_tiny_cli(*args, "--stage", "denoiser", "--init", str(init))) == 0
    pet, ct = tiny_phantom(3, (20, 40, 40))
    for variant in ("ldm", "ldm-p", "ldm-ct", "ldm-p-ct"):
        settings = load_settings(tmp_path / variant / "enhance.yaml")
        enhancer = load_enhancer(settings.model.checkpoint, options=InferenceOptions(device="cpu", steps=2))
        assert enhancer.info.name == f"uPETe {variant.upper()}"
        out = enhancer.enhance_array(pet, ct if enhancer.info.uses_ct else None, spacing_mm=(2.0, 2.0, 2.0))
        assert out.shape == pet.shape and np.isfinite(out).all()
    capsys.readouterr()

    # `upete enhance --config` with the trained uPETe checkpoint writes a derived series.
    study = StudyInfo()
    write_pet_series(tmp_path / "pet", pet, spacing_mm=(2.0, 2.0, 2.0), study=study)
    write_ct_series(tmp_path / "ct", ct, spacing_mm=(2.0, 2.0, 2.0), study=study)
    config = str(first / "enhance.yaml")
    args = ["enhance", "--config", config, "--pet", str(tmp_path / "pet"), "--ct", str(tmp_path / "ct")]
    assert main([*args, "--out", str(tmp_path / "derived")]) == 0
    assert len(list((tmp_path / "derived").rglob("*.dcm"))) == pet.shape[0]
    assert "uPETe LDM-P-CT" in capsys.readouterr().out


def test_dicom_studies_load_through_the_cli_loader(tmp_path) -> None:
    from dicomnode.testing.scanner import StudyInfo, write_ct_series, write_pet_series
    from upete.commands.train import _dicom_loader

    pet, ct = tiny_phantom(0, (12, 24, 24))
    study = StudyInfo()
    write_pet_series(tmp_path / "study_a" / "pet", pet, spacing_mm=(4.0, 4.0, 4.0), study=study)
    write_ct_series(tmp_path / "study_a" / "ct", ct, spacing_mm=(4.0, 4.0, 4.0), study=study)
    (case,) = load_cases(tmp_path, dicom_loader=_dicom_loader, need_ct=True)
    assert case.pet.shape == (24, 48, 48)  # resampled to 2 mm
    assert case.ct.shape == case.pet.shape
    assert float(case.pet.mean()) == pytest.approx(float(pet.mean()), rel=0.05)  # Bq/ml kept
    assert case.ct.min() >= -1001 and case.ct.max() > 0


def test_upete_train_usage_errors_exit_2(tmp_path, capsys) -> None:
    from upete.cli import main

    assert main(["train", "--variant", "ldm", "--simulate", "0", "--out", str(tmp_path)]) == 2
    assert "at least 1 case" in capsys.readouterr().err
    args = ["train", "--variant", "ldm", "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    assert main([*args, "--stage", "denoiser"]) == 2
    assert "--init" in capsys.readouterr().err
    assert main(args) == 2
    assert "no simulated case, NIfTI pair or DICOM study" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--patch", "16,16"])


def test_minmax_normalisation_and_the_perceptual_loss_train_too(data, tmp_path) -> None:
    from safetensors.torch import save_file

    from model.training.losses import ResNet3d

    weights = tmp_path / "resnet_10.safetensors"
    save_file(ResNet3d(10).state_dict(), str(weights))
    settings = _settings(
        "ldm-p", data, tmp_path / "out", ae_steps=2, denoiser_steps=1, normalisation="minmax",
        perceptual_weights=weights, noisy_fraction=1.0,
    )  # fmt: skip
    result = train(settings)
    assert np.isfinite(result.losses["ae"]).all()
    config = load_model_config(result.checkpoint)
    assert config.normalisation.mode == "minmax"
    assert config.normalisation.scale_bqml > 0  # kept: the noise index is measured in fixed units


@pytest.mark.parametrize("adv_weight", [0.0, 0.1])
def test_the_discriminator_trains_only_when_the_adversarial_loss_is_on(data, tmp_path, adv_weight) -> None:
    # Off by default (TrainSettings.adv_weight): it costs reconstruction fidelity on PET.
    from safetensors.torch import load_file

    assert TrainSettings.adv_weight == 0.0
    train(_settings("ldm", data, tmp_path, ae_steps=3, adv_start=0, adv_weight=adv_weight, stage="ae"))
    state = load_file(str(tmp_path / "train_state.safetensors"))
    moments = [v for k, v in state.items() if k.startswith("optim.disc.") and "exp_avg" in k]
    assert (adv_weight > 0) == any(bool(m.abs().sum() > 0) for m in moments)


def test_the_autoencoder_kept_is_the_ema_of_its_weights(data, tmp_path) -> None:
    from safetensors.torch import load_file

    from model.networks.checkpoint import load_checkpoint

    result = train(_settings("ldm", data, tmp_path, ae_steps=6, ae_lr=1e-2, stage="ae"))
    state = load_file(str(tmp_path / "train_state.safetensors"))
    kept = load_checkpoint(result.autoencoder_checkpoint).autoencoder.state_dict()
    for key, value in kept.items():
        assert torch.equal(value, state[f"module.ae_ema.shadow.{key}"]), key
    assert int(state["module.ae_ema.updates"]) == 6  # one EMA update per autoencoder step


def test_the_ct_encoder_follows_the_reused_autoencoder_not_this_runs_sizes(data, tmp_path) -> None:
    first = train(_settings("ldm-p-ct", data, tmp_path / "ae", ae_steps=2, stage="ae"))
    # A denoiser run that reuses that f = 2 autoencoder without repeating --ae-channels (default f = 4).
    result = train(
        _settings(
            "ldm-p-ct",
            data,
            tmp_path / "dn",
            stage="denoiser",
            init=first.autoencoder_checkpoint,
            denoiser_steps=2,
            ae_channels=(16, 32, 64),
        )
    )
    config = load_model_config(result.checkpoint)
    assert config.ct_encoder.channels == config.autoencoder.channels == (8, 8)
