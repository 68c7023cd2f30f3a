"""Transfer benchmark: the shipped models on the transfer test set, through the node's own path.

    .venv/bin/python benchmarks/transfer.py [--cases 2] [--styles all] [--doses 0.1] [--steps N]

For each scanner style (model/evaluation/transfer/styles.py) and case (seeds 900000, 900001, …: the
same patient drawn for every style, shrunk where it does not fit the style's field of view), the
transfer generator makes the truth, the noiseless expectation, the SPET and the LPET at each dose. The
LPET goes out as a DICOM PET series and the CT as a CT series (dicomnode.testing.scanner); the CT's
50 cm field of view is padded with air (−1000 HU) to the PET's where the PET's is wider, as a
scanner's extended-FOV CTAC does (the node would give the model the same air outside a 50 cm CT).
The node's path ``dicomnode.pipeline.enhance_series`` runs each model (by default the shipped LDM-P-CT,
with the CT, and LDM-P, without), dose unknown to the model, default steps; the derived series is read
back with ``dicomnode.volume.load_series``. A model is any checkpoint the node itself loads
(``model.enhance.load_enhancer``): a uPETe diffusion model, or the supervised reference U-Net (its JSON
says ``"kind": "supervised"``; trained at one dose, it is given every dose as it is, and has no
schedule to place the LPET on).

Scores, all against the **noiseless expectation** inside the body (voxels at least half inside the
phantom's outline), on the PET grid:

* PSNR = 10·log10(peak² / MSE), peak = the expectation's maximum in the body, MSE over body voxels.
* Gap closed = 1 − MSE(method) / MSE(LPET): the fraction of the LPET's squared error removed (1 = the
  expectation itself, 0 = no better than the LPET, < 0 = worse). In MSE terms because a PSNR
  ceiling against the expectation is infinite.
* The rival: the best Gaussian per case, its FWHM chosen on a 0–12 mm grid (1 mm steps) by the MSE
  against the expectation: chosen with the truth in hand, a bound no site can reach.
* The SPET (100 %) column: the standard-dose reconstruction's PSNR, the noise floor of a full scan.
* Lesion SUVmax / SUVmean bias of each method against the expectation's, for every lesion of
  equivalent diameter ≥ 10 mm.

Writes benchmarks/results/transfer.md and transfer.json (command, machine, load, date). The
transfer set is never used for training or any choice.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.transfer_report import MIN_LESION_MM  # noqa: E402 - after the path above

RESULTS = ROOT / "benchmarks" / "results"
MODELS = {"LDM-P-CT": ROOT / "model/weights/upete-ldm-p-ct.safetensors",
          "LDM-P": ROOT / "model/weights/upete-ldm-p.safetensors"}
GAUSSIAN_FWHM_GRID_MM = tuple(float(f) for f in range(0, 13))
AIR_HU = -1000.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=2, help="cases per style (seeds 900000+; default 2)")
    p.add_argument("--styles", default="all", help="comma-separated style names (default: all six)")
    p.add_argument("--doses", default="0.1", help="dose fractions, e.g. 0.02,0.05,0.1,0.25,0.5 (default 0.1)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the checkpoint's own)")
    p.add_argument("--device", default="auto", help="torch device of the models (default auto)")
    p.add_argument("--save-cases", metavar="DIR", help="also save each generated case (save_case) here")
    p.add_argument("--model", action="append", metavar="NAME=CHECKPOINT",
                   help="a model to score, any checkpoint the node loads: uPETe diffusion or supervised "
                        "U-Net (repeatable; NAME labels it in the report; default the shipped LDM-P-CT and "
                        "LDM-P)")
    p.add_argument("--work", default=str(ROOT / "data" / "transfer"),
                   help="each model's outputs are kept here, under its model version (the digest of its "
                        "weights and JSON), and reused by a rerun (default data/transfer)")
    p.add_argument("--out", default=str(RESULTS / "transfer"), help="results path without suffix")
    return p


def _padded_ct(ct: np.ndarray, spacing: Sequence[float], origin: Sequence[float],
               pet_half_extent_mm: float) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The CT padded in-plane with air so that it spans the PET's field of view (origin moved to match)."""
    pixel = float(spacing[1])
    ct_half = (ct.shape[1] / 2.0) * pixel
    pad = max(0, int(np.ceil((pet_half_extent_mm - ct_half) / pixel)))
    if pad == 0:
        return ct, (float(origin[0]), float(origin[1]), float(origin[2]))
    padded = np.pad(ct, ((0, 0), (pad, pad), (pad, pad)), constant_values=AIR_HU)
    return padded, (origin[0] - pad * pixel, origin[1] - pad * pixel, float(origin[2]))


