"""The quality report: checkpoints recognised by their JSON, the paper's tables, verdicts computed from
the numbers (fed summaries where each claim holds and where it does not), and benchmarks/quality.py
end to end on tiny untrained checkpoints and tiny simulated cases."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest

from model.evaluation.paper_tables import (
    ablation_section,
    beats,
    comparison_section,
    generalisation_section,
    ordering,
    paired_difference,
)
from model.evaluation.steps_curve import recommend_steps, steps_section
from model.evaluation.trained_models import (
    describe_checkpoint,
    find_checkpoints,
    models_title,
    training_header,
)
from tests.support.model_toys import one_thread, tiny_checkpoint  # noqa: F401 - one_thread: autouse fixture

VARIANTS = ("ldm", "ldm-p", "ldm-ct", "ldm-p-ct")
TRAINING = {"autoencoder": {"steps": 300, "patch_size": [16, 32, 32], "batch_size": 2, "cases": 3},
            "denoiser": {"steps": 200, "patch_size": [16, 32, 32], "batch_size": 2, "cases": 3,
                         "recons": ["osem-a", "fbp-b"]},
            "seconds": 5400.0}


def _supervised_checkpoint(folder: Path) -> Path:
    import torch

    from model.networks.supervised_unet import SupervisedConfig, SupervisedUNet, save_supervised

    torch.manual_seed(0)
    config = SupervisedConfig(channels=(8, 16), res_blocks=1, norm_groups=4, patch_size=(8, 16, 16),
                              training={"steps": 150, "patch_size": [8, 16, 16], "batch_size": 4,
                                        "cases": 3, "dose": 0.1, "parameters": 12345, "seconds": 720.0})
    return save_supervised(folder / "supervised-unet.safetensors", SupervisedUNet(config).eval())


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """The four tiny untrained variants, a tiny supervised U-Net, and files that are no model."""
    folder = tmp_path_factory.mktemp("models")
    for variant in VARIANTS:
        tiny_checkpoint(folder, variant, training=TRAINING)
    _supervised_checkpoint(folder)
    stage = tmp_path_factory.mktemp("stage")  # an autoencoder-stage file: denoiser never trained
    ae = tiny_checkpoint(stage, "ldm-p", training={"autoencoder": {"steps": 3}})
    shutil.copy(ae, folder / "autoencoder.safetensors")
    shutil.copy(ae.with_suffix(".json"), folder / "autoencoder.json")
    (folder / "train_state.json").write_text(json.dumps({"meta": {"stage": "done"}}))
    (folder / "train_state.safetensors").write_bytes(b"not a model")
    return folder


# --- recognising checkpoints ----------------------------------------------------------------------


def test_checkpoints_are_recognised_by_their_json(models_dir: Path) -> None:
    found = {m.variant: m for m in find_checkpoints([models_dir])}
    assert list(found) == [*VARIANTS, "supervised"]  # paper's order; the stage file and the state skipped
    assert found["ldm-p-ct"].label == "uPETe (LDM-P-CT)" and found["ldm-ct"].label == "LDM-CT"
    assert found["supervised"].label == "Supervised U-Net" and found["supervised"].key == "supervised-unet"
    assert found["ldm"].key == "tiny-ldm" and found["ldm"].sampler_steps == 20
    assert describe_checkpoint(models_dir / "autoencoder.safetensors") is None
    with pytest.raises(ValueError, match="no trained model"):
        find_checkpoints([models_dir / "autoencoder.safetensors"])
    with pytest.raises(ValueError, match="does not exist"):
        find_checkpoints([models_dir / "missing.safetensors"])


def test_two_checkpoints_of_one_variant_are_refused(models_dir: Path, tmp_path: Path) -> None:
    for suffix in (".safetensors", ".json"):
        source = (models_dir / "tiny-ldm").with_suffix(suffix)
        shutil.copy(source, (tmp_path / "other-ldm").with_suffix(suffix))
    with pytest.raises(ValueError, match="two ldm checkpoints"):
        find_checkpoints([models_dir / "tiny-ldm.safetensors", tmp_path / "other-ldm.safetensors"])


def test_title_and_training_header(models_dir: Path) -> None:
    models = find_checkpoints([models_dir])
    assert models_title([]) == "Quality benchmark: classical baselines on simulated low-dose PET"
    title = models_title(models)
    assert "classical baselines on" in title and title.startswith("Quality benchmark: uPETe, its ablation")
    header = training_header(models)
    assert set(header) == {"model LDM", "model LDM-P", "model LDM-CT", "model uPETe (LDM-P-CT)",
                           "model Supervised U-Net"}
    line = header["model uPETe (LDM-P-CT)"]
    assert "`tiny-ldm-p-ct.safetensors`" in line and "autoencoder: 300 steps, patch 16×32×32" in line
    assert "denoiser: 200 steps" in line and "2 reconstruction settings" in line and "1.5 h (5400 s" in line
    sup = header["model Supervised U-Net"]
    assert "150 steps, patch 8×16×16, batch 4, 3 cases, dose 10 %" in sup and "0.2 h (720 s" in sup


# --- verdicts from the numbers --------------------------------------------------------------------


def _stats(value: float) -> dict:
    return {"mean": value, "std": 0.1, "n": 3}


def _summary(table: dict[float, dict[str, tuple[float, float, float]]]) -> dict:
    """A summarise()-shaped dict from ``{dose: {method: (psnr, ssim, suvmax bias)}}``."""
    per_dose = {}
    for dose, methods in table.items():
        per_dose[f"{dose:g}"] = {
            m: {"spet": {"psnr_paper": _stats(p - 1), "ssim_paper": _stats(s - 0.01)},
                "expectation": {"psnr_paper": _stats(p), "ssim_paper": _stats(s),
                                "lesions": {"suvmax_bias": _stats(b), "suvmean_bias": _stats(b / 2)}},
                "seconds": _stats(1.0)}
            for m, (p, s, b) in methods.items()}
    return {"per_dose": per_dose}


class _Results:
    records: list = []


VARIANT_KEYS = {v: f"k-{v}" for v in VARIANTS}


def test_ablation_ordering_is_computed() -> None:
    good = _summary({0.1: {"k-ldm": (23.0, 0.90, 0), "k-ldm-p": (24.0, 0.91, 0), "k-ldm-ct": (25.0, 0.92, 0),
                           "k-ldm-p-ct": (26.0, 0.93, 0)}})
    lines, data = ablation_section(_Results(), good, VARIANT_KEYS)
    text = "\n".join(lines)
    assert data["holds"] is True and "**Ablation ordering holds at 10 % (PSNR and SSIM): yes**" in text
    assert "| LDM-P-CT | 26.00 ± 0.10 | 0.9300 ± 0.1000 | 25.00 ± 0.10 |" in text  # expectation first
    bad = _summary({0.1: {"k-ldm": (23.0, 0.90, 0), "k-ldm-p": (25.5, 0.91, 0), "k-ldm-ct": (25.0, 0.92, 0),
                          "k-ldm-p-ct": (26.0, 0.93, 0)}})
    lines, data = ablation_section(_Results(), bad, VARIANT_KEYS)
    text = "\n".join(lines)
    assert data["holds"] is False and data["ordering"]["ssim_paper"]["holds"] is True
    assert "in PSNR at 10 % dose holds: no (LDM-P 25.50 ≥ LDM-CT 25.00)" in text
    assert "(PSNR and SSIM): no**" in text
    partial = {v: k for v, k in VARIANT_KEYS.items() if v != "ldm-ct"}
    _, data = ablation_section(_Results(), good, partial)
    assert data["holds"] is None and data["ordering"]["psnr_paper"]["missing"] == ["ldm-ct"]


def test_ordering_ties_break_it_and_nan_is_not_judged() -> None:
    assert ordering({"a": 1.0, "b": 1.0}, ("a", "b"))["holds"] is False
    assert ordering({"a": 1.0, "b": math.nan}, ("a", "b"))["holds"] is None


def test_paired_difference_over_cases() -> None:
    def rec(case: str, method: str, psnr: float) -> dict:
        return {"case": case, "dose": 0.1, "method": method, "refs": {"expectation": {"psnr_paper": psnr}}}

    records = [rec("a", "x", 20.0), rec("a", "y", 21.0), rec("b", "x", 30.0), rec("b", "y", 30.5),
               rec("c", "x", 25.0), rec("c", "y", 24.9)]
    d = paired_difference(records, "x", "y", 0.1, "psnr_paper")
    assert d["n"] == 3 and d["wins"] == 2 and d["mean"] == pytest.approx((1.0 + 0.5 - 0.1) / 3)


BASE = {"lpet": (20.0, 0.60, 0.30), "gaussian": (24.0, 0.80, -0.40), "bilateral": (24.5, 0.81, -0.35),
        "sup": (25.0, 0.82, -0.05)}
LABELS = {"lpet": "LPET", "gaussian": "Gaussian", "bilateral": "CT bilateral", "sup": "Supervised U-Net",
          "up": "uPETe (LDM-P-CT)"}


def _comparison(summary: dict) -> tuple[str, dict]:
    lines, data = comparison_section(summary, upete="up", supervised="sup",
                                     baselines=["gaussian", "bilateral"], labels=LABELS)
    return "\n".join(lines), data


def test_comparison_verdicts_when_upete_wins() -> None:
    summary = _summary({0.5: {**BASE, "up": (30.0, 0.95, 0.02)}, 0.1: {**BASE, "up": (26.0, 0.85, -0.04)}})
    text, data = _comparison(summary)
    assert "**uPETe beats every classical baseline in PSNR and SSIM at every dose: yes**" in text
    assert "**uPETe beats the supervised U-Net in PSNR and SSIM at 10 %: yes**" in text
    assert "**Mean lesion SUVmax bias of uPETe within ±10 % at 10 %: -4.0 %, yes**" in text
    assert ("LPET +30.0 % (no); Gaussian -40.0 % (no); CT bilateral -35.0 % (no); "
            "Supervised U-Net -5.0 % (yes)") in text
    # Every other method keeps its PSNR from 50 % to 10 % here; uPETe loses 4 dB (the LPET is no rival).
    assert "**uPETe loses the least PSNR as the dose falls from 50 % to 10 % (paper Fig. 2): no**" in text
    assert "(uPETe (LDM-P-CT) +4.00 dB; Gaussian +0.00 dB; CT bilateral +0.00 dB; Supervised U-Net" in text
    rows = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("| ") and "±" in line]
    assert rows == ["| LPET", "| Gaussian", "| CT bilateral", "| Supervised U-Net", "| uPETe (LDM-P-CT)"]


def test_comparison_verdicts_when_upete_loses_somewhere() -> None:
    summary = _summary({0.5: {**BASE, "up": (24.2, 0.95, 0.02)}, 0.1: {**BASE, "up": (26.0, 0.80, 0.15)}})
    text, data = _comparison(summary)
    assert data["beats_baselines_every_dose"]["failures"] == [
        "50 % PSNR: CT bilateral 24.50 ≥ 24.20", "10 % SSIM: Gaussian 0.8000 ≥ 0.8000",
        "10 % SSIM: CT bilateral 0.8100 ≥ 0.8000",
    ]
    assert "at every dose: no (where not: 50 % PSNR: CT bilateral 24.50 ≥ 24.20;" in text
    assert "**uPETe beats the supervised U-Net in PSNR and SSIM at 10 %: no (where not: 10 % SSIM:" in text
    assert "within ±10 % at 10 %: +15.0 %, no**" in text
    assert data["dose_loss"]["holds"] is True  # uPETe gains 1.8 dB from 50 % to 10 % here, the rest 0
    assert beats(summary, "up", [], [0.1], LABELS)["holds"] is None


def test_dose_loss_must_be_the_smallest_of_all() -> None:
    summary = _summary({0.5: {**BASE, "gaussian": (27.0, 0.8, 0), "up": (28.0, 0.9, 0)},
                        0.1: {**BASE, "up": (26.0, 0.85, 0)}})  # uPETe loses 2 dB, Gaussian 3, the rest 0
    _, data = _comparison(summary)
    assert data["dose_loss"]["losses"]["up"] == pytest.approx(2.0) and data["dose_loss"]["holds"] is False


def test_generalisation_drop_verdict() -> None:
    standard = _summary({0.1: {"lpet": (20.0, 0.6, 0), "up": (26.0, 0.9, 0), "sup": (27.0, 0.9, 0)}})
    held = _summary({0.1: {"lpet": (19.5, 0.6, 0), "up": (25.0, 0.9, 0), "sup": (24.0, 0.9, 0)}})
    lines, data = generalisation_section(standard, held, upete="up", supervised="sup", labels=LABELS)
    text = "\n".join(lines)
    assert "| 10 % | uPETe (LDM-P-CT) | 26.00 ± 0.10 | 25.00 ± 0.10 | +1.00 | +6.00 | +5.50 | +0.50 |" in text
    assert ("**uPETe's PSNR drop smaller than the supervised U-Net's at 10 %: yes (uPETe +1.00 dB, "
            "supervised U-Net +3.00 dB)**") in text
    assert data["verdict"]["gain_drop"]["holds"] is True
    held = _summary({0.1: {"lpet": (19.5, 0.6, 0), "up": (24.0, 0.9, 0), "sup": (26.5, 0.9, 0)}})
    _, data = generalisation_section(standard, held, upete="up", supervised="sup", labels=LABELS)
    assert data["verdict"]["drop"]["holds"] is False and data["verdict"]["gain_drop"]["holds"] is False
    _, data = generalisation_section(standard, held, upete="up", supervised=None, labels=LABELS)
    assert data["verdict"]["drop"]["holds"] is None


def test_recommended_steps_is_the_smallest_within_the_tolerance() -> None:
    keys = {5: "s5", 10: "s10", 20: "s20", 50: "s50"}
    summary = _summary({0.1: {"lpet": (20, 0.5, 0), "s5": (25.0, 0.9, 0), "s10": (25.85, 0.9, 0),
                              "s20": (25.9, 0.9, 0), "s50": (25.92, 0.9, 0)}})
    pick = recommend_steps(summary, keys)
    assert pick["steps"] == 10 and pick["best_steps"] == 50
    lines, data = steps_section(summary, keys)
    assert "- **Recommended sampler steps: 10 steps: the smallest within 0.1 dB" in "\n".join(lines)
    summary["per_dose"]["0.1"]["s10"]["expectation"]["psnr_paper"]["mean"] = 25.7
    assert recommend_steps(summary, keys)["steps"] == 20
    assert recommend_steps(summary, keys, dose=0.05)["steps"] is None


# --- end to end -----------------------------------------------------------------------------------


def _bench():
    script = Path(__file__).resolve().parents[3] / "benchmarks" / "quality.py"
    spec = importlib.util.spec_from_file_location("quality_bench", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_quality_benchmark_with_models(
    models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    argv = ["--cases", "1", "--val-cases", "1", "--shape", "8,48,48", "--doses", "0.5,0.1",
            "--methods", "lpet,gaussian", "--data", str(tmp_path / "data"), "--out", str(out),
            "--tune-slices", "0", "--quiet", "--models", str(models_dir), "--holdout-cases", "1",
            "--steps-curve", "2,3", "--device", "cpu", "--transfer-doses", "none"]
    assert _bench().main(argv) == 0
    printed = capsys.readouterr().out
    assert "recommended sampler steps: " in printed and "not written into any config" in printed
    assert sorted(p.name for p in (tmp_path / "data" / "test_holdout").iterdir()) == ["case_300000"]
    text = (out / "quality.md").read_text()
    assert text.startswith("# Quality benchmark: uPETe, its ablation variants (LDM, LDM-P, LDM-CT), "
                           "a supervised U-Net and classical baselines")
    assert "--models" in text and "--steps-curve 2,3" in text
    assert "- **model uPETe (LDM-P-CT)**: `tiny-ldm-p-ct.safetensors`; autoencoder: 300 steps" in text
    assert "- **model Supervised U-Net**: `supervised-unet.safetensors`; 150 steps" in text
    heads = [line for line in text.splitlines() if line.startswith("## ")]
    assert heads[:5] == ["## Ablation (paper Table 1)", "## Comparison (paper Table 2)",
                         "## Generalisation to reconstructions absent from training",
                         "## Sampling steps vs quality (LDM-P-CT, validation cases)",
                         "## How the numbers are computed"]
    header = text.split("\n## ")[0]
    assert header.rstrip().splitlines()[-1].startswith("- **wall time of this run**")
    for verdict in ("**Ablation ordering holds at 10 % (PSNR and SSIM): ",
                    "**uPETe beats every classical baseline in PSNR and SSIM at every dose: ",
                    "**Mean lesion SUVmax bias of uPETe within ±10 % at 10 %: ",
                    "**uPETe's PSNR drop smaller than the supervised U-Net's at 10 %: ",
                    "**Recommended sampler steps: "):
        assert verdict in text, verdict
    assert "![steps_curve](steps_curve.png)" in text and (out / "steps_curve.png").stat().st_size > 5000
    assert "- **ablation variants**: LDM, LDM-P, LDM-CT scored at 10 % only (--ablation-doses)" in text
    data = json.loads((out / "quality.json").read_text())
    # The ablation variants cost minutes per run on a CPU: scored at the table dose only by default.
    at_half = data["summary"]["per_dose"]["0.5"]
    assert {"tiny-ldm-p-ct", "supervised-unet"} <= set(at_half)
    assert not {"tiny-ldm", "tiny-ldm-p", "tiny-ldm-ct"} & set(at_half)
    assert {f"tiny-{v}" for v in VARIANTS} <= set(data["summary"]["per_dose"]["0.1"])
    _check_json_verdicts(data)


def _check_json_verdicts(data: dict) -> None:
    """The verdicts in quality.json agree with the summary's own numbers."""
    sections, per_dose = data["sections"], data["summary"]["per_dose"]["0.1"]
    psnr = {v: per_dose[f"tiny-{v}"]["expectation"]["psnr_paper"]["mean"] for v in VARIANTS}
    expected = all(psnr[a] < psnr[b] for a, b in zip(VARIANTS, VARIANTS[1:], strict=False))
    assert sections["ablation"]["ordering"]["psnr_paper"]["holds"] is expected
    ranked = {k: per_dose[k]["expectation"] for k in ("tiny-ldm-p-ct", "gaussian")}
    beat = all(ranked["tiny-ldm-p-ct"][m]["mean"] > ranked["gaussian"][m]["mean"]
               for m in ("psnr_paper", "ssim_paper"))
    assert sections["comparison"]["beats_baselines_every_dose"]["holds"] is (
        beat and not sections["comparison"]["beats_baselines_every_dose"]["failures"])
    assert sections["generalisation"]["verdict"]["drop"]["holds"] in (True, False)
    assert sections["steps"]["steps"] in (2, 3)
    assert set(sections["steps"]["summary"]["per_dose"]["0.1"]) == {"lpet", "tiny-ldm-p-ct@2steps",
                                                                   "tiny-ldm-p-ct@3steps"}
    held = sections["generalisation"]["holdout_summary"]["per_dose"]["0.1"]
    assert set(held) == {"lpet", "tiny-ldm-p-ct", "supervised-unet"}


