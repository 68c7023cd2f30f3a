"""The node process: SCP, assembler, worker and sender threads around one SQLite database.

Start-up order matters: the database and spool first (stale temp files removed, ``running`` jobs put
back in the queue), then the enhancers (a model that does not load refuses the start, exit 2), then
the threads, and the SCP last, so nothing is acknowledged before the node can act on it. A signal
only sets a flag; the main loop then stops the SCP (no new associations), asks the threads to stop
and joins them. A job still inside the model when the grace period ends stays ``running`` on disk and
is resumed at the next start.
"""

from __future__ import annotations

import logging
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pynetdicom.transport import ThreadedAssociationServer

from dicomnode import metrics, sdnotify
from dicomnode.assembler import Assembler, CtPolicy
from dicomnode.audit import AuditLog
from dicomnode.config import Settings, resolve_checkpoint
from dicomnode.db import DB_FILENAME, Database
from dicomnode.derived import is_derived_by_us
from dicomnode.health import NodeMonitor, scp_alive
from dicomnode.jobs import JobQueue
from dicomnode.retention import Retention
from dicomnode.scp import ScpContext, start_server
from dicomnode.sender import Sender
from dicomnode.store import InstanceStore
from dicomnode.tls import TlsError
from dicomnode.web import load_auth, serve_status_page
from dicomnode.worker import Enhancers, Worker, model_used

__all__ = ["run_node", "Intervals"]

log = logging.getLogger("upete.service")


@dataclass(frozen=True)
class Intervals:
    """Seconds each loop waits when it found nothing to do, and the grace period of a stop."""

    assembler_s: float = 0.5
    worker_s: float = 0.2
    sender_s: float = 0.2
    stop_grace_s: float = 10.0
    # Retention sweeps: one at start, then one per interval (dicomnode/retention.py).
    retention_s: float = 3600.0


def _loop(
    name: str, step: Callable[[], object], interval_s: float, stop: threading.Event
) -> threading.Thread:
    """A thread calling ``step`` until ``stop``; it waits ``interval_s`` whenever ``step`` returns falsy."""

    def run() -> None:
        while not stop.is_set():
            try:
                busy = step()
            except Exception:  # noqa: BLE001 - log and go on: a dead thread would silently stop the node
                log.exception("loop step failed", extra={"fields": {"thread": name}})
                busy = False
            if not busy:
                stop.wait(interval_s)

    # Daemon: a job still in the model at the end of the grace period must not keep the process up;
    # its row stays 'running' and the next start resumes it.
    thread = threading.Thread(target=run, name=f"upete-{name}", daemon=True)
    thread.start()
    return thread


def _log_models(settings: Settings, enhancers: Enhancers) -> None:
    """Which checkpoints run (file, name, digest): the first thing to check when a result surprises."""
    loaded = [("main", settings.model.checkpoint, enhancers.main)]
    if enhancers.without_ct is not None and settings.model.checkpoint_without_ct is not None:
        loaded.append(("without_ct", settings.model.checkpoint_without_ct, enhancers.without_ct))
    for role, spec, enhancer in loaded:
        used = model_used(spec, enhancer.info)
        fields = {"role": role, "checkpoint": used.checkpoint, "model": used.name, "version": used.version,
                  "path": resolve_checkpoint(spec), "uses_ct": enhancer.info.uses_ct}
        log.info("model loaded", extra={"fields": fields})
    if enhancers.without_ct is None and enhancers.main.info.requires_ct:
        log.warning("no PET-only model (model.checkpoint_without_ct): a study without a CT that covers "
                    "the patient fails", extra={"fields": {}})


