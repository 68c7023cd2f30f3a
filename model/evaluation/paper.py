"""The paper's experiments on top of the quality run: held-out reconstructions, sampler steps,
and the sections that put them, the ablation and the comparison into the report.

1. :func:`score_holdout`: uPETe and the supervised U-Net (the LPET as always) on a second test set
   reconstructed with settings absent from training.
2. :func:`score_steps`: the LDM-P-CT checkpoint at several sampler step counts on the *validation*
   cases (choosing the default is model selection).
3. :func:`paper_sections`: the report's sections from the main run's summary and the two above
   (:mod:`model.evaluation.paper_tables`, :mod:`model.evaluation.steps_curve`); usable as
   ``run_quality(sections=...)``.

Scores are cached with the main run's (per case, dose, method and version), so a rerun redoes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.enhancers.classical import METHODS
from model.evaluation.evaluate import EvalResults, evaluate, summarise
from model.evaluation.paper_tables import ablation_section, comparison_section, generalisation_section
from model.evaluation.quality import checkpoint_method
from model.evaluation.steps_curve import plot_steps_curve, steps_section
from model.evaluation.trained_models import ABLATION_ORDER, SUPERVISED, UPETE, ModelCheckpoint

__all__ = ["StepsCurve", "paper_sections", "score_holdout", "score_steps", "steps_key"]

#: The dose of the paper's tables (its LPET is 10 % of the counts) and the supervised U-Net's.
TABLE_DOSE = 0.1


def _scored_dose(summary: Mapping[str, Any], dose: float) -> float:
    """``dose`` when ``summary`` has it, else its lowest dose (the verdicts then say which they used)."""
    scored = [float(d) for d in summary.get("per_dose", {})]
    if not scored or any(abs(d - dose) < 1e-9 for d in scored):
        return dose
    return min(scored)


def _by_variant(models: Sequence[ModelCheckpoint]) -> dict[str, ModelCheckpoint]:
    return {m.variant: m for m in models}


def score_holdout(
    models: Sequence[ModelCheckpoint], cases: Sequence[Any], doses: Sequence[float], *,
    cache_dir: Path | None = None, device: str = "auto", progress: bool = True,
) -> dict[str, Any]:
    """Summary of uPETe and the supervised U-Net (whichever of them is in ``models``) on ``cases``."""
    chosen = [m for m in models if m.variant in (UPETE, SUPERVISED)]
    methods = {m.key: checkpoint_method(m.path, device=device) for m in chosen}
    results = evaluate(methods, cases, doses, cache_dir=cache_dir, figure_case=None, progress=progress)
    return summarise(results)


def steps_key(model: ModelCheckpoint, steps: int) -> str:
    """The method key of ``model`` sampled with ``steps`` steps (kept apart from its default scores)."""
    return f"{model.key}@{steps}steps"


@dataclass(frozen=True)
class StepsCurve:
    """The steps curve's summary on the validation cases and ``{steps: method key}`` into it."""

    summary: dict[str, Any]
    keys: dict[int, str]
    n_cases: int


def score_steps(
    model: ModelCheckpoint, steps: Sequence[int], val_cases: Sequence[Any], doses: Sequence[float], *,
    cache_dir: Path | None = None, device: str = "auto", progress: bool = True,
) -> StepsCurve:
    """``model`` at each sampler step count on the validation cases at ``doses``."""
    if model.variant == SUPERVISED:
        raise ValueError("the supervised U-Net has no sampler: the steps curve needs a diffusion checkpoint")
    if not val_cases:
        raise ValueError("the steps curve needs validation cases (choosing a default never uses test cases)")
    keys = {int(n): steps_key(model, int(n)) for n in steps}
    methods = {key: checkpoint_method(model.path, device=device, steps=n) for n, key in keys.items()}
    results = evaluate(methods, val_cases, doses, cache_dir=cache_dir, figure_case=None, progress=progress)
    return StepsCurve(summarise(results), keys, len(val_cases))


def paper_sections(
    results: EvalResults, summary: dict[str, Any], *, models: Sequence[ModelCheckpoint],
    labels: Mapping[str, str], out_dir: Path, holdout: Mapping[str, Any] | None = None,
    steps: StepsCurve | None = None, dose: float = TABLE_DOSE,
) -> tuple[list[str], dict[str, Any]]:
    """Ablation, comparison, generalisation and steps sections for what this run has; ``(lines, data)``."""
    by = _by_variant(models)
    dose = _scored_dose(summary, dose)
    upete = by[UPETE].key if UPETE in by else None
    supervised = by[SUPERVISED].key if SUPERVISED in by else None
    lines: list[str] = []
    data: dict[str, Any] = {}
    variants = {v: by[v].key for v in ABLATION_ORDER if v in by}
    if variants:
        part, data["ablation"] = ablation_section(results, summary, variants, dose=dose)
        lines += part
    if upete or supervised:
        baselines = [m for m in results.methods if m in METHODS and m != "lpet"]
        part, data["comparison"] = comparison_section(summary, upete=upete, supervised=supervised,
                                                      baselines=baselines, labels=labels, dose=dose)
        lines += part
    if holdout is not None:
        part, data["generalisation"] = generalisation_section(
            summary, holdout, upete=upete, supervised=supervised, labels=labels,
            dose=_scored_dose(holdout, dose))
        lines += part
        data["generalisation"]["holdout_summary"] = holdout  # the held-out set's full numbers, for the JSON
    if steps is not None:
        figure = plot_steps_curve(steps.summary, steps.keys, out_dir / "steps_curve.png")
        part, data["steps"] = steps_section(steps.summary, steps.keys, dose=_scored_dose(steps.summary, dose),
                                            figure=figure, relative_to=out_dir, n_cases=steps.n_cases)
        data["steps"]["summary"] = steps.summary
        lines += part
    return lines, data
