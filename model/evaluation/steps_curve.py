"""Sampling steps vs quality: a table, a PNG and the step count the report recommends.

Scored on the *validation* cases: picking a default is model selection, and test cases are never used
for a choice. The recommendation is the smallest step count whose mean PSNR (paper, vs the expectation)
is within ``tolerance_db`` of the best one's at the chosen dose; the report prints it and writes it into
no config.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from model.evaluation.paper_tables import METHOD_HEAD, METHOD_RULE, RANK_REF, mean_of, method_cells
from model.evaluation.report import _dose_label, _pyplot, _row

__all__ = ["TOLERANCE_DB", "plot_steps_curve", "recommend_steps", "steps_section"]

#: A step count within this much PSNR of the best is as good: fewer steps are then the better default.
TOLERANCE_DB = 0.1


def recommend_steps(
    summary: Mapping[str, Any], keys: Mapping[int, str], *, dose: float = 0.1,
    tolerance_db: float = TOLERANCE_DB,
) -> dict[str, Any]:
    """``{"steps": recommended or None, "best_steps", "best_psnr", "psnr": {steps: mean}, ...}``.

    ``keys``: sampler steps → method key in ``summary``.
    """
    psnr = {int(n): mean_of(summary, dose, key, "psnr_paper") for n, key in keys.items()}
    finite = {n: v for n, v in psnr.items() if math.isfinite(v)}
    out: dict[str, Any] = {"dose": dose, "tolerance_db": tolerance_db, "psnr": psnr}
    if not finite:
        return {**out, "steps": None, "best_steps": None, "best_psnr": math.nan}
    best_steps = max(finite, key=lambda n: (finite[n], -n))
    best = finite[best_steps]
    chosen = min(n for n, v in finite.items() if v >= best - tolerance_db)
    return {**out, "steps": chosen, "best_steps": best_steps, "best_psnr": best}


def _seconds(summary: Mapping[str, Any], dose: float, key: str) -> float:
    entry = summary["per_dose"].get(f"{dose:g}", {}).get(key)
    return float(entry["seconds"]["mean"]) if entry and entry["seconds"].get("n") else math.nan


def plot_steps_curve(summary: Mapping[str, Any], keys: Mapping[int, str], path: Path) -> Path:
    """PSNR, SSIM (paper, vs the expectation, mean ± std) and seconds per volume against sampler steps,
    per dose."""
    plt = _pyplot()
    steps = sorted(keys)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.0))
    for dose_key in summary["per_dose"]:
        dose = float(dose_key)
        for ax, metric in zip(axes[:2], ("psnr_paper", "ssim_paper"), strict=True):
            entries = [summary["per_dose"][dose_key].get(keys[n], {}) for n in steps]
            stats = [e.get(RANK_REF, {}).get(metric, {}) for e in entries]
            ax.errorbar(steps, [s.get("mean", math.nan) for s in stats],
                        yerr=[s.get("std", math.nan) for s in stats], marker="o", capsize=3,
                        label=f"dose {_dose_label(dose_key)}")
        axes[2].plot(steps, [_seconds(summary, dose, keys[n]) for n in steps], marker="o",
                     label=f"dose {_dose_label(dose_key)}")
    names = ("PSNR paper vs expectation (dB)", "SSIM paper vs expectation", "seconds per volume")
    for ax, name in zip(axes, names, strict=True):
        ax.set_xscale("log")
        ax.set_xticks(steps)
        ax.set_xticklabels([str(n) for n in steps])
        ax.minorticks_off()
        ax.set_xlabel("sampler steps")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("LDM-P-CT: sampler steps vs quality (validation cases)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def steps_section(
    summary: Mapping[str, Any], keys: Mapping[int, str], *, dose: float = 0.1, figure: Path | None = None,
    relative_to: Path | None = None, n_cases: int | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """The steps table (every dose scored × steps, LPET for reference), the figure and the recommendation."""
    cases = f"{n_cases} validation case(s)" if n_cases is not None else "the validation cases"
    lines = ["## Sampling steps vs quality (LDM-P-CT, validation cases)", "",
             f"Scored on {cases}, never on test cases: choosing the default is model selection.", "",
             "| dose | steps | " + METHOD_HEAD, METHOD_RULE + "---|"]
    for dose_key in summary["per_dose"]:
        d = float(dose_key)
        lines.append(_row([_dose_label(dose_key), "LPET", *method_cells(summary, d, "lpet")]))
        lines += [_row([_dose_label(dose_key), str(n), *method_cells(summary, d, keys[n])])
                  for n in sorted(keys)]
    data = recommend_steps(summary, keys, dose=dose)
    if data["steps"] is None:
        sentence = f"no step count was scored at {_dose_label(f'{dose:g}')}: no recommendation"
    else:
        at = _dose_label(f"{dose:g}")
        sentence = (f"{data['steps']} steps: the smallest within {data['tolerance_db']:g} dB of the best "
                    f"mean PSNR at {at} ({data['best_psnr']:.2f} dB at {data['best_steps']} steps); "
                    "printed here, written into no config")
    lines += ["", f"- **Recommended sampler steps: {sentence}**", ""]
    if figure is not None:
        rel = figure.relative_to(relative_to) if relative_to else figure
        lines += [f"![{figure.stem}]({rel.as_posix()})", ""]
    return lines, data
