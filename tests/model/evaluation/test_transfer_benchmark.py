"""benchmarks/transfer.py scores any checkpoint the node loads: here a tiny supervised U-Net on a tiny
scanner style, through the node's path, its outputs kept under its model version and reused."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model.evaluation.transfer import STYLES, Reconstruction, ScannerStyle
from model.networks.checkpoint import weights_digest
from model.networks.supervised_unet import SupervisedConfig, SupervisedUNet, save_supervised
from tests.support.model_toys import one_thread  # noqa: F401 - autouse fixture

TINY_STYLE = ScannerStyle("tiny", pixel_mm=6.0, matrix=64, slice_mm=6.0, n_slices=8, n_angles=32,
                          system_fwhm_mm=7.0, trues_per_slice=3e5,
                          recon=Reconstruction("osem", 2, 4, psf_fwhm_mm=7.0, postfilter_fwhm_mm=5.0))


def _bench(name: str = "transfer.py"):  # noqa: ANN202 - the script as a module
    script = Path(__file__).resolve().parents[3] / "benchmarks" / name
    spec = importlib.util.spec_from_file_location(f"bench_{script.stem}", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _supervised(path: Path, seed: int) -> Path:
    """A tiny supervised U-Net checkpoint on the style's own 6 mm grid (few tiles), not the identity."""
    torch.manual_seed(seed)
    config = SupervisedConfig(channels=(8, 16), res_blocks=1, norm_groups=4, patch_size=(8, 16, 16),
                              spacing_mm=6.0, scale_bqml=4000.0)
    model = SupervisedUNet(config)
    with torch.no_grad():
        model.out_conv.weight.normal_(0.0, 0.05)
    return save_supervised(path, model.eval())


def _strict_json(path: Path) -> dict:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{path.name} holds {constant}, not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_supervised_checkpoint_scored_and_cached_by_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(STYLES, "tiny", TINY_STYLE)
    first = _supervised(tmp_path / "a" / "supervised-unet.safetensors", seed=0)
    second = _supervised(tmp_path / "b" / "supervised-unet.safetensors", seed=1)
    work, out = tmp_path / "work", tmp_path / "out" / "transfer-0.5"  # a dot the suffix must not eat
    common = ["--cases", "1", "--styles", "tiny", "--doses", "0.5", "--device", "cpu",
              "--work", str(work), "--out", str(out)]
    name = "Supervised U-Net (toy)"
    bench = _bench()
    assert bench.main([*common, "--model", f"{name}={first}"]) == 0

    kept = work / f"{weights_digest(first)}-steps-default" / "tiny-900000-0.5.npz"
    assert kept.is_file()
    data = _strict_json(Path(f"{out}.json"))  # no NaN: the supervised U-Net places no LPET
    assert data["models"][name].endswith(f"(version {weights_digest(first)})")
    entry = data["summary"]["0.5"]["tiny"]
    assert entry["dose_equivalent"] == {name: None}
    assert np.isfinite(entry[name]["psnr"]) and entry[name]["psnr"] != entry["LPET"]["psnr"]
    text = Path(f"{out}.md").read_text()
    assert f"--model '{name}={first}'" in text  # copy-pastable
    assert f"**{name}** `" in text and "supervised residual 3D U-Net" in text
    assert f"| gap closed: {name} |" in text
    assert "Where the node placed" not in text  # no schedule, no placement table

    # A rerun reuses the first model's output (kept under its version) and infers only the new one.
    stamp = kept.stat().st_mtime_ns
    assert bench.main([*common, "--model", f"{name}={first}", "--model", f"other={second}"]) == 0
    assert kept.stat().st_mtime_ns == stamp
    assert (work / f"{weights_digest(second)}-steps-default" / "tiny-900000-0.5.npz").is_file()
    again = _strict_json(Path(f"{out}.json"))
    assert again["cases_reused"] == 1
    assert again["summary"]["0.5"]["tiny"][name] == entry[name]
    assert again["summary"]["0.5"]["tiny"]["other"]["psnr"] != entry[name]["psnr"]

    # A linked checkpoint is read as the node reads it: the JSON beside the link, not beside its target.
    linked = tmp_path / "c" / "supervised-unet.safetensors"
    linked.parent.mkdir()
    linked.symlink_to(second)
    config = json.loads(second.with_suffix(".json").read_text())
    linked.with_suffix(".json").write_text(json.dumps({**config, "training": {"note": "this link's own"}}))
    assert weights_digest(linked) != weights_digest(second)
    assert bench.main([*common, "--model", f"linked={linked}"]) == 0
    assert (work / f"{weights_digest(linked)}-steps-default" / "tiny-900000-0.5.npz").is_file()


