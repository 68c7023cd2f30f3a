"""The transfer benchmark's report: its Markdown tables, and the targets judged from its numbers.

Everything here reads the summary :func:`benchmarks.transfer.summarise` makes; benchmarks/transfer.py
writes it on its own, benchmarks/quality.py as the first section of quality.md.
"""

from __future__ import annotations

import datetime
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

MIN_LESION_MM = 10.0  # lesions scored: equivalent diameter at least this


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v * 100:+.1f} %"


def _db(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}"


def _reuse_note(reused: int) -> str:
    if not reused:
        return ""
    return (f" (outputs of {reused} model(s) inferred by an earlier run of this command and reused from its "
            "--work folder; the load and minutes are this run's)")


def report(summary: dict[str, Any], header: dict[str, Any], methods: Sequence[str]) -> str:
    """The Markdown report: one image-quality and one lesion table per dose, the worst style named."""
    lines = ["# Transfer benchmark: the models on a second generator's scanner styles", "",
             f"Command: {header['command']}", "",
             f"Machine: {header['machine']}; load average {header['load_before']} before, "
             f"{header['load_after']} after (a shared machine); {header['date']}; "
             f"{header['wall_minutes']:.1f} min{_reuse_note(header['cases_reused'])}.", "",
             "Styles (model/evaluation/transfer/styles.py):", ""]
    lines += [f"- **{name}**: {text}" for name, text in header["styles"].items()]
    lines += ["", f"Cases: seeds {header['seeds']} (the transfer set, never used for training or any "
              "choice). Models through `dicomnode.pipeline.enhance_series`, dose unknown to them, default "
              "steps; CT-guided models with the study's CT, PET-only ones without; a supervised U-Net, "
              "trained at one dose, is given every dose as it is.", "",
              "Models: " + "; ".join(f"**{n}** `{p}`" for n, p in header["models"].items()) + ".", "",
              *[f"- **{n}**: {d}" for n, d in header.get("descriptions", {}).items()], "",
              "PSNR in dB against the **noiseless expectation** (the style's reconstruction of the noiseless "
              "sinogram), peak = its maximum in the body, MSE over body voxels. **Gap closed** = "
              "1 − MSE(method)/MSE(LPET) against the expectation (1 = the expectation, 0 = the LPET, "
              "negative = worse than the LPET). **Best Gaussian**: FWHM chosen per case with the truth in "
              "hand (0–12 mm). SPET: the full-dose reconstruction, the noise floor of a real scan. Lesion "
              f"bias: SUVmax/SUVmean against the expectation's, lesions ≥ {MIN_LESION_MM:g} mm, mean over "
              "lesions and cases (worst single lesion in brackets).", ""]
    for dose, by_style in summary.items():
        lines += [f"## Dose {float(dose) * 100:g} %", "",
                  "| style | cases | LPET | SPET (100 %) | best Gaussian (FWHM mm) | "
                  + " | ".join(methods) + " | gap closed: Gaussian | "
                  + " | ".join(f"gap closed: {m}" for m in methods) + " |",
                  "|---|---:|---:|---:|---:|" + "---:|" * len(methods) + "---:|" + "---:|" * len(methods)]
        for style, e in by_style.items():
            fwhm = ", ".join(f"{f:g}" for f in e["gaussian_fwhm_mm"])
            lines.append(f"| {style} | {e['cases']} | {_db(e['LPET']['psnr'])} | {_db(e['spet_psnr'])} | "
                         f"{_db(e['Gaussian']['psnr'])} ({fwhm}) | "
                         + " | ".join(_db(e[m]["psnr"]) for m in methods)
                         + f" | {_pct(e['Gaussian']['gap_closed'])} | "
                         + " | ".join(_pct(e[m]["gap_closed"]) for m in methods) + " |")
        names = ("LPET", "Gaussian", *methods)
        lines += ["", "Lesion SUVmax bias (SUVmean bias) against the expectation:", "",
                  "| style | lesions ≥ 10 mm | " + " | ".join(names) + " |",
                  "|---|---:|" + "---|" * len(names)]
        for style, e in by_style.items():
            cells = [f"{_pct(e[n]['suvmax_mean'])} [{_pct(e[n]['suvmax_worst'])}] "
                     f"({_pct(e[n]['suvmean_mean'])})" for n in names]
            lines.append(f"| {style} | {e['lesions_scored']} | " + " | ".join(cells) + " |")
        placing = _placing(by_style, methods)
        if placing:
            lines += ["", f"Where the node placed the {float(dose) * 100:g} % LPET on each model's schedule, "
                      "dose unknown (the dose equivalent of t*, from the image's noise index; the diffusion "
                      "step the denoiser is asked to undo, not a claim about the injected activity):", "",
                      "| style | " + " | ".join(placing) + " |", "|---|" + "---:|" * len(placing)]
            for style, e in by_style.items():
                lines.append(f"| {style} | " + " | ".join(_pct(e["dose_equivalent"][m]).lstrip("+")
                                                          for m in placing) + " |")
        lines += ["", *_verdict(by_style, methods), ""]
    roles = target_roles(header.get("descriptions", {}))
    if roles:
        lines += [f"## Targets of {roles['model']}", "", *targets_markdown(targets(summary, **roles)), ""]
    return "\n".join(lines) + "\n"


