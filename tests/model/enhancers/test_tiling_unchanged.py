"""The shared tiling loop (model.enhancers.tiling.run_tiled) gives what each enhancer's own loop gave
before it, to float rounding (bit for bit on the CPU that saved them): data/tiled_outputs.npz was
computed by those loops on these exact inputs, and regenerated once on purpose when tiles came to
start at multiples of their stride (so that a volume
cropped to the body meets the same tiles; all but the whole-volume case changed, no tile count did),
and again when the model grid came to start at the input grid's edge (half a voxel difference of
sizes had shifted it: only the 2.5 mm whole-volume case changed), and when σ_t came to be
interpolated linearly in σ² (only the Poisson case at a dose between the curve's points changed).

The cases cover CT-air skipping with batches of two, a Gaussian variant's seeded noise, a volume
done whole, and the supervised U-Net with tiles of pure air. Regenerate the file only on purpose, by
running this module as a script with OMP_NUM_THREADS=1 (as the tests run), when an enhancer's output
is meant to change.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from model.enhance import InferenceOptions, load_enhancer
from model.enhancers.supervised import SupervisedEnhancer
from model.networks.supervised_unet import SupervisedConfig, SupervisedUNet
from tests.support.model_toys import one_thread, tiny_checkpoint, tiny_phantom  # noqa: F401 - one_thread: autouse fixture

SAVED = Path(__file__).parent / "data" / "tiled_outputs.npz"
SPACING = (2.0, 2.0, 2.0)
#: The cases pin the tiling bit for bit, not the rounding of a CPU's bf16 or of oneDNN's channels-last
#: kernels (benchmarks/speed.py and test_precision check those).
FP32 = {"precision": "fp32", "channels_last": False}


def _patient_in_air() -> tuple[np.ndarray, np.ndarray]:
    """A phantom with a tile's width of CT air on both sides (noisy, never-zero PET there)."""
    pet, ct = tiny_phantom(3, (16, 32, 32))
    rng = np.random.default_rng(3)
    big_pet = np.abs(rng.normal(0.0, 30.0, (16, 32, 96))).astype(np.float32)
    big_ct = np.full((16, 32, 96), -1000.0, dtype=np.float32)
    big_pet[:, :, 32:64] += pet
    big_ct[:, :, 32:64] = ct
    return big_pet, big_ct


def _supervised() -> SupervisedEnhancer:
    torch.manual_seed(0)
    config = SupervisedConfig(
        channels=(8, 16), res_blocks=1, norm_groups=4, patch_size=(8, 16, 16), scale_bqml=4000.0
    )
    model = SupervisedUNet(config)
    with torch.no_grad():
        model.out_conv.weight.normal_(0.0, 0.05)  # not the identity its zero init would be
    return SupervisedEnhancer(model.eval(), version="tiny", device="cpu")


def outputs(folder: Path) -> dict[str, np.ndarray]:
    """Every case's enhanced volume, by name."""
    out = {}
    pet, ct = _patient_in_air()
    options = InferenceOptions(device="cpu", steps=2, dose_fraction=0.1, seed=1, tile_batch=2, **FP32)
    enhancer = load_enhancer(str(tiny_checkpoint(folder, "ldm-p-ct")), options=options)
    out["diffusion_ct_air"] = enhancer.enhance_array(pet, ct, spacing_mm=SPACING)
    assert enhancer.tile_counts == {"tiles": 4, "run": 2, "skipped_air": 2}
    pet, _ = tiny_phantom(5, (16, 36, 36))
    enhancer = load_enhancer(
        str(tiny_checkpoint(folder, "ldm")), options=InferenceOptions(device="cpu", steps=2, seed=2, **FP32)
    )
    out["diffusion_gaussian"] = enhancer.enhance_array(pet, None, spacing_mm=SPACING)
    pet, _ = tiny_phantom(6, (8, 20, 20))
    enhancer = load_enhancer(
        str(tiny_checkpoint(folder, "ldm-p")), options=InferenceOptions(device="cpu", steps=2, seed=0, **FP32)
    )
    out["diffusion_whole"] = enhancer.enhance_array(pet, None, spacing_mm=(2.5, 2.0, 2.0))
    pet, _ = tiny_phantom(7, (12, 24, 28))
    pet[:, :, :6] = 0.0
    out["supervised"] = _supervised().enhance_array(pet, None, spacing_mm=SPACING)
    return out


def test_tiled_enhancers_give_the_saved_outputs(tmp_path) -> None:
    computed = outputs(tmp_path)
    with np.load(SAVED) as saved:
        assert sorted(computed) == sorted(saved.files)
        for name, volume in computed.items():
            assert volume.dtype == saved[name].dtype and volume.shape == saved[name].shape, name
            # Bit for bit on the CPU that saved them; another CPU's float kernels round differently
            # (3e-6 of the span on an AMD EPYC), while a tile misplaced or weighted wrongly moves
            # voxels by a good part of their value.
            span = float(saved[name].max() - saved[name].min())
            error = float(np.abs(volume - saved[name]).max())
            assert error <= 1e-5 * span, f"{name}: max difference {error} ({error / span:.1e} of the span)"


if __name__ == "__main__":  # OMP_NUM_THREADS=1 python -m tests.model.enhancers.test_tiling_unchanged
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        np.savez_compressed(sys.argv[1] if len(sys.argv) > 1 else SAVED, **outputs(Path(tmp)))
