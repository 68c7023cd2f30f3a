"""The paper's tables for the quality report: ablation, comparison, generalisation.

Inputs are :func:`model.evaluation.evaluate.summarise` dictionaries (and the per-case records for paired
differences); nothing here runs a model. Every verdict line is computed from the numbers its table
prints, and each ``*_section`` function returns ``(markdown lines, data)`` so quality.json carries the
same verdicts. PSNR and SSIM are the paper's (normalised, inside the body) against the SPET, as the
paper scores; lesion biases are against the noiseless expectation (the SPET's own noise biases SUVmax).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from model.evaluation.evaluate import EvalResults
from model.evaluation.report import _dose_label, _pm, _row
from model.evaluation.trained_models import ABLATION_ORDER

__all__ = [
    "ablation_section",
    "beats",
    "comparison_section",
    "dose_loss",
    "METHOD_HEAD",
    "METHOD_RULE",
    "RANK_REF",
    "method_cells",
    "generalisation_section",
    "mean_of",
    "ordering",
    "paired_difference",
    "yes_no",
]

#: Lesion target (this project's acceptance criterion): mean SUVmax bias within ±10 %.
SUVMAX_TARGET = 0.10
#: What "beats" is judged on, with the format each value prints in.
BEAT_METRICS = {"psnr_paper": ".2f", "ssim_paper": ".4f"}
METRIC_NAMES = {"psnr_paper": "PSNR", "ssim_paper": "SSIM"}


def yes_no(value: bool | None, why_not_judged: str = "") -> str:
    if value is None:
        return f"cannot be judged ({why_not_judged})" if why_not_judged else "cannot be judged"
    return "yes" if value else "no"


def _stats(summary: Mapping[str, Any], dose: float, method: str, ref: str, metric: str) -> Mapping[str, Any]:
    entry = summary.get("per_dose", {}).get(f"{dose:g}", {}).get(method)
    if entry is None:
        return {}
    if metric in ("suvmax_bias", "suvmean_bias"):
        return entry[ref]["lesions"][metric]
    return entry[ref][metric]


#: What the verdicts rank against: the noiseless expectation. A simulated LPET shares counts with its
#: SPET, so SPET-referenced scores reward keeping noise; the SPET columns follow for the paper's sake.
RANK_REF = "expectation"


def mean_of(summary: Mapping[str, Any], dose: float, method: str, metric: str, ref: str = RANK_REF) -> float:
    """Mean over cases of ``metric`` for ``method`` at ``dose`` (NaN when not scored)."""
    stats = _stats(summary, dose, method, ref, metric)
    return float(stats["mean"]) if stats.get("n") else math.nan


def method_cells(summary: Mapping[str, Any], dose: float, method: str) -> list[str]:
    """PSNR and SSIM (paper) vs the expectation, then vs the SPET, SUVmax and SUVmean bias, s / volume."""
    entry = summary["per_dose"].get(f"{dose:g}", {}).get(method)
    if entry is None:
        return ["not scored"] + ["–"] * 6
    s, e = entry["spet"], entry["expectation"]
    return [_pm(e["psnr_paper"], ".2f"), _pm(e.get("ssim_paper"), ".4f"), _pm(s["psnr_paper"], ".2f"),
            _pm(s["ssim_paper"], ".4f"), _pm(e["lesions"]["suvmax_bias"], "+.1f", 100, " %"),
            _pm(e["lesions"]["suvmean_bias"], "+.1f", 100, " %"), _pm(entry["seconds"], ".1f")]


METHOD_HEAD = ("PSNR (dB) vs expectation | SSIM vs expectation | PSNR (dB) vs SPET | SSIM vs SPET "
               "| SUVmax bias | SUVmean bias | s / volume |")
METHOD_RULE = "|---|---|---|---|---|---|---|---|"


# ------------------------------------------------------------------------------------------- ablation


def ordering(values: Mapping[str, float], order: Sequence[str]) -> dict[str, Any]:
    """Whether ``values`` strictly increase along ``order``.

    ``holds`` is None when a member is missing or not finite (named in ``missing``); ``broken`` lists
    each neighbouring pair ``[a, b, value_a, value_b]`` where a is not below b (a tie breaks it too).
    """
    missing = [k for k in order if not math.isfinite(values.get(k, math.nan))]
    if missing:
        return {"holds": None, "missing": missing, "broken": []}
    broken = [[a, b, values[a], values[b]] for a, b in zip(order, order[1:], strict=False)
              if not values[a] < values[b]]
    return {"holds": not broken, "missing": [], "broken": broken}


def paired_difference(
    records: Sequence[Mapping[str, Any]], first: str, second: str, dose: float, metric: str,
) -> dict[str, float | int]:
    """``second − first`` per case (same case, same dose; vs the expectation): mean, standard error, n,
    and the number of cases ``second`` wins. Paired, because case-to-case spread dwarfs method differences."""
    by = {(r["case"], r["method"]): r["refs"][RANK_REF][metric] for r in records
          if abs(float(r["dose"]) - dose) < 1e-9 and r["method"] in (first, second)}
    diffs = [by[(c, second)] - by[(c, first)] for c, m in by if m == first and (c, second) in by]
    diffs = [float(d) for d in diffs if d is not None and math.isfinite(d)]
    if not diffs:
        return {"mean": math.nan, "se": math.nan, "n": 0, "wins": 0}
    arr = np.asarray(diffs)
    se = float(arr.std(ddof=1) / math.sqrt(arr.size)) if arr.size > 1 else math.nan
    return {"mean": float(arr.mean()), "se": se, "n": int(arr.size), "wins": int((arr > 0).sum())}


def _ordering_sentence(verdict: Mapping[str, Any], metric: str, dose: float) -> str:
    order = " < ".join(v.upper() for v in ABLATION_ORDER)
    head = f"Ordering {order} in {METRIC_NAMES[metric]} at {_dose_label(f'{dose:g}')} dose holds: "
    if verdict["holds"] is None:
        return head + yes_no(None, "no score for " + ", ".join(v.upper() for v in verdict["missing"]))
    if verdict["holds"]:
        return head + "yes."
    fmt = BEAT_METRICS[metric]
    broken = "; ".join(f"{a.upper()} {va:{fmt}} ≥ {b.upper()} {vb:{fmt}}"
                       for a, b, va, vb in verdict["broken"])
    return head + f"no ({broken})."


def ablation_section(
    results: EvalResults, summary: Mapping[str, Any], variants: Mapping[str, str], *, dose: float = 0.1,
) -> tuple[list[str], dict[str, Any]]:
    """Table 1: the four variants at ``dose`` and per dose, the ordering verdicts and paired differences.

    ``variants``: variant (``"ldm"`` …) → method key in the summary.
    """
    present = [v for v in ABLATION_ORDER if v in variants]
    lines = ["## Ablation (paper Table 1)", "",
             f"Test cases, {_dose_label(f'{dose:g}')} dose, mean ± std over cases.", "",
             "| variant | " + METHOD_HEAD, METHOD_RULE]
    lines += [_row([v.upper(), *method_cells(summary, dose, variants[v])]) for v in present]
    data: dict[str, Any] = {"dose": dose, "variants": dict(variants), "ordering": {}}
    lines.append("")
    for metric in BEAT_METRICS:
        values = {v: mean_of(summary, dose, variants[v], metric) for v in present}
        data["ordering"][metric] = verdict = ordering(values, ABLATION_ORDER)
        lines.append(f"- {_ordering_sentence(verdict, metric, dose)}")
    judged = [v["holds"] for v in data["ordering"].values()]
    data["holds"] = None if None in judged else all(judged)
    lines += [f"- **Ablation ordering holds at {_dose_label(f'{dose:g}')} (PSNR and SSIM): "
              f"{yes_no(data['holds'])}**", ""]
    lines += _paired_table(results, variants, present, dose, data)
    lines += _ablation_per_dose(summary, variants, present)
    return lines, data


def _paired_table(
    results: EvalResults, variants: Mapping[str, str], present: Sequence[str], dose: float, data: dict,
) -> list[str]:
    """Neighbouring pairs, paired over cases: a difference within 2 standard errors is not resolved."""
    if len(present) < 2:
        return []
    lines = ["Paired differences between neighbours in the ordering (later − earlier, same cases): a "
             "mean within 2 standard errors of 0 is not resolved by this many cases.", "",
             "| pair | Δ PSNR (dB), mean ± s.e. | Δ SSIM, mean ± s.e. | cases the later one wins (PSNR) |",
             "|---|---|---|---|"]
    data["paired"] = {}
    for a, b in zip(present, present[1:], strict=False):
        diffs = {m: paired_difference(results.records, variants[a], variants[b], dose, m)
                 for m in BEAT_METRICS}
        data["paired"][f"{a}->{b}"] = diffs
        cells = [f"{a.upper()} → {b.upper()}"]
        for m, fmt in BEAT_METRICS.items():
            d = diffs[m]
            if not d["n"]:
                cells.append("–")
            elif not math.isfinite(d["se"]):
                cells.append(f"{d['mean']:+{fmt}} (one case: not resolved)")
            else:
                resolved = "resolved" if abs(d["mean"]) > 2 * d["se"] else "not resolved"
                cells.append(f"{d['mean']:+{fmt}} ± {d['se']:{fmt}} ({resolved})")
        p = diffs["psnr_paper"]
        cells.append(f"{p['wins']} of {p['n']}")
        lines.append(_row(cells))
    return lines + [""]


def _ablation_per_dose(
    summary: Mapping[str, Any], variants: Mapping[str, str], present: Sequence[str],
) -> list[str]:
    lines = ["Per dose (PSNR dB / SSIM vs the expectation, mean ± std):", "",
             "| dose | " + " | ".join(v.upper() for v in present) + " | ordering holds (PSNR / SSIM) |",
             "|---|" + "---|" * (len(present) + 1)]
    for dose_key in summary["per_dose"]:
        dose = float(dose_key)
        cells = [_dose_label(dose_key)]
        for v in present:
            psnr = _stats(summary, dose, variants[v], RANK_REF, "psnr_paper")
            ssim = _stats(summary, dose, variants[v], RANK_REF, "ssim_paper")
            cells.append(f"{_pm(psnr, '.2f')} / {_pm(ssim, '.4f')}")
        holds = [ordering({v: mean_of(summary, dose, variants[v], m) for v in present},
                          ABLATION_ORDER)["holds"] for m in BEAT_METRICS]
        cells.append(" / ".join(yes_no(h) for h in holds))
        lines.append(_row(cells))
    return lines + [""]


# ----------------------------------------------------------------------------------------- comparison


def beats(
    summary: Mapping[str, Any], winner: str, others: Sequence[str], doses: Sequence[float],
    labels: Mapping[str, str],
) -> dict[str, Any]:
    """Whether ``winner``'s mean PSNR and SSIM exceed each of ``others``' at every dose in ``doses``.

    ``failures`` names each (dose, metric, method) where it does not, or where either was not scored.
    ``holds`` is None when there is nothing to compare against.
    """
    failures = []
    for dose in doses:
        for other in others:
            for metric, fmt in BEAT_METRICS.items():
                mine, theirs = mean_of(summary, dose, winner, metric), mean_of(summary, dose, other, metric)
                name = labels.get(other, other)
                where = f"{_dose_label(f'{dose:g}')} {METRIC_NAMES[metric]}"
                if not (math.isfinite(mine) and math.isfinite(theirs)):
                    failures.append(f"{where}: {name} or {labels.get(winner, winner)} not scored")
                elif not mine > theirs:
                    failures.append(f"{where}: {name} {theirs:{fmt}} ≥ {mine:{fmt}}")
    holds = None if not others or not doses else not failures
    return {"holds": holds, "failures": failures}


def _beats_line(text: str, verdict: Mapping[str, Any]) -> str:
    answer = yes_no(verdict["holds"], "nothing to compare against")
    if verdict["failures"]:
        answer += " (where not: " + "; ".join(verdict["failures"]) + ")"
    return f"- **{text}: {answer}**"


def _lesion_lines(
    summary: Mapping[str, Any], upete: str, others: Sequence[str], dose: float, labels: Mapping[str, str],
) -> tuple[list[str], dict[str, Any]]:
    """The SUVmax-bias verdict for uPETe at ``dose``, with every other method's bias beside it."""
    def judged(method: str) -> tuple[float, bool | None]:
        bias = mean_of(summary, dose, method, "suvmax_bias", "expectation")
        return bias, (abs(bias) <= SUVMAX_TARGET if math.isfinite(bias) else None)

    bias, ok = judged(upete)
    value = f"{100 * bias:+.1f} %" if math.isfinite(bias) else "no lesion scored"
    line = (f"- **Mean lesion SUVmax bias of uPETe within ±{100 * SUVMAX_TARGET:g} % at "
            f"{_dose_label(f'{dose:g}')}: {value}, {yes_no(ok, 'no lesion scored')}**")
    data = {"dose": dose, "upete": {"bias": bias, "within": ok}, "others": {}}
    parts = []
    for method in others:
        b, within = judged(method)
        data["others"][method] = {"bias": b, "within": within}
        shown = f"{100 * b:+.1f} %" if math.isfinite(b) else "–"
        parts.append(f"{labels.get(method, method)} {shown} ({yes_no(within, 'no lesion')})")
    return [line, f"  - the others at {_dose_label(f'{dose:g}')}: " + "; ".join(parts)], data