def _write_study(case: Any, dose: float, folder: Path) -> tuple[list[Path], list[Path]]:
    """The case's LPET at ``dose`` and its CT as DICOM series of one study; returns (PET, CT) paths."""
    from dicomnode.testing.scanner import StudyInfo, write_ct_series, write_pet_series

    # Injection one hour before the scan: the generator's uptake time, so the SUV scale matches.
    study = StudyInfo(patient_name="TRANSFER^CASE", patient_id=f"TR{case.seed}", weight_kg=case.weight_kg,
                      injected_activity_bq=case.injected_bq, injection_time="083000",
                      acquisition_time="093000")
    pet_half = case.truth.shape[2] * case.pet_spacing_mm[2] / 2.0
    ct, ct_origin = _padded_ct(case.ct_hu, case.ct_spacing_mm, case.ct_origin_mm, pet_half)
    ct_paths = write_ct_series(folder / "ct", ct, spacing_mm=case.ct_spacing_mm, origin_mm=ct_origin,
                               study=study)
    pet_paths = write_pet_series(folder / "pet", case.lpet[dose], spacing_mm=case.pet_spacing_mm,
                                 origin_mm=case.pet_origin_mm, study=study, dose_fraction_note=dose,
                                 series_description=f"PET AC {case.style}")
    return pet_paths, ct_paths


def _read(paths: Sequence[Path], shape: tuple[int, ...]) -> np.ndarray:
    import SimpleITK as sitk

    from dicomnode.volume import load_series

    array = sitk.GetArrayFromImage(load_series(paths).image).astype(np.float32)
    if array.shape != shape:
        raise RuntimeError(f"series read back as {array.shape}, the case is {shape}")
    return array


def _lesion_bias(x: np.ndarray, case: Any, labels: np.ndarray) -> dict[str, float | None]:
    from model.evaluation.metrics import lesion_suv_bias

    if not labels.any():
        return {"suvmax_mean": None, "suvmax_worst": None, "suvmax_lowest": None, "suvmean_mean": None}
    # The injected activity decayed to the scan start, so SUVs are the case's own (bias is a ratio anyway).
    injected = case.bqml_per_suv * case.weight_kg * 1000.0
    biases = lesion_suv_bias(x, case.expectation, labels, weight_kg=case.weight_kg, injected_bq=injected)
    smax = [b.suvmax_bias for b in biases]
    return {"suvmax_mean": float(np.mean(smax)), "suvmax_worst": float(smax[int(np.argmax(np.abs(smax)))]),
            "suvmax_lowest": float(min(smax)),
            "suvmean_mean": float(np.mean([b.suvmean_bias for b in biases]))}


def score_case(case: Any, dose: float, outputs: dict[str, np.ndarray], lpet: np.ndarray) -> dict[str, Any]:
    """Every method's PSNR, gap closed and lesion biases for one case and dose (module doc)."""
    from model.evaluation.metrics import psnr
    from model.evaluation.transfer import gaussian_fwhm

    ref, body = case.expectation, case.body
    peak = float(ref[body].max())

    def mse(x: np.ndarray) -> float:
        return float(np.mean((x[body].astype(np.float64) - ref[body]) ** 2))

    smoothed = {f: gaussian_fwhm(lpet, f, case.pet_spacing_mm) for f in GAUSSIAN_FWHM_GRID_MM}
    best_fwhm = min(smoothed, key=lambda f: mse(smoothed[f]))
    methods = {"LPET": lpet, "Gaussian": smoothed[best_fwhm], **outputs}
    big = [les.index for les in case.lesions if les.diameter_mm >= MIN_LESION_MM]
    labels = np.where(np.isin(case.lesion_labels, big), case.lesion_labels, 0)
    lpet_mse = mse(lpet)
    row: dict[str, Any] = {"style": case.style, "seed": case.seed, "dose": dose, "peak_bqml": peak,
                           "gaussian_fwhm_mm": best_fwhm, "lesions_scored": len(big),
                           "spet_psnr": psnr(case.spet, ref, data_range=peak, mask=body), "methods": {}}
    for name, x in methods.items():
        row["methods"][name] = {"psnr": psnr(x, ref, data_range=peak, mask=body),
                                "gap_closed": 1.0 - mse(x) / lpet_mse, **_lesion_bias(x, case, labels)}
    return row