def test_steps_curve_needs_the_full_model(models_dir: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--cases", "1", "--val-cases", "1", "--shape", "8,48,48", "--doses", "0.1", "--methods", "lpet",
            "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--quiet",
            "--checkpoint", str(models_dir / "tiny-ldm-p.safetensors"), "--steps-curve", "2"]
    assert _bench().main(argv) == 2
    assert "--steps-curve needs an LDM-P-CT checkpoint" in capsys.readouterr().err


def test_a_held_out_main_test_set_cannot_be_compared_with_itself(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--data", str(tmp_path), "--out", str(tmp_path / "out"), "--holdout-recons",
            "--holdout-cases", "2"]
    assert _bench().main(argv) == 2
    assert "would make both held out" in capsys.readouterr().err


def test_cache_version_includes_the_sampler_steps(models_dir: Path) -> None:
    from model.evaluation.evaluate import _version
    from model.evaluation.quality import checkpoint_method

    path = models_dir / "tiny-ldm-p-ct.safetensors"
    a = checkpoint_method(path, device="cpu", steps=2).at(0.1)
    b = checkpoint_method(path, device="cpu", steps=3).at(0.1)
    assert _version(a, "x") != _version(b, "x") and _version(a, "x").startswith(a.info.version)


def test_result_paths_append_their_suffixes_and_make_the_folder(tmp_path: Path) -> None:
    from model.evaluation.report import result_paths

    json_path, md_path = result_paths(tmp_path / "new" / "validate-0.25")
    assert (json_path.name, md_path.name) == ("validate-0.25.json", "validate-0.25.md")
    assert json_path.parent.is_dir()
