"""Forward-process benchmark: is a training input at dose d a real dose-d acquisition of the patient?

    .venv/bin/python benchmarks/forward_process.py [--cases 3] [--shape 32,128,128]

For each case (seeds 700000, 700001, …) and one OSEM and one FBP preset of
:data:`model.simulation.dataset.RECON_PRESETS`, :func:`model.simulation.dataset.simulate_case` makes the
noiseless expectation, the SPET and the **real LPET** at each dose (binomial thinning of the
acquisition's own counts). From the SPET alone, two forward processes make a dose-d input, with the
case's CT attenuation, scanner and reconstruction:

* ``perturb`` — :func:`model.physics.perturb`, today's training forward process (re-projects the SPET);
* ``inject`` — :func:`model.physics.inject_dose_noise`, mean-preserving noise injection.

Each is compared with the real LPET of the same dose:

* noise: the standard deviation of (image − expectation) in the liver (eroded by 2 voxels in-plane,
  lesions excluded), as a ratio to the real LPET's; and the radially averaged 2D noise power spectrum
  of (image − expectation) inside the body, summed in four frequency bands (0–0.5 cycles/voxel), as a
  power ratio per band;
* means: the liver mean and the mean of each lesion (≥ 20 voxels), as ratios to the real LPET's
  (lesion means summed over all lesions of all cases before the ratio); for context also as ratios
  to the expectation's, the real LPET's beside them.

Ratios are pooled over cases (noise: variance and power summed before the ratio; liver mean:
averaged). "Agrees" = every judged ratio of that row within 10 % of 1. Writes
benchmarks/results/forward_process.md and .json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.evaluation.machine import machine_description  # noqa: E402
from model.physics import (  # noqa: E402
    ReconAlgorithm,
    ScannerModel,
    attenuation_factors,
    get_projector,
    inject_dose_noise,
    mu_map_from_ct,
    perturb,
)
from model.simulation.dataset import RECON_PRESETS, STANDARD_RECONS, SimCase, simulate_case  # noqa: E402
from model.simulation.phantom import LABELS  # noqa: E402

DOSES = (0.02, 0.05, 0.10, 0.25, 0.50)
BANDS = ((0.0, 0.125), (0.125, 0.25), (0.25, 0.375), (0.375, 0.5))  # cycles per voxel
TOLERANCE = 0.10
MIN_LESION_VOXELS = 20
METHODS = ("perturb", "inject")
RESULTS = ROOT / "benchmarks" / "results"


def _first_preset(algorithm: ReconAlgorithm) -> str:
    return next(n for n in STANDARD_RECONS if RECON_PRESETS[n].algorithm is algorithm)


def _regions(case: SimCase) -> dict[str, np.ndarray]:
    liver = (case.organ_labels == LABELS["liver"]) & (case.lesion_labels == 0)
    liver = ndimage.binary_erosion(liver, structure=np.ones((1, 5, 5), bool))
    lesions = [
        case.lesion_labels == k
        for k in np.unique(case.lesion_labels[case.lesion_labels > 0])
        if (case.lesion_labels == k).sum() >= MIN_LESION_VOXELS
    ]
    return {"liver": liver, "body": case.organ_labels > 0, "lesions": lesions}


def _band_power(noise: np.ndarray, body: np.ndarray) -> np.ndarray:
    """Radially averaged NPS of the body-masked noise, summed per band (all slices pooled)."""
    spectrum = (np.abs(np.fft.fft2(noise * body)) ** 2).sum(axis=0)
    fy = np.fft.fftfreq(noise.shape[-2])[:, None]
    fx = np.fft.fftfreq(noise.shape[-1])[None, :]
    radius = np.hypot(fy, fx)
    return np.array([spectrum[(radius >= lo) & (radius < hi)].mean() for lo, hi in BANDS])


def _measure(image: np.ndarray, case: SimCase, regions: dict) -> dict:
    noise = image - case.expectation_bqml
    return {
        "liver_noise_var": float(noise[regions["liver"]].var()),
        "band_power": _band_power(noise, regions["body"]).tolist(),
        "liver_mean": float(image[regions["liver"]].mean()),
        "lesion_means": [float(image[m].mean()) for m in regions["lesions"]],
    }


def _inputs(case: SimCase, dose: float, seed: int) -> dict[str, np.ndarray]:
    """The two forward processes' dose-d inputs from the case's SPET, physics as the simulator's."""
    spacing = case.spacing_mm
    projector = get_projector(case.spet_bqml.shape[-1], pixel_size_mm=spacing[1])
    attenuation = attenuation_factors(projector, mu_map_from_ct(torch.from_numpy(case.ct_hu))).clamp_min(1e-6)
    physics = {
        "scanner": ScannerModel(**case.meta["scanner"]),
        "recon": case.recon,
        "pixel_size_mm": spacing[1],
        "slice_thickness_mm": spacing[0],
        "attenuation": attenuation,
    }
    spet = torch.from_numpy(case.spet_bqml)
    out = {}
    for k, method in enumerate((perturb, inject_dose_noise)):
        generator = torch.Generator().manual_seed(seed * 101 + k)
        out[METHODS[k]] = method(spet, dose, generator=generator, **physics).numpy()
    return out


