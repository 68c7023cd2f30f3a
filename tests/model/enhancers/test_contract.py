"""The Enhancer contract, one suite for every implementation (volume in, volume out, in Bq/ml).

Each implementation is a subclass of :class:`Contract` that says how to build it and what it
promises beyond the contract (``linear``: its output scales with its input; ``activity_rtol``: how
far the total activity in the body may move). All run through :meth:`Enhancer.enhance` on a
SimpleITK image with a non-trivial origin, spacing and direction, on tiny volumes.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from model.enhance import Enhancer, InferenceOptions, load_enhancer
from model.enhancers.classical import CTBilateralEnhancer, GaussianEnhancer, LPETEnhancer, make_baseline
from model.networks.supervised_unet import SupervisedConfig, SupervisedUNet, save_supervised
from model.networks.upete_model import SamplerConfig
from tests.support.model_toys import one_thread, tiny_checkpoint, tiny_phantom  # noqa: F401 - one_thread: autouse fixture

SPACING_XYZ = (2.0, 2.0, 2.5)
ORIGIN = (-31.0, 17.5, 402.0)
DIRECTION = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # rotated 90° in-plane


def _image(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing(SPACING_XYZ)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    return image


@pytest.fixture(scope="module")
def phantom() -> tuple[sitk.Image, sitk.Image, np.ndarray]:
    """PET (Bq/ml) and CT (HU) images on one grid, and the body (the PET's support, 3 voxels wider)."""
    pet, ct = tiny_phantom(2, (12, 32, 32))
    body = ndimage.binary_dilation(pet > 0.05 * float(pet.max()), iterations=3)
    return _image(pet), _image(ct), body


class Contract:
    """What every Enhancer does; subclasses build one (:meth:`make`) and state their promises."""

    linear = False
    activity_rtol = 0.0
    repeat_atol = 0.0  # of the output's maximum: a second run gives the same output, bit for bit

    def make(self, folder: Path) -> Enhancer:
        raise NotImplementedError

    @pytest.fixture(scope="class")
    @classmethod
    def enhancer(cls, tmp_path_factory: pytest.TempPathFactory) -> Enhancer:
        return cls().make(tmp_path_factory.mktemp(cls.__name__))

    def _run(self, enhancer: Enhancer, pet: sitk.Image, ct: sitk.Image, progress=None) -> sitk.Image:  # noqa: ANN001
        return enhancer.enhance(pet, ct if enhancer.info.uses_ct else None, progress=progress)

    def test_shape_geometry_and_pixel_type_are_kept(self, enhancer, phantom) -> None:
        pet, ct, _ = phantom
        out = self._run(enhancer, pet, ct)
        assert out.GetSize() == pet.GetSize() and out.GetPixelID() == sitk.sitkFloat32
        assert (out.GetOrigin(), out.GetSpacing(), out.GetDirection()) == (ORIGIN, SPACING_XYZ, DIRECTION)

    def test_bqml_in_bqml_out(self, enhancer, phantom) -> None:
        pet, ct, body = phantom
        before = sitk.GetArrayFromImage(pet)
        after = sitk.GetArrayFromImage(self._run(enhancer, pet, ct))
        assert np.isfinite(after).all()
        assert float(after[body].sum()) == pytest.approx(float(before[body].sum()), rel=self.activity_rtol)
        if self.linear:
            doubled = sitk.GetArrayFromImage(self._run(enhancer, _image(2.0 * before), ct))
            np.testing.assert_allclose(doubled, 2.0 * after, rtol=1e-4, atol=1e-3 * float(after.max()))

    def test_progress_runs_from_0_to_1(self, enhancer, phantom) -> None:
        pet, ct, _ = phantom
        seen: list[float] = []
        self._run(enhancer, pet, ct, progress=lambda fraction, stage: seen.append(fraction))
        assert seen[0] == 0.0 and seen[-1] == 1.0
        assert all(0.0 <= a <= b <= 1.0 for a, b in zip(seen, seen[1:], strict=False))

    def test_the_same_input_gives_the_same_output(self, enhancer, phantom, tmp_path) -> None:
        pet, ct, _ = phantom
        first = sitk.GetArrayFromImage(self._run(enhancer, pet, ct))
        again = sitk.GetArrayFromImage(self._run(self.make(tmp_path), pet, ct))  # a second instance
        np.testing.assert_allclose(first, again, rtol=0, atol=self.repeat_atol * float(np.abs(first).max()))

    def test_a_ct_is_demanded_or_ignored_as_the_info_says(self, enhancer, phantom) -> None:
        pet, ct, _ = phantom
        if enhancer.info.requires_ct:
            name = re.escape(enhancer.info.name)
            with pytest.raises(ValueError, match=name):
                enhancer.enhance(pet, None)
            with pytest.raises(ValueError, match=name):
                enhancer.enhance_array(sitk.GetArrayFromImage(pet), None, spacing_mm=SPACING_XYZ[::-1])
        elif not enhancer.info.uses_ct:
            with_ct = sitk.GetArrayFromImage(enhancer.enhance(pet, ct))
            np.testing.assert_array_equal(with_ct, sitk.GetArrayFromImage(enhancer.enhance(pet, None)))


class TestGaussian(Contract):
    linear, activity_rtol = True, 0.02  # "nearest" edges keep the total; a little spreads past the body

    def make(self, folder: Path) -> Enhancer:
        return GaussianEnhancer(fwhm_mm=6.0)


class TestLPETIdentity(Contract):
    linear, activity_rtol = True, 1e-6

    def make(self, folder: Path) -> Enhancer:
        return LPETEnhancer()


class TestNonLocalMeans(Contract):
    linear, activity_rtol = True, 0.02  # h is a multiple of the σ it estimates: scale-free

    def make(self, folder: Path) -> Enhancer:
        return make_baseline("nlm", patch_distance=2)


@pytest.mark.skipif(importlib.util.find_spec("bm4d") is None, reason="the bm4d package is not installed")
class TestBM4D(Contract):
    # Not linear: its block matching and thresholds on √activity move a few % of voxels with the scale.
    activity_rtol = 0.02
    # Its compiled library sums in threads: under load two runs differ by float rounding, not more.
    repeat_atol = 1e-4

    def make(self, folder: Path) -> Enhancer:
        return make_baseline("bm4d")


class TestCTBilateral(Contract):
    linear, activity_rtol = True, 0.02  # linear in the PET for a given CT

    def make(self, folder: Path) -> Enhancer:
        return CTBilateralEnhancer(spatial_fwhm_mm=7.0, range_sigma_hu=150.0)


class TestSupervised(Contract):
    activity_rtol = 0.15  # an untrained (random) network: the contract, not quality

    def make(self, folder: Path) -> Enhancer:
        torch.manual_seed(0)
        config = SupervisedConfig(channels=(8, 16), res_blocks=1, norm_groups=4, patch_size=(8, 16, 16),
                                  scale_bqml=4000.0)
        model = SupervisedUNet(config)
        with torch.no_grad():
            model.out_conv.weight.normal_(0.0, 0.05)  # not the identity its zero init would be
        path = save_supervised(folder / "supervised.safetensors", model)
        return load_enhancer(str(path), options=InferenceOptions(device="cpu"))


class _Diffusion(Contract):
    """A tiny random checkpoint that keeps the LPET's local mean.

    Untrained, about half of what it decodes is negative and clipped (activity is non-negative), so
    only the order of the total activity holds: the local-mean setting keeps 55-60 % of it here, where
    the bare random output keeps under 20 %.
    """

    variant = ""
    activity_rtol = 0.5

    def make(self, folder: Path) -> Enhancer:
        sampler = SamplerConfig(steps=2, local_mean_fwhm_mm=12.0)
        path = tiny_checkpoint(folder, self.variant, sampler=sampler)
        return load_enhancer(str(path), options=InferenceOptions(device="cpu", seed=3))


class TestDiffusionPETOnly(_Diffusion):
    variant = "ldm-p"


class TestDiffusionWithCT(_Diffusion):
    variant = "ldm-p-ct"
