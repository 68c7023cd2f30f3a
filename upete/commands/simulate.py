"""``upete simulate``: write simulated PET/CT cases as arrays and scanner-like DICOM series.

The composition root of the simulator: cases come from :mod:`model.simulation.dataset` (phantom, counts,
doses, reconstruction) and DICOM from :mod:`dicomnode.testing.scanner`; nothing in ``model`` knows DICOM.

Per case ``OUT/case_NNNN/``: ``arrays.npz`` + ``meta.json`` (model.dataset), ``dicom/CT/`` and one
``dicom/PET_D<percent>/`` per dose (PET Image Storage with the SUV attributes; the frame duration is
the dose fraction of the standard frame, as a shorter acquisition would record), then ``DONE``. A
folder with ``DONE`` is skipped, so an interrupted run resumes where it stopped. Case ``k`` uses the
seed ``seed·100000 + k``: different ``--seed`` values give disjoint sets (train / validation / test).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("upete.simulate")

DONE = "DONE"
_SEED_STRIDE = 100_000


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "simulate",
        help="simulate PET/CT phantom cases at several doses (arrays and DICOM)",
        description="Simulate chest-abdomen PET/CT cases: per case a phantom, a standard-dose acquisition "
        "(Poisson counts with attenuation from the CT), every lower dose by binomial thinning of those "
        "counts, reconstruction by a per-case OSEM or FBP setting, written as arrays (arrays.npz + "
        "meta.json) and as DICOM (a CT series and one PET series per dose). Resumable: finished cases "
        "are skipped.",
    )
    parser.add_argument("--out", metavar="DIR", required=True, help="output folder (one subfolder per case)")
    parser.add_argument("--cases", type=int, required=True, metavar="N", help="number of cases")
    parser.add_argument(
        "--doses",
        default="1,0.5,0.25,0.1,0.05,0.02",
        help="comma-separated dose fractions in (0, 1] (default: 1,0.5,0.25,0.1,0.05,0.02)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="base seed; case k uses seed*100000+k (default 0)"
    )
    parser.add_argument(
        "--shape",
        default="160,256,256",
        metavar="Z,Y,X",
        help="voxels per case, square slices (default 160,256,256 at 2 mm)",
    )
    parser.add_argument(
        "--spacing", type=float, default=2.0, metavar="MM", help="voxel size in mm (default 2)"
    )
    parser.add_argument(
        "--recon-pool",
        default="standard",
        metavar="POOL",
        help="reconstruction settings drawn per case: 'standard' (default), 'holdout' "
        "(settings kept out of the standard pool, for test sets), 'all', or "
        "comma-separated preset names",
    )
    parser.add_argument("--no-dicom", action="store_true", help="write arrays only")
    parser.add_argument(
        "--no-mumap",
        action="store_true",
        help="no attenuation from the CT (the scanner's uniform survival instead)",
    )
    parser.add_argument("--device", default="cpu", help="torch device for projection and reconstruction")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _doses(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--doses must be comma-separated numbers, found {text!r}") from None
    if not values or any(not 0 < v <= 1 for v in values) or len(set(values)) != len(values):
        raise ValueError(f"--doses must be distinct fractions in (0, 1], found {text!r}")
    return values


def _shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--shape must be Z,Y,X integers, found {text!r}") from None
    if len(shape) != 3 or shape[1] != shape[2] or min(shape) < 8:
        raise ValueError(f"--shape must be Z,Y,X with Y == X and every size ≥ 8, found {text!r}")
    return shape  # type: ignore[return-value]


def _recon_pool(text: str) -> tuple[str, ...]:
    from model.simulation.dataset import HOLDOUT_RECONS, RECON_PRESETS, STANDARD_RECONS

    named = {"standard": STANDARD_RECONS, "holdout": HOLDOUT_RECONS, "all": tuple(RECON_PRESETS)}
    if text in named:
        return named[text]
    pool = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in pool if name not in RECON_PRESETS]
    if unknown or not pool:
        raise ValueError(
            f"--recon-pool: unknown preset(s) {unknown or [text]}; use standard, holdout, all "
            f"or names from: {', '.join(sorted(RECON_PRESETS))}"
        )
    return pool


def _tm(seconds: float) -> str:
    seconds = int(seconds) % 86400
    return f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"


def write_case_dicom(case, folder: Path, *, case_name: str) -> dict[str, int]:
    """Write the CT and one PET series per dose of a :class:`~model.simulation.dataset.SimCase` in ``folder``.

    UIDs derive from the case seed, so a rerun writes the same study. Returns files per series.
    """
    from pydicom.uid import generate_uid

    from dicomnode.testing.scanner import StudyInfo, write_ct_series, write_pet_series

    meta = case.meta
    seed = int(meta["seed"])

    def uid(*parts: str) -> str:
        return generate_uid(entropy_srcs=["upete-simulate", str(seed), *parts])

    acquisition_s = 9 * 3600 + 30 * 60  # 09:30:00; the injection was the uptake time earlier
    study = StudyInfo(
        patient_name=f"PHANTOM^{case_name.upper()}",
        patient_id=f"SIM{seed}",
        weight_kg=float(meta["patient_weight_kg"]),
        height_m=float(meta["patient_height_m"]),
        study_uid=uid("study"),
        frame_of_reference_uid=uid("for"),
        study_time=_tm(acquisition_s - 600),
        accession=f"SIM{seed}"[:16],
        injected_activity_bq=float(meta["injected_activity_bq"]),
        injection_time=_tm(acquisition_s - float(meta["uptake_time_s"])),
        acquisition_time=_tm(acquisition_s),
    )
    nz, ny, nx = case.ct_hu.shape
    sz, sy, sx = case.spacing_mm
    origin = (-(nx - 1) / 2 * sx, -(ny - 1) / 2 * sy, -(nz - 1) / 2 * sz)  # (x, y, z) of voxel [0, 0, 0]
    written = {}
    ct_paths = write_ct_series(
        folder / "CT",
        case.ct_hu,
        spacing_mm=case.spacing_mm,
        origin_mm=origin,
        study=study,
        series_uid=uid("ct"),
        series_number=2,
        series_description="CT AC",
    )
    written["CT"] = len(ct_paths)
    frame_s = float(meta["scanner"]["frame_duration_s"])
    recon_name = meta["recon_name"]
    for index, (dose, volume) in enumerate(sorted(case.lpet_bqml.items(), reverse=True)):
        name = f"PET_D{100 * dose:g}".replace(".", "p")
        paths = write_pet_series(
            folder / name,
            volume,
            spacing_mm=case.spacing_mm,
            origin_mm=origin,
            study=study,
            series_uid=uid("pet", repr(float(dose))),
            series_number=10 + index,
            series_description=f"PET AC {100 * dose:g}% {recon_name}"[:64],
            dose_fraction_note=float(dose),
            frame_duration_s=frame_s * float(dose),
        )
        written[name] = len(paths)
    return written


def _simulate_one(folder: Path, seed: int, args, doses: Sequence[float], shape, pool) -> dict:
    from model.simulation.dataset import recon_for_case, save_case, simulate_case

    if folder.exists():
        shutil.rmtree(folder)  # a half-written case from an interrupted run
    started = time.perf_counter()
    recon = recon_for_case(seed, pool)
    case = simulate_case(
        seed,
        shape=shape,
        doses=doses,
        recon=recon,
        spacing_mm=args.spacing,
        use_mumap=not args.no_mumap,
        device=args.device,
    )
    case.meta["case_id"] = folder.name
    save_case(case, folder)
    series = {} if args.no_dicom else write_case_dicom(case, folder / "dicom", case_name=folder.name)
    summary = {
        "seed": seed,
        "recon": recon.name,
        "lesions": len(case.meta["lesions"]),
        "series": series,
        "seconds": round(time.perf_counter() - started, 1),
        "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    (folder / DONE).write_text(json.dumps(summary, indent=2) + "\n")  # written last: the case is complete
    return summary


def run(args: argparse.Namespace) -> int:
    try:
        doses = _doses(args.doses)
        shape = _shape(args.shape)
        pool = _recon_pool(args.recon_pool)
        if args.cases < 1:
            raise ValueError(f"--cases must be at least 1, found {args.cases}")
        if args.spacing <= 0:
            raise ValueError(f"--spacing must be positive, found {args.spacing}")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from tqdm import tqdm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done = skipped = 0
    bar = tqdm(range(args.cases), desc="simulate", unit="case", disable=args.quiet)
    for k in bar:
        folder = out / f"case_{k:04d}"
        if (folder / DONE).is_file():
            skipped += 1
            continue
        seed = args.seed * _SEED_STRIDE + k
        summary = _simulate_one(folder, seed, args, doses, shape, pool)
        bar.set_postfix(recon=summary["recon"], s=summary["seconds"])
        log.info("case simulated", extra={"fields": {"case": folder.name, **summary}})
        done += 1
    print(f"ok: {done} case(s) simulated, {skipped} already complete, in {out}")
    return 0
