"""``upete evaluate``: score enhancers on simulated cases (PSNR, SSIM, NRMSE, lesion SUV, liver CoV)."""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "evaluate",
        help="score classical baselines and model checkpoints on simulated cases",
        description="Run every method on the low-dose PET of each case in --data (folders written by "
        "`upete simulate`) at each dose, score it against the standard-dose PET and the noiseless "
        "expectation (PSNR and SSIM as in the paper and as UDPET, NRMSE, lesion SUVmax/SUVmean bias, "
        "liver CoV, fraction of the LPET-to-ceiling gap closed) and write quality.md, quality.json and "
        "PNG figures into --out. With --val, baseline parameters are tuned per dose on those cases first "
        "(never on --data). Finished work is cached in --out/cache: a rerun resumes.",
    )
    parser.add_argument("--data", metavar="DIR", required=True, help="test cases (one folder per case)")
    parser.add_argument("--out", metavar="DIR", required=True, help="folder for the report, JSON and figures")
    parser.add_argument("--methods", default="lpet,gaussian,nlm,bm4d,bilateral",
                        help="comma-separated baselines: lpet, gaussian, nlm, bm4d, bilateral "
                        "(default: all)")
    parser.add_argument("--checkpoint", metavar="FILE", action="append", default=[],
                        help="a model checkpoint (.safetensors) to evaluate too; repeatable")
    parser.add_argument("--doses", default="0.5,0.25,0.1,0.05,0.02",
                        help="comma-separated dose fractions (default: the paper's 0.5,0.25,0.1,0.05,0.02)")
    parser.add_argument("--val", metavar="DIR", help="validation cases to tune the baselines on, per dose")
    parser.add_argument("--tune-slices", type=int, default=32, metavar="N",
                        help="tune on each validation case's central N slices (0: all; default 32)")
    parser.add_argument("--max-cases", type=int, metavar="N", help="use only the first N test cases")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, found {text!r}") from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise ValueError(f"{what} must be fractions in (0, 1], found {text!r}")
    return values


def _command_line(args: argparse.Namespace) -> str:
    """The command as it would be typed again (rebuilt from the parsed arguments)."""
    parts = ["upete evaluate", f"--data {args.data}", f"--out {args.out}", f"--methods {args.methods}",
             f"--doses {args.doses}"]
    parts += [f"--checkpoint {c}" for c in args.checkpoint]
    if args.val:
        parts += [f"--val {args.val}", f"--tune-slices {args.tune_slices}"]
    if args.max_cases:
        parts.append(f"--max-cases {args.max_cases}")
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    try:
        import matplotlib  # noqa: F401 - the figures need it; it comes with the "bench" extra
    except ImportError:
        print("error: upete evaluate draws figures with matplotlib: pip install 'upete-node[bench]'",
              file=sys.stderr)
        return 2
    # Imported here so `upete --help` stays fast.
    from model.evaluation.quality import machine_description, run_quality
    from model.simulation.dataset import list_cases

    try:
        doses = _floats(args.doses, "--doses")
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        test = list_cases(Path(args.data))
        if args.max_cases:
            test = test[: args.max_cases]
        val = list_cases(Path(args.val)) if args.val else []
        checkpoints = [Path(c) for c in args.checkpoint]
        for path in checkpoints:
            if not path.is_file():
                raise ValueError(f"checkpoint {path} does not exist")
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not test:
        print(f"error: no cases in {args.data}", file=sys.stderr)
        return 2
    header = {
        "command": _command_line(args),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_description(),
        "doses": ", ".join(f"{100 * d:g} %" for d in doses),
    }
    try:
        _, summary = run_quality(
            test, Path(args.out), methods=methods, doses=doses, val_cases=val, checkpoints=checkpoints,
            header=header, tune_slices=args.tune_slices or None, progress=not args.quiet,
            title="Evaluation",
        )
    except (ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    n_methods = len(next(iter(summary["per_dose"].values()), {}))
    report = Path(args.out) / "quality.md"
    print(f"ok: {len(test)} case(s) x {len(doses)} dose(s) x {n_methods} method(s) -> {report}")
    return 0
