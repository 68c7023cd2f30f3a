"""Distributed training under ``torchrun``: two CPU processes (gloo) split the cases and average
gradients; rank 0 alone writes the files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.networks.checkpoint import load_model_config
from tests.support.model_toys import write_nifti_cases


@pytest.mark.timeout(300)
def test_two_gloo_ranks_train_one_model(tmp_path: Path) -> None:
    data = write_nifti_cases(tmp_path / "data", 4, shape=(16, 32, 32))
    out = tmp_path / "run"
    upete = Path(sys.executable).with_name("upete")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
        str(upete), "train", "--variant", "ldm-p-ct", "--data", str(data), "--out", str(out),
        "--ae-steps", "3", "--denoiser-steps", "3", "--ae-channels", "8,8", "--unet-channels", "8,16",
        "--latent-channels", "4", "--norm-groups", "4", "--head-channels", "8", "--patch", "8,16,16",
        "--curve-points", "3", "--curve-slabs", "1", "--pool-size", "2", "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=280, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    config = load_model_config(out / "upete-ldm-p-ct.safetensors")
    summary = config.training["denoiser"]
    # Both ranks' shares of the 4 cases count, and the run knew it had two processes.
    assert summary["world_size"] == 2 and summary["cases"] == 4
    assert summary["forward_process"] == "inject"
    assert config.noise_curve is not None  # calibration averaged over the ranks
    written = sorted(p.name for p in out.iterdir())
    assert written.count("upete-ldm-p-ct.safetensors") == 1
    assert json.loads((out / "upete-ldm-p-ct.json").read_text())["variant"] == "ldm-p-ct"
