"""Receive rate: 300 CT slices of 512×512 over one association, the node vs DCMTK storescp.

    .venv/bin/python benchmarks/receive.py [--slices 300] [--repeat 3]

In the same run, DCMTK ``storescu`` (TCP_NODELAY=1, ARCHITECTURE.md §6 Nagle) sends the same files in one
association to DCMTK ``storescp`` (writes each file, never fsyncs) and to ``upete serve`` (validates
every element, stores each instance durably — file and database row fsynced — before answering
Success). Runs alternate, ``--repeat`` times each; the median rate of each is reported with their
ratio (target ≥ 0.2) and the ≈250 instances/s ceiling one fsync per instance puts on any durable
receiver here (ARCHITECTURE.md §6: one fsync ≈ 3.9 ms). Writes ``benchmarks/results/receive.md`` + ``.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from benchmarks.receive_memory import ct_slices  # noqa: E402
from tests.support.nodeutil import PACS_AE, NodeProcess, StoreSCP, db_rows, free_port, storescu, write_config  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TARGET_RATIO = 0.2

# Run in the node process before the CLI (``--profile``): times the receive path's parts, written as JSON
# at exit. Benchmark-only instrumentation; the node has no such hook.
PROFILE = """
import atexit, collections, contextlib, json, os, threading, time
import dicomnode.db as _db, dicomnode.scp as _scp, dicomnode.store as _st
_T = collections.defaultdict(float)
_in_put = threading.local()
def _timed(label, f):
    def g(*a, **k):
        s = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            _T[label] += time.perf_counter() - s
    return g
_scp.handle_store = _timed("C-STORE handler (all below)", _scp.handle_store)
_scp.read_received = _timed("read the received header", _scp.read_received)
_scp.validate_instance = _timed("validate every element", _scp.validate_instance)
_move = _st.InstanceStore._move_durably
_st.InstanceStore._move_durably = staticmethod(_timed("file: rename + fsync", _move))
_st.fsync_dir = _timed("directory fsync", _st.fsync_dir)
_tx = _db.Database.transaction
@contextlib.contextmanager
def _transaction(self):
    s = time.perf_counter()
    with _tx(self) as conn:
        yield conn
    if getattr(_in_put, "on", False):
        _T["database row: commit (WAL fsync)"] += time.perf_counter() - s
_db.Database.transaction = _transaction
_put = _st.InstanceStore.put
def _put_flagged(self, *a, **k):
    _in_put.on = True
    try:
        return _put(self, *a, **k)
    finally:
        _in_put.on = False
