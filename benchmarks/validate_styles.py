"""Checkpoints on validation phantoms through training scanner styles: where choices are made.

    .venv/bin/python benchmarks/validate_styles.py --model NAME=CKPT [--model ...] [--dose 0.1]

The validation phantoms (seeds 100000–100001, ``data/quality/val``, made by ``benchmarks/quality.py``) are
shown through the named scanner styles of ``benchmarks/noise_index.py`` (each LPET made on the style's
native grid by the training simulator and resampled onto the model grid as the node does), dose unknown
to the model. Per style and case: PSNR against the noiseless expectation in the body and the mean lesion
SUVmax bias (lesions of ≥ 10 mm equivalent diameter) of each checkpoint. The transfer set is never used
here: this is where a calibration, a sampler setting or a fine-tune is chosen.

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
    p.add_argument(
        "--out", type=Path, default=RESULTS / "validate_styles", help="results path without suffix"
    )
    return p


def _score(x: np.ndarray, truth: np.ndarray, body: np.ndarray, lesion_labels: np.ndarray) -> dict[str, Any]:
    """PSNR against ``truth`` in ``body`` (peak: its maximum there) and the mean lesion SUVmax bias of
    lesions ≥ 10 mm (None without one; biases are relative, so the SUV scale cancels)."""
    from model.evaluation.metrics import lesion_suv_bias, psnr

    lesions = [
        b
        for b in lesion_suv_bias(x, truth, lesion_labels, weight_kg=70.0, injected_bq=3e8)
        if b.n_voxels >= MIN_LESION_VOXELS
    ]
    return {
        "psnr": psnr(x, truth, data_range=float(truth[body].max()), mask=body),
        "suvmax_bias": float(np.mean([b.suvmax_bias for b in lesions])) if lesions else None,
    }


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from benchmarks.noise_index import validation_volumes
    from model.enhancers.diffusion import load_diffusion_enhancer
    from model.enhancers.options import InferenceOptions
    from model.evaluation.machine import machine_description
    from model.evaluation.report import result_paths
    from model.simulation import dataset

    started = time.perf_counter()
    load_before = [round(v, 2) for v in os.getloadavg()]
    specs = [m.split("=", 1) for m in args.model]
    enhancers = {name: load_diffusion_enhancer(path, InferenceOptions(device="cpu")) for name, path in specs}
    rows: list[dict[str, Any]] = []
    cases: dict[int, Any] = {}
    for style, seed, _dose, lpet, _clean in validation_volumes([args.dose], 0):
        if seed not in cases:  # each phantom read once (setdefault would read it for every style)
            cases[seed] = dataset.load_case(ROOT / f"data/quality/val/case_{seed}")
        case = cases[seed]
        truth, labels = case.expectation_bqml, case.lesion_labels
        body = truth > 0.1 * np.percentile(truth, 99)
        row = {"style": style, "seed": int(seed), "LPET": _score(lpet, truth, body, labels)}
        for name, enhancer in enhancers.items():
            ct = case.ct_hu if enhancer.info.uses_ct else None
            output = enhancer.enhance_array(lpet, ct, spacing_mm=(2.0, 2.0, 2.0))
            row[name] = _score(output, truth, body, labels)
        rows.append(row)
        print(
            f"{style} {seed}: " + ", ".join(f"{n} {row[n]['psnr']:.2f} dB" for n in ["LPET", *enhancers]),
            flush=True,
        )

    names = list(enhancers)
    mean = {n: float(np.mean([r[n]["psnr"] for r in rows])) for n in ["LPET", *names]}
    lesion = {
        n: float(np.mean([r[n]["suvmax_bias"] for r in rows if r[n]["suvmax_bias"] is not None]))
        for n in ["LPET", *names]
    }
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
    }
    json_path, md_path = result_paths(args.out)
    json_path.write_text(
        json.dumps({**header, "mean_psnr": mean, "mean_suvmax_bias": lesion, "rows": rows}, indent=1)
    )

    def cell(row: dict[str, Any], name: str) -> str:
        bias = row[name]["suvmax_bias"]
        return f"{row[name]['psnr']:.2f}" + (f" / {bias:+.1%}" if bias is not None else "")

    md = [
        "# Checkpoints on validation phantoms through training scanner styles",
        "",
        f"Command: `.venv/bin/python {header['command']}`",
        "",
        f"Machine: {header['machine']}; load average {load_before} before, {header['load_after']} after; "
        f"{header['date']}; {header['minutes']} min.",
        "",
        "Models: "
        + "; ".join(f"**{n}** `{p}`" for n, p in specs)
        + f". Dose {args.dose:.0%}, unknown to the "
        "models. PSNR (dB) against the noiseless expectation in the body / mean lesion SUVmax bias "
        "against it "
        "(lesions ≥ 10 mm; cases without one show PSNR only).",
        "",
        "| style | case | LPET | " + " | ".join(names) + " |",
        "|---|---:|---:|" + "---:|" * len(names),
        *(
            f"| {r['style']} | {r['seed']} | {cell(r, 'LPET')} | "
            + " | ".join(cell(r, n) for n in names)
            + " |"
            for r in rows
        ),
        f"| **mean** | | {mean['LPET']:.2f} / {lesion['LPET']:+.1%} | "
        + " | ".join(f"**{mean[n]:.2f}** / {lesion[n]:+.1%}" for n in names)
        + " |",
    ]
    md_path.write_text("\n".join(md) + "\n")
    print(f"wrote {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