def run_node(
    settings: Settings, *, stop: threading.Event | None = None, intervals: Intervals = Intervals()
) -> int:
    """Serve until a stop signal (or ``stop`` is set); returns the process exit status."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():

        def _on_signal(signum: int, _frame: object) -> None:
            stop.set()  # only a flag: the main loop does the stopping

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)

    root = settings.storage.root
    root.mkdir(parents=True, exist_ok=True)
    db = Database(root / DB_FILENAME)
    audit = AuditLog(settings.logging.audit_file)
    try:
        return _serve(settings, db, audit, stop, intervals)
    finally:
        audit.close()
        db.close()


def _serve(
    settings: Settings, db: Database, audit: AuditLog, stop: threading.Event, intervals: Intervals
) -> int:
    store = InstanceStore(settings.storage.root, db, min_free_mb=settings.storage.min_free_mb)
    stale = store.remove_stale_temp_files()
    # pynetdicom streams each received data set into a temporary file (chunked receive, dicomnode.scp).
    # In the spool's tmp the store renames it into place instead of copying it across file systems
    # (systemd's PrivateTmp is another mount), and the next start removes what a crash left there.
    tempfile.tempdir = str(store.tmp_dir)
    jobs = JobQueue(db, audit)
    resumed = jobs.recover()
    try:
        # Never serve the status page unguarded when the site asked for a guard.
        web_auth = load_auth(settings)
    except ValueError as exc:
        log.error("refusing to start: metrics.auth does not load", extra={"fields": {"error": str(exc)}})
        return 2
    loading = time.perf_counter()
    try:
        enhancers = Enhancers.load(settings)
    except (ValueError, OSError, NotImplementedError, RuntimeError) as exc:
        log.error("refusing to start: the model does not load", extra={"fields": {"error": str(exc)}})
        return 2
    metrics.model_loaded(time.perf_counter() - loading)
    _log_models(settings, enhancers)
    info = enhancers.main.info
    policy = CtPolicy(
        uses_ct=info.uses_ct,
        requires_ct=info.requires_ct,
        has_without_ct_variant=enhancers.without_ct is not None,
    )
    halt = threading.Event()
    threads = _start_loops(settings, db, audit, store, jobs, enhancers, policy, intervals, halt)
    ctx = ScpContext(
        settings, store, audit, is_our_series=jobs.is_our_series, is_derived_by_us=is_derived_by_us
    )
    try:
        server = start_server(ctx)
    except TlsError as exc:
        # Never fall back to clear text when the site asked for TLS.
        log.error("refusing to start: access.tls does not load", extra={"fields": {"error": str(exc)}})
        halt.set()
        return 2
    except OSError as exc:
        log.error(
            "cannot listen",
            extra={"fields": {"host": settings.node.host, "port": settings.node.port, "error": str(exc)}},
        )
        halt.set()
        return 1
    _announce_start(settings, audit, enhancers, resumed=resumed, stale=stale)
    node = settings.node
    # Heartbeat file, /metrics and /healthz: what `upete status` and monitoring see of this process.
    def alive() -> dict[str, bool]:
        return {"scp": scp_alive(server), **{t.name.removeprefix("upete-"): t.is_alive() for t in threads}}

    monitor = NodeMonitor(settings, db, alive=alive, auth=web_auth)
    if monitor.server is not None:
        infos = [e.info for e in (enhancers.main, enhancers.without_ct) if e is not None]
        serve_status_page(monitor.server, settings, db, enhancers=infos, auth=web_auth)
    # systemd (Type=notify) calls the unit started only now: the SCP accepts associations.
    sdnotify.ready(f"listening on {node.host}:{node.port} as {node.ae_title}")
    try:
        while not stop.wait(0.5):
            monitor.tick()
    finally:
        _stop(server, threads, halt, monitor, audit, grace_s=intervals.stop_grace_s)
    return 0


def _start_loops(
    settings: Settings,
    db: Database,
    audit: AuditLog,
    store: InstanceStore,
    jobs: JobQueue,
    enhancers: Enhancers,
    policy: CtPolicy,
    intervals: Intervals,
    halt: threading.Event,
) -> list[threading.Thread]:
    """The assembler, worker, sender and retention loops, started; each ends once ``halt`` is set."""
    sender = Sender(jobs, audit, settings, storage_root=settings.storage.root)
    worker = Worker(jobs, store, enhancers, settings, destinations=sender.destination_keys())
    assembler = Assembler(db, jobs, audit, settings=settings.assembly, policy=policy)
    retention = Retention(
        db,
        settings.storage.root,
        audit,
        retention_days=settings.storage.retention_days,
        interval_s=intervals.retention_s,
    )
    return [
        _loop("assembler", lambda: assembler.poll() and True, intervals.assembler_s, halt),
        _loop("worker", worker.run_once, intervals.worker_s, halt),
        _loop("sender", sender.run_once, intervals.sender_s, halt),
        _loop("retention", retention.run_once, min(60.0, intervals.retention_s), halt),
    ]


def _announce_start(settings: Settings, audit: AuditLog, enhancers: Enhancers, *, resumed: int,
                    stale: int) -> None:
    """The ``node_started`` audit line and the ``listening`` log line."""
    node, info = settings.node, enhancers.main.info
    audit.record(
        "node_started",
        ae_title=node.ae_title,
        host=node.host,
        port=node.port,
        tls=settings.access.tls is not None,
        enhancer=info.name,
        enhancer_version=info.version,
        enhancer_without_ct=enhancers.without_ct.info.version if enhancers.without_ct else "none",
        resumed_jobs=resumed,
        stale_temp_files=stale,
        destinations=len(settings.destinations),
    )
    fields = {"ae": node.ae_title, "host": node.host, "port": node.port, "enhancer": info.name,
              "resumed_jobs": resumed}
    log.info("listening", extra={"fields": fields})


def _stop(
    server: ThreadedAssociationServer,
    threads: list[threading.Thread],
    halt: threading.Event,
    monitor: NodeMonitor,
    audit: AuditLog,
    *,
    grace_s: float,
) -> None:
    """Stop accepting, let work under way finish within ``grace_s``, abort what is left, record it."""
    sdnotify.stopping("stopping: finishing associations and jobs under way")
    server.shutdown()  # no new associations
    halt.set()
    deadline = time.monotonic() + grace_s
    # Associations under way may finish within the grace period; the rest are aborted, so their
    # senders retry what was not acknowledged (nothing acknowledged is lost either way).
    while server.active_associations and time.monotonic() < deadline:
        time.sleep(0.1)
    for assoc in server.active_associations:
        assoc.abort()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    unfinished = ",".join(t.name for t in threads if t.is_alive()) or "none"
    monitor.close()
    audit.record("node_stopped", unfinished_threads=unfinished)
    log.info("stopped", extra={"fields": {"unfinished_threads": unfinished}})