_st.InstanceStore.put = _timed("store.put (file, directory, row)", _put_flagged)
atexit.register(lambda: open(os.environ["UPETE_PROFILE_OUT"], "w").write(json.dumps(_T)))
"""


def fsync_ms(directory: Path, n: int = 50) -> float:
    """Median time of new file + write 512 kB + fsync + rename here: the floor of a durable store."""
    times = []
    payload = os.urandom(512 * 1024)
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


def to_storescp(files: list[Path], work: Path) -> float:
    out = work / "storescp-in"
    with StoreSCP(out) as scp:
        started = time.perf_counter()
        result = storescu(files, scp.port, called=PACS_AE, timeout=600)
        seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"storescu → storescp failed: {result.stderr[-2000:]}")
    received = len([p for p in out.iterdir() if p.is_file()])
    if received != len(files):
        raise RuntimeError(f"storescp stored {received} of {len(files)}")
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
        started = time.perf_counter()
        result = storescu(files, node.port, timeout=600)
        seconds = time.perf_counter() - started
        stored = db_rows(node.db_path, "SELECT COUNT(*) AS n FROM instances")[0]["n"]
    if result.returncode != 0:
        raise RuntimeError(f"storescu → node failed: {result.stderr[-2000:]}")
    if stored != len(files):
        raise RuntimeError(f"the node stored {stored} of {len(files)}")
    shutil.rmtree(directory)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--note", action="append", default=[], help="a line added to the report")
    parser.add_argument("--no-profile", action="store_true", help="skip the extra, instrumented node run")
    args = parser.parse_args(argv)
    profile: dict[str, float] = {}
    load_before = [round(v, 2) for v in os.getloadavg()]
    runs: dict[str, list[float]] = {"storescp": [], "node": []}
    with tempfile.TemporaryDirectory(prefix="upete-receive-") as tmp:
        work = Path(tmp)
        files = ct_slices(work / "ct", args.slices)
        floor = fsync_ms(work)
        for _ in range(args.repeat):
            runs["storescp"].append(to_storescp(files, work))
            runs["node"].append(to_node(files, work))
        if not args.no_profile:
            out = work / "profile.json"
            profile = {"total (storescu wall time)": to_node(files, work, profile=out),
                       **json.loads(out.read_text())}
        mb = sum(p.stat().st_size for p in files) / 2**20
    rates = {k: args.slices / statistics.median(v) for k, v in runs.items()}
    ratio = rates["node"] / rates["storescp"]
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    report = {
        "command": " ".join([".venv/bin/python benchmarks/receive.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"cores": os.cpu_count(), "cpu": cpu, "load_before": load_before,
                    "load_after": [round(v, 2) for v in os.getloadavg()]},
        "slices": args.slices, "mb": mb, "seconds": runs, "per_s": rates, "ratio": ratio,
        "fsync_ms": floor, "fsync_ceiling_per_s": 1000 / floor, "target_ratio": TARGET_RATIO,
        "profile_s": profile,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "receive.json").write_text(json.dumps(report, indent=2) + "\n")
    m = report["machine"]
    lines = [
        "# Receive rate: the node vs DCMTK storescp", "",
        f"Command: `{report['command']}`", "",
        f"Machine: {m['cores']} cores ({m['cpu']}); load average before {m['load_before']}, after "
        f"{m['load_after']} (a shared machine: other jobs add to the load); {report['date']}.", "",
        f"{args.slices} CT slices of 512×512 ({mb:.0f} MB), one association each, DCMTK storescu with "
        f"TCP_NODELAY=1; runs alternate, {args.repeat} of each, median shown.", "",
        "| receiver | seconds (each run) | instances/s (median) |", "|---|---|---:|",
        f"| DCMTK storescp (no fsync) | {', '.join(f'{s:.2f}' for s in runs['storescp'])} | "
        f"{rates['storescp']:.0f} |",
        f"| upete serve (durable: file + row fsynced before Success) | "
        f"{', '.join(f'{s:.2f}' for s in runs['node'])} | {rates['node']:.0f} |", "",
        f"**Ratio node / storescp: {ratio:.2f}** (target ≥ {TARGET_RATIO}: "
        f"{'met' if ratio >= TARGET_RATIO else 'not met'}).", "",
        f"Floor here: new file + 512 kB write + fsync + rename takes {floor:.1f} ms (median of 50), so one "
        f"association that stores durably before each Success cannot pass ≈{1000 / floor:.0f} instances/s.",
        "",
    ]
    if profile:
        n, wall = args.slices, "total (storescu wall time)"
        lines += ["## Where the node's time goes", "",
                  "One more node run, instrumented (wrappers timing the receive path's functions, "
                  "benchmark-only): ms per instance.", "", "| part | ms per instance |", "|---|---:|",
                  *[f"| {k} | {v * 1000 / n:.2f} |" for k, v in profile.items()],
                  f"| outside the handler (pynetdicom: PDUs, DIMSE, the chunked temp file) | "
                  f"{(profile[wall] - profile['C-STORE handler (all below)']) * 1000 / n:.2f} |",
                  ""]
    lines += [*args.note]
    (RESULTS / "receive.md").write_text("\n".join(lines).rstrip() + "\n")
    print((RESULTS / "receive.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
