"""Checkpoints on validation phantoms through training scanner styles: where choices are made.

    .venv/bin/python benchmarks/validate_styles.py --model NAME=CKPT [--model ...] [--dose 0.1]

The validation phantoms (``--cases``, seeds 100000+, ``data/quality/val``, made by ``benchmarks/quality.py``)
are shown through the named scanner styles of ``benchmarks/noise_index.py`` (each LPET made on the
style's native grid by the training simulator and resampled onto the model grid as the node does), dose
unknown to the model. ``--insert-lesions`` first adds eight lesions of 10–14 mm to each case
(``model/evaluation/lesion_insertion.py``): the small lesions a denoiser flattens first, which the
phantoms' own lesions (4–30 mm) rarely are. Per style and case: PSNR against the style's noiseless image
(the expectation through the style's grid and back, as the transfer set scores) in the body, and the
lesion SUVmax bias (lesions of ≥ 10 mm equivalent diameter) of each checkpoint and of the rival, the
best Gaussian (FWHM chosen per style-case with the truth in hand, 0–12 mm). The transfer set is never
used here: this is where a calibration, a sampler setting or a fine-tune is chosen.

Writes benchmarks/results/validate_styles.md and .json (command, machine, load, date).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
MIN_LESION_VOXELS = 523 / 8.0  # a 10 mm sphere (523 mm³) in 2 mm voxels


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="NAME=CHECKPOINT",
        help="a checkpoint to score (repeatable)",
    )
    p.add_argument("--dose", type=float, default=0.1, help="dose fraction (default 0.1)")
    p.add_argument("--cases", default="100000,100001", help="validation seeds (default 100000,100001)")
    p.add_argument(
        "--insert-lesions", action="store_true", help="add eight 10–14 mm lesions to each case first"
    )
    p.add_argument(
        "--significance",
        default="",
        metavar="FWHM:SD[+FWHM:SD],...",
        help="also score each model's output with the significance step at these settings (mm : σ, a "
        "window of 40 mm), applied to the output as the node does (model/enhancers/significance.py); "
        "after a +, the low-dose setting that takes the rest of the weight (with --significance-doses)",
    )
    p.add_argument(
        "--significance-doses",
        default="",
        metavar="LOW,HIGH",
        help="weight the scanned step as the node does by where the model placed the LPET: 0 at or below "
        "a LOW dose equivalent, 1 at or above HIGH (e.g. 0.06,0.12; default: weight 1 everywhere)",
    )
    p.add_argument(
        "--work",
        type=Path,
        default=ROOT / "data" / "validate_styles",
        help="model outputs kept here by model version and volume, and reused (default data/validate_styles)",
    )
    p.add_argument(
        "--out", type=Path, default=RESULTS / "validate_styles", help="results path without suffix"
    )
    return p


def _score(x: np.ndarray, truth: np.ndarray, body: np.ndarray, lesion_labels: np.ndarray) -> dict[str, Any]:
    """PSNR against ``truth`` in ``body`` (peak: its maximum there) and the SUVmax biases of the lesions
    ≥ 10 mm, each and their mean (None without one; biases are relative, so the SUV scale cancels)."""
    from model.evaluation.metrics import lesion_suv_bias, psnr

    lesions = [
        b.suvmax_bias
        for b in lesion_suv_bias(x, truth, lesion_labels, weight_kg=70.0, injected_bq=3e8)
        if b.n_voxels >= MIN_LESION_VOXELS
    ]
    return {
        "psnr": psnr(x, truth, data_range=float(truth[body].max()), mask=body),
        "suvmax_bias": float(np.mean(lesions)) if lesions else None,
        "lesions": lesions,
    }


def _best_gaussian(
    lpet: np.ndarray, truth: np.ndarray, body: np.ndarray, labels: np.ndarray
) -> dict[str, Any]:
    """The rival: the LPET smoothed by the Gaussian (0–12 mm FWHM) with the best PSNR against ``truth``."""
    from benchmarks.transfer import GAUSSIAN_FWHM_GRID_MM  # the transfer set's rival, on the same grid
    from model.evaluation.transfer import gaussian_fwhm

    scored = [
        {**_score(gaussian_fwhm(lpet, f, (2.0, 2.0, 2.0)), truth, body, labels), "fwhm_mm": f}
        for f in GAUSSIAN_FWHM_GRID_MM
    ]
    return max(scored, key=lambda r: r["psnr"])


def _volume_key(v: Any, inserted: bool) -> str:
    """The file name of one validation volume's model output: seed, style, dose, lesions."""
    style = "".join(c if c.isalnum() else "_" for c in v.style)
    return f"{v.seed}_{style}_{v.dose:g}_{'inserted' if inserted else 'own'}.npy"


