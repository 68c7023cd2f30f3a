"""Is a node serving this spool? The heartbeat file, and the monitor that keeps it (and /metrics) up.

``upete serve`` rewrites ``<storage.root>/heartbeat.json`` every :data:`HEARTBEAT_INTERVAL_S` seconds
with its pid, address, metrics URL and whether each of its threads is alive, and marks it ``stopped``
on a clean stop. ``upete status`` (another process, maybe another user) reads it: a file older than
:data:`STALE_AFTER_S`, or naming a pid that no longer exists on this host, means the node is not
running — it was killed, crashed, or hangs. A file rather than a database row: a hung database (or a
node that cannot write to it) must still be visible, and a reader never waits for a lock.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from dicomnode.config import Settings
from dicomnode.db import Database
from dicomnode.metrics import REGISTRY, Authenticator, JobStateCollector, MetricsServer

__all__ = [
    "HEARTBEAT_FILENAME",
    "HEARTBEAT_INTERVAL_S",
    "STALE_AFTER_S",
    "NodeHealth",
    "NodeMonitor",
    "read_heartbeat",
    "scp_alive",
]

log = logging.getLogger("upete.health")

HEARTBEAT_FILENAME = "heartbeat.json"
HEARTBEAT_INTERVAL_S = 2.0
#: Several missed beats before "not running": a busy machine may delay one.
STALE_AFTER_S = 15.0


def scp_alive(server: object) -> bool:
    """True while a pynetdicom ThreadedAssociationServer is listening and its accept loop runs."""
    sock = getattr(server, "socket", None)
    if sock is None or sock.fileno() == -1:
        return False
    # socketserver sets this private event when serve_forever() returns (shutdown or a crash of the
    # loop); pynetdicom offers no public "is serving" flag.
    finished = getattr(server, "_BaseServer__is_shut_down", None)
    return not (finished is not None and finished.is_set())


def _write_atomically(path: Path, data: Mapping[str, object]) -> None:
    # No fsync: after a power loss a stale heartbeat is the truth anyway.
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(temporary, path)


@dataclass(frozen=True)
class NodeHealth:
    """What the heartbeat file says about the node of one spool."""

    running: bool
    summary: str  # one line for people: "running (pid 123, …)", "not running: …"
    heartbeat: dict | None  # the file's content, when there is one
    age_s: float | None  # seconds since the last beat

    def to_json(self) -> dict[str, object]:
        return {"running": self.running, "summary": self.summary, "age_s": self.age_s,
                "heartbeat": self.heartbeat}


def _pid_gone(beat: Mapping[str, object]) -> bool:
    """True when the heartbeat's process certainly no longer exists (only decidable on its host)."""
    if beat.get("hostname") != socket.gethostname() or not isinstance(beat.get("pid"), int):
        return False
    try:
        os.kill(int(beat["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, owned by another user (the service account)
        return False
    return False


def read_heartbeat(
    root: Path, *, now: float | None = None, stale_after_s: float = STALE_AFTER_S
) -> NodeHealth:
    """The node's health from ``<root>/heartbeat.json`` (see the module docstring for the rules)."""
    now = time.time() if now is None else now
    path = Path(root) / HEARTBEAT_FILENAME
    try:
        beat = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        why = "not running: no heartbeat (has `upete serve` run with this spool?)"
        return NodeHealth(False, why, None, None)
    except (OSError, ValueError) as exc:
        return NodeHealth(False, f"unknown: heartbeat file unreadable ({exc})", None, None)
    if not isinstance(beat, dict):
        return NodeHealth(False, "unknown: heartbeat file is not a JSON object", None, None)
    updated = float(beat.get("updated_at") or 0.0)
    age = round(max(now - updated, 0.0), 1)
    where = f"pid {beat.get('pid')} on {beat.get('hostname')}"
    if beat.get("state") == "stopped":
        stopped = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(updated))
        return NodeHealth(False, f"not running: stopped at {stopped} ({where})", beat, age)
    if _pid_gone(beat):
        return NodeHealth(False, f"not running: {where} is gone (killed or crashed)", beat, age)
    if age > stale_after_s:
        return NodeHealth(False, f"not running: last heartbeat {age:.0f} s ago ({where}; hung or killed?)",
                          beat, age)
    threads = beat.get("threads") or {}
    dead = sorted(name for name, alive in threads.items() if not alive)
    listening = f"{beat.get('ae_title')} on {beat.get('host')}:{beat.get('port')}"
    if dead:
        return NodeHealth(True, f"running but unhealthy: {', '.join(dead)} not alive ({where}, {listening})",
                          beat, age)
    return NodeHealth(True, f"running ({where}, {listening}, heartbeat {age:.0f} s ago)", beat, age)


def _job_counts(db: Database) -> dict[str, int]:
    rows = db.query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
    return {row["state"]: row["n"] for row in rows}


class NodeMonitor:
    """The serving node's outward signs of life: heartbeat file, /metrics and /healthz.

    ``alive()`` returns ``{"scp": bool, "worker": bool, …}``. :meth:`tick` is called from the service's
    main loop (it writes the heartbeat when one is due); :meth:`close` marks the node stopped. A metrics
    port that cannot be bound is logged and skipped: metrics never keep the node from serving images.
    """

    def __init__(
        self,
        settings: Settings,
        db: Database,
        *,
        alive: Callable[[], Mapping[str, bool]],
        auth: Authenticator | None = None,
    ) -> None:
        self.settings = settings
        self.alive = alive
        self.path = settings.storage.root / HEARTBEAT_FILENAME
        self.started_at = time.time()
        self._last_beat = 0.0
        self.collector = JobStateCollector(lambda: _job_counts(db))
        REGISTRY.register(self.collector)
        self.server: MetricsServer | None = None
        metrics = settings.metrics
        if metrics.enabled:
            try:
                self.server = MetricsServer(metrics.host, metrics.port, health=alive, auth=auth)
            except OSError as exc:
                log.error("metrics endpoint not started",
                          extra={"fields": {"host": metrics.host, "port": metrics.port, "error": str(exc)}})
            else:
                log.info("metrics endpoint", extra={"fields": {"url": self.server.url}})
        self.tick(force=True)

    def _beat(self, state: str) -> dict[str, object]:
        node = self.settings.node
        return {
            "state": state,
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "ae_title": node.ae_title,
            "host": node.host,
            "port": node.port,
            "metrics_url": self.server.url if self.server is not None else None,
            "started_at": self.started_at,
            "updated_at": time.time(),
            "threads": dict(self.alive()),
        }

    def tick(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_beat < HEARTBEAT_INTERVAL_S:
            return
        self._last_beat = now
        try:
            _write_atomically(self.path, self._beat("running"))
        except OSError as exc:  # a full disk is reported by the store; do not stop serving for this
            log.warning("heartbeat not written", extra={"fields": {"error": str(exc)}})

    def close(self) -> None:
        try:
            _write_atomically(self.path, self._beat("stopped"))
        except OSError as exc:
            log.warning("heartbeat not written", extra={"fields": {"error": str(exc)}})
        if self.server is not None:
            self.server.close()
        REGISTRY.unregister(self.collector)
