"""Tiny PET/CT phantoms and model settings for the diffusion-model tests: seconds on two CPU cores.

A body ellipse with a warmer "liver", cold "lungs" and two hot spheres; activity in Bq/ml, CT in HU.
The SPET is the truth blurred to PET resolution (the tests that need count noise add it through
``model.physics.perturb``, as training does).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

from dicomnode.testing.phantoms import tiny_phantom  # noqa: F401 - re-exported for the model tests

#: Tiny model sizes shared by the tests (channels (8, 8, …) as in MONAI's unit tests).
TINY = dict(
    ae_channels=(8, 8, 8),
    latent_channels=4,
    unet_channels=(8, 16, 16),
    norm_groups=4,
    head_channels=8,
)
TINY_PATCH = (16, 32, 32)


@pytest.fixture(autouse=True)
def one_thread():
    """Import into a test module to run its tests on one torch thread (restored afterwards).

    Tensors this small gain nothing from threads, and on a shared machine OpenMP's spinning costs 5×.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_nifti_cases(root: Path, n: int, *, shape: tuple[int, int, int] = (24, 48, 48)) -> Path:
    """``root/case_k/pet.nii.gz`` + ``ct.nii.gz`` for k < n; returns ``root``."""
    for k in range(n):
        pet, ct = tiny_phantom(k, shape)
        folder = root / f"case_{k:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for name, array in (("pet", pet), ("ct", ct)):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing((2.0, 2.0, 2.0))
            sitk.WriteImage(image, str(folder / f"{name}.nii.gz"))
    return root


def tiny_config(variant: str, **overrides):  # noqa: ANN201 - model.network.ModelConfig
    """A tiny, consistent :class:`~model.networks.upete_model.ModelConfig` with a synthetic noise curve."""
    from model.networks.noise_level import NoiseCurve
    from model.networks.upete_model import default_config

    t = (0.0, 100.0, 200.0, 300.0, 400.0)
    curve = NoiseCurve(
        t=t,
        dose=tuple(1e-3 ** (v / 400) for v in t),
        latent_sigma=(0.1, 0.2, 0.4, 0.8, 1.6),
        noise_index=(0.01, 0.05, 0.2, 0.8, 3.0),
    )
    settings = dict(patch_size=TINY_PATCH, noise_curve=curve, training={"denoiser": {"steps": 1}})
    settings.update(overrides)
    return default_config(variant, **TINY, **settings)


def tiny_checkpoint(folder: Path, variant: str, *, seed: int = 0, **overrides) -> Path:
    """An untrained (random) tiny model saved as ``folder/tiny-VARIANT.safetensors`` + JSON."""
    from model.networks.checkpoint import save_checkpoint
    from model.networks.upete_model import UPETeModel

    torch.manual_seed(seed)
    model = UPETeModel(tiny_config(variant, **overrides))
    return save_checkpoint(folder / f"tiny-{variant}.safetensors", model)
