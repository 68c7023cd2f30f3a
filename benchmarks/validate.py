"""Model selection while training: a training state or checkpoint scored on the *validation* cases.

    .venv/bin/python benchmarks/validate.py --state runs/X/train_state.safetensors [--doses 0.1]
    .venv/bin/python benchmarks/validate.py --checkpoint runs/X/upete-ldm-p-ct.safetensors

Two questions, both on validation cases (seeds 100000+, ``data/quality/val`` as benchmarks/quality.py
makes them; never the test cases):

1. **Autoencoder fidelity** (``--state`` of any stage, or ``--checkpoint``): PSNR of D(E(x)) against
   the input and against the noiseless expectation, for the SPET and each LPET, on tiles of the
   training patch as the enhancer runs (GroupNorm makes whole-volume passes read worse than they are).
   The expectation column is the ceiling any denoiser on this autoencoder can reach.
2. **Enhancement** (a denoiser stage state, scored with its EMA weights, or a ``--checkpoint`` of a
   diffusion model or the supervised U-Net): paper
   PSNR/SSIM against the SPET (and PSNR against the expectation: a model trained on LPET/SPET pairs
   that share counts can score above the ceiling against the SPET alone) and lesion SUVmax bias
   against the expectation, beside the LPET and the
   Gaussian filter tuned for that dose (``benchmarks/results/tuned_params.json``).

Prints one line per row; writes nothing but a temporary checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.enhance import GaussianEnhancer, InferenceOptions, load_enhancer  # noqa: E402
from model.enhancers.tiling import Blender, gaussian_weights, tile_starts, tile_windows  # noqa: E402
from model.evaluation.evaluate import as_eval_case, lpet_at, score_volume  # noqa: E402
from model.networks.checkpoint import load_checkpoint, read_training_meta, save_checkpoint  # noqa: E402
from model.networks.upete_model import ModelConfig, UPETeModel  # noqa: E402
from model.simulation import dataset  # noqa: E402


def _model_from_state(path: Path) -> tuple[UPETeModel, str, int]:
    """The model of a training state with the EMA weights of the stage under way, where they exist."""
    meta = read_training_meta(path)
    model = UPETeModel(ModelConfig.from_json(meta["config"]))
    tensors = load_file(str(path), device="cpu")

    def module(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    model.load_state_dict(module("module.model."), strict=True)
    ae_ema = module("module.ae_ema.shadow.")
    if meta["stage"] == "ae" and ae_ema:
        model.autoencoder.load_state_dict(ae_ema, strict=True)  # what the stage keeps (training/diffusion.py)
    if meta["stage"] in ("denoiser", "done") and meta["step"] > 0:
        model.diffusion.load_state_dict(module("module.ema.shadow."), strict=True)
    return model.eval(), meta["stage"], int(meta["step"])


@torch.inference_mode()
def _reconstruct(model: UPETeModel, bqml: np.ndarray) -> np.ndarray:
    """D(E(x)) on overlapping tiles of the training patch, blended; Bq/ml in, Bq/ml out."""
    config = model.config
    patch, scale = config.patch_size, config.normalisation.scale_bqml
    starts = [tile_starts(n, p, 0.25) for n, p in zip(bqml.shape, patch, strict=True)]
    corners = list(itertools.product(*starts))
    windows = tile_windows(corners, patch)
    blender = Blender(bqml.shape, gaussian_weights(patch))
    x = (np.clip(bqml, 0.0, None) / scale).astype(np.float32)
    ae = model.autoencoder
    for i in range(0, len(windows), 8):
        chunk = windows[i:i + 8]
        batch = torch.from_numpy(np.stack([x[w] for w in chunk]))[:, None]
        out = ae.decode(ae.encode(batch).mean)[:, 0].numpy()
        for w, tile in zip(chunk, out, strict=True):
            blender.add(w, tile)
    return blender.result() * scale


def _psnr_in_body(x: np.ndarray, ref: np.ndarray, body: np.ndarray) -> float:
    span = float(ref[body].max() - ref[body].min())
    return 20.0 * np.log10(span / np.sqrt(np.mean((x[body] - ref[body]) ** 2)))


def autoencoder_fidelity(model: UPETeModel, cases: list[Path], doses: list[float]) -> None:
    for path in cases:
        case = dataset.load_case(path)
        exp = case.expectation_bqml
        body = exp > 0.05 * exp.max()
        for name, volume in [("SPET", case.spet_bqml), *((f"LPET {d:g}", lpet_at(case, d)) for d in doses)]:
            rec = _reconstruct(model, volume)
            print(f"AE {path.name} {name:9s} input vs expectation "
                  f"{_psnr_in_body(volume, exp, body):6.2f} dB | "
                  f"D(E(x)) vs input {_psnr_in_body(rec, volume, body):6.2f} dB, "
                  f"vs expectation {_psnr_in_body(rec, exp, body):6.2f} dB", flush=True)


def enhancement(checkpoint: str, cases: list[Path], doses: list[float], steps: int | None) -> None:
    tuned = json.loads((ROOT / "benchmarks/results/tuned_params.json").read_text())["tuned"]["gaussian"]
    loaded = [as_eval_case(c) for c in cases]
    for dose in doses:
        methods = {
            "LPET": None,
            "Gaussian (tuned)": GaussianEnhancer(fwhm_mm=tuned[f"{dose:g}"]["params"]["fwhm_mm"]),
            "model": load_enhancer(
                checkpoint, options=InferenceOptions(device="cpu", dose_fraction=dose, steps=steps)
            ),
        }
        for name, method in methods.items():
            psnr, ssim, psnr_exp, bias, started = [], [], [], [], time.perf_counter()
            for case in loaded:
                lpet = lpet_at(case, dose)
                if method is None:
                    out = lpet
                else:
                    ct = case.ct_hu if method.info.uses_ct else None
                    out = method.enhance_array(lpet, ct, spacing_mm=case.spacing_mm)
                against_spet = score_volume(out, case, "spet")
                psnr.append(against_spet["psnr_paper"])
                ssim.append(against_spet["ssim_paper"])
                against_expectation = score_volume(out, case, "expectation")
                psnr_exp.append(against_expectation["psnr_paper"])
                bias += [les["suvmax_bias"] for les in against_expectation["lesions"]]
            seconds = (time.perf_counter() - started) / len(loaded)
            mean_bias = f"{100 * np.mean(bias):+.1f} %" if bias else "–"
            print(f"dose {dose:g} {name:17s} PSNR {np.mean(psnr):6.2f} dB  SSIM {np.mean(ssim):.4f}  "
                  f"(vs expectation {np.mean(psnr_exp):6.2f} dB)  "
                  f"SUVmax bias {mean_bias} ({len(bias)} lesions)  {seconds:.0f} s/volume", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--state", type=Path, help="a training state (train_state.safetensors)")
    source.add_argument("--checkpoint", type=Path, help="a model checkpoint (.safetensors + .json)")
    p.add_argument("--data", type=Path, default=ROOT / "data" / "quality" / "val", help="validation cases")
    p.add_argument("--cases", type=int, default=2, help="how many validation cases (default 2)")
    p.add_argument("--doses", default="0.1", help="comma-separated dose fractions (default 0.1)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the checkpoint's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    p.add_argument("--no-ae", action="store_true", help="skip the autoencoder fidelity rows")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = sorted(args.data.glob("case_*"))[: args.cases]
    if not cases:
        print(f"error: no validation cases in {args.data} (benchmarks/quality.py simulates them)",
              file=sys.stderr)
        return 2
    doses = [float(v) for v in args.doses.split(",")]
    if args.state is not None:
        model, stage, step = _model_from_state(args.state)
        print(f"state {args.state}: stage {stage}, step {step}", flush=True)
        checkpoint = None
        if stage in ("denoiser", "done") and step > 0:
            checkpoint = str(Path(tempfile.mkdtemp()) / "validate.safetensors")
            # Mid-training the config does not record denoiser steps yet; the loader wants them.
            training = {**model.config.training, "denoiser": {"steps": step}}
            save_checkpoint(checkpoint, model, dataclasses.replace(model.config, training=training))
    elif json.loads(args.checkpoint.with_suffix(".json").read_text()).get("kind") == "supervised":
        model, checkpoint = None, str(args.checkpoint)  # no autoencoder: enhancement rows only
    else:
        model, checkpoint = load_checkpoint(args.checkpoint), str(args.checkpoint)
        if not model.config.training.get("denoiser", {}).get("steps"):
            checkpoint = None  # an autoencoder-stage file: fidelity only
    if model is not None and not args.no_ae:
        autoencoder_fidelity(model, cases, doses)
    if checkpoint is not None:
        enhancement(checkpoint, cases, doses, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
