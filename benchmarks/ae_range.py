"""Autoencoder dynamic range: D(E(x)) against x for validation volumes scaled up, as hot organs are.

    .venv/bin/python benchmarks/ae_range.py CHECKPOINT [CHECKPOINT ...] [--gains 1,4,10] [--cases 2]

Scanners' hot organs (bladder, brain) reach 20–40× the body's median; the training phantoms rarely
do. For each validation case (``data/quality/val``, seeds 100000+, never the test or transfer sets)
the noiseless expectation is multiplied by each gain and passed through the checkpoint's autoencoder
alone (tiles of the training patch, as the enhancer runs them; no denoiser, no local-mean step). The
PSNR of D(E(g·x)) against g·x inside the body (peak = its maximum) says how much of the signal the
autoencoder keeps at that level: the ceiling of any denoiser working in its latent space. Prints one
line per checkpoint, case and gain.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.enhancers.tiling import run_tiled  # noqa: E402
from model.evaluation.metrics import psnr  # noqa: E402
from model.networks.checkpoint import load_checkpoint  # noqa: E402


@torch.no_grad()
def reconstruct(model, x_bqml: np.ndarray) -> np.ndarray:  # noqa: ANN001 - a UPETeModel
    """D(E(x)) of a 2 mm volume in Bq/ml, tile by tile as the enhancer runs (25 % overlap)."""
    scale = model.config.normalisation.scale_bqml
    ae = model.autoencoder.eval()

    def run_batch(tiles: np.ndarray, _ct: np.ndarray | None) -> np.ndarray:
        xs = torch.from_numpy(np.ascontiguousarray(tiles, dtype=np.float32))[:, None]
        return ae.decode(ae.encode(xs).mean).float().numpy()[:, 0]

    tiled = run_tiled(x_bqml / scale, run_batch, tile=tuple(model.config.patch_size), overlap=0.25,
                      batch_size=4)
    return tiled.volume * scale


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--gains", default="1,4,10")
    p.add_argument("--cases", type=int, default=2)
    p.add_argument("--data", type=Path, default=ROOT / "data" / "quality" / "val")
    args = p.parse_args(argv)
    cases = sorted(args.data.glob("case_*"))[: args.cases]
    if not cases:
        raise SystemExit(f"no validation case in {args.data} (benchmarks/quality.py makes them)")
    for path in args.checkpoints:
        model = load_checkpoint(path)
        for case in cases:
            with np.load(case / "arrays.npz") as arrays:
                x, body = arrays["expectation_bqml"], arrays["organ_labels"] > 0
            for gain in (float(g) for g in args.gains.split(",")):
                scaled = (x * gain).astype(np.float32)
                peak = float(scaled[body].max())
                score = psnr(reconstruct(model, scaled), scaled, data_range=peak, mask=body)
                print(f"{path} {case.name} gain {gain:g}: D(E(x)) {score:.2f} dB", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