def comparison_section(
    summary: Mapping[str, Any], *, upete: str | None, supervised: str | None, baselines: Sequence[str],
    labels: Mapping[str, str], dose: float = 0.1,
) -> tuple[list[str], dict[str, Any]]:
    """Table 2: LPET, every baseline, the supervised U-Net and uPETe at ``dose``, with the verdicts."""
    rows = ["lpet", *baselines, *([supervised] if supervised else []), *([upete] if upete else [])]
    lines = ["## Comparison (paper Table 2)", "",
             f"Test cases, {_dose_label(f'{dose:g}')} dose, mean ± std over cases; baselines tuned per dose "
             "on the validation cases.", "",
             "| method | " + METHOD_HEAD, METHOD_RULE]
    lines += [_row([labels.get(m, m), *method_cells(summary, dose, m)]) for m in rows]
    lines.append("")
    if upete is None:
        return lines + ["- **No LDM-P-CT checkpoint was given: no uPETe verdicts.**", ""], {"upete": None}
    doses = [float(d) for d in summary["per_dose"]]
    sup = [supervised] if supervised else []
    at = _dose_label(f"{dose:g}")
    data: dict[str, Any] = {
        "dose": dose,
        "beats_baselines_every_dose": beats(summary, upete, baselines, doses, labels),
        "beats_supervised": beats(summary, upete, sup, [dose], labels),
        "beats_supervised_every_dose": beats(summary, upete, sup, doses, labels),
    }
    lines.append(_beats_line("uPETe beats every classical baseline in PSNR and SSIM at every dose",
                             data["beats_baselines_every_dose"]))
    lines.append(_beats_line(f"uPETe beats the supervised U-Net in PSNR and SSIM at {at}",
                             data["beats_supervised"]))
    lines.append(_beats_line("uPETe beats the supervised U-Net in PSNR and SSIM at every dose",
                             data["beats_supervised_every_dose"]))
    others = ["lpet", *baselines, *([supervised] if supervised else [])]
    lesion_lines, data["lesions"] = _lesion_lines(summary, upete, others, dose, labels)
    loss_line, data["dose_loss"] = _dose_loss_line(summary, upete, others[1:], labels)
    return lines + lesion_lines + loss_line + [""], data


