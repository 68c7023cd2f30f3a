"""Receive rate: PET instances over one association — the node, a durable Python floor, DCMTK storescp.

    .venv/bin/python benchmarks/receive.py [--slices 300] [--size 256] [--repeat 5]

In the same run, DCMTK ``storescu`` (TCP_NODELAY=1) sends the same ``--slices`` PET instances of
``--size``² pixels in one association to four receivers, one fresh process each run, runs
alternating, ``--repeat`` times each (median reported):

- DCMTK ``storescp``: writes each file, never fsyncs (how fast the bytes can arrive here);
- the **floor** (benchmarks/receive_floor.py): pynetdicom writing the raw bytes as received, fsync,
  rename, directory fsync — no parsing, no database: the least a durable receiver in Python must do;
- the same floor without the directory fsync (the bytes durable at Success, their new name not yet);
- ``upete serve``: validates every element, stores each instance durably (bytes, name and database
  row) before answering Success.

The target is node / floor ≥ 0.8; the ratio to the floor without the directory fsync is reported too.
One more, instrumented node run times the receive path's parts (``--no-profile`` skips it). Writes
``benchmarks/results/receive.md`` + ``.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from dicomnode.testing.load import pet_slices  # noqa: E402
from dicomnode.testing.peers import (  # noqa: E402
    PACS_AE,
    NodeProcess,
    StoreSCP,
    db_rows,
    echoscu,
    free_port,
    peer_env,
    storescu,
    wait_for,
    write_config,
)
from model.evaluation.machine import machine_description  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
FLOOR_SCRIPT = ROOT / "benchmarks" / "receive_floor.py"
TARGET_RATIO = 0.8
RECEIVERS = ("storescp", "floor", "floor_no_dir_fsync", "node")

# Run in the node process before the CLI (``--profile``): times the receive path's parts, written as JSON
# at exit. Benchmark-only instrumentation; the node has no such hook.
PROFILE = """
import atexit, collections, json, os, time
import dicomnode.scp as _scp, dicomnode.store as _st
_T = collections.defaultdict(float)
def _timed(label, f):
    def g(*a, **k):
        s = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            _T[label] += time.perf_counter() - s
    return g
_scp.handle_store = _timed("C-STORE handler (all below)", _scp.handle_store)
_scp.peek_instance_uids = _timed("peek the UIDs (the file's first bytes)", _scp.peek_instance_uids)
_scp.read_received = _timed("read the received header", _scp.read_received)
_scp.validate_instance = _timed("validate every element", _scp.validate_instance)
_S = _st.InstanceStore
_S.contains = _timed("duplicate check (database)", _S.contains)
_S._place = _timed("file: rename to its final name", _S._place)
_st.fsync_dir = _timed("directory fsync (a helper thread, during validation)", _st.fsync_dir)
_S._in_helpers = _timed("wait until the helpers are inside their fsyncs (file, directory)", _S._in_helpers)
import dicomnode.jobs as _jobs
_jobs.JobQueue.is_our_series = _timed("loop guard: is the series our own output (database, once per series)",
                                      _jobs.JobQueue.is_our_series)