def _summary(rows: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, Any]]:
    """Per method: mean PSNR, mean and worst lesion SUVmax bias over every lesion, lesions counted."""
    out = {}
    for n in names:
        lesions = [b for r in rows for b in r[n]["lesions"]]
        out[n] = {
            "psnr": float(np.mean([r[n]["psnr"] for r in rows])),
            "suvmax_bias": float(np.mean(lesions)) if lesions else None,
            "worst_suvmax_bias": float(np.min(lesions)) if lesions else None,
            "lesions_below_minus_15": int(sum(b < -0.15 for b in lesions)),
            "lesions": len(lesions),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from benchmarks.noise_index import validation_volumes
    from model.enhancers.detail import dose_weight
    from model.enhancers.diffusion import load_diffusion_enhancer
    from model.enhancers.options import InferenceOptions
    from model.enhancers.significance import restore_significant_by_dose
    from model.evaluation.machine import machine_description
    from model.evaluation.report import result_paths

    started = time.perf_counter()
    load_before = [round(v, 2) for v in os.getloadavg()]
    specs = [m.split("=", 1) for m in args.model]
    enhancers = {name: load_diffusion_enhancer(path, InferenceOptions(device="cpu")) for name, path in specs}
    seeds = [int(s) for s in args.cases.split(",") if s.strip()]
    # The step runs after the model; scored here on the model's output (the node applies it before its
    # non-negativity clip, on the model grid, which these volumes are on: the same up to negative voxels).
    scan = {
        f"+ significance {item.strip()}": [
            tuple(float(v) for v in part.split(":")) for part in item.split("+")
        ]
        for item in args.significance.split(",")
        if item.strip()
    }
    ramp = tuple(float(d) for d in args.significance_doses.split(",")) if args.significance_doses else None
    case_dirs = tuple(f"data/quality/val/case_{s}" for s in seeds)
    rows: list[dict[str, Any]] = []
    reused = 0
    for v in validation_volumes([args.dose], 0, cases=case_dirs, insert_lesions=args.insert_lesions):
        truth, labels = v.clean, v.lesion_labels
        body = truth > 0.1 * np.percentile(truth, 99)
        row = {
            "style": v.style,
            "seed": int(v.seed),
            "LPET": _score(v.lpet, truth, body, labels),
            "Gaussian": _best_gaussian(v.lpet, truth, body, labels),
        }
        for name, enhancer in enhancers.items():
            cached = args.work / enhancer.info.version / _volume_key(v, args.insert_lesions)
            placed = cached.with_suffix(".json")  # where the model placed it: written after the output
            if cached.exists() and placed.exists():
                output, placement = np.load(cached), json.loads(placed.read_text())
                reused += 1
            else:
                ct = v.ct_hu if enhancer.info.uses_ct else None
                output = enhancer.enhance_array(v.lpet, ct, spacing_mm=(2.0, 2.0, 2.0))
                placement = enhancer.placement
                cached.parent.mkdir(parents=True, exist_ok=True)
                np.save(cached.with_suffix(".part.npy"), output)
                cached.with_suffix(".part.npy").replace(cached)
                placed.write_text(json.dumps(placement))
            row[name] = {**_score(output, truth, body, labels), "placement": placement}
            weight = dose_weight(placement["dose_equivalent"], ramp) if ramp else 1.0
            for label, (setting, *low) in scan.items():
                restored = restore_significant_by_dose(
                    output, v.lpet, setting=setting, low_setting=low[0] if low else None, weight=weight,
                    window_fwhm_mm=40.0, spacing_mm=(2.0,) * 3,
                )
                row[f"{name} {label}"] = _score(np.maximum(restored, 0.0), truth, body, labels)
        rows.append(row)
        print(
            f"{v.style} {v.seed}: "
            + ", ".join(f"{n} {row[n]['psnr']:.2f} dB" for n in row if n not in ("style", "seed")),
            flush=True,
        )

    names = [n for name in enhancers for n in (name, *(f"{name} {label}" for label in scan))]
    columns = ["LPET", "Gaussian", *names]
    summary = _summary(rows, columns)
    header = {
        "command": shlex.join(
            ["benchmarks/validate_styles.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": machine_description(),
        "load_before": load_before,
        "load_after": [round(v, 2) for v in os.getloadavg()],
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "models": dict(specs),
        "dose": args.dose,
        "cases": seeds,
        "inserted_lesions": args.insert_lesions,
        "significance_doses": list(ramp) if ramp else None,
        "outputs_reused": reused,
    }
    json_path, md_path = result_paths(args.out)
    json_path.write_text(json.dumps({**header, "summary": summary, "rows": rows}, indent=1))
    md_path.write_text("\n".join(_markdown(header, specs, rows, columns, summary)) + "\n")
    print(f"wrote {md_path}")
    return 0


def _markdown(
    header: dict[str, Any], specs: list[list[str]], rows: list[dict[str, Any]], columns: list[str],
    summary: dict[str, dict[str, Any]],
) -> list[str]:
    def cell(row: dict[str, Any], name: str) -> str:
        bias = row[name]["suvmax_bias"]
        fwhm = f" ({row[name]['fwhm_mm']:g})" if name == "Gaussian" else ""
        placed = row[name].get("placement")
        at = f" [{placed['dose_equivalent']:.1%}]" if placed else ""
        return f"{row[name]['psnr']:.2f}{fwhm}" + (f" / {bias:+.1%}" if bias is not None else "") + at

    def pct(value: float | None) -> str:
        return "–" if value is None else f"{value:+.1%}"

    lesions = "its own"
    if header["inserted_lesions"]:
        lesions = "8 inserted lesions of 10–14 mm per case, and its own"
    return [
        "# Checkpoints on validation phantoms through training scanner styles",
        "",
        f"Command: `.venv/bin/python {header['command']}`",
        "",
        f"Machine: {header['machine']}; load average {header['load_before']} before, {header['load_after']} "
        f"after; {header['date']}; {header['minutes']} min"
        + (
            f" ({header['outputs_reused']} model outputs made by an earlier run of the same model version on "
            "the same volumes, reused from its --work folder)."
            if header["outputs_reused"] else "."
        ),
        "",
        "Models: " + "; ".join(f"**{n}** `{p}`" for n, p in specs)
        + f". Dose {header['dose']:.0%}, unknown to the models. Cases "
        f"{', '.join(map(str, header['cases']))} ({lesions}). PSNR (dB) against the style's noiseless "
        "image in the body / mean lesion SUVmax bias against it (lesions ≥ 10 mm; cases without one show "
        "PSNR only); [the dose equivalent where the model placed the LPET]. Gaussian: the best per "
        "style-case, FWHM (mm) chosen with the truth in hand."
        + (
            " Significance step weighted by that placement: 0 at or below a "
            f"{header['significance_doses'][0]:.0%} dose equivalent, 1 at or above "
            f"{header['significance_doses'][1]:.0%}."
            if header["significance_doses"] else ""
        ),
        "",
        "| style | case | " + " | ".join(columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
        *(f"| {r['style']} | {r['seed']} | " + " | ".join(cell(r, n) for n in columns) + " |" for r in rows),
        "| **mean** | | " + " | ".join(
            f"**{summary[n]['psnr']:.2f}** / {pct(summary[n]['suvmax_bias'])}" for n in columns
        ) + " |",
        "",
        "Lesions over every style-case (SUVmax bias against the style's noiseless image):",
        "",
        "| | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
        "| lesions scored | " + " | ".join(str(summary[n]["lesions"]) for n in columns) + " |",
        "| mean SUVmax bias | " + " | ".join(pct(summary[n]["suvmax_bias"]) for n in columns) + " |",
        "| worst lesion | " + " | ".join(pct(summary[n]["worst_suvmax_bias"]) for n in columns) + " |",
        "| lesions below −15 % | "
        + " | ".join(str(summary[n]["lesions_below_minus_15"]) for n in columns)
        + " |",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
