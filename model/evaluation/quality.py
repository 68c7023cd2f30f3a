"""The quality run shared by ``upete evaluate`` and benchmarks/quality.py: tune, evaluate, write.

1. Tune each baseline per dose on the *validation* cases (:func:`tune_all`; cached in
   ``tuned_params.json`` and reused while the validation set, grid and slab size are unchanged).
2. Build the methods: tuned baselines as :class:`~model.evaluation.evaluate.PerDose`, plus any diffusion or
   U-Net checkpoint by path (:func:`build_methods`) — later models join by name here.
3. Evaluate them on the *test* cases (:func:`model.evaluation.evaluate.evaluate`, cached per case, dose and
   method) and write ``quality.md``, ``quality.json``, ``tuned_params.json`` and PNG figures
   (:func:`run_quality`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from model.enhancers.classical import METHODS, make_baseline
from model.evaluation.evaluate import EvalResults, MethodLike, PerDose, as_eval_case, evaluate, summarise
from model.evaluation.machine import machine_description
from model.evaluation.report import (
    markdown_report,
    plot_lesion_bias_vs_dose,
    plot_panels,
    plot_psnr_vs_dose,
    write_json,
)

__all__ = [
    "DEFAULT_DOSES", "LABELS", "Sections", "available_baselines", "build_methods", "checkpoint_method",
    "machine_description", "run_quality", "tune_all",
]

log = logging.getLogger(__name__)

#: The paper's dose fractions.
DEFAULT_DOSES = (0.5, 0.25, 0.1, 0.05, 0.02)

#: ``sections(results, summary) → (Markdown lines, JSON data)``: report sections computed from the run.
Sections = Callable[[EvalResults, dict[str, Any]], tuple[list[str], dict[str, Any]]]

#: Names as the report prints them.
LABELS = {
    "lpet": "LPET", "gaussian": "Gaussian", "nlm": "NLM", "bm4d": "BM4D", "bilateral": "CT bilateral",
}


def available_baselines(names: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """The requested baselines that can run here, and {name: why not} for the others."""
    ok, missing = [], {}
    for name in names:
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
        if name == "bm4d":
            try:
                import bm4d  # noqa: F401
            except ImportError as exc:
                missing[name] = f"the bm4d package does not import ({exc})"
                continue
        ok.append(name)
    return ok, missing


def _case_id(case: Any, index: int, prefix: str) -> str:
    """The id evaluate() will give the case, without loading a case folder's arrays."""
    if isinstance(case, (str, Path)):
        return Path(case).name
    return as_eval_case(case, f"{prefix}{index:03d}").case_id