_st.Staged.commit = _timed("commit: wait for the file and name fsyncs, then the row", _st.Staged.commit)
_S._insert_rows = _timed("database row: commit (WAL fsync)", _S._insert_rows)
atexit.register(lambda: open(os.environ["UPETE_PROFILE_OUT"], "w").write(json.dumps(_T)))
"""


def fsync_ms(directory: Path, size: int, n: int = 50) -> float:
    """Median ms of new file + write ``size`` bytes + fsync + rename here: one wait for the disk."""
    times = []
    payload = os.urandom(size)
    for k in range(n):
        tmp, final = directory / f"probe{k}.tmp", directory / f"probe{k}.dcm"
        started = time.perf_counter()
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        times.append(time.perf_counter() - started)
        final.unlink()
    return statistics.median(times) * 1000


def _send(files: list[Path], port: int, called: str) -> float:
    started = time.perf_counter()
    result = storescu(files, port, called=called, timeout=600)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"storescu → {called} failed: {result.stderr[-2000:]}")
    return seconds


def _count_files(directory: Path, expected: int, who: str) -> None:
    # Hidden names are temporary files (the floor's ``.part``), never a stored instance.
    received = len([p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")])
    if received != expected:
        raise RuntimeError(f"{who} stored {received} of {expected}")


def to_storescp(files: list[Path], work: Path) -> float:
    out = work / "storescp-in"
    with StoreSCP(out) as scp:
        seconds = _send(files, scp.port, PACS_AE)
    _count_files(out, len(files), "storescp")
    shutil.rmtree(out)
    return seconds


def to_floor(files: list[Path], work: Path, *, directory_fsync: bool = True) -> float:
    out, port = work / "floor-in", free_port()
    command = [sys.executable, str(FLOOR_SCRIPT), "--port", str(port), "--out", str(out), "--ae", PACS_AE]
    log = open(work / "floor.out", "a")  # noqa: SIM115 - the child holds it; closed below
    try:
        process = subprocess.Popen(
            [*command, *([] if directory_fsync else ["--no-directory-fsync"])],
            stdout=log, stderr=subprocess.STDOUT, env=peer_env(),
        )
    finally:
        log.close()
    try:
        wait_for(lambda: echoscu(port, called=PACS_AE).returncode == 0, timeout=30, interval=0.2,
                 what=f"the floor receiver to answer C-ECHO ({work / 'floor.out'})")
        time.sleep(1.0)  # start-up settles, as for the node
        seconds = _send(files, port, PACS_AE)
    finally:
        process.terminate()
        process.wait(timeout=30)
    _count_files(out, len(files), "the floor receiver")
    shutil.rmtree(out)
    return seconds


def to_node(files: list[Path], work: Path, *, profile: Path | None = None) -> float:
    directory = work / "node"
    directory.mkdir()
    # A long quiet period: no job starts during the receive (this measures the receive path alone).
    config = write_config(directory, port=free_port(), series_timeout_s=600)
    if profile is not None:
        os.environ["UPETE_PROFILE_OUT"] = str(profile)  # the node inherits it
    with NodeProcess(config, preamble=PROFILE if profile is not None else None) as node:
        time.sleep(1.0)  # start-up settles
        seconds = _send(files, node.port, "UPETE")
        stored = db_rows(node.db_path, "SELECT COUNT(*) AS n FROM instances")[0]["n"]
    if stored != len(files):
        raise RuntimeError(f"the node stored {stored} of {len(files)}")
    shutil.rmtree(directory)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300, help="PET instances per run")
    parser.add_argument("--size", type=int, default=256, help="rows = columns of each instance")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--note", action="append", default=[], help="a line added to the report")
    parser.add_argument("--no-profile", action="store_true", help="skip the extra, instrumented node run")
    args = parser.parse_args(argv)
    senders = {
        "storescp": to_storescp,
        "floor": to_floor,
        "floor_no_dir_fsync": lambda files, work: to_floor(files, work, directory_fsync=False),
        "node": to_node,
    }
    profile: dict[str, float] = {}
    load_before = [round(v, 2) for v in os.getloadavg()]
    runs: dict[str, list[float]] = {name: [] for name in RECEIVERS}
    with tempfile.TemporaryDirectory(prefix="upete-receive-") as tmp:
        work = Path(tmp)
        files = pet_slices(work / "pet", args.slices, size=args.size)
        wait_ms = fsync_ms(work, files[0].stat().st_size)
        for _ in range(args.repeat):
            for name in RECEIVERS:
                runs[name].append(senders[name](files, work))
        if not args.no_profile:
            out = work / "profile.json"
            profile = {"total (storescu wall time)": to_node(files, work, profile=out),
                       **json.loads(out.read_text())}
        mb = sum(p.stat().st_size for p in files) / 2**20
    rates = {k: args.slices / statistics.median(v) for k, v in runs.items()}
    ratio = rates["node"] / rates["floor"]
    report = {
        "command": " ".join([".venv/bin/python benchmarks/receive.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"description": machine_description(), "load_before": load_before,
                    "load_after": [round(v, 2) for v in os.getloadavg()]},
        "slices": args.slices, "size": args.size, "mb": mb, "seconds": runs, "per_s": rates,
        "ratio_node_to_floor": ratio,
        "ratio_node_to_floor_no_dir_fsync": rates["node"] / rates["floor_no_dir_fsync"],
        "ratio_node_to_storescp": rates["node"] / rates["storescp"],
        "target_ratio": TARGET_RATIO, "fsync_ms": wait_ms, "profile_s": profile,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "receive.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "receive.md").write_text(_markdown(report, args.repeat, args.note))
    print((RESULTS / "receive.md").read_text())
    return 0


def _met(ratio: float, target: float) -> str:
    return "met" if ratio >= target else "not met"


def _markdown(report: dict, repeat: int, notes: list[str]) -> str:
    m, runs, rates, n = report["machine"], report["seconds"], report["per_s"], report["slices"]
    labels = {
        "storescp": "DCMTK storescp (writes, no fsync)",
        "floor": "durable Python floor (pynetdicom, raw bytes, fsync, rename, directory fsync)",
        "floor_no_dir_fsync": "the same floor without the directory fsync (name not yet durable)",
        "node": "upete serve (validated; bytes, name and row durable before Success)",
    }
    ratio, target = report["ratio_node_to_floor"], report["target_ratio"]
    weaker = report["ratio_node_to_floor_no_dir_fsync"]
    lines = [
        "# Receive rate: the node vs a durable Python floor and DCMTK storescp", "",
        f"Command: `{report['command']}`", "",
        f"Machine: {m['description']}; load average before {m['load_before']}, after "
        f"{m['load_after']} (a shared machine: other jobs add to the load); {report['date']}.", "",
        f"{n} PET instances of {report['size']}×{report['size']} ({report['mb']:.0f} MB), one association "
        f"each, DCMTK storescu with TCP_NODELAY=1; a fresh receiver process per run, runs alternate, "
        f"{repeat} of each, median shown.", "",
        "| receiver | seconds (each run) | instances/s (median) |", "|---|---|---:|",
        *[f"| {labels[k]} | {', '.join(f'{s:.2f}' for s in runs[k])} | {rates[k]:.0f} |" for k in RECEIVERS],
        "",
        f"**Ratio node / floor: {ratio:.2f}** (target ≥ {target}: {_met(ratio, target)}); node / floor "
        f"without the directory fsync: {weaker:.2f} ({_met(weaker, target)}); "
        f"node / storescp {report['ratio_node_to_storescp']:.2f}.", "",
        f"One wait for the disk here (new file of one instance's size, write, fsync, rename; median of 50, "
        f"before the runs): {report['fsync_ms']:.1f} ms. Per instance the floor waits twice (its file, then "
        "its name), the floor without the directory fsync once; the node waits for the row's commit "
        "(shared with concurrent associations), the fsyncs of its file and of its name running in helper "
        "threads while the file is read and validated (it is named first, by the UIDs peeked from its first "
        "bytes; the handler goes on once each helper is inside its fsync; dicomnode/store.py). "
        "How long a wait takes on "
        "this virtual machine depends on the load as much as on the disk (a waiting CPU that idles wakes "
        "late), so the ratio is only meaningful within one run.", "",
    ]
    profile = report["profile_s"]
    if profile:
        wall = "total (storescu wall time)"
        lines += ["## Where the node's time goes", "",
                  "One more node run, instrumented (wrappers timing the receive path's functions, "
                  "benchmark-only, so its total is a little slower): ms per instance. The directory "
                  "fsync runs in a helper thread while the handler validates, so the parts overlap.", "",
                  "| part | ms per instance |", "|---|---:|",
                  *[f"| {k} | {v * 1000 / n:.2f} |" for k, v in profile.items()],
                  f"| outside the handler (pynetdicom: PDUs, DIMSE, the chunked temp file) | "
                  f"{(profile[wall] - profile['C-STORE handler (all below)']) * 1000 / n:.2f} |",
                  ""]
    return "\n".join([*lines, *notes]).rstrip() + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
