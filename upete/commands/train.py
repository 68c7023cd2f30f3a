"""``upete train``: train a uPETe variant from SPET only (real studies or the simulator).

Data: ``--data DIR`` (simulated cases, NIfTI pairs, or one DICOM study per sub-folder), or
``--simulate N`` (N phantom cases made once into ``OUT/sim_data`` and reused on resume). The run ends
with ``OUT/upete-VARIANT.safetensors`` + ``.json`` and ``OUT/enhance.yaml``, a config naming it for
``upete enhance --config``. Several GPUs: ``torchrun --nproc-per-node G -m upete train ...``.

``--variant supervised`` trains the supervised reference U-Net instead (:mod:`model.training.supervised`):
on LPET/SPET pairs at ``--dose`` from simulated cases that hold that dose (``--simulate N`` makes them
into ``OUT/sim_data_dDOSE``), ending with ``OUT/supervised-unet.safetensors`` + ``.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from dicomnode.logs import setup_logging

VARIANTS = ("ldm", "ldm-p", "ldm-ct", "ldm-p-ct", "supervised")


def _sizes(text: str, count: int | None = None) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, found {text!r}") from None
    if count is not None and len(values) != count:
        raise argparse.ArgumentTypeError(f"expected {count} comma-separated integers, found {text!r}")
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"sizes must be positive, found {text!r}")
    return values


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "train",
        help="train a uPETe model variant from SPET (real or simulated)",
        description="Train one variant of the paper's ablation from standard-dose PET only: stage 1 the "
        "autoencoder, then its calibration (latent scale, noise curve), stage 2 the denoiser (+ CT "
        "encoder). Progress is logged with loss and ETA; the state is saved every few minutes and "
        "--resume continues it. Exit status 0 when trained, 1 on a training failure, 2 on usage errors.",
    )
    parser.add_argument(
        "--variant",
        choices=VARIANTS,
        required=True,
        help="ldm, ldm-p, ldm-ct or ldm-p-ct (uPETe); supervised: the reference U-Net on LPET/SPET pairs",
    )
    parser.add_argument(
        "--dose",
        metavar="D",
        type=float,
        default=0.1,
        help="supervised only: the LPET dose fraction it trains on (default 0.1)",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--data", metavar="DIR", type=Path, help="folder of SPET cases (simulated, NIfTI or DICOM)"
    )
    source.add_argument("--simulate", metavar="N", type=int, help="train on N simulated phantom cases")
    parser.add_argument(
        "--out", metavar="DIR", type=Path, required=True, help="folder for checkpoints and state"
    )
    parser.add_argument("--stage", choices=("ae", "denoiser", "both"), default="both")
    parser.add_argument(
        "--init",
        metavar="CKPT",
        type=Path,
        help="reuse the trained autoencoder of this checkpoint (e.g. OUT/autoencoder.safetensors "
        "of another variant: the paper's variants share one compression model)",
    )
    parser.add_argument(
        "--patch",
        metavar="Z,Y,X",
        type=lambda t: _sizes(t, 3),
        default=None,
        help="training patch in 2 mm voxels, multiples of f × 4 (default 96,96,96 on CUDA, 32,48,48 on CPU)",
    )
    parser.add_argument(
        "--steps", metavar="N", type=int, help="steps of each stage (default 2000 AE, 4000 denoiser)"
    )
    parser.add_argument("--ae-steps", metavar="N", type=int)
    parser.add_argument("--denoiser-steps", metavar="N", type=int)
    parser.add_argument("--batch", metavar="N", type=int, default=2, help="patches per step (per GPU)")
    parser.add_argument(
        "--ae-channels",
        metavar="C,..",
        type=_sizes,
        default=(16, 32, 64),
        help="autoencoder channels per level; 2/3/4 levels give f = 2/4/8 (default 16,32,64)",
    )
    parser.add_argument(
        "--unet-channels",
        metavar="C,..",
        type=_sizes,
        default=None,
        help="U-Net channels per level (default 32,64,64 for the denoiser, 16,32,64 for supervised)",
    )
    parser.add_argument("--latent-channels", metavar="C", type=int, default=4)
    parser.add_argument("--norm-groups", metavar="G", type=int, default=8)
    parser.add_argument("--head-channels", metavar="C", type=int, default=32)
    parser.add_argument("--normalisation", choices=("fixed", "minmax"), default="fixed")
    parser.add_argument(
        "--perceptual-weights",
        metavar="FILE",
        type=Path,
        help="3D ResNet (MedicalNet) weights as .safetensors for the perceptual loss (off without)",
    )
    parser.add_argument(
        "--adv-weight",
        metavar="W",
        type=float,
        default=0.0,
        help="weight of the autoencoder's patch-adversarial loss (default 0: off, it costs PSNR)",
    )
    parser.add_argument(
        "--adv-start", metavar="STEP", type=int, help="autoencoder step where the discriminator joins"
    )
    parser.add_argument(
        "--sim-shape",
        metavar="Z,Y,X",
        type=lambda t: _sizes(t, 3),
        default=(64, 128, 128),
        help="phantom size in 2 mm voxels for --simulate (default 64,128,128)",
    )
    parser.add_argument(
        "--no-vary-recon",
        action="store_true",
        help="perturb with one reconstruction setting only (default: vary OSEM/FBP and filters)",
    )
    parser.add_argument(
        "--pool-size", metavar="N", type=int, default=8, help="perturbed slabs kept for cropping"
    )
    parser.add_argument(
        "--pool-refresh",
        metavar="R",
        type=float,
        default=0.25,
        help="perturbed slabs replaced per step (default 0.25: one every 4 steps; perturbing costs seconds)",
    )
    parser.add_argument(
        "--curve-points",
        metavar="N",
        type=int,
        default=9,
        help="steps t at which the noise curve is measured",
    )
    parser.add_argument(
        "--curve-slabs", metavar="N", type=int, default=3, help="slabs averaged per curve point"
    )
    parser.add_argument(
        "--checkpoint-every", metavar="S", type=float, default=300.0, help="seconds between saves"
    )
    parser.add_argument(
        "--log-every", metavar="S", type=float, default=15.0, help="seconds between progress lines"
    )
    parser.add_argument("--resume", action="store_true", help="continue the state saved in --out")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _error(message: str, status: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status


def _simulate(
    root: Path, count: int, shape: tuple[int, ...], seed: int, doses: tuple[float, ...] = ()
) -> Path:
    """N phantom cases under ``root`` (existing ones kept); rank 0 makes them, other ranks wait.

    ``doses``: LPETs to simulate as well (thinned from each case's own counts), for supervised pairs.
    """
    marker = root / f".complete-{count}"
    if int(os.environ.get("RANK", "0")) != 0:
        deadline = time.monotonic() + 24 * 3600
        while not marker.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("timed out waiting for rank 0 to simulate the training cases")
            time.sleep(2.0)
        return root
    from model.simulation import dataset

    root.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        folder = root / f"case_{k:04d}"
        if (folder / "arrays.npz").is_file():
            continue
        # recon=None: each case draws its reconstruction from the simulator's pool (several textures).
        case = dataset.simulate_case(seed * 100000 + k, shape=shape, doses=doses, recon=None)
        dataset.save_case(case, folder)
        print(f"simulated case {k + 1}/{count}", file=sys.stderr)
    marker.touch()
    return root


def _dicom_loader(folder: Path):  # noqa: ANN202 - (sitk.Image, sitk.Image | None)
    """PET (Bq/ml) and CT (HU) of one study folder, via the node's own series loader."""
    from dicomnode.folders import FolderError, find_series
    from dicomnode.volume import load_series

    pet = load_series(find_series(folder, "PT")).image
    try:
        ct_paths = find_series(folder, "CT")
    except FolderError:
        return pet, None
    return pet, load_series(ct_paths).image


def _run_supervised(args: argparse.Namespace) -> int:
    from model.training.supervised import SupervisedSettings, train_supervised

    if not 0 < args.dose <= 1:
        return _error(f"--dose must be in (0, 1], found {args.dose}", 2)
    defaults = SupervisedSettings(data_dir=Path(), out_dir=Path())
    try:
        data = args.data
        if args.simulate is not None:
            folder = args.out / f"sim_data_d{args.dose:g}"
            data = _simulate(folder, args.simulate, args.sim_shape, args.seed, doses=(args.dose,))
        settings = SupervisedSettings(
            data_dir=data,
            out_dir=args.out,
            dose=args.dose,
            steps=args.steps if args.steps is not None else defaults.steps,
            patch_size=args.patch or defaults.patch_size,
            batch_size=args.batch,
            channels=args.unet_channels or defaults.channels,
            norm_groups=args.norm_groups,
            checkpoint_every_s=args.checkpoint_every,
            log_every_s=args.log_every,
            seed=args.seed,
            device=args.device,
            amp=not args.no_amp,
            resume=args.resume,
        )
        result = train_supervised(settings)
    except (ValueError, FileNotFoundError) as exc:
        return _error(str(exc), 2)
    print(f"model: {result.checkpoint}")
    print(f"evaluate: python benchmarks/quality.py --checkpoint {result.checkpoint}")
    return 0


def run(args: argparse.Namespace) -> int:
    setup_logging("DEBUG" if args.verbose else "INFO")
    if args.simulate is not None and args.simulate < 1:
        return _error("--simulate needs at least 1 case", 2)
    if args.variant == "supervised":
        return _run_supervised(args)
    from model.networks.diffusion import Variant
    from model.training.diffusion import TrainSettings, train

    ae_steps = (
        args.ae_steps if args.ae_steps is not None else (args.steps if args.steps is not None else 2000)
    )
    dn_steps = (
        args.denoiser_steps
        if args.denoiser_steps is not None
        else (args.steps if args.steps is not None else 4000)
    )
    try:
        data = args.data
        if args.simulate is not None:
            data = _simulate(args.out / "sim_data", args.simulate, args.sim_shape, args.seed)
        settings = TrainSettings(
            variant=Variant(args.variant),
            out_dir=args.out,
            data_dir=data,
            stage=args.stage,
            init=args.init,
            patch_size=args.patch,
            batch_size=args.batch,
            ae_steps=ae_steps,
            denoiser_steps=dn_steps,
            ae_channels=args.ae_channels,
            latent_channels=args.latent_channels,
            unet_channels=args.unet_channels or (32, 64, 64),
            norm_groups=args.norm_groups,
            head_channels=args.head_channels,
            perceptual_weights=args.perceptual_weights,
            adv_weight=args.adv_weight,
            adv_start=args.adv_start,
            normalisation=args.normalisation,
            vary_recon=not args.no_vary_recon,
            pool_size=args.pool_size,
            pool_refresh=args.pool_refresh,
            curve_points=args.curve_points,
            curve_slabs=args.curve_slabs,
            checkpoint_every_s=args.checkpoint_every,
            log_every_s=args.log_every,
            seed=args.seed,
            device=args.device,
            amp=not args.no_amp,
            resume=args.resume,
        )
        result = train(settings, dicom_loader=_dicom_loader)
    except (ValueError, FileNotFoundError) as exc:
        return _error(str(exc), 2)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if result.checkpoint is None:
        print(f"autoencoder trained: {result.autoencoder_checkpoint}")
        print(
            f"next: upete train --variant VARIANT --stage denoiser --init {result.autoencoder_checkpoint} ..."
        )
        return 0
    config = args.out / "enhance.yaml"
    config.write_text(
        f"# written by upete train: the model to use with `upete enhance --config {config}`\n"
        f"model:\n  checkpoint: {result.checkpoint.resolve()}\n"
    )
    print(f"model: {result.checkpoint}")
    print(f"config: {config} (upete enhance --config {config} --pet DIR --ct DIR --out DIR)")
    return 0