def _entry(psnr: dict[str, float], gap: dict[str, float], lesion: float | None, lowest: float | None) -> dict:
    methods = {n: {"psnr": v, "gap_closed": gap.get(n, 0.0), "suvmax_mean": lesion, "suvmax_lowest": lowest,
                   "suvmax_worst": lowest, "suvmean_mean": lesion} for n, v in psnr.items()}
    return {"cases": 1, "lesions_scored": 0 if lesion is None else 2, **methods}


def test_targets_are_judged_from_the_numbers() -> None:
    bench = _bench("transfer_report.py")  # the report's half of the benchmark
    summary = {
        "0.1": {"a": _entry({"Gaussian": 40.0, "LDM-P-CT": 41.2, "LDM-P": 41.0, "sup": 41.5},
                            {"LDM-P-CT": 0.85}, -0.04, -0.10),
                "b": _entry({"Gaussian": 38.0, "LDM-P-CT": 38.9, "LDM-P": 38.7, "sup": 38.0},
                            {"LDM-P-CT": 0.81}, 0.02, -0.20)},
        "0.5": {"a": _entry({"Gaussian": 45.0, "LDM-P-CT": 45.6, "LDM-P": 45.9, "sup": 45.0}, {}, None, None),
                "b": _entry({"Gaussian": 44.0, "LDM-P-CT": 44.5, "LDM-P": 44.9, "sup": 44.0}, {}, None,
                            None)},
    }
    rows = bench.targets(summary, "LDM-P-CT", without_ct="LDM-P", supervised="sup")
    met = {r["target"]: r["met"] for r in rows}
    assert met["10 %: ≥ 80 % of the LPET-to-expectation gap closed on every style"] is True
    assert met["10 %: ≥ 1 dB above the best Gaussian on every style"] is False  # b: +0.9 dB
    assert met["50 %: ≥ 0.5 dB above the best Gaussian on every style"] is True  # +0.6 and +0.5
    lesions = [r for r in rows if r["target"].startswith("10 %: lesion")][0]
    assert lesions["met"] is False and "lowest -20.0 %" in lesions["measured"]  # the mean (-1 %) is fine
    assert [r["met"] for r in rows if r["target"].startswith("50 %: lesion")] == [None]  # none scored
    ct = [r for r in rows if r["target"].startswith("LDM-P-CT ≥ LDM-P")][0]
    assert ct["met"] is False and "behind at 1 of 2 doses: 50 % (-0.35 dB)" in ct["measured"]
    sup = [r for r in rows if "ahead of sup" in r["target"]][0]
    assert sup["met"] is False and "10 % 1 of 2, 50 % 2 of 2" in sup["measured"]

    header = {"models": {"LDM-P-CT": "x", "LDM-P": "y", "sup": "z"}, "seeds": [900000]}
    lines, data = bench.transfer_section(summary, header, {"model": "LDM-P-CT", "without_ct": "LDM-P"})
    text = "\n".join(lines)
    assert "### Targets of LDM-P-CT (2 of 6 met)" in text and len(data["targets"]) == 6
    assert "| b | +0.90 (+81.0 %) | +0.50 (+0.0 %) |" in text  # LDM-P-CT over the best Gaussian
