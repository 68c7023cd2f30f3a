"""Quality benchmark: the transfer set first, then every available method on held-out simulated cases.

    .venv/bin/python benchmarks/quality.py [--cases 10] [--val-cases 4] [--shape 64,192,192] ...

The trained-model report (ablation and comparison tables; each checkpoint with its JSON beside it):

    .venv/bin/python benchmarks/quality.py --checkpoint LDM.safetensors --checkpoint LDM-P.safetensors \
        --checkpoint LDM-CT.safetensors --checkpoint LDM-P-CT.safetensors \
        --checkpoint supervised-unet.safetensors --holdout-cases 10 --steps-curve 5,10,20,50 --quiet

LDM, LDM-P and LDM-CT are scored at the table dose only (``--ablation-doses``, default 0.1); uPETe and
the supervised U-Net at every dose.

0. The transfer set (benchmarks/transfer.py: a second generator's scanner styles, never trained or
   chosen on; ``--transfer-doses``, ``--transfer-cases``, ``--transfer-model``) through the node's path,
   dose unknown, against the noiseless expectation with the best Gaussian per case (truth in hand) as
   the rival: the report's first section, with the targets of the model named LDM-P-CT judged from the
   numbers; transfer.md / transfer.json beside quality.md hold every table of that run.
1. Simulates what is missing (model.dataset): validation cases with seeds 100000+ and test cases with
   seeds 200000+ (training seeds start at 0, so none overlap), each with its own reconstruction drawn
   from the standard pool (``--holdout-recons``: from the reconstructions held out of training).
2. Tunes every baseline per dose on the validation cases only (grid search on the paper's PSNR against
   the SPET, on each case's central ``--tune-slices`` slices).
3. Runs every method on the test cases at each dose (a model does not know the dose, as at the node)
   and ranks against the noiseless expectation, the SPET columns after; writes benchmarks/results/quality.md,
   quality.json, tuned_params.json and PNG figures, with the command, date, machine and settings.

Resumable: simulated cases, tuned parameters and each (case, dose, method) score are kept (in
``--data``, default data/quality/, git-ignored) and reused by a rerun. Later models join by name:
``--checkpoint model.safetensors`` or ``--models DIR`` (every trained model in DIR), recognised by
their JSON config: the diffusion variant (LDM, LDM-P, LDM-CT, LDM-P-CT = uPETe) or ``"kind":
"supervised"`` (the supervised U-Net); or ``--enhancer NAME=SPEC`` (any
:func:`model.enhance.load_enhancer` spec, built once per dose).

With models, the report opens with the paper's experiments (model.quality_paper), each with a verdict
computed from its numbers: the ablation (Table 1), the comparison (Table 2), and, when asked for,
generalisation to reconstructions absent from training (``--holdout-cases N``: a second test set,
seeds 300000+, reconstructed from model.dataset.HOLDOUT_RECONS) and sampler steps vs quality
(``--steps-curve 5,10,20,50``: LDM-P-CT on the *validation* cases; the recommended count is printed,
never written into a config).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

VAL_SEED0 = 100_000
TEST_SEED0 = 200_000
HOLDOUT_SEED0 = 300_000
DEFAULT_SHAPE = (64, 192, 192)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=10, help="test cases (seeds 200000+; default 10)")
    p.add_argument("--val-cases", type=int, default=4,
                   help="validation cases for tuning (seeds 100000+; default 4)")
    p.add_argument("--shape", default=",".join(map(str, DEFAULT_SHAPE)),
                   help="phantom grid z,y,x at 2 mm (default 64,192,192: 128 mm of trunk, 384 mm field)")
    p.add_argument("--doses", default="0.5,0.25,0.1,0.05,0.02", help="dose fractions (default: the paper's)")
    p.add_argument("--methods", default="lpet,gaussian,nlm,bm4d,bilateral", help="baselines to run")
    p.add_argument("--checkpoint", action="append", default=[], metavar="FILE",
                   help="a model checkpoint to evaluate as well; repeatable")
    p.add_argument("--models", action="append", default=[], metavar="DIR",
                   help="a folder of trained checkpoints (diffusion variants, supervised U-Net); repeatable")
    p.add_argument("--holdout-cases", type=int, default=0,
                   help="also score uPETe and the supervised U-Net on N cases reconstructed with held-out "
                   "settings (seeds 300000+, in DATA/test_holdout; default 0: none)")
    p.add_argument("--holdout-doses", default="0.1", help="doses of the held-out set (default 0.1)")
    p.add_argument("--steps-curve", default="", metavar="N,N,...",
                   help="LDM-P-CT at these sampler steps on the validation cases (e.g. 5,10,20,50)")
    p.add_argument("--steps-doses", default="0.1", help="doses of the steps curve (default 0.1)")
    p.add_argument("--ablation-doses", default="0.1", metavar="D,D,...|all",
                   help="doses at which LDM, LDM-P and LDM-CT are scored (default 0.1, the paper's table "
                   "dose: each diffusion run costs minutes on a CPU); uPETe and the supervised U-Net are "
                   "scored at every dose; 'all': every model at every dose")
    p.add_argument("--steps-cases", type=int, default=0,
                   help="validation cases of the steps curve (default 0: all --val-cases)")
    p.add_argument("--device", default="auto", help="torch device for the models (default auto)")
    p.add_argument("--enhancer", action="append", default=[], metavar="NAME=SPEC",
                   help="any enhancer load_enhancer() builds (e.g. unet=weights/unet.safetensors); "
                   "repeatable")
    p.add_argument("--tune-slices", type=int, default=32,
                   help="tune on each validation case's central N slices (0: all; default 32)")
    p.add_argument("--holdout-recons", action="store_true",
                   help="reconstruct test cases with the settings held out of training")
    p.add_argument("--data", default=str(ROOT / "data" / "quality"), help="simulated cases and caches")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="report folder")
    p.add_argument("--transfer-doses", default="0.02,0.05,0.1,0.25,0.5", metavar="D,D,...|none",
                   help="doses of the transfer set, the report's first section (default the paper's five; "
                   "'none' to leave it out)")
    p.add_argument("--transfer-cases", type=int, default=1, help="transfer cases per style (default 1)")
    p.add_argument("--transfer-model", action="append", default=[], metavar="NAME=CHECKPOINT",
                   help="a model on the transfer set (repeatable; default the shipped LDM-P-CT and LDM-P and "
                   "the supervised reference U-Net); the targets judge the one named LDM-P-CT")
    p.add_argument("--transfer-work", default=str(ROOT / "data" / "transfer"),
                   help="transfer outputs kept by model version and reused (default data/transfer, shared "
                   "with benchmarks/transfer.py)")
    p.add_argument("--note", action="append", default=[], help="a line for the report's header; repeatable")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _simulate_missing(
    folder: Path, seeds: list[int], *, shape: tuple[int, ...], doses: list[float], holdout: bool,
    progress: bool,
) -> float:
    """Simulate and save the cases of ``seeds`` not yet complete in ``folder``; returns seconds spent."""
    from tqdm import tqdm

    from model.simulation.dataset import HOLDOUT_RECONS, list_cases, recon_for_case, save_case, simulate_case

    done = {p.name for p in list_cases(folder)}
    todo = [s for s in seeds if f"case_{s}" not in done]
    started = time.perf_counter()
    for seed in tqdm(todo, desc=f"simulate {folder.name}", unit="case", disable=not progress or not todo):
        recon = recon_for_case(seed, HOLDOUT_RECONS) if holdout else None
        case = simulate_case(seed, shape=shape, doses=doses, recon=recon)
        save_case(case, folder / f"case_{seed}")
    return time.perf_counter() - started


def _case_summary(paths: list[Path]) -> str:
    """Per case: reconstruction, lesion count, weight (from meta.json only; arrays stay on disk)."""
    parts = []
    for path in paths:
        meta = json.loads((path / "meta.json").read_text())
        parts.append(f"{path.name}: {meta['recon_name']}, {len(meta['lesions'])} lesion(s), "
                     f"{meta['patient_weight_kg']:.0f} kg")
    return "; ".join(parts)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _command_line(argv: list[str]) -> str:
    """The command as typed, without the notes (they go into the header themselves)."""
    given, skip = [], False
    for item in argv:
        if skip or item.startswith("--note="):
            skip = False
        elif item == "--note":
            skip = True
        else:
            given.append(item)
    return ("python benchmarks/quality.py " + " ".join(given)).strip()


def _extra_methods(items: list[str]) -> dict:
    """``--enhancer NAME=SPEC`` → {name: PerDose}; raises ValueError on a malformed item."""
    from model.enhance import InferenceOptions, load_enhancer
    from model.evaluation.evaluate import PerDose

    extra = {}
    for item in items:
        name, _, spec = item.partition("=")
        if not spec:
            raise ValueError(f"--enhancer wants NAME=SPEC, found {item!r}")
        extra[name] = PerDose(
            lambda d, spec=spec: load_enhancer(spec, options=InferenceOptions(dose_fraction=d))
        )
    return extra


def _split_models(models: list, ablation_doses: str, device: str) -> tuple[list, dict]:
    """(models scored at every dose, {key: method} of the ablation-only variants at their doses)."""
    from model.evaluation.quality import checkpoint_method
    from model.evaluation.trained_models import SUPERVISED, UPETE

    if ablation_doses.strip().lower() == "all":
        return models, {}
    doses = _floats(ablation_doses)
    everywhere = [m for m in models if m.variant in (UPETE, SUPERVISED)]
    only = {m.key: checkpoint_method(m.path, device=device, doses=doses)
            for m in models if m.variant not in (UPETE, SUPERVISED)}
    return everywhere, only


def _seeded(folder: Path, seeds: list[int]) -> list[Path]:
    from model.simulation.dataset import list_cases

    return [p for p in list_cases(folder) if int(p.name.split("_")[1]) in seeds]


def _paper_runs(args: argparse.Namespace, models: list, val: list[Path], data: Path) -> tuple:
    """The held-out-reconstruction summary and the steps curve, when asked for (None otherwise)."""
    from model.evaluation.paper import score_holdout, score_steps
    from model.evaluation.trained_models import UPETE

    holdout = steps = None
    if args.holdout_cases:
        seeds = [HOLDOUT_SEED0 + i for i in range(args.holdout_cases)]
        # Only the doses the held-out table needs: every dose is one more reconstruction per case.
        _simulate_missing(data / "test_holdout", seeds, shape=args.shape_zyx, doses=args.holdout_dose_list,
                          holdout=True, progress=not args.quiet)
        holdout = score_holdout(models, _seeded(data / "test_holdout", seeds), args.holdout_dose_list,
                                cache_dir=data / "cache", device=args.device, progress=not args.quiet)
    if args.steps_curve:
        upete = next((m for m in models if m.variant == UPETE), None)
        if upete is None:
            raise ValueError("--steps-curve needs an LDM-P-CT checkpoint (--checkpoint or --models)")
        counts = [int(v) for v in args.steps_curve.split(",") if v.strip()]
        curve_cases = val[: args.steps_cases] if args.steps_cases else val
        steps = score_steps(upete, counts, curve_cases, _floats(args.steps_doses), cache_dir=data / "cache",
                            device=args.device, progress=not args.quiet)
    return holdout, steps


SUPERVISED_REFERENCE = ("Supervised U-Net (10 % pairs, old simulator, 31 min)",
                        ROOT / "training_runs" / "supervised" / "supervised-unet.safetensors")


def _transfer_models(specs: list[str]) -> dict[str, Path]:
    """``--transfer-model`` options, or the shipped pair and the supervised reference where it is."""
    from benchmarks.transfer import MODELS, parse_models

    if specs:
        return parse_models(specs)
    name, path = SUPERVISED_REFERENCE
    return {**MODELS, **({name: path} if path.is_file() else {})}


def _transfer_run(args: argparse.Namespace, command: str) -> tuple[list[str], dict[str, Any]]:
    """The transfer set through the node's path (benchmarks/transfer.py, its cache shared): the report's
    first section, and transfer.md / transfer.json beside quality.md with the full tables."""
    from benchmarks.transfer import run_transfer
    from benchmarks.transfer_report import target_roles, transfer_section, write_results
    from model.evaluation.transfer import STYLES

    if args.transfer_doses.strip().lower() == "none":
        return [], {}
    models = _transfer_models(args.transfer_model)
    load_before = [round(v, 2) for v in os.getloadavg()]
    started = time.time()
    rows, summary, run = run_transfer(models, styles=list(STYLES), cases=args.transfer_cases,
                                      doses=_floats(args.transfer_doses), work=Path(args.transfer_work),
                                      device=args.device)
    header = write_results(Path(args.out) / "transfer", command=command, load_before=load_before,
                           started=started, run=run, summary=summary, rows=rows, methods=list(models))
    return transfer_section(summary, header, target_roles(header["descriptions"]))


def _report_header(
    args: argparse.Namespace, command: str, *, load: float, test: list, models: list, ablation_only: dict,
    methods: list[str],
) -> dict[str, str]:
    """The report's header: how it was run, on what, with which simulation, baselines and models."""
    from model.enhancers.classical import METHODS
    from model.evaluation.machine import machine_description
    from model.evaluation.trained_models import training_header

    shape, data = args.shape_zyx, Path(args.data)
    grids = {m: dict(METHODS[m].grid) for m in methods if m in METHODS and METHODS[m].grid}
    return {
        "command": f"`{command}`",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{machine_description()}; load average {load:.1f} at the start (a shared machine: "
                   "timings are indicative)",
        "phantoms": f"{shape[0]}×{shape[1]}×{shape[2]} voxels of 2 mm (z, y, x), model.phantom; "
                    "test seeds 200000+, validation seeds 100000+"
                    + (", held-out-reconstruction test seeds 300000+" if args.holdout_cases else "")
                    + " (training uses seeds from 0)",
        "simulation": "model.simulation.dataset.simulate_case: resolution 4 mm, CT attenuation, "
                      "Poisson counts at standard dose, every dose a binomial thinning of that acquisition "
                      "(LPET and SPET share counts, as list-mode subsampling does); reconstruction per case "
                      + ("from the held-out pool" if args.holdout_recons else "from the standard pool"),
        "test case reconstructions": _case_summary(test),
        **({"held-out test case reconstructions": _case_summary(_seeded(
            data / "test_holdout", [HOLDOUT_SEED0 + i for i in range(args.holdout_cases)]))}
           if args.holdout_cases else {}),
        "baselines": "NLM 3³ patches ±3 search (scikit-image, fast mode); BM4D 'fast' profile on √activity "
                     "(hard thresholding only, 4-voxel steps, ±4 search); CT bilateral piecewise-linear "
                     "in HU (levels σr/2 apart); "
                     f"tuning grids: {grids}",
        "tuning": "per dose on the validation cases' "
                  + (f"central {args.tune_slices} slices" if args.tune_slices else "slices, all of them"),
        **training_header(models),
        **({"ablation variants": f"{', '.join(m.label for m in models if m.key in ablation_only)} scored at "
            f"{', '.join(f'{100 * d:g} %' for d in _floats(args.ablation_doses))} only (--ablation-doses)"}
           if ablation_only else {}),
        **{f"note {i + 1}" if len(args.note) > 1 else "note": n for i, n in enumerate(args.note)},
    }


def _record_wall_time(report: Path, *, total_s: float, simulation_s: float) -> None:
    """Add how long this invocation took (a resumed run counts only its own work) as the header's last
    line: the first section heading follows the header."""
    text = report.read_text().replace(
        "\n\n## ",
        f"\n- **wall time of this run**: {total_s / 60:.1f} min (simulation {simulation_s / 60:.1f} min); "
        "cached work from earlier runs is not counted\n\n## ", 1)
    report.write_text(text)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from model.evaluation.paper import paper_sections
    from model.evaluation.quality import LABELS, run_quality
    from model.evaluation.trained_models import find_checkpoints, models_title

    shape = args.shape_zyx = tuple(int(v) for v in args.shape.split(","))
    doses = _floats(args.doses)
    args.holdout_dose_list = _floats(args.holdout_doses)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    data = Path(args.data)
    started = time.perf_counter()
    load = os.getloadavg()[0]
    if args.holdout_cases and args.holdout_recons:
        print("error: --holdout-cases compares held-out reconstructions with the standard test set; "
              "--holdout-recons would make both held out", file=sys.stderr)
        return 2
    try:
        models = find_checkpoints([*args.checkpoint, *args.models])
        everywhere, ablation_only = _split_models(models, args.ablation_doses, args.device)
        extra = {**ablation_only, **_extra_methods(args.enhancer)}
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    sim_doses = sorted(set(doses), reverse=True)
    val_seeds = [VAL_SEED0 + i for i in range(args.val_cases)]
    test_seeds = [TEST_SEED0 + i for i in range(args.cases)]
    sim_s = _simulate_missing(data / "val", val_seeds, shape=shape, doses=sim_doses, holdout=False,
                              progress=not args.quiet)
    sim_s += _simulate_missing(data / "test", test_seeds, shape=shape, doses=sim_doses,
                               holdout=args.holdout_recons, progress=not args.quiet)
    val, test = _seeded(data / "val", val_seeds), _seeded(data / "test", test_seeds)
    try:
        holdout, steps = _paper_runs(args, models, val, data)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    command = _command_line(argv if argv is not None else sys.argv[1:])
    try:
        transfer_lines, transfer_data = _transfer_run(args, command)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    header = _report_header(args, command, load=load, test=test, models=models,
                            ablation_only=ablation_only, methods=methods)
    labels = {m.key: m.label for m in models}

    def sections(results: Any, summary: dict) -> tuple[list[str], dict]:
        lines, data = [], {}
        if models:
            lines, data = paper_sections(results, summary, models=models, labels={**LABELS, **labels},
                                         out_dir=Path(args.out), holdout=holdout, steps=steps)
        return [*transfer_lines, *lines], {**({"transfer": transfer_data} if transfer_data else {}), **data}

    results, summary = run_quality(
        test, Path(args.out), methods=methods, doses=doses, val_cases=val,
        checkpoints=[m.path for m in everywhere], extra_methods=extra, header=header,
        cache_dir=data / "cache", tune_slices=args.tune_slices or None, progress=not args.quiet,
        title=models_title(models), labels=labels, sections=sections if models or transfer_lines else None,
    )
    total = time.perf_counter() - started
    report = Path(args.out) / "quality.md"
    _record_wall_time(report, total_s=total, simulation_s=sim_s)
    if steps is not None:
        from model.evaluation.steps_curve import recommend_steps

        pick = recommend_steps(steps.summary, steps.keys)
        print(f"recommended sampler steps: {pick['steps']} (smallest within {pick['tolerance_db']:g} dB "
              f"of the best validation PSNR, {pick['best_psnr']:.2f} dB at {pick['best_steps']} steps); "
              "not written into any config")
    print(f"wrote {report} ({len(results.records)} records, {total / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