def target_roles(descriptions: dict[str, str]) -> dict[str, str]:
    """Which model the targets judge (the one named LDM-P-CT), its PET-only twin (LDM-P) and the
    supervised reference (a model whose description says so), among those run; {} without LDM-P-CT."""
    if "LDM-P-CT" not in descriptions:
        return {}
    roles = {"model": "LDM-P-CT"}
    if "LDM-P" in descriptions:
        roles["without_ct"] = "LDM-P"
    supervised = [n for n, d in descriptions.items() if d.lower().startswith("supervised")]
    if supervised:
        roles["supervised"] = supervised[0]
    return roles


def _placing(by_style: dict[str, Any], methods: Sequence[str]) -> list[str]:
    """The models that placed the LPET on a schedule (diffusion ones; not the supervised U-Net)."""
    return [m for m in methods if any(e["dose_equivalent"].get(m) is not None for e in by_style.values())]


def _verdict(by_style: dict[str, Any], methods: Sequence[str]) -> list[str]:
    """The worst style per model, and where the model beats the best Gaussian (a model is as good as
    its worst scanner style)."""
    out = []
    for m in methods:
        gaps = {s: e[m]["gap_closed"] for s, e in by_style.items() if e[m]["gap_closed"] is not None}
        if not gaps:
            continue
        worst = min(gaps, key=lambda s: gaps[s])
        wins = [s for s, e in by_style.items() if e[m]["psnr"] > e["Gaussian"]["psnr"]]
        margin = by_style[worst][m]["psnr"] - by_style[worst]["Gaussian"]["psnr"]
        out.append(f"- **{m}**: worst style **{worst}** (gap closed {_pct(gaps[worst])}, "
                   f"{margin:+.2f} dB against the best Gaussian); above the best Gaussian on {len(wins)} of "
                   f"{len(by_style)} styles"
                   + (f" ({', '.join(wins)})" if wins else "") + ". A model is as good as its worst scanner "
                   "style.")
    return out


#: The issue's targets on the transfer set, dose unknown (docs: benchmarks/results/quality.md).
TARGET_DOSE = 0.1
TARGET_GAP = 0.80
TARGET_MARGIN_DB = {TARGET_DOSE: 1.0}  # above the best Gaussian on every style; 0.5 dB at other doses
OTHER_MARGIN_DB = 0.5
TARGET_LESION_MEAN = 0.05
TARGET_LESION_LOWEST = -0.15


def _dose(fraction: float | str) -> str:
    return f"{100 * float(fraction):.3g} %"


def _styles_where(by_style: dict[str, Any], ok: Any) -> list[str]:
    return [style for style, e in by_style.items() if ok(e)]