def dose_loss(summary: Mapping[str, Any], method: str) -> float:
    """Mean PSNR (paper, vs the expectation) at the highest dose scored minus at the lowest: how much is
    lost as the dose falls (the paper's Fig. 2 claim is that uPETe loses least). NaN with fewer than two
    doses."""
    doses = sorted(float(d) for d in summary["per_dose"])
    if len(doses) < 2:
        return math.nan
    high, low = (mean_of(summary, d, method, "psnr_paper") for d in (doses[-1], doses[0]))
    return high - low


def _dose_loss_line(
    summary: Mapping[str, Any], upete: str, others: Sequence[str], labels: Mapping[str, str],
) -> tuple[list[str], dict[str, Any]]:
    losses = {m: dose_loss(summary, m) for m in (upete, *others)}
    judged = [m for m in others if math.isfinite(losses[m])]
    ok = (all(losses[upete] < losses[m] for m in judged)
          if math.isfinite(losses[upete]) and judged else None)
    doses = sorted(float(d) for d in summary["per_dose"])
    span = (f"from {_dose_label(f'{doses[-1]:g}')} to {_dose_label(f'{doses[0]:g}')}" if len(doses) > 1
            else "(one dose only)")
    shown = "; ".join(f"{labels.get(m, m)} {_signed(losses[m])} dB" for m in (upete, *others))
    line = (f"- **uPETe loses the least PSNR as the dose falls {span} (paper Fig. 2): "
            f"{yes_no(ok, 'needs two doses and another method')}** ({shown})")
    return [line], {"losses": losses, "holds": ok}