class _Placement(logging.Handler):
    """Catches where the diffusion enhancer placed the LPET on its schedule (its log line): the dose
    equivalent of t*, the node's own estimate when no dose is given. NaN for models that log none (the
    supervised U-Net has no schedule)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.dose_equivalent = float("nan")
        self._logger = logging.getLogger("model.enhancers.diffusion")

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", {})
        if "dose_equivalent" in fields:
            self.dose_equivalent = float(fields["dose_equivalent"])

    def __enter__(self) -> _Placement:
        self._level = self._logger.level
        self._logger.setLevel(logging.INFO)
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._level)


def run_case(style: str, seed: int, doses: Sequence[float], enhancers: dict[str, Any],
             save_dir: str | None, cache: dict[str, Path] | None = None) -> list[dict[str, Any]]:
    """Generate one case, send each dose's LPET through the node's path with every model, score it.

    ``cache``: per model, a folder where its output of each case and dose is kept (as .npy with its
    seconds) and read back by a later run: the generator is deterministic, inference is what costs."""
    from dicomnode.config import OutputSettings
    from dicomnode.pipeline import enhance_series
    from model.evaluation.transfer import generate_case, save_case

    started = time.perf_counter()
    case = generate_case(style, seed, doses=tuple(doses))
    generated = time.perf_counter() - started
    if save_dir:
        save_case(case, Path(save_dir) / f"{style}-{seed}")
    rows = []
    for dose in doses:
        with tempfile.TemporaryDirectory(prefix="upete-transfer-") as tmp:
            folder = Path(tmp)
            pet_paths, ct_paths = _write_study(case, dose, folder)
            lpet = _read(pet_paths, case.truth.shape)
            outputs, seconds, placed = {}, {}, {}
            for name, enhancer in enhancers.items():
                kept = cache[name] / f"{style}-{seed}-{dose:g}.npz" if cache else None
                if kept is not None and kept.is_file():
                    with np.load(kept) as saved:
                        outputs[name], seconds[name] = saved["output"], float(saved["seconds"])
                        placed[name] = float(saved["dose_equivalent"])
                    continue
                started = time.perf_counter()
                with _Placement() as placement:
                    result = enhance_series(pet_paths, ct_paths if enhancer.info.uses_ct else None, enhancer,
                                            folder / f"out-{name}", output=OutputSettings(preview=False))
                seconds[name] = time.perf_counter() - started
                placed[name] = placement.dose_equivalent
                if enhancer.info.uses_ct and not result.ct_used:
                    raise RuntimeError(f"{name} ran without the CT on {style} case {seed}")
                outputs[name] = _read(result.paths, case.truth.shape)
                if kept is not None:
                    kept.parent.mkdir(parents=True, exist_ok=True)
                    np.savez(kept.with_suffix(".tmp.npz"), output=outputs[name], seconds=seconds[name],
                             dose_equivalent=placed[name])
                    kept.with_suffix(".tmp.npz").replace(kept)
        row = score_case(case, dose, outputs, lpet)
        row["seconds"] = {"generate": generated, **seconds}
        row["dose_equivalent"] = {k: None if np.isnan(v) else v for k, v in placed.items()}
        rows.append(row)
        m = row["methods"]
        print(f"{style} {seed} dose {dose:g}: LPET {m['LPET']['psnr']:.2f} dB, Gaussian "
              f"{m['Gaussian']['psnr']:.2f} dB ({row['gaussian_fwhm_mm']:g} mm), "
              + ", ".join(f"{k} {m[k]['psnr']:.2f} dB (gap {m[k]['gap_closed']:+.0%})" for k in enhancers),
              flush=True)
    return rows


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not np.isnan(v)]
    return float(np.mean(kept)) if kept else None


def summarise(rows: list[dict[str, Any]], methods: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per dose and style: case means of every score, and the worst lesion bias over the cases."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(f"{row['dose']:g}", {}).setdefault(row["style"], {"rows": []})["rows"].append(row)
    for by_style in out.values():
        for entry in by_style.values():
            rs = entry.pop("rows")
            entry["cases"] = len(rs)
            entry["spet_psnr"] = _mean([r["spet_psnr"] for r in rs])
            entry["gaussian_fwhm_mm"] = [r["gaussian_fwhm_mm"] for r in rs]
            entry["lesions_scored"] = sum(r["lesions_scored"] for r in rs)
            entry["dose_equivalent"] = {m: _mean([r.get("dose_equivalent", {}).get(m) for r in rs])
                                        for m in methods}
            for name in ("LPET", "Gaussian", *methods):
                scores = [r["methods"][name] for r in rs]
                worst = [s["suvmax_worst"] for s in scores if s["suvmax_worst"] is not None]
                entry[name] = {key: _mean([s[key] for s in scores])
                               for key in ("psnr", "gap_closed", "suvmax_mean", "suvmean_mean")}
                entry[name]["suvmax_worst"] = worst[int(np.argmax(np.abs(worst)))] if worst else None
                lowest = [s["suvmax_lowest"] for s in scores if s.get("suvmax_lowest") is not None]
                entry[name]["suvmax_lowest"] = min(lowest) if lowest else None
    return out


def parse_models(specs: Sequence[str] | None) -> dict[str, Path]:
    """``NAME=CHECKPOINT`` options as a name → path table (the shipped models without any)."""
    if not specs:
        return dict(MODELS)
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not Path(path).is_file():
            raise SystemExit(f"--model wants NAME=CHECKPOINT with an existing file, found {spec!r}")
        # Absolute, links not followed: the JSON beside the path given is the one the node reads.
        out[name] = Path(os.path.abspath(path))
    return out


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def run_transfer(
    models: dict[str, Path], *, styles: Sequence[str], cases: int, doses: Sequence[float], work: Path,
    steps: int | None = None, device: str = "auto", save_cases: str | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Every model on every style, case and dose, dose unknown: (rows, summary, header fields).

    Outputs are kept in ``work`` under each model's version (the digest of its weights and JSON: either
    changes outputs) and reused: a rerun after a crash, or with one more model, infers only what is new.
    """
    from model.enhance import InferenceOptions, load_enhancer
    from model.evaluation.transfer import SEED_BASE, STYLES

    unknown = [s for s in styles if s not in STYLES]
    if unknown:
        raise ValueError(f"unknown style(s) {unknown}; known: {', '.join(STYLES)}")
    if cases < 1 or any(not 0 < d <= 1 for d in doses):
        raise ValueError(f"need cases >= 1 and doses in (0, 1], found {cases} and {list(doses)}")
    options = InferenceOptions(device=device, steps=steps)  # dose_fraction None: unknown
    enhancers = {name: load_enhancer(str(path), options=options) for name, path in models.items()}
    seeds = [SEED_BASE + k for k in range(cases)]
    versions = {name: enhancer.info.version for name, enhancer in enhancers.items()}
    cache = {name: Path(work) / f"{versions[name]}-steps-{steps or 'default'}" for name in models}
    reused = sum(1 for folder in cache.values() if folder.is_dir() and any(folder.iterdir()))
    rows = []
    for style in styles:
        for seed in seeds:
            rows += run_case(style, seed, doses, enhancers, save_cases, cache)
    header = {
        "cases_reused": reused,
        "styles": {s: STYLES[s].describe() for s in styles},
        "seeds": seeds,
        "models": {name: f"{_shown(path)} (version {versions[name]})" for name, path in models.items()},
        "descriptions": {name: enhancer.info.description for name, enhancer in enhancers.items()},
        "steps": steps,
    }
    return rows, summarise(rows, list(enhancers)), header


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from benchmarks.transfer_report import write_results
    from model.evaluation.transfer import STYLES

    styles = list(STYLES) if args.styles == "all" else [s.strip() for s in args.styles.split(",")]
    load_before = [round(v, 2) for v in os.getloadavg()]
    started = time.time()
    models = parse_models(args.model)
    try:
        rows, summary, run = run_transfer(
            models, styles=styles, cases=args.cases, doses=[float(d) for d in args.doses.split(",")],
            work=Path(args.work), steps=args.steps, device=args.device, save_cases=args.save_cases,
        )
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    command_args = sys.argv[1:] if argv is None else argv
    # Quoted as a shell needs it: a --model NAME may hold spaces.
    command = f".venv/bin/python benchmarks/transfer.py {shlex.join(command_args)}"
    write_results(args.out, command=command, load_before=load_before, started=started, run=run,
                  summary=summary, rows=rows, methods=list(models))
    print(f"wrote {args.out}.md and {args.out}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
