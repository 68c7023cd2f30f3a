"""Tune a baseline's parameters on validation cases, per dose, by grid search on PSNR.

The objective is the paper's PSNR (:func:`model.evaluation.metrics.paper_psnr_ssim`: SPET reference min-max
normalised inside the body), averaged over the validation cases: what a site could tune on with its
own standard-dose scans. Test cases are never seen here; :func:`tune` takes whatever cases it is
given, and benchmarks/quality.py gives it the validation set only.

PSNR-optimal is not lesion-optimal: a PSNR-tuned filter trades lesion contrast for smoothness, which
the evaluation's lesion SUV biases then show.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from model.enhancers.classical import METHODS, make_baseline
from model.evaluation import metrics
from model.evaluation.evaluate import EvalCase, as_eval_case, lpet_at

__all__ = ["TuneResult", "central_slab", "tune"]


@dataclass(frozen=True)
class TuneResult:
    """The chosen parameters and every grid point's mean validation PSNR (dB)."""

    method: str
    dose: float
    params: dict[str, Any]
    psnr_db: float
    n_cases: int
    grid: list[dict[str, Any]]  # [{"params": {...}, "psnr_db": mean over cases}, ...]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def central_slab(case: EvalCase, max_slices: int | None) -> EvalCase:
    """The case cut to its central ``max_slices`` axial slices (all of it if None or already thinner).

    Tuning on a slab keeps the cost of a grid search bounded; the filters are local, so the optimum
    hardly moves.
    """
    nz = case.spet_bqml.shape[0]
    if max_slices is None or nz <= max_slices:
        return case
    start = (nz - max_slices) // 2
    cut = slice(start, start + max_slices)
    return EvalCase(
        case_id=case.case_id,
        ct_hu=case.ct_hu[cut],
        spet_bqml=case.spet_bqml[cut],
        expectation_bqml=case.expectation_bqml[cut],
        lpet_bqml={d: v[cut] for d, v in case.lpet_bqml.items()},
        organ_labels=case.organ_labels[cut],
        lesion_labels=case.lesion_labels[cut],
        spacing_mm=case.spacing_mm,
        weight_kg=case.weight_kg,
        injected_bq=case.injected_bq,
        liver_label=case.liver_label,
    )


def _grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    names = list(grid)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*(grid[n] for n in names))]


def tune(
    method: str,
    val_cases: Sequence[Any],
    dose: float,
    *,
    grid: Mapping[str, Sequence[Any]] | None = None,
    max_slices: int | None = None,
    progress: bool = False,
) -> TuneResult:
    """Grid-search ``method``'s parameters at ``dose`` for the best mean paper PSNR over ``val_cases``.

    ``val_cases``: EvalCase, SimCase or case-folder paths (validation only — never test cases).
    ``grid``: parameter name → values (default
    :data:`model.enhancers.classical.METHODS` [method].grid); an empty grid returns the defaults.
    Ties go to the first grid point. ``max_slices`` tunes on each case's central slab
    (see :func:`central_slab`).
    """
    if method not in METHODS:
        raise ValueError(f"unknown baseline {method!r}; known: {', '.join(METHODS)}")
    if not val_cases:
        raise ValueError("tune needs at least one validation case")
    grid = METHODS[method].grid if grid is None else grid
    points = _grid_points(grid) if grid else [{}]
    cases = [central_slab(as_eval_case(c, f"val{i:03d}"), max_slices) for i, c in enumerate(val_cases)]
    scores = np.zeros((len(points), len(cases)))
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=scores.size, desc=f"tune {method} @ {dose:g}", unit="run")
    for j, case in enumerate(cases):
        lpet = lpet_at(case, dose)
        for i, params in enumerate(points):
            enhancer = make_baseline(method, **params)
            ct = case.ct_hu if enhancer.info.uses_ct else None
            out = enhancer.enhance_array(lpet, ct, spacing_mm=case.spacing_mm)
            scores[i, j] = metrics.psnr(
                out, case.spet_bqml, data_range=_body_span(case), mask=case.body
            )
            if progress:
                bar.update(1)
    if progress:
        bar.close()
    mean = scores.mean(axis=1)
    best = int(np.argmax(mean))  # argmax returns the first of equal maxima
    return TuneResult(
        method=method,
        dose=float(dose),
        params={**METHODS[method].defaults, **points[best]},
        psnr_db=float(mean[best]),
        n_cases=len(cases),
        grid=[{"params": p, "psnr_db": float(m)} for p, m in zip(points, mean, strict=True)],
    )


def _body_span(case: EvalCase) -> float:
    """The paper's data range: max − min of the SPET inside the body (PSNR only; no SSIM while tuning)."""
    values = case.spet_bqml[case.body]
    return float(values.max() - values.min())
