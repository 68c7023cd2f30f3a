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
import dataclasses
import os
import sys
import time
from pathlib import Path

from dicomnode.logs import setup_logging
from model.training.settings import (
    DEFAULT_PATCH_CPU,
    DEFAULT_PATCH_CUDA,
    SupervisedSettings,
    TrainSettings,
    TrainStage,
)
from upete.commands.common import EXIT_USAGE, fail

VARIANTS = ("ldm", "ldm-p", "ldm-ct", "ldm-p-ct", "supervised")
#: Phantom size (2 mm voxels) for --simulate: a command-line choice, not a training setting.
SIM_SHAPE = (64, 128, 128)


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
    # Every option the settings hold defaults to None here: model.training.settings is the one table
    # of defaults (quoted in the help from there), and an option not given leaves its default alone.
    _add_data_options(parser)
    _add_model_options(parser)
    _add_run_options(parser)
    return parser


def _add_data_options(parser: argparse.ArgumentParser) -> None:
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
        help=f"supervised only: the LPET dose fraction it trains on (default {SupervisedSettings.dose:g})",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--data", metavar="DIR", type=Path, help="folder of SPET cases (simulated, NIfTI or DICOM)"
    )
    source.add_argument("--simulate", metavar="N", type=int, help="train on N simulated phantom cases")
    parser.add_argument(
        "--sim-shape",
        metavar="Z,Y,X",
        type=lambda t: _sizes(t, 3),
        default=SIM_SHAPE,
        help=f"phantom size in 2 mm voxels for --simulate (default {_listed(SIM_SHAPE)})",
    )
    parser.add_argument(
        "--out", metavar="DIR", type=Path, required=True, help="folder for checkpoints and state"
    )
    parser.add_argument(
        "--stage",
        choices=[s.value for s in TrainStage],
        help="default both; 'index' only re-matches the noise index (where the node places an LPET of "
        "unknown dose) of --init + --init-denoiser over scanner styles and saves that checkpoint in --out",
    )
    parser.add_argument(
        "--init",
        metavar="CKPT",
        type=Path,
        help="reuse the trained autoencoder of this checkpoint (e.g. OUT/autoencoder.safetensors "
        "of another variant: the paper's variants share one compression model)",
    )
    parser.add_argument(
        "--no-vary-recon",
        dest="vary_recon",
        action="store_false",
        default=None,
        help="perturb with one reconstruction setting only (default: vary OSEM/FBP and filters)",
    )
    parser.add_argument(
        "--forward",
        choices=["inject", "perturb"],
        help="training LPET: inject (default; a real lower-dose acquisition of the SPET's patient) or "
        "perturb (re-projects the reconstructed SPET, as the first runs did)",
    )
    parser.add_argument(
        "--no-styles",
        dest="styles",
        action="store_false",
        default=None,
        help="make training LPET on the 2 mm model grid only (default: random scanner styles, 2-5.5 mm "
        "pixels, 2-4 mm slices, FBP/OSEM, post-filters 0-7 mm, count levels over a factor of 10)",
    )
    parser.add_argument(
        "--init-denoiser",
        metavar="CKPT",
        type=Path,
        help="start the denoiser from this checkpoint's (fine-tuning; may be the --init file itself)",
    )
    parser.add_argument(
        "--ae-gain-max",
        metavar="G",
        type=float,
        help=f"autoencoder patches scaled by a gain in [1/2, G] (default {TrainSettings.ae_gain_max:g}; "
        "1: off)",
    )
    parser.add_argument("--pool-size", metavar="N", type=int, help="perturbed slabs kept for cropping")
    parser.add_argument(
        "--pool-refresh",
        metavar="R",
        type=float,
        help=f"perturbed slabs replaced per step (default {TrainSettings.pool_refresh:g}; perturbing "
        "costs seconds)",
    )


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--patch",
        dest="patch_size",
        metavar="Z,Y,X",
        type=lambda t: _sizes(t, 3),
        help=f"training patch in 2 mm voxels, multiples of f × 4 (default {_listed(DEFAULT_PATCH_CUDA)} "
        f"on CUDA, {_listed(DEFAULT_PATCH_CPU)} on CPU)",
    )
    parser.add_argument(
        "--ae-channels",
        metavar="C,..",
        type=_sizes,
        help="autoencoder channels per level; 2/3/4 levels give f = 2/4/8 "
        f"(default {_listed(TrainSettings.ae_channels)})",
    )
    parser.add_argument(
        "--unet-channels",
        metavar="C,..",
        type=_sizes,
        help=f"U-Net channels per level (default {_listed(TrainSettings.unet_channels)} for the denoiser, "
        f"{_listed(SupervisedSettings.channels)} for supervised)",
    )
    parser.add_argument("--latent-channels", metavar="C", type=int)
    parser.add_argument("--norm-groups", metavar="G", type=int)
    parser.add_argument("--head-channels", metavar="C", type=int)
    parser.add_argument("--normalisation", choices=("fixed", "minmax"), help="default fixed")
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
        help="weight of the autoencoder's patch-adversarial loss (default 0: off, it costs PSNR)",
    )
    parser.add_argument(
        "--adv-start", metavar="STEP", type=int, help="autoencoder step where the discriminator joins"
    )
    parser.add_argument(
        "--curve-points", metavar="N", type=int, help="steps t at which the noise curve is measured"
    )
    parser.add_argument("--curve-slabs", metavar="N", type=int, help="slabs averaged per curve point")


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--steps",
        metavar="N",
        type=int,
        help=f"steps of each stage (default {TrainSettings.ae_steps} AE, {TrainSettings.denoiser_steps} "
        f"denoiser; {SupervisedSettings.steps} supervised)",
    )
    parser.add_argument("--ae-steps", metavar="N", type=int)
    parser.add_argument("--denoiser-steps", metavar="N", type=int)
    parser.add_argument(
        "--unet-lr",
        metavar="LR",
        type=float,
        help=f"denoiser learning rate (default {TrainSettings.unet_lr:g}; lower to fine-tune)",
    )
    parser.add_argument(
        "--batch", dest="batch_size", metavar="N", type=int, help="patches per step (per GPU)"
    )
    parser.add_argument(
        "--checkpoint-every",
        dest="checkpoint_every_s",
        metavar="S",
        type=float,
        help="seconds between saves",
    )
    parser.add_argument(
        "--log-every", dest="log_every_s", metavar="S", type=float, help="seconds between progress lines"
    )
    parser.add_argument(
        "--resume", action="store_true", default=None, help="continue the state saved in --out"
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default auto")
    parser.add_argument(
        "--no-amp", dest="amp", action="store_false", default=None, help="no mixed precision on CUDA"
    )
    parser.add_argument("--seed", type=int)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _listed(sizes: tuple[int, ...]) -> str:
    return ",".join(str(v) for v in sizes)


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


def _dicom_loader(folder: Path):  # noqa: ANN202 - (sitk.Image, sitk.Image | None, dict)
    """PET (Bq/ml), CT (HU) and acquisition of one study folder, via the node's own series loader.

    The acquisition (:func:`dicomnode.pet_acquisition.acquisition_from_headers`) is read from the
    first PET header, so training makes the study's lower-dose inputs with its own reconstruction
    and frame duration.
    """
    from dicomnode.folders import FolderError, find_series
    from dicomnode.pet_acquisition import acquisition_from_headers
    from dicomnode.volume import load_series

    volume = load_series(find_series(folder, "PT"))
    # load_series keeps every slice's header without its pixels: no second read of the file.
    acquisition = acquisition_from_headers(volume.datasets[0])
    try:
        ct_paths = find_series(folder, "CT")
    except FolderError:
        return volume.image, None, acquisition
    return volume.image, load_series(ct_paths).image, acquisition


def _run_supervised(args: argparse.Namespace) -> int:
    from model.training.supervised import train_supervised

    settings = SupervisedSettings.from_options(
        {**vars(args), "channels": args.unet_channels}, data_dir=args.data, out_dir=args.out
    )
    if not 0 < settings.dose <= 1:
        return fail(f"--dose must be in (0, 1], found {settings.dose}", EXIT_USAGE)
    try:
        if args.simulate is not None:
            folder = args.out / f"sim_data_d{settings.dose:g}"
            data = _simulate(folder, args.simulate, args.sim_shape, settings.seed, doses=(settings.dose,))
            settings = dataclasses.replace(settings, data_dir=data)
        result = train_supervised(settings)
    except (ValueError, FileNotFoundError) as exc:
        return fail(str(exc), EXIT_USAGE)
    print(f"model: {result.checkpoint}")
    print(f"evaluate: python benchmarks/quality.py --checkpoint {result.checkpoint}")
    return 0


def run(args: argparse.Namespace) -> int:
    setup_logging("DEBUG" if args.verbose else "INFO")
    if args.simulate is not None and args.simulate < 1:
        return fail("--simulate needs at least 1 case", EXIT_USAGE)
    if args.variant == "supervised":
        return _run_supervised(args)
    from model.training.diffusion import train

    try:
        settings = train_settings(args)
        if args.simulate is not None:
            _simulate(settings.data_dir, args.simulate, args.sim_shape, settings.seed)
        result = train(settings, dicom_loader=_dicom_loader)
    except (ValueError, FileNotFoundError) as exc:
        return fail(str(exc), EXIT_USAGE)
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


def train_settings(args: argparse.Namespace) -> TrainSettings:
    """A uPETe variant's settings from the parsed options: those given over the table's defaults
    (``--steps`` sets both stages unless ``--ae-steps`` or ``--denoiser-steps`` say otherwise)."""
    from model.networks.diffusion import Variant

    given = {k: v for k, v in vars(args).items() if v is not None}
    return TrainSettings.from_options(
        {"ae_steps": args.steps, "denoiser_steps": args.steps, **given},
        variant=Variant(args.variant),
        data_dir=args.data if args.simulate is None else args.out / "sim_data",
        out_dir=args.out,
    )
