"""Write evaluation results: a Markdown table, a JSON file and PNG figures (matplotlib, Agg backend).

Inputs are :class:`model.evaluation.evaluate.EvalResults` and the
:func:`model.evaluation.evaluate.summarise` dictionary;
nothing here computes a metric.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from model.evaluation.evaluate import EvalResults

__all__ = [
    "METRIC_NOTES",
    "markdown_report",
    "plot_lesion_bias_vs_dose",
    "plot_panels",
    "plot_psnr_vs_dose",
    "result_paths",
    "write_json",
]

#: How every number is computed, in the words the report prints (keep in step with model.metrics).
METRIC_NOTES = """\
- **PSNR / SSIM (paper)**: both volumes min-max normalised with the reference's min and max inside the
  body (body = every voxel with an organ label), data range 1; PSNR = 10·log10(1/MSE) over body voxels;
  SSIM = mean over body voxels of a 3D SSIM map (Gaussian window σ = 1.5 voxels, truncated at 3.5 σ,
  K1 = 0.01, K2 = 0.03).
- **PSNR / SSIM / NRMSE (UDPET)**: whole volume in Bq/ml, no normalisation; PSNR = 20·log10(max(ref)/RMSE);
  SSIM with data range max(ref) − min(ref), mean over every voxel; NRMSE = RMSE / (max(ref) − min(ref)).
