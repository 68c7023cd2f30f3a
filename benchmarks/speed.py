"""Wall time of the `upete enhance` path by stage, peak RSS (and on CUDA GPU time and memory).

    .venv/bin/python benchmarks/speed.py [--checkpoint F] [--shape 160,256,256] [--steps N]
        [--threads N] [--device cpu|cuda|auto] [--work DIR] [--verify-shape 32,96,96] [--no-ratio]
        [--precision auto|fp32|bf16] [--no-nlm]

Data: one simulated case (``model.simulation.dataset.simulate_case``, 10 % dose, MLEM) of ``--shape``
voxels at 2 mm written as a PET DICOM series, and its CT resampled to 1 mm in-plane (512×512 for 256×256)
written as a CT series; cached in ``--work`` so a rerun (e.g. with the trained ``--checkpoint``)
skips the simulation. The measured run is a child process (so its peak RSS is the enhance path's
alone) doing what ``upete enhance`` does: load the model, :func:`dicomnode.pipeline.enhance_series`
(read DICOM → CT onto the PET grid → enhancer → write DICOM), the enhancer reporting its own stages.

Without ``--checkpoint`` it measures the shipped uPETe model (``model/weights/upete-ldm-p-ct``) with
its default sampler steps; where no model ships it builds a **randomly initialised** checkpoint of the
planned architecture (speed does not depend on weight values).

``--verify-shape``: the optimised inference settings against the unoptimised ones (tiles of 2, no
CT-air skip, no crop to the body, float32) on a crop of the same case, same model: max |difference| /
dynamic range, PSNR of both against the standard-dose PET, and each lesion's SUVmax change.
``--no-ratio`` skips the latent vs full-resolution denoiser step comparison. Unless ``--no-nlm``,
non-local means is timed on the same volume in the same run (the target: under half its time).
Writes ``benchmarks/results/speed.md`` and ``speed.json`` (``--out-name``: another name).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TARGET_CPU_S, TARGET_RSS_GB, TARGET_GPU_S = 60.0, 4.0, 5.0
#: The model's wall time must be under this fraction of non-local means' on the same volume.
TARGET_NLM_FRACTION = 0.5
#: The planned shipped architecture.
PLANNED = dict(ae_channels=(16, 32), latent_channels=4, unet_channels=(32, 64, 64), patch_size=(32, 48, 48))
STAGES = ["read DICOM", "resample", "normalise", "encode", "sample", "decode", "resample back", "write DICOM"]


def machine(threads: int) -> dict:
    """Cores, CPU model, load average, torch threads, versions and date: what a result depends on."""
    import torch

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    load = [round(v, 2) for v in os.getloadavg()]
    return {"cores": os.cpu_count(), "cpu": cpu, "gpu": gpu, "load_average": load,
            "torch_threads": threads, "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


# --- data and model ----------------------------------------------------------------------------


def make_case(work: Path, shape: tuple[int, int, int], seed: int = 0) -> dict:
    """Simulate (once) and write the PET (2 mm) and CT (1 mm in-plane) series; returns their folders."""
    from scipy import ndimage

    from dicomnode.testing.scanner import StudyInfo, write_ct_series, write_pet_series
    from model.simulation.dataset import simulate_case

    folder = work / f"case-{seed}-{'x'.join(map(str, shape))}"
    arrays = folder / "arrays.npz"
    if not arrays.is_file():
        started = time.perf_counter()
        case = simulate_case(seed, shape=shape, doses=(0.1,))
        study = StudyInfo()
        write_pet_series(folder / "pet", case.lpet_bqml[0.1], spacing_mm=(2.0, 2.0, 2.0), study=study,
                         dose_fraction_note=0.1)
        # The CT at 1 mm in-plane (512×512 for a 256×256 PET), as a PET/CT's CT usually is.
        ct = ndimage.zoom(case.ct_hu, (1, 2, 2), order=1)
        write_ct_series(folder / "ct", ct, spacing_mm=(2.0, 1.0, 1.0), origin_mm=(0.0, -0.5, -0.5),
                        study=study)
        np.savez(arrays, lpet=case.lpet_bqml[0.1], spet=case.spet_bqml, ct=case.ct_hu,
                 lesions=case.lesion_labels)
        print(f"simulated and wrote the case in {time.perf_counter() - started:.0f} s", flush=True)
    return {"pet": str(folder / "pet"), "ct": str(folder / "ct"), "arrays": str(arrays)}


def random_checkpoint(work: Path) -> Path:
    """A randomly initialised checkpoint of the planned architecture (speed ignores weight values)."""
    import torch

    from model.networks.checkpoint import save_checkpoint
    from model.networks.noise_level import NoiseCurve
    from model.networks.upete_model import UPETeModel, default_config

    path = work / "random-ldm-p-ct.safetensors"
    if path.is_file():
        return path
    t = (0.0, 100.0, 200.0, 300.0, 400.0)
    curve = NoiseCurve(t=t, dose=tuple(1e-3 ** (v / 400) for v in t), latent_sigma=(0.1, 0.2, 0.4, 0.8, 1.6),
                       noise_index=(0.01, 0.05, 0.2, 0.8, 3.0))
    config = default_config("ldm-p-ct", **PLANNED, noise_curve=curve, latent_scale=1.0,
                            training={"denoiser": {"steps": 1}, "note": "random initialisation (benchmark)"})
    torch.manual_seed(0)
    return save_checkpoint(path, UPETeModel(config))


# --- the measured child ------------------------------------------------------------------------


def measure(args: argparse.Namespace) -> dict:
    """One `upete enhance` run in this (fresh) process: stages, peak RSS, GPU time and memory."""
    import torch

    from dicomnode.config import OutputSettings
    from dicomnode.folders import find_series
    from dicomnode.pipeline import enhance_series
    from model.enhance import InferenceOptions, load_enhancer

    started = time.perf_counter()
    options = InferenceOptions(device=args.device, steps=args.steps, dose_fraction=args.dose_fraction,
                               **json.loads(args.settings))
    enhancer = load_enhancer(args.checkpoint, options=options)
    load_s = time.perf_counter() - started
    torch.set_num_threads(args.threads)  # after the load, which picks the threads a node would use
    cuda = enhancer.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    pet, ct = find_series(args.pet, "PT"), find_series(args.ct, "CT")
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        result = enhance_series(pet, ct, enhancer, out, output=OutputSettings())
        total = time.perf_counter() - started
    inner, outer = result.enhance_seconds, result.seconds_by_stage
    stages = {
        "read DICOM": outer["load"],
        "resample": outer.get("resample", 0.0) + inner.get("resample", 0.0),
        "normalise": inner.get("normalise", 0.0),
        "encode": inner.get("encode", 0.0),
        "sample": inner.get("sample", 0.0),
        "decode": inner.get("decode", 0.0),
        "resample back": inner.get("resample_back", 0.0),
        "write DICOM": outer["write"],
    }
    stages["other (tiling, blending)"] = max(outer["enhance"] - sum(inner.values()), 0.0)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report = {"model_load_s": load_s, "total_s": total, "stages_s": stages, "peak_rss_bytes": peak_rss,
              "tiles": enhancer.tile_counts, "steps": enhancer.steps,
              "sampling": enhancer.sampling, "dose_fraction": args.dose_fraction,
              "device": str(enhancer.device)}
    if cuda:
        report["gpu_s"] = inner.get("encode", 0.0) + inner.get("sample", 0.0) + inner.get("decode", 0.0)
        report["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    return report


def run_child(
    args: argparse.Namespace, case: dict, checkpoint: Path, settings: dict
) -> tuple[dict, list[str]]:
    command = [sys.executable, str(Path(__file__).resolve()), "--measure", "--checkpoint", str(checkpoint),
               "--pet", case["pet"], "--ct", case["ct"], "--threads",
               str(args.threads), "--device", args.device, "--settings", json.dumps(settings)]
    if args.steps is not None:
        command += ["--steps", str(args.steps)]
    if args.dose_fraction is not None:
        command += ["--dose-fraction", str(args.dose_fraction)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"measured run failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), command


# --- latent vs full resolution, and the equivalence check ----------------------------------------


def cost_ratio(checkpoint: Path, threads: int) -> dict:
    """One denoiser step on a latent tile vs a same-width U-Net on the same tile at full resolution."""
    import dataclasses

    import torch

    from model.networks.checkpoint import load_checkpoint
    from model.networks.unet import UNet

    torch.set_num_threads(threads)
    model = load_checkpoint(checkpoint).eval()
    config = model.config
    f = config.autoencoder.downsample_factor
    patch = config.patch_size
    latent = tuple(p // f for p in patch)
    full_cfg = dataclasses.replace(config.unet, in_channels=1, out_channels=1, ct_channels=1)
    full = UNet(full_cfg).eval()

    def seconds(fn, repeat: int) -> float:  # noqa: ANN001
        fn()
        started = time.perf_counter()
        for _ in range(repeat):
            fn()
        return (time.perf_counter() - started) / repeat

    with torch.inference_mode():
        z = torch.randn(1, config.unet.in_channels, *latent)
        zc = torch.randn(1, config.unet.ct_channels, *latent)
        t = torch.full((1,), 133)
        x, xc = torch.randn(1, 1, *patch), torch.randn(1, 1, *patch)
        latent_s = seconds(lambda: model.diffusion.unet(z, t, zc if config.unet.uses_ct else None), 5)
        full_s = seconds(lambda: full(x, t, xc if full_cfg.uses_ct else None), 1)
    return {"tile_voxels": list(patch), "latent_voxels": list(latent), "latent_step_s": latent_s,
            "full_resolution_step_s": full_s, "ratio": full_s / latent_s}


def verify(
    checkpoint: Path, arrays: str, shape: tuple[int, int, int], steps: int, threads: int, dose: float | None,
    settings: dict,
) -> dict:
    """Optimised (the run's ``settings``) vs unoptimised inference on a crop of the case, same model."""
    import torch

    from model.enhance import InferenceOptions, load_enhancer
    from model.evaluation.metrics import psnr

    data = np.load(arrays)
    lpet, spet, ct = data["lpet"], data["spet"], data["ct"]
    z0 = (lpet.shape[0] - shape[0]) // 2
    # A crop through the body centre, reaching out into air (so the CT-air skip has tiles to skip).
    y0, x0 = (lpet.shape[1] - shape[1]) // 2, 0
    crop = (slice(z0, z0 + shape[0]), slice(y0, y0 + shape[1]), slice(x0, x0 + shape[2]))
    lpet, spet, ct = lpet[crop], spet[crop], ct[crop]
    outputs, seconds = {}, {}
    unoptimised = {"tile_batch": 2, "skip_air_ct": False, "crop_to_body": False, "precision": "fp32"}
    variants = {"unoptimised": unoptimised, "optimised": settings}
    for name, chosen in variants.items():
        options = InferenceOptions(device="cpu", steps=steps, dose_fraction=dose, **chosen)
        enhancer = load_enhancer(str(checkpoint), options=options)
        torch.set_num_threads(threads)  # after the load, which picks the threads a node would use
        started = time.perf_counter()
        outputs[name] = enhancer.enhance_array(lpet, ct, spacing_mm=(2.0, 2.0, 2.0))
        seconds[name] = time.perf_counter() - started
    a, b = outputs["unoptimised"], outputs["optimised"]
    lesions = data["lesions"][crop] if "lesions" in data.files else np.zeros(a.shape, dtype=np.uint16)
    # Each lesion's SUVmax (its hottest voxel) with the optimised path vs the unoptimised one, in %.
    lesion_change = [100.0 * (float(b[lesions == k].max()) / float(a[lesions == k].max()) - 1.0)
                     for k in np.unique(lesions) if k]
    span = float(spet.max() - spet.min())
    body = ct > -900.0  # the CT-air skip never touches these voxels: only busy tiles cover them
    out_range = max(float(a.max() - a.min()), 1e-12)
    return {
        "shape": list(shape), "steps": steps, "seconds": seconds, "lesion_suvmax_change_pct": lesion_change,
        "max_abs_diff_over_range": float(np.abs(a - b).max() / out_range),
        "max_abs_diff_in_body_over_range": float(np.abs(a - b)[body].max() / out_range),
        "psnr_unoptimised_db": psnr(a, spet, data_range=span),
        "psnr_optimised_db": psnr(b, spet, data_range=span),
        "psnr_body_unoptimised_db": psnr(a, spet, data_range=span, mask=body),
        "psnr_body_optimised_db": psnr(b, spet, data_range=span, mask=body),
    }


def nlm_seconds(arrays: str) -> dict:
    """Non-local means (the classical baseline, default parameters) on the same PET volume, timed.

    On the array alone (no DICOM reading or writing): the model's total includes them, so the
    comparison favours non-local means by those few seconds.
    """
    from model.enhancers.classical import make_baseline

    lpet = np.load(arrays)["lpet"]
    enhancer = make_baseline("nlm")
    started = time.perf_counter()
    enhancer.enhance_array(lpet, spacing_mm=(2.0, 2.0, 2.0))
    return {"seconds": time.perf_counter() - started, "version": enhancer.info.version}


# --- report --------------------------------------------------------------------------------------


def write_report(report: dict, name: str = "speed") -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    run = report["run"]
    m = report["machine"]
    gb = run["peak_rss_bytes"] / 1e9
    lines = [
        "# Speed of `upete enhance`", "",
        f"Command: `{report['command']}`", "",
        f"Machine: {m['cores']} cores ({m['cpu']}), GPU: {m['gpu'] or 'none'}; torch {m['torch']}, "
        f"{m['torch_threads']} torch thread(s); load average before {report['load_before']}, after "
        f"{m['load_average']} (a shared machine: other jobs add to the load); {m['date']}.", "",
        f"Volume: PET {report['shape'][1]}×{report['shape'][2]}×{report['shape'][0]} at 2 mm (simulated, "
        "10 % dose, MLEM), CT 1 mm in-plane; "
        f"model: {report['model']}; {run['steps']} sampling steps (t* = {run['sampling'].get('t_start')} "
        f"from dose fraction {run['dose_fraction']}, {run['sampling'].get('evaluations')} denoiser "
        f"evaluations per tile), device {run['device']}; tiles: {run['tiles']}; inference settings "
        f"{report['settings'] or 'default'}.", "",
        "| stage | seconds |", "|---|---:|",
        *[f"| {k} | {v:.2f} |" for k, v in run["stages_s"].items()],
        f"| **total** (model load {run['model_load_s']:.1f} s not included) | **{run['total_s']:.1f}** |", "",
        f"Peak RSS of the process (model load included): {gb:.2f} GB.", "",
    ]
    if "gpu_s" in run:
        lines += [f"GPU time (encode + sample + decode, synchronised): {run['gpu_s']:.2f} s; peak GPU memory "
                  f"{run['gpu_peak_bytes'] / 1e9:.2f} GB.", ""]
    on_gpu = run["device"].startswith("cuda")
    lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    nlm = report.get("nlm")
    if on_gpu:
        lines.append(f"| GPU ≤ {TARGET_GPU_S:g} s per study | {run['total_s']:.1f} s | "
                     f"{'yes' if run['total_s'] <= TARGET_GPU_S else 'no'} |")
    else:
        lines += [
            f"| 2-core CPU ≤ {TARGET_CPU_S:g} s per study | {run['total_s']:.1f} s | "
            f"{'yes' if run['total_s'] <= TARGET_CPU_S else 'no'} |",
            f"| peak RSS ≤ {TARGET_RSS_GB:g} GB | {gb:.2f} GB | {'yes' if gb <= TARGET_RSS_GB else 'no'} |",
            f"| GPU ≤ {TARGET_GPU_S:g} s per study | not measurable here (no GPU) | — |",
        ]
    if nlm:
        fraction = run["total_s"] / nlm["seconds"]
        lines.append(f"| < {TARGET_NLM_FRACTION:g} × non-local means' time on the same volume, same run "
                     f"(NLM {nlm['version']}: {nlm['seconds']:.1f} s) | {fraction:.2f} × | "
                     f"{'yes' if fraction < TARGET_NLM_FRACTION else 'no'} |")
    if "ratio" in report:
        r = report["ratio"]
        lines += ["", "## Latent vs full resolution", "",
                  f"One denoiser step on a training tile of {'×'.join(map(str, r['tile_voxels']))} voxels: "
                  f"on its latent ({'×'.join(map(str, r['latent_voxels']))}) "
                  f"{r['latent_step_s'] * 1000:.0f} ms, "
                  f"a same-width U-Net (same channels, levels and CT attention) at full resolution "
                  f"{r['full_resolution_step_s'] * 1000:.0f} ms: **{r['ratio']:.1f}×** the cost."]
    if "verify" in report:
        v = report["verify"]
        changes = v["lesion_suvmax_change_pct"]
        lesion_text = ", ".join(f"{c:+.2f} %" for c in changes) or "no lesion in the crop"
        lines += ["", "## Optimised vs unoptimised output", "",
                  f"Same model and seed, crop {'×'.join(map(str, v['shape']))} of the case, "
                  f"{v['steps']} steps; unoptimised = 2 tiles per call, every tile run, the whole field "
                  "of view, float32. "
                  f"max |optimised − unoptimised| = {v['max_abs_diff_over_range']:.2e} of the output range "
                  f"over the volume, {v['max_abs_diff_in_body_over_range']:.2e} inside the body "
                  "(CT > −900 HU). "
                  f"PSNR against the standard-dose PET {v['psnr_unoptimised_db']:.3f} dB (unoptimised) vs "
                  f"{v['psnr_optimised_db']:.3f} dB (optimised), a difference of "
                  f"{abs(v['psnr_unoptimised_db'] - v['psnr_optimised_db']):.3f} dB (limit 0.1 dB); "
                  f"inside the body {v['psnr_body_unoptimised_db']:.3f} vs "
                  f"{v['psnr_body_optimised_db']:.3f} dB. "
                  f"Lesion SUVmax, optimised vs unoptimised: {lesion_text} (limit ±1 %). "
                  f"Times: {v['seconds']['unoptimised']:.1f} s vs {v['seconds']['optimised']:.1f} s."]
    lines += ["", *report.get("notes", [])]
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="model .safetensors (default: shipped model, else random init)")
    parser.add_argument("--shape", default="160,256,256", help="PET voxels z,y,x at 2 mm")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the checkpoint's)")
    parser.add_argument("--dose-fraction", type=float, default=0.1,
                        help="model.dose_fraction (the case is simulated at 10 %%; 0 = estimate from noise)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "upete-speed"))
    parser.add_argument("--verify-shape", default="32,256,256", help="crop for the check ('' = skip)")
    parser.add_argument("--overlap", type=float, help="tile overlap (default: the checkpoint's)")
    parser.add_argument("--tile-batch", type=int, help="tiles per denoiser call (default: the enhancer's)")
    parser.add_argument("--verify-steps", type=int, default=5)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), help="(default: the enhancer's)")
    parser.add_argument("--no-nlm", action="store_true", help="skip timing non-local means on the volume")
    parser.add_argument("--no-ratio", action="store_true")
    parser.add_argument("--note", action="append", default=[], help="a line added to the report")
    parser.add_argument("--out-name", default="speed", help="results file name (benchmarks/results/NAME.md)")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pet", help=argparse.SUPPRESS)
    parser.add_argument("--ct", help=argparse.SUPPRESS)
    parser.add_argument("--settings", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import torch

    args.threads = args.threads or torch.get_num_threads()
    args.dose_fraction = args.dose_fraction or None
    if args.measure:
        print(json.dumps(measure(args)))
        return 0
    load_before = [round(v, 2) for v in os.getloadavg()]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shape = tuple(int(v) for v in args.shape.split(","))
    case = make_case(work, shape)  # type: ignore[arg-type]
    shipped = ROOT / "model" / "weights" / "upete-ldm-p-ct.safetensors"
    if args.checkpoint:
        checkpoint, model = Path(args.checkpoint), f"checkpoint {Path(args.checkpoint).name}"
    elif shipped.is_file():
        checkpoint, model = shipped, f"shipped model {shipped.name}"
    else:
        checkpoint = random_checkpoint(work)
        model = ("**randomly initialised** checkpoint of the planned shipped architecture (LDM-P-CT, "
                 "AE (16, 32) f=2, 4 latent channels, U-Net (32, 64, 64), CT attention at the two "
                 "coarsest levels, training patch 32×48×48): no model is shipped yet; speed does not "
                 "depend on weights")
    settings = {}
    if args.overlap is not None:
        settings["tile_overlap"] = args.overlap
    if args.tile_batch is not None:
        settings["tile_batch"] = args.tile_batch
    if args.precision is not None:
        settings["precision"] = args.precision
    run, _ = run_child(args, case, checkpoint, settings)
    argv_used = argv if argv is not None else sys.argv[1:]
    report = {"command": " ".join([".venv/bin/python benchmarks/speed.py", *argv_used]),
              "shape": list(shape), "model": model, "run": run, "load_before": load_before,
              "notes": args.note, "settings": settings}
    if not args.no_nlm:
        report["nlm"] = nlm_seconds(case["arrays"])
    if not args.no_ratio:
        report["ratio"] = cost_ratio(checkpoint, args.threads)
    if args.verify_shape:
        vshape = tuple(int(v) for v in args.verify_shape.split(","))
        report["verify"] = verify(checkpoint, case["arrays"], vshape, args.verify_steps,  # type: ignore[arg-type]
                                  args.threads, args.dose_fraction, settings)
    report["machine"] = machine(args.threads)
    print(write_report(report, args.out_name).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
