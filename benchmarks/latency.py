"""End-to-end latency: last instance of a study in → derived series stored at a DCMTK storescp.

    .venv/bin/python benchmarks/latency.py [--checkpoint F] [--shape 48,128,128] [--repeat 3]
        [--series-timeout 2] [--steps N]

A small simulated PET/CT study (PET ``--shape`` at 2 mm, CT at 1 mm in-plane, CT sent first) goes
from DCMTK ``storescu`` to ``upete serve`` in one association; the node enhances it
(``classical:gaussian``, and the diffusion ``--checkpoint`` when given) and sends the derived series
to DCMTK ``storescp``. The parts come from the node's own job timestamps (``dicomnode/jobs.py``;
``upete status`` shows the same): **quiet** last instance received → job created (a study is
complete after ``assembly.series_timeout_s`` quiet seconds, or at once when the PET holds
NumberOfSlices instances and no CT is awaited), **queue** created → started, **enhance** started →
processed (load, enhance, write, preview, fsync), **send** processed → finished; **arrival**: job
finished → last derived file seen at storescp by this script (polling, ≤ 50 ms late). Writes
``benchmarks/results/latency.md`` + ``.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from dicomnode.testing.peers import NodeProcess, StoreSCP, db_rows, free_port, storescu, write_config  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PARTS = ("quiet", "queue", "enhance", "send", "arrival")


def make_study(folder: Path, shape: tuple[int, int, int]) -> list[Path]:
    """A fresh study (new UIDs) of a smooth body-like phantom: CT files first, then PET."""
    from scipy import ndimage

    from dicomnode.testing.phantoms import tiny_phantom
    from dicomnode.testing.scanner import StudyInfo, write_ct_series, write_pet_series

    pet, ct = tiny_phantom(0, shape)
    rng = np.random.default_rng(0)
    pet = np.clip(pet + rng.normal(0, 300, pet.shape), 0, None).astype(np.float32)  # low-dose-like noise
    study = StudyInfo()
    ct_1mm = ndimage.zoom(ct, (1, 2, 2), order=1)
    ct_paths = write_ct_series(folder / "ct", ct_1mm, spacing_mm=(2.0, 1.0, 1.0), origin_mm=(0.0, -0.5, -0.5),
                               study=study)
    pet_paths = write_pet_series(folder / "pet", pet, spacing_mm=(2.0, 2.0, 2.0), study=study)
    return ct_paths + pet_paths


def one_run(work: Path, shape: tuple[int, int, int], model: dict, series_timeout: float) -> dict:
    files = make_study(work / "study", shape)
    pet_count = shape[0]
    (work / "node").mkdir()
    with StoreSCP(work / "pacs-in") as pacs:
        config = write_config(work / "node", port=free_port(), destinations=[pacs.destination()],
                              series_timeout_s=series_timeout, model=model)
        with NodeProcess(config) as node:
            sent = storescu(files, node.port, timeout=600)
            if sent.returncode != 0:
                raise RuntimeError(f"storescu failed: {sent.stderr[-2000:]}")
            deadline = time.monotonic() + 1800
            while len(list(pacs.out_dir.iterdir())) < pet_count:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the derived series did not arrive; node log:\n{node.log()[-3000:]}")
                time.sleep(0.05)
            arrived = time.time()
            wait_for_finish = time.monotonic() + 30
            while True:
                [job] = db_rows(node.db_path, "SELECT * FROM jobs")
                if job["finished_at"] or time.monotonic() > wait_for_finish:
                    break
                time.sleep(0.05)
            last_in = db_rows(node.db_path, "SELECT MAX(received_at) AS t FROM instances")[0]["t"]
    stages = json.loads(job["stage_seconds"] or "{}")
    finished = job["finished_at"] or arrived
    parts = {
        "quiet": job["created_at"] - last_in,
        "queue": job["started_at"] - job["created_at"],
        "enhance": job["processed_at"] - job["started_at"],
        "send": finished - job["processed_at"],
        "arrival": max(arrived - finished, 0.0),
    }
    return {"parts": parts, "total": arrived - last_in, "job_stages": stages, "state": job["state"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="also this diffusion checkpoint (dose_fraction 0.1)")
    parser.add_argument("--shape", default="48,128,128", help="PET voxels z,y,x at 2 mm")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--series-timeout", type=float, default=2.0, help="assembly.series_timeout_s")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the checkpoint's)")
    parser.add_argument("--checkpoint-repeat", type=int, default=1, help="runs with --checkpoint")
    parser.add_argument("--node-threads", type=int, help="OMP_NUM_THREADS of the node (torch threads)")
    parser.add_argument("--note", action="append", default=[])
    args = parser.parse_args(argv)
    if args.node_threads:
        os.environ["OMP_NUM_THREADS"] = str(args.node_threads)  # the node process inherits it
    shape = tuple(int(v) for v in args.shape.split(","))
    models = {"classical:gaussian": {"checkpoint": "classical:gaussian", "device": "cpu"}}
    if args.checkpoint:
        models[Path(args.checkpoint).name] = {"checkpoint": str(Path(args.checkpoint).resolve()),
                                              "device": "cpu", "steps": args.steps, "dose_fraction": 0.1}
    load_before = [round(v, 2) for v in os.getloadavg()]
    results: dict[str, list[dict]] = {}
    for name, model in models.items():
        results[name] = []
        for k in range(args.repeat if name == "classical:gaussian" else args.checkpoint_repeat):
            with tempfile.TemporaryDirectory(prefix="upete-latency-") as tmp:
                results[name].append(one_run(Path(tmp), shape, model, args.series_timeout))  # type: ignore[arg-type]
            print(name, k, {p: round(v, 2) for p, v in results[name][-1]["parts"].items()}, flush=True)
    used = argv if argv is not None else sys.argv[1:]
    command = " ".join([".venv/bin/python benchmarks/latency.py", *used])
    report = {"command": command, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "cores": os.cpu_count(), "load_before": load_before,
              "load_after": [round(v, 2) for v in os.getloadavg()], "shape": list(shape),
              "series_timeout_s": args.series_timeout, "runs": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latency.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# End-to-end latency", "",
        f"Command: `{command}`", "",
        f"{os.cpu_count()} cores; load average before {load_before}, after {report['load_after']} (a "
        f"shared machine: other jobs add to the load); {report['date']}. "
        f"Study: PET {shape[1]}×{shape[2]}×{shape[0]} at 2 mm + CT "
        f"1 mm in-plane ({2 * shape[0]} files), one association; assembly.series_timeout_s = "
        f"{args.series_timeout:g}; destination DCMTK storescp on loopback; node torch threads "
        f"{args.node_threads or 'default'}.", "",
        "Seconds from the last instance received to the derived series stored at the destination, median "
        f"of {args.repeat} runs ({args.checkpoint_repeat} with a checkpoint; each part's median, total the "
        "median of totals):", "",
        "| model | " + " | ".join(PARTS) + " | **total** |", "|---|" + "---:|" * (len(PARTS) + 1),
    ]
    for name, runs in results.items():
        medians = [statistics.median(r["parts"][p] for r in runs) for p in PARTS]
        total = statistics.median(r["total"] for r in runs)
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in medians) + f" | **{total:.2f}** |")
    lines += ["", "Parts: quiet = last instance → job created (the quiet period, assembly.series_timeout_s); "
              "queue = created → started; enhance = started → processed (read DICOM, enhance, write, "
              "preview, fsync; job stage seconds in latency.json); send = processed → finished; arrival = "
              "finished → last file seen at storescp.", "", *args.note]
    (RESULTS / "latency.md").write_text("\n".join(lines).rstrip() + "\n")
    print((RESULTS / "latency.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
