"""Where the node places an LPET of unknown dose, per scanner style: its estimate against the right place.

    .venv/bin/python benchmarks/noise_index.py [--model NAME=CKPT ...] [--doses 0.02,0.1,0.5]

The denoiser is asked to undo step t*, which means latent noise σ_{t*} (the checkpoint's noise curve).
For each scanner style and dose this benchmark makes the LPET on the model grid as the node does, and
measures its latent noise against the noiseless expectation: σ = RMS of E(LPET) − E(expectation) over a
central body crop. The **right place** is the t whose σ_t that is; the node's **estimate** is the t it
reads off its curve from the image alone (:meth:`NoiseCurve.t_from_image`). Both are reported as dose
equivalents on the schedule (not the injected activity: an FBP image of 10 % dose is noisier than an
OSEM one), with the ratio estimate / right; ``error`` = |log₂ ratio| (1 = a factor of two in dose).

Two sets:

* **validation** (training simulator, seeds 100000–100001, ``data/quality/val``; choices may be made
  here): named scanner styles of ``model.training.styles`` plus random draws from it, the LPET made
  by ``inject_dose_noise`` on the style's native grid;
* **transfer** (the second generator, ``model.evaluation.transfer``; report only, never a choice).

Writes benchmarks/results/noise_index.md and .json (command, machine, load, date).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from model.networks.noise_level import noise_index  # noqa: E402 - after the path set-up

RESULTS = ROOT / "benchmarks" / "results"
MODELS = {"LDM-P-CT": ROOT / "model/weights/upete-ldm-p-ct.safetensors"}
VAL_CASES = ("data/quality/val/case_100000", "data/quality/val/case_100001")
CROP = (32, 96, 96)  # model voxels (z, y, x) of the central body crop the latent noise is measured on
#: Bands (inner, outer Gaussian σ in model voxels) of the noise index scanned against the latent noise.
BANDS = (
    (0.0, 1.0),
    (0.0, 2.0),
    (0.0, 3.0),
    (0.5, 2.0),
    (0.5, 3.0),
    (0.7, 2.5),
    (0.7, 3.0),
    (1.0, 3.0),
    (1.0, 4.0),
)


def _band_name(band: tuple[float, float]) -> str:
    return f"{band[0]:g}–{band[1]:g}"


def band_scan(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per band: the power law log σ²_latent = a + b · log index fitted over ``rows``, and the residual
    spread (standard deviation of log σ²): how well that band's index predicts the latent noise."""
    from model.training.calibration import IndexMatch  # the fit calibration makes

    y = np.log([r["latent_variance"] for r in rows])
    out = {}
    for band in BANDS:
        fit = IndexMatch.fit(np.log([r["band_index"][_band_name(band)] for r in rows]), y)
        out[_band_name(band)] = {"slope": fit.slope, "spread": fit.spread, "largest": fit.largest}
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=CHECKPOINT",
        help="a checkpoint whose placement to score (repeatable; default the shipped LDM-P-CT)",
    )
    p.add_argument("--doses", default="0.02,0.1,0.5", help="dose fractions (default 0.02,0.1,0.5)")
    p.add_argument(
        "--random-styles",
        type=int,
        default=6,
        help="random training styles beside the named ones (validation set; default 6)",
    )
    p.add_argument("--transfer-seed", type=int, default=900000, help="transfer case seed (default 900000)")
    p.add_argument("--no-transfer", action="store_true", help="validation set only")
    p.add_argument("--out", type=Path, default=RESULTS / "noise_index", help="results path without suffix")
    return p