def tune_all(
    names: Sequence[str],
    val_cases: Sequence[Any],
    doses: Sequence[float],
    *,
    cache_path: Path | None = None,
    max_slices: int | None = 32,
    progress: bool = True,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Tune every baseline in ``names`` at every dose on ``val_cases`` → ``{name: {"0.1": TuneResult dict}}``.

    Validation cases are loaded once (they are few), and only if some entry must be tuned. Results are
    saved to ``cache_path`` after each (method, dose), so an interrupted run resumes; an entry is reused
    only if it was tuned on the same validation cases, grid and slab size.
    """
    from model.evaluation.tuning import tune

    val_ids = sorted(_case_id(c, i, "val") for i, c in enumerate(val_cases))
    loaded: list[Any] = []  # the validation arrays, read from disk only if something needs tuning
    cached: dict[str, Any] = {}
    if cache_path is not None and cache_path.exists():
        cached = json.loads(cache_path.read_text()).get("tuned", {})
    tuned: dict[str, dict[str, dict[str, Any]]] = {}
    for name in names:
        grid = {k: list(v) for k, v in METHODS[name].grid.items()}
        for dose in doses:
            key = f"{dose:g}"
            previous = cached.get(name, {}).get(key)
            signature = {"val_cases": val_ids, "grid": grid, "max_slices": max_slices}
            if previous is not None and previous.get("signature") == signature:
                tuned.setdefault(name, {})[key] = previous
                continue
            if not loaded:
                loaded = [as_eval_case(c, f"val{i:03d}") for i, c in enumerate(val_cases)]
            result = tune(name, loaded, dose, max_slices=max_slices, progress=progress).as_dict()
            result["signature"] = signature
            tuned.setdefault(name, {})[key] = result
            log.info("tuned %s at dose %s: %s (%.2f dB)", name, key, result["params"], result["psnr_db"])
            if cache_path is not None:
                _save_tuned(cache_path, {**cached, **tuned})
    return tuned


def _save_tuned(path: Path, tuned: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    note = "Baseline parameters tuned per dose on validation cases (never test cases): best mean paper PSNR."
    tmp.write_text(json.dumps({"note": note, "tuned": tuned}, indent=1) + "\n")
    tmp.replace(path)


def build_methods(
    names: Sequence[str],
    *,
    tuned: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
    checkpoints: Sequence[Path] = (),
    device: str = "auto",
    steps: int | None = None,
) -> dict[str, MethodLike]:
    """Baselines by name (tuned per dose when ``tuned`` has them, else their defaults) and checkpoints.

    A checkpoint ``path`` becomes method ``path.stem``, loaded once per dose through
    :func:`model.enhance.load_enhancer` with that dose (the diffusion model's t* depends on it).
    """
    methods: dict[str, MethodLike] = {}
    for name in names:
        if name == "lpet":
            continue  # evaluate() always scores the LPET
        by_dose = (tuned or {}).get(name)
        if by_dose:
            methods[name] = PerDose(_tuned_factory(name, by_dose))
        else:
            methods[name] = make_baseline(name)
    for path in checkpoints:
        methods[Path(path).stem] = checkpoint_method(Path(path), device=device, steps=steps)
    return methods


def checkpoint_method(
    path: Path, *, device: str = "auto", steps: int | None = None, doses: Sequence[float] | None = None
) -> PerDose:
    """A checkpoint as a method through :func:`model.enhance.load_enhancer`, the dose unknown to it as
    at the node by default (a diffusion model places the LPET from its noise); ``steps`` None = the
    checkpoint's default; ``doses`` None = run at every dose, else only at these."""
    from model.enhance import InferenceOptions, load_enhancer

    def factory(dose: float) -> MethodLike:
        options = InferenceOptions(device=device, steps=steps)
        enhancer = load_enhancer(str(path), options=options)
        if hasattr(enhancer, "steps"):
            # The weights digest alone is the cache version: without the steps in it, a score at one
            # step count would be taken for another's; scores made with the dose given are not these.
            enhancer.params = {"steps": enhancer.steps, "dose": "unknown"}
            local_mean = enhancer.config.sampler.local_mean_fwhm_mm
            if local_mean:  # a JSON-only setting: it must be in the cache version too
                enhancer.params["local_mean_fwhm_mm"] = local_mean
        return enhancer

    return PerDose(factory, doses=doses)


def _figure_case(cases: Sequence[Any]) -> int:
    """Index of the case to show in the panels: the first with lesions, an OSEM one if there is one."""
    def describe(case: Any) -> tuple[bool, bool]:
        if isinstance(case, (str, Path)):
            meta = json.loads((Path(case) / "meta.json").read_text())
            return bool(meta.get("lesions")), meta.get("recon", {}).get("algorithm") == "osem"
        meta = getattr(case, "meta", {}) or {}
        return bool(case.lesion_labels.any()), meta.get("recon", {}).get("algorithm", "osem") == "osem"

    found = [describe(c) for c in cases]
    for wanted in ((True, True), (True, False)):
        if wanted in found:
            return found.index(wanted)
    return 0


def _tuned_factory(name: str, by_dose: Mapping[str, Mapping[str, Any]]):
    def factory(dose: float):
        entry = by_dose.get(f"{dose:g}")
        if entry is None:
            raise KeyError(f"{name} was not tuned at dose {dose:g}; tuned at {sorted(by_dose)}")
        return make_baseline(name, **entry["params"])

    return factory


def run_quality(
    test_cases: Sequence[Any],
    out_dir: Path,
    *,
    methods: Sequence[str] = tuple(METHODS),
    doses: Sequence[float] = DEFAULT_DOSES,
    val_cases: Sequence[Any] = (),
    checkpoints: Sequence[Path] = (),
    extra_methods: Mapping[str, MethodLike] | None = None,
    header: Mapping[str, Any] | None = None,
    cache_dir: Path | None = None,
    tune_slices: int | None = 32,
    progress: bool = True,
    title: str = "Quality benchmark",
    report_name: str = "quality",
    labels: Mapping[str, str] | None = None,
    sections: Sections | None = None,
) -> tuple[EvalResults, dict[str, Any]]:
    """Tune on ``val_cases`` (if any), evaluate on ``test_cases``, write the report into ``out_dir``.

    Writes ``{report_name}.md``, ``{report_name}.json``, ``tuned_params.json`` (when tuned) and PNGs:
    ``panel_<case>_dose<d>.png`` per dose, ``psnr_vs_dose.png``, ``ssim_vs_dose.png``,
    ``lesion_bias_vs_dose.png``. ``labels`` add to :data:`LABELS`; ``sections``, when given, adds
    sections computed from this run's results after the header (their data under ``"sections"`` in
    the JSON). Raises ValueError if a case is in both the test and validation sets.
    """
    test_ids = {_case_id(c, i, "case") for i, c in enumerate(test_cases)}
    val_ids = {_case_id(c, i, "val") for i, c in enumerate(val_cases)}
    if test_ids & val_ids:
        raise ValueError(f"cases in both the test and the validation set: {sorted(test_ids & val_ids)}")
    names, missing = available_baselines(methods)
    out_dir.mkdir(parents=True, exist_ok=True)
    tuned = None
    if val_cases:
        tunable = [n for n in names if METHODS[n].grid]
        tuned = tune_all(tunable, val_cases, doses, cache_path=out_dir / "tuned_params.json",
                         max_slices=tune_slices, progress=progress)
    built = build_methods(names, tuned=tuned, checkpoints=checkpoints)
    built.update(extra_methods or {})
    results = evaluate(built, test_cases, doses, cache_dir=cache_dir or out_dir / "cache",
                       figure_case=_figure_case(test_cases), progress=progress)
    summary = summarise(results)

    full_header = dict(header or {})
    full_header.setdefault("test cases", f"{len(test_cases)} ({', '.join(sorted(test_ids))})")
    if val_cases:
        val_text = f"{len(val_cases)} ({', '.join(sorted(val_ids))})"
        full_header.setdefault("validation cases (tuning only)", val_text)
    else:
        full_header.setdefault("tuning", "none: baselines at their default parameters")
    for name, why in missing.items():
        full_header[f"{name} not run"] = why
    names = {**LABELS, **(labels or {})}
    figures = plot_panels(results, out_dir, labels=names)
    figures.append(plot_psnr_vs_dose(summary, out_dir / "psnr_vs_dose.png", labels=names))
    figures.append(
        plot_psnr_vs_dose(summary, out_dir / "ssim_vs_dose.png", metric="ssim_paper", labels=names)
    )
    figures.append(plot_lesion_bias_vs_dose(summary, out_dir / "lesion_bias_vs_dose.png", labels=names))
    # Curves first: they summarise; the panels show one case.
    figures = figures[-3:] + figures[:-3]
    extra_lines, extra_data = sections(results, summary) if sections else ([], {})
    text = markdown_report(results, summary, title=title, header=full_header, tuned=tuned, figures=figures,
                           relative_to=out_dir, labels=names, sections=extra_lines)
    (out_dir / f"{report_name}.md").write_text(text)
    write_json(results, summary, out_dir / f"{report_name}.json", header=full_header, tuned=tuned,
               sections=extra_data)
    return results, summary
