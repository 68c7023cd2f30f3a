"""Score enhancers on simulated cases: per case, per dose, per method, against both references.

:func:`evaluate` runs every method on every case's LPET at every dose and scores the output against
two references: the standard-dose PET (``"spet"``, noisy, as the paper scores) and the noiseless
expectation of the same reconstruction (``"expectation"``). Each record holds both; :func:`summarise`
turns them into mean ± std per dose and method, the fraction of the LPET → ceiling gap each method
closes, and pooled lesion biases. :mod:`model.evaluation.report` writes them out.

A *method* is an :class:`~model.enhance.Enhancer`, a plain callable ``volume (z, y, x) Bq/ml → volume``,
or, when its settings depend on the dose (tuned baselines, the diffusion model's t*), a
:class:`PerDose` or a ``{dose: method}`` mapping. Any of them can be added by name, so later models
(diffusion checkpoints, the supervised U-Net) join the same table.

Work is cached per (case, dose, method, version) in ``cache_dir/records.jsonl``: a rerun skips what
is done, and a method whose version (e.g. tuned parameters) changed is scored again.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.enhance import Enhancer
from model.evaluation import metrics

__all__ = [
    "REFERENCES",
    "EvalCase",
    "EvalResults",
    "PerDose",
    "as_eval_case",
    "evaluate",
    "lpet_at",
    "score_volume",
    "summarise",
]

#: Reference name → attribute of :class:`EvalCase`.
REFERENCES = {"spet": "spet_bqml", "expectation": "expectation_bqml"}

VolumeFn = Callable[[np.ndarray], np.ndarray]
OneMethod = Enhancer | VolumeFn


class PerDose:
    """A method whose instance depends on the dose: ``factory(dose) → Enhancer or callable``, cached.

    ``doses``, when given, are the only doses it is run at (e.g. the ablation variants, scored at the
    paper's table dose only: each diffusion run costs minutes on a CPU); None: every dose.
    """

    def __init__(
        self, factory: Callable[[float], OneMethod], *, doses: Sequence[float] | None = None
    ) -> None:
        self._factory = factory
        self._built: dict[float, OneMethod] = {}
        self.doses = None if doses is None else tuple(float(d) for d in doses)

    def covers(self, dose: float) -> bool:
        return self.doses is None or any(abs(d - dose) < 1e-9 for d in self.doses)

    def at(self, dose: float) -> OneMethod:
        if dose not in self._built:
            self._built[dose] = self._factory(dose)
        return self._built[dose]


MethodLike = OneMethod | PerDose | Mapping[float, OneMethod]


@dataclass
class EvalCase:
    """What scoring needs from one simulated case; arrays are ``(z, y, x)``, activity in Bq/ml."""

    case_id: str
    ct_hu: np.ndarray
    spet_bqml: np.ndarray
    expectation_bqml: np.ndarray
    lpet_bqml: Mapping[float, np.ndarray]
    organ_labels: np.ndarray
    lesion_labels: np.ndarray
    spacing_mm: tuple[float, float, float]
    weight_kg: float
    injected_bq: float  # injected activity decayed to the scan start: SUV = Bq/ml × weight_g / this
    liver_label: int | None = None
    _body: np.ndarray | None = field(default=None, repr=False)

    @property
    def body(self) -> np.ndarray:
        """Body mask from the organ labels (every labelled voxel), computed once."""
        if self._body is None:
            self._body = metrics.body_mask(self.organ_labels)
        return self._body

    def liver_mask(self) -> np.ndarray | None:
        return None if self.liver_label is None else self.organ_labels == self.liver_label


def _meta_number(meta: Mapping[str, Any], *names: str) -> float:
    for name in names:
        if name in meta and meta[name] is not None:
            return float(meta[name])
    raise KeyError(f"case metadata has none of {names}")


def _liver_label() -> int | None:
    try:
        from model.simulation.phantom import ORGANS
    except ImportError:  # phantom module not present: no liver CoV
        return None
    by_name = {name: label for label, name in ORGANS.items()}
    return by_name.get("liver")


def as_eval_case(case: Any, default_id: str | None = None) -> EvalCase:
    """View a :class:`model.simulation.dataset.SimCase` (or a case folder's path) as an :class:`EvalCase`.

    The case id is the folder's name for a path, else ``meta["case_id"]``, else ``seed<seed>`` from the
    metadata, else ``default_id``: ids follow the simulation seed wherever it is known, so the same case
    reached twice (e.g. in a test and a validation set) is recognised.
    """
    if isinstance(case, EvalCase):
        return case
    if isinstance(case, (str, Path)):
        from model.simulation.dataset import load_case

        path = Path(case)
        loaded = as_eval_case(load_case(path))
        loaded.case_id = path.name
        return loaded
    meta = dict(getattr(case, "meta", {}) or {})
    if meta.get("case_id"):
        case_id = str(meta["case_id"])
    elif meta.get("seed") is not None:
        case_id = f"seed{meta['seed']}"
    else:
        case_id = default_id or "case"
    weight_kg = _meta_number(meta, "patient_weight_kg", "weight_kg")
    if meta.get("bqml_per_suv"):
        # The simulator's SUV divides by the injected activity decayed to the scan start, as a
        # scanner's SUVbw does; SUV = Bq/ml × weight_g / injected_bq then matches its organ SUVs.
        injected_bq = float(meta["bqml_per_suv"]) * weight_kg * 1000.0
    else:
        injected_bq = _meta_number(meta, "injected_activity_bq", "injected_bq")
    return EvalCase(
        case_id=case_id,
        ct_hu=case.ct_hu,
        spet_bqml=case.spet_bqml,
        expectation_bqml=case.expectation_bqml,
        lpet_bqml={float(d): v for d, v in case.lpet_bqml.items()},
        organ_labels=case.organ_labels,
        lesion_labels=case.lesion_labels,
        spacing_mm=tuple(float(s) for s in case.spacing_mm),
        weight_kg=weight_kg,
        injected_bq=injected_bq,
        liver_label=_liver_label(),
    )


def lpet_at(case: Any, dose: float) -> np.ndarray:
    """The case's LPET at ``dose`` (dose keys match to 1e-9, so 0.1 and 0.1000000001 are the same)."""
    for d, volume in case.lpet_bqml.items():
        if abs(float(d) - dose) < 1e-9:
            return volume
    raise KeyError(f"case has no LPET at dose {dose:g}; it has {sorted(float(d) for d in case.lpet_bqml)}")


def _resolve(method: MethodLike, dose: float) -> OneMethod:
    if isinstance(method, PerDose):
        return method.at(dose)
    if isinstance(method, Mapping):
        for d, m in method.items():
            if abs(float(d) - dose) < 1e-9:
                return m
        raise KeyError(f"method has no entry for dose {dose:g}")
    return method


def _version(method: OneMethod, name: str) -> str:
    if isinstance(method, Enhancer):
        params = getattr(method, "params", None)
        if params:
            return f"{method.info.version}|{json.dumps(params, sort_keys=True)}"
        return method.info.version
    return getattr(method, "version", name)


def _run(method: OneMethod, lpet: np.ndarray, case: EvalCase) -> np.ndarray:
    if isinstance(method, Enhancer):
        ct = case.ct_hu if method.info.uses_ct else None
        out = method.enhance_array(lpet, ct, spacing_mm=case.spacing_mm)
    else:
        out = method(lpet)
    out = np.asarray(out)
    if out.shape != lpet.shape:
        raise RuntimeError(f"method returned shape {out.shape}, expected {lpet.shape}")
    return out.astype(np.float32, copy=False)


def score_volume(volume: np.ndarray, case: EvalCase, ref: str) -> dict[str, Any]:
    """Every reference-based metric of ``volume`` against reference ``ref`` ("spet" or "expectation")."""
    reference = getattr(case, REFERENCES[ref])
    psnr_p, ssim_p = metrics.paper_psnr_ssim(volume, reference, case.body)
    psnr_u, ssim_u, nrmse_u = metrics.udpet_psnr_ssim_nrmse(volume, reference)
    lesions = metrics.lesion_suv_bias(
        volume, reference, case.lesion_labels, weight_kg=case.weight_kg, injected_bq=case.injected_bq
    )
    return {
        "psnr_paper": psnr_p,
        "ssim_paper": ssim_p,
        "psnr_udpet": psnr_u,
        "ssim_udpet": ssim_u,
        "nrmse": nrmse_u,
        "lesions": [lesion.as_dict() for lesion in lesions],
    }


def _liver_cov(volume: np.ndarray, case: EvalCase) -> float | None:
    liver = case.liver_mask()
    if liver is None or not liver.any():
        return None
    try:
        return metrics.liver_cov(volume, liver, exclude=case.lesion_labels > 0)
    except ValueError:  # liver too small after erosion (tiny test phantoms)
        return None


def _slices(volume: np.ndarray, where: tuple[int, int]) -> dict[str, np.ndarray]:
    z, y = where
    return {"axial": np.array(volume[z], np.float32), "coronal": np.array(volume[:, y, :], np.float32)}


def figure_location(case: EvalCase) -> tuple[int, int]:
    """(axial z, coronal y) through the centre of the largest lesion, or the middle of the body."""
    labels = case.lesion_labels
    if labels.any():
        ids, counts = np.unique(labels[labels > 0], return_counts=True)
        zz, yy, _ = np.nonzero(labels == ids[np.argmax(counts)])
    else:
        zz, yy, _ = np.nonzero(case.body)
    return int(np.round(zz.mean())), int(np.round(yy.mean()))


@dataclass
class EvalResults:
    """Raw results: one record per (case, dose, method), reference rows per case, figure slices."""

    records: list[dict[str, Any]]
    references: dict[str, dict[str, Any]]  # case → {"ceiling": scores vs SPET, "spet": scores vs expectation}
    doses: list[float]
    methods: list[str]
    slices: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # "case|dose|name" → views
    figure_case: str | None = None


class _Cache:
    """Append-only JSON-lines record store; each line is one finished (case, dose, method, version)."""

    def __init__(self, cache_dir: Path | None) -> None:
        self.path = None if cache_dir is None else Path(cache_dir) / "records.jsonl"
        self.done: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        self._torn = False  # the file ends inside a line: start the next record on a fresh one
        if self.path is not None and self.path.exists():
            text = self.path.read_text()
            self._torn = bool(text) and not text.endswith("\n")
            for line in text.splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line torn by a kill mid-write: that work is redone
                    continue
                self.done[self._key(record)] = record

    @staticmethod
    def _key(record: Mapping[str, Any]) -> tuple[str, str, str, str]:
        return (record["case"], f"{record['dose']:g}", record["method"], record["version"])

    def get(self, case: str, dose: float, method: str, version: str) -> dict[str, Any] | None:
        return self.done.get((case, f"{dose:g}", method, version))

    def _slice_path(self, key: str, version: str) -> Path | None:
        if self.path is None:
            return None
        digest = hashlib.sha1(f"{key}|{version}".encode()).hexdigest()[:16]
        return self.path.parent / "slices" / f"{digest}.npz"

    def get_slices(self, key: str, version: str) -> dict[str, np.ndarray] | None:
        path = self._slice_path(key, version)
        if path is None or not path.exists():
            return None
        with np.load(path) as data:
            return {name: data[name] for name in data.files}

    def put_slices(self, key: str, version: str, views: Mapping[str, np.ndarray]) -> None:
        path = self._slice_path(key, version)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(path, **views)

    def put(self, record: dict[str, Any]) -> None:
        self.done[self._key(record)] = record
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                prefix = "\n" if self._torn else ""
                f.write(prefix + json.dumps(record) + "\n")  # NaN/inf survive as NaN/Infinity
            self._torn = False


def _cases(cases: Sequence[Any]) -> Iterator[EvalCase]:
    for i, case in enumerate(cases):
        yield as_eval_case(case, f"case{i:03d}")


def evaluate(
    methods: Mapping[str, MethodLike],
    cases: Sequence[Any],
    doses: Sequence[float],
    *,
    cache_dir: Path | None = None,
    figure_case: int | None = 0,
    progress: bool = True,
) -> EvalResults:
    """Run and score every method on every case at every dose.

    ``cases``: :class:`EvalCase`, ``SimCase`` or case-folder paths (loaded one at a time, so memory
    holds one case). ``"lpet"`` (the LPET as is) is always scored, since the gap-closed figures need it.
    ``figure_case``: index of the case whose slices are kept for figures (None: keep none).
    """
    from tqdm import tqdm

    from model.enhancers.classical import LPETEnhancer

    all_methods: dict[str, MethodLike] = {"lpet": LPETEnhancer(), **methods}
    cache = _Cache(cache_dir)
    records: list[dict[str, Any]] = []
    references: dict[str, dict[str, Any]] = {}
    slices: dict[str, dict[str, np.ndarray]] = {}
    figure_id = None
    def runs(dose: float) -> dict[str, MethodLike]:
        return {n: m for n, m in all_methods.items() if not isinstance(m, PerDose) or m.covers(dose)}

    total = len(cases) * sum(len(runs(d)) for d in doses)
    bar = tqdm(total=total, desc="evaluate", unit="run", disable=not progress)
    for index, case in enumerate(_cases(cases)):
        keep = figure_case is not None and index == figure_case
        where = figure_location(case) if keep else None
        if keep:
            figure_id = case.case_id
            for name, volume in (("SPET", case.spet_bqml), ("expectation", case.expectation_bqml),
                                 ("CT", case.ct_hu)):
                slices[f"{case.case_id}|ref|{name}"] = _slices(volume, where)
        references[case.case_id] = _reference_rows(case, cache)
        for dose in doses:
            lpet = lpet_at(case, dose)
            for name, method_like in runs(dose).items():
                method = _resolve(method_like, dose)
                version = _version(method, name)
                record = cache.get(case.case_id, dose, name, version)
                key = f"{case.case_id}|{dose:g}|{name}"
                views = cache.get_slices(key, version) if keep else None
                if record is None or (keep and views is None):
                    start = time.perf_counter()
                    out = _run(method, lpet, case)
                    seconds = time.perf_counter() - start
                    if keep:
                        views = _slices(out, where)
                        cache.put_slices(key, version, views)
                if keep:
                    slices[key] = views
                if record is None:
                    record = {
                        "case": case.case_id, "dose": float(dose), "method": name, "version": version,
                        "seconds": seconds, "params": dict(getattr(method, "params", {}) or {}),
                        "liver_cov": _liver_cov(out, case),
                        "refs": {ref: score_volume(out, case, ref) for ref in REFERENCES},
                    }
                    cache.put(record)
                records.append(record)
                bar.update(1)
    bar.close()
    return EvalResults(records, references, [float(d) for d in doses], list(all_methods), slices, figure_id)


def _reference_rows(case: EvalCase, cache: _Cache) -> dict[str, Any]:
    """The ceiling (expectation scored against SPET) and the SPET's own error (against the expectation)."""
    rows = {}
    pairs = (("ceiling", case.expectation_bqml, "spet"), ("spet", case.spet_bqml, "expectation"))
    for name, volume, ref in pairs:
        record = cache.get(case.case_id, 1.0, f"ref:{name}", "1")
        if record is None:
            record = {"case": case.case_id, "dose": 1.0, "method": f"ref:{name}", "version": "1",
                      "liver_cov": _liver_cov(volume, case), "refs": {ref: score_volume(volume, case, ref)}}
            cache.put(record)
        rows[name] = record
    return rows


# ---------------------------------------------------------------------------------------------- summary

#: Scalar metrics summarised per reference; ``higher`` says which way is better.
SCALARS = {"psnr_paper": True, "ssim_paper": True, "psnr_udpet": True, "ssim_udpet": True, "nrmse": False}
#: Metrics whose LPET → ceiling gap is reported (against the SPET, where the ceiling is finite).
GAP_METRICS = ("psnr_paper", "ssim_paper", "psnr_udpet", "nrmse")
#: Lesion targets (this project's acceptance criteria): |SUVmax bias| ≤ 10 %, |SUVmean bias| ≤ 5 %.
LESION_TARGETS = {"suvmax_bias": 0.10, "suvmean_bias": 0.05}


def _stats(values: Sequence[float | None]) -> dict[str, float | int]:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    arr = np.asarray(finite)
    return {"mean": float(arr.mean()), "std": float(arr.std()), "n": int(arr.size)}


def summarise(results: EvalResults) -> dict[str, Any]:
    """Mean ± std (population std over cases) per dose and method, gap closed, pooled lesion biases.

    Returns ``{"per_dose": {dose: {method: {...}}}, "ceiling": {...}, "spet_vs_expectation": {...}}``
    where each method entry has, per reference, every scalar metric's stats, ``gap_closed`` (SPET
    reference only; see :func:`_gap_stats`), and lesion stats over all lesions of all cases: signed
    SUVmax/SUVmean bias and the fraction of lesions within the targets. Non-finite values
    (the PSNR of a perfect match) are left out of means and counts.
    """
    by_key = {(r["case"], r["dose"], r["method"]): r for r in results.records}
    ceiling = {c: rows["ceiling"]["refs"]["spet"] for c, rows in results.references.items()}
    per_dose: dict[str, dict[str, Any]] = {}
    for dose in results.doses:
        entry: dict[str, Any] = {}
        for method in results.methods:
            recs = [r for r in results.records if r["dose"] == dose and r["method"] == method]
            if not recs:
                continue
            m: dict[str, Any] = {"n_cases": len(recs), "liver_cov": _stats([r["liver_cov"] for r in recs]),
                                 "seconds": _stats([r.get("seconds") for r in recs]),
                                 "params": recs[0].get("params", {})}
            for ref in REFERENCES:
                scores = [r["refs"][ref] for r in recs]
                m[ref] = {k: _stats([s[k] for s in scores]) for k in SCALARS}
                m[ref]["lesions"] = _lesion_stats([les for s in scores for les in s["lesions"]])
            triples: dict[str, list[tuple[float, float, float]]] = {k: [] for k in GAP_METRICS}
            for r in recs:
                lpet = by_key.get((r["case"], dose, "lpet"))
                if lpet is None or r["case"] not in ceiling:
                    continue
                for k in GAP_METRICS:
                    triples[k].append((r["refs"]["spet"][k], lpet["refs"]["spet"][k], ceiling[r["case"]][k]))
            m["gap_closed"] = {k: _gap_stats(v) for k, v in triples.items()}
            entry[method] = m
        per_dose[f"{dose:g}"] = entry
    ceiling_scores = list(ceiling.values())
    spet_scores = [rows["spet"]["refs"]["expectation"] for rows in results.references.values()]
    return {
        "per_dose": per_dose,
        "ceiling": {k: _stats([s[k] for s in ceiling_scores]) for k in SCALARS},
        "spet_vs_expectation": {
            **{k: _stats([s[k] for s in spet_scores]) for k in SCALARS},
            "lesions": _lesion_stats([les for s in spet_scores for les in s["lesions"]]),
        },
        "liver_cov_reference": {
            name: _stats([rows[name]["liver_cov"] for rows in results.references.values()])
            for name in ("ceiling", "spet")
        },
    }


def _gap_stats(triples: Sequence[tuple[float, float, float]]) -> dict[str, float | int]:
    """Gap closed over cases: ``of_means`` = gap_closed(mean method, mean LPET, mean ceiling), stable
    where a case's own gap is tiny (at 50 % dose the LPET can sit within 0.1 dB of the ceiling, and a
    per-case ratio explodes); ``mean``/``std`` of the per-case ratios as well."""
    out = _stats([metrics.gap_closed(*t) for t in triples])
    finite = [t for t in triples if all(math.isfinite(v) for v in t)]
    if finite:
        value, lpet, ceiling = (float(np.mean(col)) for col in zip(*finite, strict=True))
        out["of_means"] = metrics.gap_closed(value, lpet, ceiling)
        out["gap_of_means"] = ceiling - lpet  # the denominator: how far the LPET is from the ceiling
    else:
        out["of_means"] = out["gap_of_means"] = math.nan
    return out


def _lesion_stats(lesions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(lesions)}
    for key, target in LESION_TARGETS.items():
        values = [les[key] for les in lesions if math.isfinite(les[key])]
        out[key] = _stats(values)
        out[f"{key}_within_target"] = (
            float(np.mean([abs(v) <= target for v in values])) if values else math.nan
        )
    return out