def _named_styles() -> dict[str, Any]:
    from model.physics import ReconAlgorithm, ReconSettings
    from model.training.styles import ScannerStyle

    osem, fbp = ReconAlgorithm.OSEM, ReconAlgorithm.FBP
    return {
        "2 mm OSEM, no filter": ScannerStyle(
            2.0, 2.0, ReconSettings(algorithm=osem, postfilter_fwhm_mm=0.0), 1.0
        ),
        "4 mm OSEM, 4 mm filter": ScannerStyle(
            4.0, 3.0, ReconSettings(algorithm=osem, postfilter_fwhm_mm=4.0), 1.0
        ),
        "4 mm OSEM-PSF, 5 mm filter": ScannerStyle(
            4.0,
            3.0,
            ReconSettings(algorithm=osem, iterations=4, psf_fwhm_mm=4.0, postfilter_fwhm_mm=5.0),
            1.0,
        ),
        "4 mm OSEM, 6 mm filter, 4 mm slices": ScannerStyle(
            4.0, 4.0, ReconSettings(algorithm=osem, postfilter_fwhm_mm=6.0), 1.0
        ),
        "5.5 mm FBP 0.8, 6 mm filter": ScannerStyle(
            5.5, 3.0, ReconSettings(algorithm=fbp, fbp_cutoff=0.8, postfilter_fwhm_mm=6.0), 1.0
        ),
        "4 mm FBP 0.5, no filter": ScannerStyle(
            4.0, 4.0, ReconSettings(algorithm=fbp, fbp_cutoff=0.5, postfilter_fwhm_mm=0.0), 1.0
        ),
    }


