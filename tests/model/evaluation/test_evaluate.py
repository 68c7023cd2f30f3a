"""Tiny end-to-end evaluation: 2 toy cases, 2 doses, 2 methods → records, summary, table, JSON, PNGs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from model.enhancers.classical import make_baseline
from model.evaluation.evaluate import PerDose, evaluate, score_volume, summarise
from model.evaluation.report import (
    markdown_report,
    plot_lesion_bias_vs_dose,
    plot_panels,
    plot_psnr_vs_dose,
    write_json,
)
from tests.support.toy_cases import toy_case

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
    assert 0.0 < low["gaussian"]["gap_closed"]["psnr_paper"]["of_means"] < 1.0
    assert low["lpet"]["gap_closed"]["psnr_paper"]["of_means"] == 0.0
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
        assert oracle["gap_closed"]["psnr_paper"]["of_means"] == pytest.approx(1.0)
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


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """Two test cases and one validation case from the real simulator, on a tiny grid."""
    from model.simulation.dataset import save_case, simulate_case

    root = tmp_path_factory.mktemp("sim")
    for folder, seed in (("test", 200000), ("test", 200001), ("val", 100000)):
        save_case(simulate_case(seed, shape=(8, 48, 48), doses=DOSES), root / folder / f"case_{seed}")
    return root


def test_upete_evaluate_command(simulated: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from upete.cli import main

    out = tmp_path / "report"
    argv = ["evaluate", "--data", str(simulated / "test"), "--out", str(out), "--methods", "lpet,gaussian",
            "--doses", "0.5,0.1", "--val", str(simulated / "val"), "--tune-slices", "0", "--quiet"]
    assert main(argv) == 0
    assert "ok: 2 case(s) x 2 dose(s) x 2 method(s)" in capsys.readouterr().out
    text = (out / "quality.md").read_text()
    assert "| 10 % | Gaussian |" in text and "| Gaussian | 50 % | fwhm_mm = " in text
    assert "case_100000" in text and "case_200001" in text
    tuned = json.loads((out / "tuned_params.json").read_text())["tuned"]
    assert set(tuned["gaussian"]) == {"0.5", "0.1"}
    assert tuned["gaussian"]["0.1"]["signature"]["val_cases"] == ["case_100000"]
    data = json.loads((out / "quality.json").read_text())
    # SUVs use the simulator's decay-corrected definition: a lesion's SUVmax in the noiseless
    # reconstruction is its phantom SUV, less what the resolution blurs away.
    meta = json.loads((simulated / "test" / "case_200000" / "meta.json").read_text())
    truth = {les["label"]: les["suv"] for les in meta["lesions"]}
    ceiling = data["references"]["case_200000"]["ceiling"]["refs"]["spet"]["lesions"]
    assert truth and len(ceiling) == len(truth)
    for les in ceiling:
        assert 0.2 * truth[les["label"]] < les["suvmax"] < 1.3 * truth[les["label"]]
    curves = ["lesion_bias_vs_dose.png", "psnr_vs_dose.png", "ssim_vs_dose.png"]
    assert sorted(p.name for p in out.glob("*_vs_dose.png")) == curves
    panels = sorted(p.name for p in out.glob("panel_*.png"))
    assert len(panels) == 2 and panels[0].endswith("_dose10.png") and panels[1].endswith("_dose50.png")
    # Test cases may not be tuned on.
    argv[argv.index("--val") + 1] = str(simulated / "test")
    assert main(argv) == 1
    assert "in both the test and the validation set" in capsys.readouterr().err


def test_upete_evaluate_refuses_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from upete.cli import main

    assert main(["evaluate", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--doses", "2"]) == 2
    assert "fractions in (0, 1]" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "no cases in" in capsys.readouterr().err


@pytest.mark.slow
def test_quality_benchmark_script(tmp_path: Path) -> None:
    import importlib.util

    script = Path(__file__).resolve().parents[3] / "benchmarks" / "quality.py"
    spec = importlib.util.spec_from_file_location("quality_bench", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--cases", "2", "--val-cases", "1", "--shape", "8,48,48", "--doses", "0.5,0.1",
            "--methods", "lpet,gaussian,bilateral", "--data", str(tmp_path / "data"),
            "--out", str(tmp_path / "out"), "--tune-slices", "0", "--quiet", "--note", "first try",
            "--transfer-doses", "none"]
    assert bench.main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "data" / "test").iterdir()) == ["case_200000", "case_200001"]
    assert [p.name for p in (tmp_path / "data" / "val").iterdir()] == ["case_100000"]
    text = (tmp_path / "out" / "quality.md").read_text()
    assert "python benchmarks/quality.py --cases 2" in text and "wall time of this run" in text
    assert "- **note**: first try" in text and "--note" not in text
    assert text.count("| CT bilateral |") >= 4  # 2 doses × 2 reference tables (+ tuning rows)
    records = (tmp_path / "data" / "cache" / "records.jsonl").read_text().splitlines()
    assert bench.main(argv) == 0  # resumed: nothing is simulated or scored again
    assert (tmp_path / "data" / "cache" / "records.jsonl").read_text().splitlines() == records


def test_cache_survives_a_torn_line(cases, tmp_path: Path) -> None:
    method = Counting(lambda v: v * 1.0)
    evaluate({"same": method}, cases[:1], DOSES, cache_dir=tmp_path, figure_case=None, progress=False)
    path = tmp_path / "records.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])  # killed while writing the last one
    evaluate({"same": method}, cases[:1], DOSES, cache_dir=tmp_path, figure_case=None, progress=False)
    assert method.calls == 3  # 2 doses, then only the torn record again
    evaluate({"same": method}, cases[:1], DOSES, cache_dir=tmp_path, figure_case=None, progress=False)
    assert method.calls == 3  # the redone record landed on a line of its own


def test_gap_closed_is_not_printed_when_the_gap_is_tiny() -> None:
    from model.evaluation.report import _gap

    assert _gap({"of_means": 0.69, "gap_of_means": 6.5}) == "0.69"
    assert _gap({"of_means": 30.0, "gap_of_means": 0.05}) == "– (LPET 0.05 dB from the ceiling)"


def test_lesion_plot_with_one_dose_and_no_lesions(tmp_path: Path) -> None:
    # A one-dose run on a case without lesions gives only NaN biases: the log dose axis must still draw.
    nan = {"mean": math.nan, "std": math.nan}
    lesions = {"suvmax_bias": nan, "suvmean_bias": nan}
    summary = {"per_dose": {"0.1": {"lpet": {"expectation": {"lesions": lesions}}}}}
    path = plot_lesion_bias_vs_dose(summary, tmp_path / "bias.png")
    assert path.stat().st_size > 0


def test_sections_go_between_the_header_and_the_tables(cases, tmp_path: Path) -> None:
    results = evaluate({}, cases[:1], (0.1,), figure_case=None, progress=False)
    summary = summarise(results)
    text = markdown_report(results, summary, header={"command": "pytest"},
                           sections=["## Ablation", "", "- verdict: yes", ""])
    heads = [line for line in text.splitlines() if line.startswith("## ")]
    assert heads[:2] == ["## Ablation", "## How the numbers are computed"]
    assert text.index("- **command**: pytest") < text.index("- verdict: yes")
    path = write_json(results, summary, tmp_path / "q.json", sections={"ablation": {"holds": None}})
    assert json.loads(path.read_text())["sections"] == {"ablation": {"holds": None}}
    assert "sections" not in json.loads(write_json(results, summary, tmp_path / "r.json").read_text())