- **References**: *SPET* = the standard-dose reconstruction (noisy, as the paper scores); *expectation* =
  the same reconstruction of noiseless data. *Ceiling* = the expectation scored against the SPET: the
  best an estimate independent of the SPET's noise can reach. *Gap closed* = (method − LPET) /
  (ceiling − LPET) against the SPET, on the means over cases (per-case ratios explode where a case's
  gap is tiny; they are in the JSON), not printed where the LPET is within 0.5 dB of the ceiling:
  0 = no better than LPET, 1 = at the ceiling. Each LPET
  is a binomial thinning of the SPET's own counts (as list-mode subsampling makes it), so LPET noise
  correlates with SPET noise, most at high dose: there a filtered LPET can score *above* the ceiling
  (gap closed > 1) against the SPET. The noiseless-expectation columns are free of this effect; there
  *gap closed* = 1 − (NRMSE / the LPET's NRMSE)², means over cases: the share of the LPET's squared
  error removed (1 = the expectation itself, negative = worse than the LPET).
- **Lesions**: SUV = Bq/ml × weight [g] / injected activity [Bq]; per lesion mask, SUVmax = hottest voxel,
  SUVmean = mask mean; bias = (method − reference) / reference, signed, pooled over all lesions of all
  cases. Targets (this project's acceptance criteria): |SUVmax bias| ≤ 10 %, |SUVmean bias| ≤ 5 %.
- **Liver CoV** = std/mean in the liver eroded by 2 voxels (4 mm), lesions (dilated 2 voxels) excluded.
- Values are mean ± std (population) over test cases.
"""


# ------------------------------------------------------------------------------------------------ JSON


def result_paths(out: str | Path) -> tuple[Path, Path]:
    """The ``.json`` and ``.md`` of a results path given without suffix (a benchmark's ``--out``).

    Suffixes are appended, not substituted: ``runs/transfer-0.1`` keeps its ".1" (``with_suffix``
    would write ``transfer-0.json``). The folder is created.
    """
    json_path, md_path = Path(f"{out}.json"), Path(f"{out}.md")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    return json_path, md_path


def _finite(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become null (strict JSON has no NaN/Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, np.generic):
        return _finite(value.item())
    return value


def write_json(
    results: EvalResults,
    summary: Mapping[str, Any],
    path: Path,
    *,
    header: Mapping[str, Any] | None = None,
    tuned: Mapping[str, Any] | None = None,
    sections: Mapping[str, Any] | None = None,
) -> Path:
    """Everything: header, summary, tuned parameters, the sections' verdicts (``sections``, e.g. the
    ablation ordering), reference rows and every per-case record."""
    payload = {
        "header": dict(header or {}),
        **({"sections": dict(sections)} if sections else {}),
        "doses": results.doses,
        "methods": results.methods,
        "summary": summary,
        "tuned_params": dict(tuned or {}),
        "references": results.references,
        "records": results.records,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(payload), indent=1, allow_nan=False) + "\n")
    return path


# -------------------------------------------------------------------------------------------- Markdown


def _pm(stats: Mapping[str, Any] | None, fmt: str, scale: float = 1.0, unit: str = "") -> str:
    if not stats or stats.get("n", 0) == 0 or not math.isfinite(stats["mean"]):
        return "–"
    mean, std = stats["mean"] * scale, stats["std"] * scale
    return f"{mean:{fmt}} ± {std:{fmt.lstrip('+')}}{unit}"


def _number(value: float | None, fmt: str) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:{fmt}}"


#: Below this LPET → ceiling distance (dB) the gap-closed ratio is dominated by noise: not printed.
MIN_GAP_DB = 0.5


def _gap(stats: Mapping[str, Any]) -> str:
    gap = stats.get("gap_of_means", math.nan)
    if math.isfinite(gap) and abs(gap) < MIN_GAP_DB:
        return f"– (LPET {gap:.2f} dB from the ceiling)"
    return _number(stats.get("of_means"), ".2f")


def _fraction(value: float | None) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{100 * value:.0f} %"


def _dose_label(dose: str) -> str:
    return f"{100 * float(dose):g} %"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _reference_section(summary: Mapping[str, Any]) -> list[str]:
    ceiling, spet = summary["ceiling"], summary["spet_vs_expectation"]
    liver = summary["liver_cov_reference"]

    def cells(s: Mapping[str, Any], cov: Mapping[str, Any]) -> list[str]:
        return [_pm(s["psnr_paper"], ".2f"), _pm(s["ssim_paper"], ".4f"), _pm(s["psnr_udpet"], ".2f"),
                _pm(s["ssim_udpet"], ".4f"), _pm(s["nrmse"], ".4f"), _pm(cov, ".3f")]

    return [
        "## Ceiling and reference noise", "",
        "| | PSNR paper (dB) | SSIM paper | PSNR UDPET (dB) | SSIM UDPET | NRMSE | liver CoV |",
        "|---|---|---|---|---|---|---|",
        _row(["ceiling: expectation vs SPET", *cells(ceiling, liver["ceiling"])]),
        _row(["SPET vs expectation", *cells(spet, liver["spet"])]),
        "",
        f"SPET lesions vs expectation: SUVmax bias {_pm(spet['lesions']['suvmax_bias'], '+.1f', 100, ' %')}, "
        f"SUVmean bias {_pm(spet['lesions']['suvmean_bias'], '+.1f', 100, ' %')} "
        f"({spet['lesions']['n']} lesions): the noise the SPET reference itself carries.",
        "",
    ]


def markdown_report(
    results: EvalResults,
    summary: Mapping[str, Any],
    *,
    title: str = "Quality benchmark",
    header: Mapping[str, Any] | None = None,
    tuned: Mapping[str, Any] | None = None,
    figures: Sequence[Path] = (),
    relative_to: Path | None = None,
    labels: Mapping[str, str] | None = None,
    sections: Sequence[str] = (),
) -> str:
    """The Markdown report: header, ``sections`` (ready Markdown lines, e.g. the paper's tables and
    their verdicts), metric definitions, one table per reference, lesions, tuning, figures."""
    labels = dict(labels or {})
    lines = [f"# {title}", ""]
    for key, value in (header or {}).items():
        lines.append(f"- **{key}**: {value}")
    lines += ["", *sections]
    lines += ["## How the numbers are computed", "", METRIC_NOTES]

    lines += _reference_section(summary)
    # The expectation first: a simulated LPET shares counts with its SPET, so SPET-referenced scores
    # reward keeping noise; the paper's SPET scores follow for comparison with it.
    lines += _expectation_table(summary["per_dose"], labels, n_cases=len(results.references))
    lines += _spet_table(summary["per_dose"], labels)
    if tuned:
        lines += _tuned_section(tuned, labels)
    if figures:
        lines += ["## Figures", ""]
        for fig in figures:
            rel = fig.relative_to(relative_to) if relative_to else fig
            lines += [f"![{fig.stem}]({rel.as_posix()})", ""]
    return "\n".join(lines) + "\n"


def _spet_table(per_dose: Mapping[str, Any], labels: Mapping[str, str]) -> list[str]:
    """Every method at every dose against the SPET, as the paper scores."""
    lines = [
        "", "## Against the SPET (as the paper scores)", "",
        "| dose | method | PSNR paper (dB) | SSIM paper | PSNR UDPET (dB) | SSIM UDPET | NRMSE "
        "| gap closed (PSNR paper, of means) | SUVmax bias | liver CoV | s / volume |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for dose, entry in per_dose.items():
        for method, m in entry.items():
            s = m["spet"]
            cells = [
                _dose_label(dose), labels.get(method, method), _pm(s["psnr_paper"], ".2f"),
                _pm(s["ssim_paper"], ".4f"), _pm(s["psnr_udpet"], ".2f"), _pm(s["ssim_udpet"], ".4f"),
                _pm(s["nrmse"], ".4f"), _gap(m["gap_closed"]["psnr_paper"]),
                _pm(s["lesions"]["suvmax_bias"], "+.1f", 100, " %"), _pm(m["liver_cov"], ".3f"),
                _pm(m["seconds"], ".1f"),
            ]
            lines.append(_row(cells))
    return lines


def _expectation_table(per_dose: Mapping[str, Any], labels: Mapping[str, str], *, n_cases: int) -> list[str]:
    """Every method at every dose against the noiseless expectation, with the lesion targets."""
    lines = [
        "## Against the noiseless expectation (the ranking)", "",
        "| dose | method | PSNR paper (dB) | SSIM paper | PSNR UDPET (dB) | NRMSE | gap closed "
        "| SUVmax bias | SUVmean bias "
        "| lesions within ±10 % SUVmax | within ±5 % SUVmean |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    n_lesions = 0
    for dose, entry in per_dose.items():
        lpet = entry.get("lpet", {}).get("expectation", {}).get("nrmse", {}).get("mean")
        for method, m in entry.items():
            e = m["expectation"]
            les = e["lesions"]
            n_lesions = les["n"]
            # The LPET-to-expectation gap in MSE terms (the expectation's PSNR ceiling is infinite).
            gap = 1.0 - (e["nrmse"]["mean"] / lpet) ** 2 if lpet else None
            cells = [
                _dose_label(dose), labels.get(method, method), _pm(e["psnr_paper"], ".2f"),
                _pm(e["ssim_paper"], ".4f"), _pm(e["psnr_udpet"], ".2f"), _pm(e["nrmse"], ".4f"),
                _fraction(gap),
                _pm(les["suvmax_bias"], "+.1f", 100, " %"), _pm(les["suvmean_bias"], "+.1f", 100, " %"),
                _fraction(les["suvmax_bias_within_target"]), _fraction(les["suvmean_bias_within_target"]),
            ]
            lines.append(_row(cells))
    return [*lines, "", f"Lesion statistics pool {n_lesions} lesions over {n_cases} test cases.", ""]


def _tuned_section(tuned: Mapping[str, Any], labels: Mapping[str, str]) -> list[str]:
    """The baselines' tuned parameters per dose and their validation PSNR."""
    lines = ["## Tuned parameters (validation cases only, best mean paper PSNR vs SPET)", "",
             "| method | dose | parameters | validation PSNR (dB) |", "|---|---|---|---|"]
    for method, by_dose in tuned.items():
        for dose, t in by_dose.items():
            params = ", ".join(f"{k} = {v:g}" if isinstance(v, float) else f"{k} = {v}"
                               for k, v in t["params"].items())
            name = labels.get(method, method)
            lines.append(_row([name, _dose_label(dose), params, f"{t['psnr_db']:.2f}"]))
    return [*lines, ""]


# --------------------------------------------------------------------------------------------- figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display here; must precede pyplot's import
    import matplotlib.pyplot as plt

    return plt


def _dose_axis(ax: Any, doses: Sequence[float]) -> None:
    """Log dose axis labelled at the doses themselves, in per cent, without minor tick labels."""
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    # Explicit limits: a single dose gives matplotlib a zero-width range it cannot put on a log axis.
    ax.set_xlim(100 * min(doses) / 1.5, 100 * max(doses) * 1.5)
    ax.set_xticks([100 * d for d in doses])
    ax.set_xticklabels([f"{100 * d:g}" for d in doses])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("dose (% of standard)")
    ax.grid(True, alpha=0.3)


def plot_panels(
    results: EvalResults,
    out_dir: Path,
    *,
    spacing_mm: tuple[float, float, float] = (2.0, 2.0, 2.0),
    labels: Mapping[str, str] | None = None,
) -> list[Path]:
    """One PNG per dose for the figure case: axial (top) and coronal (bottom) views,
    columns LPET | each method | SPET | CT. PET shares one grey scale (0 … 99.5th percentile of the SPET).
    """
    if results.figure_case is None:
        return []
    plt = _pyplot()
    labels = dict(labels or {})
    case = results.figure_case
    refs = {name: results.slices[f"{case}|ref|{name}"] for name in ("SPET", "CT")}
    spet_values = np.concatenate([refs["SPET"]["axial"].ravel(), refs["SPET"]["coronal"].ravel()])
    vmax = float(np.percentile(spet_values, 99.5))
    aspect = spacing_mm[0] / spacing_mm[2]
    paths = []
    for dose in results.doses:
        cols = [(f"LPET {100 * dose:g} %", results.slices[f"{case}|{dose:g}|lpet"], "pet")]
        cols += [(labels.get(m, m), results.slices[f"{case}|{dose:g}|{m}"], "pet")
                 for m in results.methods if m != "lpet" and f"{case}|{dose:g}|{m}" in results.slices]
        cols += [("SPET", refs["SPET"], "pet"), ("CT", refs["CT"], "ct")]
        ny, nx = refs["SPET"]["axial"].shape
        nz = refs["SPET"]["coronal"].shape[0]
        heights = [ny, nz * aspect]  # rows as tall as the views they hold
        fig, axes = plt.subplots(
            2, len(cols), figsize=(2.4 * len(cols), 2.4 * sum(heights) / nx + 0.6), squeeze=False,
            gridspec_kw={"height_ratios": heights},
        )
        for j, (title, views, kind) in enumerate(cols):
            for i, view in enumerate(("axial", "coronal")):
                ax = axes[i, j]
                image = views[view][::-1] if view == "coronal" else views[view]  # head up
                shape = {"aspect": aspect if view == "coronal" else 1.0}
                if kind == "ct":
                    ax.imshow(image, cmap="gray", vmin=-400, vmax=400, **shape)
                else:
                    ax.imshow(image, cmap="gray_r", vmin=0, vmax=vmax, **shape)
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(title, fontsize=9)
        fig.suptitle(f"{case}: dose {100 * dose:g} % (axial and coronal through the largest lesion)",
                     fontsize=10)
        fig.tight_layout()
        path = out_dir / f"panel_{case}_dose{100 * dose:g}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_psnr_vs_dose(
    summary: Mapping[str, Any],
    path: Path,
    *,
    metric: str = "psnr_paper",
    labels: Mapping[str, str] | None = None,
) -> Path:
    """``metric`` (mean ± std over cases) against dose for every method, like the paper's Fig. 2;
    left against the SPET with the ceiling dashed, right against the noiseless expectation."""
    plt = _pyplot()
    labels = dict(labels or {})
    per_dose = summary["per_dose"]
    doses = [float(d) for d in per_dose]
    methods = list(dict.fromkeys(m for entry in per_dose.values() for m in entry))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, ref in zip(axes, ("spet", "expectation"), strict=True):
        for method in methods:
            stats = [per_dose[f"{d:g}"].get(method, {}).get(ref, {}).get(metric, {}) for d in doses]
            ax.errorbar([100 * d for d in doses], [s.get("mean", math.nan) for s in stats],
                        yerr=[s.get("std", math.nan) for s in stats], marker="o", capsize=3,
                        label=labels.get(method, method))
        if ref == "spet":
            c = summary["ceiling"][metric]
            if c.get("n", 0):
                ax.axhline(c["mean"], color="k", linestyle="--", label="ceiling (expectation vs SPET)")
        _dose_axis(ax, doses)
        name, _, style = metric.partition("_")
        ax.set_ylabel(f"{name.upper()} ({style}){' (dB)' if name == 'psnr' else ''}")
        ax.set_title(f"against the {'SPET' if ref == 'spet' else 'noiseless expectation'}")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_lesion_bias_vs_dose(
    summary: Mapping[str, Any],
    path: Path,
    *,
    labels: Mapping[str, str] | None = None,
) -> Path:
    """Signed lesion SUVmax and SUVmean bias (vs the noiseless expectation) against dose, targets shaded."""
    plt = _pyplot()
    labels = dict(labels or {})
    per_dose = summary["per_dose"]
    doses = [float(d) for d in per_dose]
    methods = list(dict.fromkeys(m for entry in per_dose.values() for m in entry))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, target in zip(axes, ("suvmax_bias", "suvmean_bias"), (0.10, 0.05), strict=True):
        ax.axhspan(-100 * target, 100 * target, color="g", alpha=0.1, label=f"target ±{100 * target:g} %")
        for method in methods:
            entries = [per_dose[f"{d:g}"].get(method, {}) for d in doses]
            lesions = [e.get("expectation", {}).get("lesions", {}) for e in entries]
            stats = [les.get(key, {}) for les in lesions]
            ax.errorbar([100 * d for d in doses], [100 * s.get("mean", math.nan) for s in stats],
                        yerr=[100 * s.get("std", math.nan) for s in stats], marker="o", capsize=3,
                        label=labels.get(method, method))
        ax.axhline(0, color="k", linewidth=0.8)
        _dose_axis(ax, doses)
        ax.set_ylabel(f"lesion {'SUVmax' if key == 'suvmax_bias' else 'SUVmean'} bias (%)")
        ax.set_title("against the noiseless expectation")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
