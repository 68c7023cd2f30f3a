"""Export the committed supervised U-Net state (step 1219) as a checkpoint, without its training data.

    OMP_NUM_THREADS=1 .venv/bin/python training_runs/supervised/export_checkpoint.py

``upete train --variant supervised --resume --steps 1219`` would write the same weights (the EMA's,
as the end of ``model.training.supervised.train_supervised`` does), but it reads the 10 % pairs first
(``load_pairs``) only to count them for the training summary, and those pairs came from the *old*
simulator, which no longer exists in this tree: regenerating them would give other data. Here the
state's network and EMA are restored with the training code's own ``load_training_state`` and the EMA
is saved with ``save_supervised``; the summary is filled from the state's meta and the recorded
command (training_runs/README.md). Writes ``supervised-unet.safetensors`` + ``.json`` beside the state.
The state itself was removed once exported; to rerun, restore both of its files first, from the
folder: ``git show 30d5758:./supervised-state.safetensors > supervised-state.safetensors`` (and
``.json``).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> int:
    import torch

    from model.networks.checkpoint import load_training_state, read_training_meta
    from model.networks.supervised_unet import (
        SupervisedConfig,
        SupervisedUNet,
        parameter_count,
        save_supervised,
    )
    from model.training.runtime import Ema, software_version
    from model.training.supervised import CHECKPOINT_NAME, STATE_NAME

    state = HERE / STATE_NAME
    meta = read_training_meta(state)
    config = SupervisedConfig.from_json(meta["config"])
    model = SupervisedUNet(config)
    ema = Ema(model, 0.999)  # decay unused: only the restored shadow weights are exported
    optimizer = torch.optim.Adam(model.parameters())  # the state holds it; restored, not exported
    load_training_state(state, modules={"model": model, "ema": ema}, optimizers={"adam": optimizer})
    losses = meta.get("losses", [])
    training = {
        # The recorded command (training_runs/README.md): 100 simulated cases of the old simulator
        # (2 mm grid, 7 reconstruction settings), 10 % dose pairs, patch 32×48×48, batch 2, CPU, 1 thread.
        "cases": 100,
        "dose": config.dose,
        "patch_size": list(config.patch_size),
        "batch_size": 2,
        "parameters": parameter_count(model),
        "steps": int(meta["step"]),
        "final_loss": round(float(np.mean(losses[-100:])), 6) if losses else None,
        "minutes": 31,  # recorded in training_runs/README.md (the state keeps no clock)
        "data": "old simulator (before the transfer-driven changes of 2026-12-07)",
        "exported_from": f"training_runs/supervised/{STATE_NAME} (step {meta['step']}), EMA weights",
    }
    final = dataclasses.replace(config, training=training, software_version=software_version())
    path = save_supervised(HERE / CHECKPOINT_NAME, ema.shadow, final)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