def targets(summary: dict[str, Any], model: str, *, without_ct: str | None = None,
            supervised: str | None = None) -> list[dict[str, Any]]:
    """Each target of the model on the transfer set: what it asks, what was measured, met or not.

    ``summary`` as :func:`summarise` makes it. Per dose scored: the margin over the best Gaussian on
    every style (1 dB at 10 %, 0.5 dB elsewhere), at 10 % the gap closed on every style, the mean lesion
    SUVmax bias (pooled over the styles' lesions ≥ 10 mm) and the lowest single lesion; with
    ``without_ct`` (the PET-only twin) the mean PSNR over styles at each dose; with ``supervised`` the
    styles where the model is ahead. ``met`` is None where the run has nothing to judge by.
    """
    out: list[dict[str, Any]] = []

    def add(target: str, measured: str, met: bool | None) -> None:
        out.append({"target": target, "measured": measured, "met": met})

    doses = sorted(summary, key=float)
    ten = summary.get(f"{TARGET_DOSE:g}")
    if ten:
        gaps = {s: e[model]["gap_closed"] for s, e in ten.items()}
        worst = min(gaps, key=lambda s: gaps[s])
        below = _styles_where(ten, lambda e: e[model]["gap_closed"] < TARGET_GAP)
        add(f"{_dose(TARGET_DOSE)}: ≥ {_dose(TARGET_GAP)} of the LPET-to-expectation gap closed on every "
            "style",
            f"worst {worst} {_dose(gaps[worst])}; below on {len(below)} of {len(ten)}"
            + (f" ({', '.join(below)})" if below else ""), not below)
    else:
        add(f"{_dose(TARGET_DOSE)}: ≥ {_dose(TARGET_GAP)} of the gap closed on every style", "not scored",
            None)
    for dose in doses:
        by_style = summary[dose]
        need = TARGET_MARGIN_DB.get(float(dose), OTHER_MARGIN_DB)
        margin = {s: e[model]["psnr"] - e["Gaussian"]["psnr"] for s, e in by_style.items()}
        worst = min(margin, key=lambda s: margin[s])
        short = [s for s, m in margin.items() if m < need]
        add(f"{_dose(dose)}: ≥ {need:g} dB above the best Gaussian on every style",
            f"worst {worst} {margin[worst]:+.2f} dB; short on {len(short)} of {len(margin)}"
            + (f" ({', '.join(short)})" if short else ""), not short)
    for dose in doses:
        by_style = summary[dose]
        n = {s: e["lesions_scored"] for s, e in by_style.items() if e[model]["suvmax_mean"] is not None}
        if not n:
            add(f"{_dose(dose)}: lesion SUVmax bias within ±{_dose(TARGET_LESION_MEAN)} (mean), none below "
                f"{_pct(TARGET_LESION_LOWEST)}", "no lesion ≥ 10 mm scored", None)
            continue
        pooled = sum(by_style[s][model]["suvmax_mean"] * k for s, k in n.items()) / max(sum(n.values()), 1)
        lowest = min(by_style[s][model]["suvmax_lowest"] for s in n)
        low_styles = [s for s in n if by_style[s][model]["suvmax_lowest"] < TARGET_LESION_LOWEST]
        add(f"{_dose(dose)}: lesion SUVmax bias within ±{_dose(TARGET_LESION_MEAN)} (mean), none below "
            f"{_pct(TARGET_LESION_LOWEST)}",
            f"mean {_pct(pooled)} over {sum(n.values())} lesions; lowest {_pct(lowest)}; styles with a "
            f"lesion below: {len(low_styles)} of {len(n)}",
            abs(pooled) <= TARGET_LESION_MEAN and not low_styles)
    if without_ct:
        behind = []
        for dose in doses:
            mine = np.mean([e[model]["psnr"] for e in summary[dose].values()])
            theirs = np.mean([e[without_ct]["psnr"] for e in summary[dose].values()])
            behind += [f"{_dose(dose)} ({mine - theirs:+.2f} dB)"] if mine < theirs else []
        add(f"{model} ≥ {without_ct} (mean PSNR over styles, at every dose)",
            f"behind at {len(behind)} of {len(doses)} doses" + (f": {', '.join(behind)}" if behind else ""),
            not behind)
    if supervised:
        cells, every = [], True
        for dose in doses:
            ahead = _styles_where(summary[dose], lambda e: e[model]["psnr"] > e[supervised]["psnr"])
            every &= len(ahead) == len(summary[dose])
            cells.append(f"{_dose(dose)} {len(ahead)} of {len(summary[dose])}")
        add(f"{model} ahead of {supervised} on every style", "styles ahead: " + ", ".join(cells), every)
    return out


