"""Load: several scanners send whole PET/CT studies to one `upete serve` at once, while jobs run.

    .venv/bin/python benchmarks/load.py [--studies 8] [--pet-slices 96] [--pet-size 128]
                                        [--ct-slices 96] [--ct-size 256]

Each of N DCMTK ``storescu`` processes (one association each, started ``--stagger-s`` apart) sends its own
synthetic study (dicomnode.testing.scanner: CT series then PET series, distinct Study/Series/SOP UIDs) to a
node running the ``classical:gaussian`` model, whose destination is DCMTK ``storescp``. A study's
PET is complete as soon as its NumberOfSlices instances are in, so the first jobs run while the other
associations are still sending. Checked, then recorded in benchmarks/results/load.md:

- every instance storescu sent (exit status 0: every C-STORE acknowledged) is in the node's index;
- every study gets exactly one job, and every job ends ``done``;
- no mix-up: each derived series at the PACS is in its own study, references exactly its own PET
  series' SOP Instance UIDs, one derived instance per source slice;
- throughput (instances/s from the first association's start to the last one's end) and the node's
  peak RSS over the whole run (VmHWM, reset just before sending).

tests/system/test_load.py runs the same check on 4 small studies.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from dicomnode.testing.load import make_studies, run_load  # noqa: E402
from model.evaluation.machine import machine_description  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "load.md"
READING = [
    "Times count from the start of the first association; instances/s is over the whole receive (from",
    "the first association's start to the last one's end, stagger included), with the node storing",
    "durably (fsync per instance) while its worker already runs the first jobs. The CPU (2 cores) was",
    "shared with other work, so treat it as a floor, not a capacity figure.",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=8, help="concurrent associations, one study each")
    parser.add_argument("--pet-slices", type=int, default=96)
    parser.add_argument("--pet-size", type=int, default=128, help="PET rows = columns")
    parser.add_argument("--ct-slices", type=int, default=96)
    parser.add_argument("--ct-size", type=int, default=256, help="CT rows = columns")
    parser.add_argument("--stagger-s", type=float, default=1.0, help="seconds between association starts")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="upete-load-") as tmp:
        work = Path(tmp)
        studies = make_studies(
            work / "in", args.studies, pet_slices=args.pet_slices, pet_size=args.pet_size,
            ct_slices=args.ct_slices, ct_size=args.ct_size,
        )
        result = run_load(studies, work / "run", stagger_s=args.stagger_s)
    load_after = os.getloadavg()
    summary = (
        f"{result['studies']} studies, {result['instances']} instances ({result['mb']:.0f} MB) received in "
        f"{result['receive_s']:.1f} s = {result['per_s']:.0f} instances/s; all jobs done after "
        f"{result['total_s']:.1f} s (first job started at {result['first_job_s']:.1f} s); "
        f"node RSS {result['rss_before_mb']:.0f} MB before, peak "
        f"{result['peak_mb']:.0f} MB"
    )
    print(summary)
    command = argv if argv is not None else sys.argv[1:]
    lines = [
        "# Load: concurrent associations, each a whole PET/CT study, while jobs run",
        "",
        f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/load.py', *command])}`  ",
        f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}  ",
        f"Machine: {machine_description()}  ",
        f"Load average (1, 5, 15 min) before: {', '.join(f'{v:.2f}' for v in load_before)}; after: "
        f"{', '.join(f'{v:.2f}' for v in load_after)} (the CPU was shared with a model training job)",
        "",
        f"Per study: CT {args.ct_slices} slices of {args.ct_size}², PET {args.pet_slices} slices of "
        f"{args.pet_size}² (CT sent first); association i starts i × {args.stagger_s:g} s after the first. "
        "Model `classical:gaussian`; destination DCMTK storescp.",
        "",
        "| studies (associations) | instances | MB | receive s | instances/s | first job started at s "
        "| all jobs done after s | RSS before (MB) | peak RSS (MB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {result['studies']} | {result['instances']} | {result['mb']:.0f} | {result['receive_s']:.1f} | "
        f"{result['per_s']:.0f} | {result['first_job_s']:.1f} | {result['total_s']:.1f} | "
        f"{result['rss_before_mb']:.0f} | {result['peak_mb']:.0f} |",
        "",
        *READING,
        "",
        "Checked: every acknowledged instance is in the index; exactly one job per study, all `done`; "
        "each derived series is in its own study and references exactly its own PET instances.",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
