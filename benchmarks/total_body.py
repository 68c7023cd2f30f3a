"""Peak RSS and wall time of `upete enhance` on a total-body study (600 slices), by stage.

    .venv/bin/python benchmarks/total_body.py [--slices 600] [--slice-mm 2.8] [--threads N] [--work DIR]
        [--no-crop]

Data: a synthetic total-body PET/CT written as DICOM series: PET 256×256 over a 70 cm field of view
(2.73 mm in-plane), ``--slices`` slices of ``--slice-mm``; CT 512×512 over 50 cm on the same slices;
the patient (an elliptic cylinder, 36 × 24 cm, with lungs, a liver and hot spots) through every
slice, MLEM-like low noise in the air around it. Cached in ``--work``. The measured run is the same
child process as benchmarks/speed.py's (shipped model, no model section: the default options, the
threads a node would use): read DICOM → CT onto the PET grid → enhancer → write DICOM. Target:
peak RSS ≤ 6 GB. ``--no-crop``: the model grid over the whole field of view (what the crop to the
body saves). Writes ``benchmarks/results/total_body.md`` and ``.json`` (``total_body.no-crop.*``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.speed import RESULTS, machine, run_child  # noqa: E402

TARGET_RSS_GB = 6.0
PET_FOV_MM, CT_FOV_MM = 700.0, 500.0
SHIPPED = ROOT / "model" / "weights" / "upete-ldm-p-ct.safetensors"


def _patient(
    n: int, pixel_mm: float, z: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``(activity Bq/ml, HU)`` of the patient on ``n``² slices of ``pixel_mm`` centred on the axis."""
    axis = (np.arange(n) - (n - 1) / 2) * pixel_mm
    y, x = np.meshgrid(axis, axis, indexing="ij")
    body = (x / 180.0) ** 2 + (y / 120.0) ** 2 < 1
    lungs = body & (np.abs(x) > 30) & (np.abs(x) < 130) & (y < 40) & (np.abs(z[:, None, None]) < 150)
    liver = body & (x > 20) & (y > -20) & (z[:, None, None] > 150) & (z[:, None, None] < 320)
    pet = np.where(body, 4000.0, 0.0)[None] * np.ones((len(z), 1, 1))
    ct = np.where(body, 40.0, -1000.0)[None] * np.ones((len(z), 1, 1))
    pet[lungs], ct[lungs] = 800.0, -800.0
    pet[liver], ct[liver] = 7000.0, 60.0
    for _ in range(12):  # hot spots of 10-20 mm
        c = (rng.uniform(z[0] + 20, z[-1] - 20), rng.uniform(-80, 80), rng.uniform(-120, 120))
        distance2 = (z[:, None, None] - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2
        near = distance2 < rng.uniform(5, 10) ** 2
        pet[near] = rng.uniform(15000, 30000)
    return pet.astype(np.float32), ct.astype(np.float32)


def make_study(work: Path, slices: int, slice_mm: float, seed: int = 0) -> dict:
    """Write (once) the PET and CT series; returns their folders."""
    from dicomnode.testing.scanner import StudyInfo, write_ct_series, write_pet_series

    folder = work / f"total-body-{slices}x{slice_mm:g}mm"
    done = folder / "written"
    if not done.is_file():
        started = time.perf_counter()
        rng = np.random.default_rng(seed)
        z = (np.arange(slices) - (slices - 1) / 2) * slice_mm
        pet_mm, ct_mm = PET_FOV_MM / 256, CT_FOV_MM / 512
        pet, _ = _patient(256, pet_mm, z, rng)
        # A 10 %-dose look: multiplicative noise in the patient, MLEM's low positive noise in the air.
        pet = np.abs(pet * rng.normal(1.0, 0.25, pet.shape) + rng.normal(0.0, 30.0, pet.shape))
        study = StudyInfo()
        origin = (-(255 / 2) * pet_mm, -(255 / 2) * pet_mm, -(slices - 1) / 2 * slice_mm)  # (x, y, z)
        write_pet_series(folder / "pet", pet.astype(np.float32), spacing_mm=(slice_mm, pet_mm, pet_mm),
                         origin_mm=origin, study=study, dose_fraction_note=0.1)
        del pet
        _, ct = _patient(512, ct_mm, z, np.random.default_rng(seed))
        origin = (-(511 / 2) * ct_mm, -(511 / 2) * ct_mm, -(slices - 1) / 2 * slice_mm)
        write_ct_series(folder / "ct", ct, spacing_mm=(slice_mm, ct_mm, ct_mm), origin_mm=origin, study=study)
        done.write_text("ok\n")
        print(f"wrote the study in {time.perf_counter() - started:.0f} s", flush=True)
    return {"pet": str(folder / "pet"), "ct": str(folder / "ct")}


def write_report(report: dict, name: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    run, m = report["run"], report["machine"]
    gb = run["peak_rss_bytes"] / 1e9
    lines = [
        "# Total-body study through `upete enhance`", "",
        f"Command: `{report['command']}`", "",
        f"Machine: {m['cores']} cores ({m['cpu']}); torch {m['torch']}, {m['torch_threads']} torch "
        f"thread(s); load average before {report['load_before']}, after {m['load_average']} (a shared "
        f"machine: other jobs add to the load); {m['date']}.", "",
        f"Study: PET 256×256×{report['slices']} (70 cm field of view, 2.73 mm in-plane, "
        f"{report['slice_mm']:g} mm slices), CT 512×512×{report['slices']} over 50 cm; the patient "
        "through every slice. Model: the shipped upete-ldm-p-ct, default options (no model section) "
        f"but the series' dose fraction 0.1 given, as benchmarks/speed.py does; settings "
        f"{report['settings'] or 'default'}; {run['steps']} steps, device {run['device']}; tiles "
        f"{run['tiles']}.", "",
        "| stage | seconds |", "|---|---:|",
        *[f"| {k} | {v:.1f} |" for k, v in run["stages_s"].items()],
        f"| **total** (model load {run['model_load_s']:.1f} s not included) | **{run['total_s']:.1f}** |", "",
        "| target | measured | met |", "|---|---|---|",
        f"| peak RSS ≤ {TARGET_RSS_GB:g} GB | {gb:.2f} GB | {'yes' if gb <= TARGET_RSS_GB else 'no'} |",
        "", *report.get("notes", []),
    ]
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=600)
    parser.add_argument("--slice-mm", type=float, default=2.8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the usable CPUs)")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "upete-total-body"))
    parser.add_argument("--note", action="append", default=[], help="a line added to the report")
    parser.add_argument("--no-crop", action="store_true", help="model grid over the whole field of view")
    args = parser.parse_args(argv)
    from model.enhancers.threads import intra_op_threads

    threads = args.threads or intra_op_threads()
    load_before = [round(v, 2) for v in os.getloadavg()]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    study = make_study(work, args.slices, args.slice_mm)
    # The dose fraction the series notes (10 %), as benchmarks/speed.py passes it: t* from the schedule.
    child = argparse.Namespace(threads=threads, device="cpu", steps=None, dose_fraction=0.1)
    settings = {"crop_to_body": False} if args.no_crop else {}
    run, _ = run_child(child, study, SHIPPED, settings)
    used = argv if argv is not None else sys.argv[1:]
    report = {"command": " ".join([".venv/bin/python benchmarks/total_body.py", *used]),
              "slices": args.slices, "slice_mm": args.slice_mm, "run": run, "load_before": load_before,
              "machine": machine(threads), "notes": args.note, "settings": settings}
    print(write_report(report, "total_body.no-crop" if args.no_crop else "total_body").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