def targets_markdown(rows: list[dict[str, Any]]) -> list[str]:
    mark = {True: "yes", False: "**no**", None: "–"}
    return ["| target | measured | met |", "|---|---|---|",
            *(f"| {r['target']} | {r['measured']} | {mark[r['met']]} |" for r in rows)]


def transfer_section(summary: dict[str, Any], header: dict[str, Any],
                     roles: dict[str, str]) -> tuple[list[str], dict[str, Any]]:
    """The quality report's first section: the targets, then each model against the best Gaussian and
    its lesion SUVmax bias per style and dose (the full tables: transfer.md). Returns (lines, data)."""
    methods = list(header["models"])
    doses = sorted(summary, key=float)
    styles = list(next(iter(summary.values()))) if summary else []
    lines = ["## Transfer set: the measure of the model", "",
             "A second generator inside the project (model/evaluation/transfer/: its own phantoms, projector "
             "and reconstructions, sharing nothing with the training simulator) at the pixel sizes and "
             "algorithms clinics use; never used for training or for any choice. Each LPET goes through the "
             "node's own path (DICOM in, DICOM out), the dose unknown to the models. Scored against the "
             "**noiseless expectation** (the style's reconstruction of the noiseless data) in the body; the "
             "rival is the **best Gaussian chosen per case with the truth in hand**; gap closed = 1 − "
             "MSE(method)/MSE(LPET). Cases per style: "
             f"{len(header['seeds'])} (seeds {header['seeds']}). Models: "
             + "; ".join(f"**{n}** `{p}`" for n, p in header["models"].items())
             + ". Every table of this run: [transfer.md](transfer.md).", ""]
    data: dict[str, Any] = {"doses": doses, "styles": styles, "models": header["models"]}
    if roles:
        rows = targets(summary, **roles)
        data["targets"] = rows
        met = sum(r["met"] is True for r in rows)
        lines += [f"### Targets of {roles['model']} ({met} of {len(rows)} met)", "", *targets_markdown(rows),
                  ""]
    head = "| style | " + " | ".join(_dose(d) for d in doses) + " |"
    rule = "|---|" + "---:|" * len(doses)
    for m in methods:
        lines += [f"### {m}: PSNR above the best Gaussian (dB), gap closed in brackets", "", head, rule]
        for style in styles:
            cells = [f"{summary[d][style][m]['psnr'] - summary[d][style]['Gaussian']['psnr']:+.2f} "
                     f"({_pct(summary[d][style][m]['gap_closed'])})" for d in doses]
            lines.append(f"| {style} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["### Lesion SUVmax bias, lesions ≥ 10 mm (mean over the style's lesions; the best Gaussian's "
              "in brackets)", "", "| style | model | " + " | ".join(_dose(d) for d in doses) + " |",
              "|---|---|" + "---:|" * len(doses)]
    for style in styles:
        for m in methods:
            cells = [f"{_pct(summary[d][style][m]['suvmax_mean'])} "
                     f"({_pct(summary[d][style]['Gaussian']['suvmax_mean'])})" for d in doses]
            lines.append(f"| {style} | {m} | " + " | ".join(cells) + " |")
    return [*lines, ""], data


def write_results(out: str | Path, *, command: str, load_before: list[float], started: float,
                  run: dict[str, Any], summary: dict[str, Any], rows: list[dict[str, Any]],
                  methods: Sequence[str]) -> dict[str, Any]:
    """transfer.md and transfer.json at ``out`` (a path without suffix), with how they were made:
    ``command`` as typed, the load before and now, the date and the minutes since ``started``
    (time.time()), and ``run`` (what :func:`benchmarks.transfer.run_transfer` returns as its header).
    Returns the header."""
    from model.evaluation.machine import machine_description
    from model.evaluation.report import result_paths

    header = {
        "command": f"`{command}`",
        "machine": machine_description(),
        "load_before": load_before,
        "load_after": [round(v, 2) for v in os.getloadavg()],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_minutes": (time.time() - started) / 60.0,
        **run,
    }
    json_path, md_path = result_paths(out)
    json_path.write_text(json.dumps({**header, "summary": summary, "cases": rows}, indent=1))
    md_path.write_text(report(summary, header, methods))
    return header