# ------------------------------------------------------------------------------------- generalisation


def generalisation_section(
    standard: Mapping[str, Any], holdout: Mapping[str, Any], *, upete: str | None, supervised: str | None,
    labels: Mapping[str, str], dose: float = 0.1,
) -> tuple[list[str], dict[str, Any]]:
    """PSNR on the standard vs the held-out-reconstruction test set, each method's drop, the verdict.

    The two sets are different phantoms too, so the LPET's own change is shown, and the gain over the
    LPET (method − LPET on the same set) is compared as well: its drop is free of the sets' difference.
    """
    methods = ["lpet", *[m for m in (supervised, upete) if m]]
    lines = ["## Generalisation to reconstructions absent from training", "",
             "PSNR (paper, vs the expectation), mean ± std over cases: the standard test set against a "
             "test set reconstructed with the held-out settings (model.dataset.HOLDOUT_RECONS). Drop = "
             "standard − held-out; gain = method − LPET on the same set.", "",
             "| dose | method | PSNR standard (dB) | PSNR held-out (dB) | drop (dB) | gain standard (dB) "
             "| gain held-out (dB) | drop in gain (dB) |", "|---|---|---|---|---|---|---|---|"]
    data: dict[str, Any] = {"per_dose": {}}
    for dose_key in holdout["per_dose"]:
        d = float(dose_key)
        entry = data["per_dose"][dose_key] = {}
        for m in methods:
            std_v, held_v = mean_of(standard, d, m, "psnr_paper"), mean_of(holdout, d, m, "psnr_paper")
            gain_s = std_v - mean_of(standard, d, "lpet", "psnr_paper")
            gain_h = held_v - mean_of(holdout, d, "lpet", "psnr_paper")
            entry[m] = {"standard": std_v, "holdout": held_v, "drop": std_v - held_v,
                        "gain_standard": gain_s, "gain_holdout": gain_h, "gain_drop": gain_s - gain_h}
            lines.append(_row([_dose_label(dose_key), labels.get(m, m),
                               _pm(_stats(standard, d, m, RANK_REF, "psnr_paper"), ".2f"),
                               _pm(_stats(holdout, d, m, RANK_REF, "psnr_paper"), ".2f"),
                               *(_signed(entry[m][k]) for k in ("drop", "gain_standard", "gain_holdout",
                                                                 "gain_drop"))]))
    lines.append("")
    verdict = _drop_verdict(data["per_dose"].get(f"{dose:g}", {}), upete, supervised, dose)
    data["verdict"] = verdict
    return lines + verdict.pop("lines") + [""], data


