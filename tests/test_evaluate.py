"""Tiny end-to-end evaluation: 2 toy cases, 2 doses, 2 methods → records, summary, table, JSON, PNGs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from model.baselines import make_baseline
from model.evaluate import PerDose, evaluate, score_volume, summarise
from model.report import markdown_report, plot_lesion_bias_vs_dose, plot_panels, plot_psnr_vs_dose, write_json
from tests.toy_cases import toy_case

DOSES = (0.5, 0.1)


@pytest.fixture(scope="module")
def cases():
    return [toy_case(0, doses=DOSES), toy_case(1, doses=DOSES)]


class Counting:
    """A plain volume → volume callable that counts its calls."""

    def __init__(self, fn, version="v1"):
        self.fn, self.calls, self.version = fn, 0, version

    def __call__(self, volume: np.ndarray) -> np.ndarray:
        self.calls += 1
        return self.fn(volume)


def test_end_to_end_outputs(cases, tmp_path: Path) -> None:
    methods = {
        "gaussian": make_baseline("gaussian", fwhm_mm=6.0),
        "bilateral": PerDose(lambda d: make_baseline("bilateral", spatial_fwhm_mm=6.0 if d > 0.2 else 9.0)),
    }
    results = evaluate(methods, cases, DOSES, cache_dir=tmp_path / "cache", progress=False)
    assert results.methods == ["lpet", "gaussian", "bilateral"]
    assert len(results.records) == 2 * 2 * 3
    widths = {r["params"].get("spatial_fwhm_mm") for r in results.records if r["method"] == "bilateral"}
    assert widths == {6.0, 9.0}

    summary = summarise(results)
    assert set(summary["per_dose"]) == {"0.5", "0.1"}
    low = summary["per_dose"]["0.1"]
    # Filtering beats the LPET at 10 % dose, against both references, and closes part of the gap.
    for ref in ("spet", "expectation"):
        assert low["gaussian"][ref]["psnr_paper"]["mean"] > low["lpet"][ref]["psnr_paper"]["mean"]
    assert low["lpet"]["gap_closed"]["psnr_paper"]["mean"] == 0.0
    assert low["gaussian"]["gap_closed"]["psnr_paper"]["mean"] > 0.0
    assert low["lpet"]["n_cases"] == 2
    assert low["lpet"]["expectation"]["lesions"]["n"] == 4  # 2 lesions × 2 cases
    # Smoothing pulls lesion SUVmax down (signed bias).
    lesions = {m: low[m]["expectation"]["lesions"]["suvmax_bias"]["mean"] for m in ("lpet", "gaussian")}
    assert lesions["gaussian"] < min(0.0, lesions["lpet"])
    assert summary["ceiling"]["psnr_paper"]["n"] == 2

    figures = plot_panels(results, tmp_path / "out")
    figures.append(plot_psnr_vs_dose(summary, tmp_path / "out" / "psnr_vs_dose.png"))
    figures.append(plot_lesion_bias_vs_dose(summary, tmp_path / "out" / "lesion_bias_vs_dose.png"))
    assert len(figures) == 4  # one panel per dose + two curves
    for fig in figures:
        assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and fig.stat().st_size > 5000

    tuned = {"gaussian": {"0.1": {"params": {"fwhm_mm": 6.0}, "psnr_db": 30.0}}}
    text = markdown_report(results, summary, header={"command": "pytest"}, tuned=tuned, figures=figures,
                           relative_to=tmp_path / "out")
    for table in text.split("## Against")[1:]:
        rows = [line for line in table.splitlines() if line.startswith("| ") and "%" in line.split("|")[1]]
        assert len(rows) == 2 * 3, rows  # every dose × method, in each reference's table
        assert any(r.startswith("| 10 % | bilateral |") for r in rows)
    assert "![psnr_vs_dose](psnr_vs_dose.png)" in text
    assert "| gaussian | 10 % | fwhm_mm = 6 | 30.00 |" in text

    path = write_json(results, summary, tmp_path / "out" / "quality.json", header={"command": "pytest"})
    data = json.loads(path.read_text())  # strict JSON: no NaN/Infinity
    assert len(data["records"]) == 12 and data["methods"] == results.methods
    assert data["summary"]["per_dose"]["0.1"]["gaussian"]["spet"]["psnr_paper"]["n"] == 2


def test_cache_skips_finished_work(cases, tmp_path: Path) -> None:
    method = Counting(lambda v: v * 1.0)
    evaluate({"same": method}, cases, DOSES, cache_dir=tmp_path, progress=False)
    assert method.calls == 4
    again = evaluate({"same": method}, cases, DOSES, cache_dir=tmp_path, progress=False)
    assert method.calls == 4  # everything, the figure slices included, came from the cache
    assert len(again.records) == 2 * 2 * 2 and again.slices
    method.version = "v2"  # a changed method is scored again
    evaluate({"same": method}, cases, DOSES, cache_dir=tmp_path, progress=False)
    assert method.calls == 8


def test_gap_closed_is_one_at_the_ceiling(cases) -> None:
    by_case = {c.case_id: c for c in cases}
    methods = {"oracle": {d: _oracle(by_case, d) for d in DOSES}}
    summary = summarise(evaluate(methods, cases, DOSES, figure_case=None, progress=False))
    for dose in ("0.5", "0.1"):
        oracle = summary["per_dose"][dose]["oracle"]
        assert oracle["gap_closed"]["psnr_paper"]["mean"] == pytest.approx(1.0)
        assert oracle["gap_closed"]["nrmse"]["mean"] == pytest.approx(1.0)
        # Against the expectation the oracle is perfect: PSNR inf, which the mean leaves out.
        assert oracle["expectation"]["psnr_paper"]["n"] == 0
        assert oracle["expectation"]["ssim_paper"]["mean"] == pytest.approx(1.0)


def _oracle(by_case, dose):
    """Returns the noiseless expectation of whichever case's LPET it is given: the ceiling itself."""

    def fn(volume: np.ndarray) -> np.ndarray:
        for case in by_case.values():
            if volume is case.lpet_bqml[dose]:
                return case.expectation_bqml
        raise AssertionError("unknown volume")

    return fn


def test_score_volume_against_itself(cases) -> None:
    case = cases[0]
    scores = score_volume(case.expectation_bqml, case, "expectation")
    assert scores["psnr_paper"] == math.inf and scores["nrmse"] == 0.0
    assert all(les["suvmax_bias"] == 0.0 for les in scores["lesions"])


def test_missing_dose_is_reported(cases) -> None:
    with pytest.raises(KeyError, match="no LPET at dose 0.25"):
        evaluate({}, cases, (0.25,), progress=False)
    with pytest.raises(KeyError, match="no entry for dose 0.1"):
        evaluate({"m": {0.5: make_baseline("lpet")}}, cases, (0.1,), progress=False)