def _crop(volume: np.ndarray) -> tuple[slice, ...]:
    """The central crop (even sizes, at most :data:`CROP`) around the body's centre of mass."""
    weights = np.clip(volume, 0, None)
    centre = [int(round(c)) for c in np.argwhere(weights > 0.1 * np.percentile(weights, 99)).mean(axis=0)]
    out = []
    for n, c, size in zip(volume.shape, centre, CROP, strict=True):
        size = min(size, n - n % 2)
        start = min(max(c - size // 2, 0), n - size)
        out.append(slice(start, start + size))
    return tuple(out)


class Placement:
    """One checkpoint: its latent noise measure and its placement from the image."""

    def __init__(self, path: Path) -> None:
        from model.networks.checkpoint import load_checkpoint

        self.model = load_checkpoint(path, device="cpu")
        self.config = self.model.config

    def right_t(self, lpet: np.ndarray, expectation: np.ndarray) -> tuple[float, float]:
        """``(t, σ²)``: the LPET's latent noise variance against the expectation (both model grid, Bq/ml)
        and the t whose σ_t it is."""
        from model.training.calibration import latent_noise_variance

        box = _crop(expectation)
        scale = self.config.normalisation.scale_bqml
        var = latent_noise_variance(
            self.model.autoencoder,
            expectation[box] / scale,
            lpet[box] / scale,
            latent_scale=self.config.latent_scale,
        )
        return self.config.noise_curve.t_from_latent_sigma(math.sqrt(var)), var

    def estimate_t(self, lpet: np.ndarray) -> float:
        return self.config.noise_curve.t_from_image(lpet / self.config.normalisation.scale_bqml)

    def dose(self, t: float) -> float:
        return self.config.schedule.dose_at(t)


class ValidationVolume(NamedTuple):
    """One validation LPET on the model grid, with what it is scored against (Bq/ml, model grid)."""

    style: str
    seed: int
    dose: float
    lpet: np.ndarray
    clean: np.ndarray  # the style's noiseless image: the expectation through its grid and back
    lesion_labels: np.ndarray
    ct_hu: np.ndarray  # the case's CT on the model grid


def validation_volumes(
    doses: list[float],
    random_styles: int,
    *,
    cases: tuple[str, ...] = VAL_CASES,
    insert_lesions: bool = False,
) -> Iterator[ValidationVolume]:
    """Each validation case through each named style (and ``random_styles`` drawn ones) at each dose.

    ``insert_lesions``: 10–14 mm lesions are added to each case's expectation first
    (:func:`model.evaluation.lesion_insertion.insert_lesions`, drawn from the case's seed).
    """
    import torch

    from model.physics import ScannerModel, inject_dose_noise
    from model.simulation import dataset
    from model.training.styles import draw_style, to_model_grid, to_native

    styles = _named_styles()
    rng = np.random.default_rng(5)
    for k in range(random_styles):
        style = draw_style(rng)
        styles[f"random {k + 1}: {style.name}"] = style
    for case_dir in cases:
        case = dataset.load_case(ROOT / case_dir)
        scanner = ScannerModel(**case.meta["scanner"])
        expectation, lesion_labels = _expectation(case, insert_lesions)
        for s, (name, style) in enumerate(styles.items()):
            native = to_native(expectation, 2.0, style)
            clean = to_model_grid(native, expectation.shape, 2.0, style)
            counts = dataclasses.replace(
                scanner, frame_duration_s=scanner.frame_duration_s * style.count_scale
            )
            for dose in doses:
                gen = torch.Generator().manual_seed(1000 * s + round(dose * 1000))
                # The expectation carries no noise of its own: inject Σ(1/d − 1) with d = dose/(1 + dose),
                # i.e. Σ/dose, the noise of a dose-``dose`` acquisition.
                noisy = inject_dose_noise(
                    torch.from_numpy(native),
                    dose / (1 + dose),
                    scanner=counts,
                    recon=style.recon,
                    pixel_size_mm=style.pixel_mm,
                    slice_thickness_mm=style.slice_mm,
                    generator=gen,
                ).numpy()
                lpet = to_model_grid(noisy, expectation.shape, 2.0, style)
                yield ValidationVolume(name, case.meta["seed"], dose, lpet, clean, lesion_labels, case.ct_hu)


def _expectation(case: Any, insert_lesions: bool) -> tuple[np.ndarray, np.ndarray]:
    """The case's expectation and lesion labels, with inserted lesions when asked for."""
    if not insert_lesions:
        return case.expectation_bqml, case.lesion_labels
    from model.evaluation.lesion_insertion import insert_lesions as insert

    resolution = math.hypot(case.meta["scanner"]["resolution_fwhm_mm"], case.recon.postfilter_fwhm_mm)
    expectation, labels, _ = insert(
        case.expectation_bqml,
        case.organ_labels,
        case.lesion_labels,
        organs={int(k): v for k, v in case.meta["organs"].items()},
        organ_suv=case.meta["organ_suv"],
        bqml_per_suv=case.meta["bqml_per_suv"],
        spacing_mm=2.0,
        resolution_fwhm_mm=resolution,
        rng=np.random.default_rng([int(case.meta["seed"]), 7]),
    )
    return expectation, labels


def _transfer_volumes(doses: list[float], seed: int):  # noqa: ANN202 - a generator of tuples
    from model.evaluation.transfer import STYLES, generate_case
    from model.grid import resample_isotropic

    for style in STYLES:
        case = generate_case(style, seed, doses=tuple(doses))
        expectation = resample_isotropic(case.expectation, case.pet_spacing_mm, 2.0)
        for dose in doses:
            yield (
                style,
                seed,
                dose,
                resample_isotropic(case.lpet[dose], case.pet_spacing_mm, 2.0),
                expectation,
                None,  # lesions are not scored here
                None,  # nor the CT used
            )


def _score(volumes, models: dict[str, Placement], reference: str) -> list[dict[str, Any]]:  # noqa: ANN001
    rows = []
    for style, seed, dose, lpet, expectation, *_ in volumes:
        ref = models[reference]
        right, variance = ref.right_t(lpet, expectation)
        scaled = lpet / ref.config.normalisation.scale_bqml
        row = {
            "latent_variance": variance,
            "band_index": {_band_name(b): noise_index(scaled, band=b) for b in BANDS},
            "style": style,
            "seed": int(seed),
            "dose": dose,
            "right_t": right,
            "right_dose": ref.dose(right),
            "estimates": {},
        }
        for name, m in models.items():
            t = m.estimate_t(lpet)
            row["estimates"][name] = {
                "t": t,
                "dose": m.dose(t),
                "log2_ratio": math.log2(m.dose(t) / ref.dose(right)),
            }
        rows.append(row)
        print(
            f"{style} {seed} {dose:g}: right {row['right_dose']:.1%} | "
            + ", ".join(f"{n} {e['dose']:.1%} ({e['log2_ratio']:+.2f})" for n, e in row["estimates"].items()),
            flush=True,
        )
    return rows


def _table(rows: list[dict[str, Any]], names: list[str]) -> list[str]:
    lines = [
        "| style | dose | right place | " + " | ".join(f"{n}: estimate (log₂ ratio)" for n in names) + " |",
        "|---|---:|---:|" + "---:|" * len(names),
    ]
    for r in rows:
        cells = [f"{r['estimates'][n]['dose']:.1%} ({r['estimates'][n]['log2_ratio']:+.2f})" for n in names]
        lines.append(
            f"| {r['style']} (case {r['seed']}) | {r['dose']:.0%} | {r['right_dose']:.1%} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def _summary(rows: list[dict[str, Any]], names: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    for n in names:
        errors = np.abs([r["estimates"][n]["log2_ratio"] for r in rows])
        by_style: dict[str, list[float]] = {}
        for r, e in zip(rows, errors, strict=True):
            by_style.setdefault(r["style"], []).append(float(e))
        worst = max(by_style, key=lambda s: np.mean(by_style[s]))
        out[n] = {
            "median_error": float(np.median(errors)),
            "mean_error": float(errors.mean()),
            "max_error": float(errors.max()),
            "worst_style": worst,
            "worst_style_error": float(np.mean(by_style[worst])),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from model.evaluation.machine import machine_description
    from model.evaluation.report import result_paths

    started = time.perf_counter()
    load_before = [round(v, 2) for v in os.getloadavg()]
    specs = [m.split("=", 1) for m in args.model] if args.model else [[k, str(v)] for k, v in MODELS.items()]
    models = {name: Placement(Path(path)) for name, path in specs}
    names = list(models)
    doses = [float(d) for d in args.doses.split(",")]
    sets = {"validation": _score(validation_volumes(doses, args.random_styles), models, names[0])}
    if not args.no_transfer:
        sets["transfer"] = _score(_transfer_volumes(doses, args.transfer_seed), models, names[0])
    header = {
        "command": shlex.join(["benchmarks/noise_index.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_description(),
        "load_before": load_before,
        "load_after": [round(v, 2) for v in os.getloadavg()],
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "minutes": round((time.perf_counter() - started) / 60, 1),
        "models": {n: p for n, p in specs},
        "bands": {n: list(m.config.noise_curve.index_band) for n, m in models.items()},
    }
    summaries = {k: _summary(v, names) for k, v in sets.items()}
    scan = band_scan(sets["validation"])
    json_path, md_path = result_paths(args.out)
    json_path.write_text(
        json.dumps({**header, "summary": summaries, "band_scan": scan, "rows": sets}, indent=1)
    )
    md = [
        "# Where the node places an LPET of unknown dose, per scanner style",
        "",
        f"Command: `.venv/bin/python {header['command']}`",
        "",
        f"Machine: {header['machine']}; load average {header['load_before']} before, {header['load_after']} "
        f"after; {header['date']}; {header['minutes']} min.",
        "",
        "Models: "
        + "; ".join(f"**{n}** `{p}` (noise index band {header['bands'][n]} voxels)" for n, p in specs)
        + f". The right place is measured with {names[0]}'s autoencoder and noise curve.",
        "",
        "**Right place**: the t whose σ_t (the checkpoint's noise curve) equals the LPET's latent noise, "
        "RMS of E(LPET) − E(expectation) over a central body crop; **estimate**: the t the node reads off "
        "the "
        "curve from the image alone. Both as dose equivalents on the schedule (an FBP image of 10 % dose is "
        "noisier than an OSEM one, so the right place is not the injected dose). Error = |log₂(estimate / "
        "right)|: 1 is a factor of two in dose equivalent.",
        "",
        "## Summary",
        "",
        "| set | model | median error | mean error | largest | worst style (its mean error) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for k, summary in summaries.items():
        for n, s in summary.items():
            md.append(
                f"| {k} | {n} | {s['median_error']:.2f} | {s['mean_error']:.2f} | {s['max_error']:.2f} | "
                f"{s['worst_style']} ({s['worst_style_error']:.2f}) |"
            )
    md += [
        "",
        "## Which band (validation only: the choice of `LATENT_BAND` in model/networks/noise_level.py)",
        "",
        "Per band of the noise index (inner, outer Gaussian σ in model voxels; 0–1 is the first "
        "checkpoints' fine high-pass): a power law log σ²_latent = a + b · log index fitted over the "
        "validation rows, and the spread of log σ² around it (0.3 ≈ ±35 % in latent noise variance).",
        "",
        "| band | slope b | spread | largest residual |",
        "|---|---:|---:|---:|",
        *(f"| {b} | {v['slope']:.2f} | {v['spread']:.3f} | {v['largest']:.2f} |" for b, v in scan.items()),
    ]
    for k, rows in sets.items():
        title = (
            "Validation: training simulator styles on validation phantoms"
            if k == "validation"
            else "Transfer set: the second generator (report only)"
        )
        md += ["", f"## {title}", "", *_table(rows, names)]
    md_path.write_text("\n".join(md) + "\n")
    print(f"wrote {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