def _signed(value: float) -> str:
    return f"{value:+.2f}" if math.isfinite(value) else "–"


def _drop_verdict(entry: Mapping[str, Any], upete: str | None, supervised: str | None, dose: float) -> dict:
    why = None
    if upete is None or supervised is None:
        why = "needs both the LDM-P-CT and the supervised checkpoint"
    elif upete not in entry or supervised not in entry:
        why = f"held-out set not scored at {_dose_label(f'{dose:g}')}"
    out: dict[str, Any] = {"dose": dose}
    lines = []
    texts = {"drop": "uPETe's PSNR drop smaller than the supervised U-Net's",
             "gain_drop": "uPETe's drop in gain over the LPET smaller than the supervised U-Net's"}
    for key, text in texts.items():
        if why is None:
            mine, theirs = entry[upete][key], entry[supervised][key]
            ok = mine < theirs if math.isfinite(mine) and math.isfinite(theirs) else None
            detail = f" (uPETe {_signed(mine)} dB, supervised U-Net {_signed(theirs)} dB)"
            out[key] = {"upete": mine, "supervised": theirs, "holds": ok}
        else:
            ok, detail = None, ""
            out[key] = {"holds": None, "why": why}
        lines.append(f"- **{text} at {_dose_label(f'{dose:g}')}: {yes_no(ok, why or 'not finite')}{detail}**")
    out["lines"] = lines
    return out