def _lesion_ratio(per_case: list[dict], method: str, reference: str) -> float | None:
    """Sum of the method's lesion means over all lesions of all cases / the reference's; None if none.

    Pooled rather than averaged per lesion: a small lesion's mean in a 2 % LPET is mostly noise."""
    method_sum = sum(sum(c[method]["lesion_means"]) for c in per_case)
    reference_sum = sum(sum(c[reference]["lesion_means"]) for c in per_case)
    return float(method_sum / reference_sum) if reference_sum else None


def _pooled(per_case: list[dict], method: str, key: str) -> np.ndarray:
    """A noise measure summed over cases, as a ratio to the real LPET's."""
    return np.sum([c[method][key] for c in per_case], axis=0) / np.sum(
        [c["real"][key] for c in per_case], axis=0
    )


def _summarise(per_case: list[dict]) -> dict:
    """Pool one (recon, dose) over cases: ratios of each method to the real LPET."""
    row = {}
    for method in METHODS:
        lesion = _lesion_ratio(per_case, method, "real")
        ratios = {
            "liver_noise_std": float(np.sqrt(_pooled(per_case, method, "liver_noise_var"))),
            "nps_band_power": [float(b) for b in _pooled(per_case, method, "band_power")],
            "liver_mean": float(
                np.mean([c[method]["liver_mean"] / c["real"]["liver_mean"] for c in per_case])
            ),
            "lesion_mean": lesion,
        }
        judged = [ratios["liver_noise_std"], *ratios["nps_band_power"], ratios["liver_mean"]]
        judged += [lesion] if lesion is not None else []
        ratios["agrees"] = bool(all(abs(v - 1) <= TOLERANCE for v in judged))
        # Context, not judged: how far each keeps the lesions' expected mean (the real LPET's too).
        ratios["lesion_mean_vs_expectation"] = _lesion_ratio(per_case, method, "expectation")
        ratios["real_lesion_mean_vs_expectation"] = _lesion_ratio(per_case, "real", "expectation")
        row[method] = ratios
    return row


def run(n_cases: int, shape: tuple[int, int, int]) -> dict:
    recons = {"OSEM": _first_preset(ReconAlgorithm.OSEM), "FBP": _first_preset(ReconAlgorithm.FBP)}
    results: dict = {}
    for label, name in recons.items():
        per_dose: dict[float, list] = {d: [] for d in DOSES}
        for i in range(n_cases):
            seed = 700_000 + i
            case = simulate_case(seed, shape=shape, doses=DOSES, recon=RECON_PRESETS[name])
            regions = _regions(case)
            for dose in DOSES:
                images = {
                    "expectation": case.expectation_bqml,
                    "real": case.lpet_bqml[dose],
                    **_inputs(case, dose, seed),
                }
                per_dose[dose].append({k: _measure(v, case, regions) for k, v in images.items()})
            print(f"{label} case {seed} done", flush=True)
        results[label] = {"preset": name, "doses": {str(d): _summarise(per_dose[d]) for d in DOSES}}
    return results


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _markdown(report: dict) -> str:
    rows = [row for block in report["results"].values() for row in block["doses"].values()]
    total = len(rows)
    agreeing = {method: sum(row[method]["agrees"] for row in rows) for method in METHODS}
    lines = [
        "# Forward process: training input vs a real lower-dose acquisition",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}; load average at start {report['load_average']}  ",
        f"Date: {report['date']}; {report['seconds']:.0f} s; "
        f"{report['cases']} cases of shape {report['shape']}",
        "",
        "Ratios to the real LPET of the same dose (1 = identical); noise and lesion means pooled over cases,"
        " liver mean averaged.",
        "NPS bands: " + ", ".join(f"{lo}–{hi}" for lo, hi in BANDS) + " cycles/voxel (power ratios).",
        "Rows that agree: " + ", ".join(f"{m} {n} of {total}" for m, n in agreeing.items()) + ".",
        f"Agrees: every judged ratio of the row within {TOLERANCE:.0%} of 1 (all but the last column).",
        "Last column, for context: lesion mean / the expectation's, the method's (the real LPET's).",
        "",
        "| recon | dose | method | liver noise std | NPS power per band | liver mean | lesion mean | agrees "
        "| lesion vs expectation |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, block in report["results"].items():
        for dose, row in block["doses"].items():
            for method in METHODS:
                r = row[method]
                bands = " / ".join(f"{b:.2f}" for b in r["nps_band_power"])
                cells = [
                    f"{label} ({block['preset']})",
                    f"{float(dose):.0%}",
                    method,
                    f"{r['liver_noise_std']:.3f}",
                    bands,
                    f"{r['liver_mean']:.3f}",
                    _fmt(r["lesion_mean"]),
                    "yes" if r["agrees"] else "no",
                    f"{_fmt(r['lesion_mean_vs_expectation'])} ({_fmt(r['real_lesion_mean_vs_expectation'])})",
                ]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--shape", default="32,128,128", help="z,y,x of each simulated case")
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    if len(shape) != 3:
        parser.error(f"--shape needs three integers z,y,x, found {args.shape!r}")
    load = [round(v, 2) for v in os.getloadavg()]
    started = time.perf_counter()
    results = run(args.cases, shape)
    report = {
        "command": "benchmarks/forward_process.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_description(),
        "torch_threads": torch.get_num_threads(),
        "load_average": load,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "seconds": time.perf_counter() - started,
        "cases": args.cases,
        "shape": list(shape),
        "doses": list(DOSES),
        "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "forward_process.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "forward_process.md").write_text(_markdown(report))
    print(_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
