"""Prometheus metrics of the node, and the small HTTP server that serves them with ``/healthz`` (and,
once :meth:`MetricsServer.mount` is called, the status page of dicomnode/web.py behind optional auth).

The rest of the node calls one function per event (:func:`instance_answered`, :func:`association`,
:func:`observe_stages`, :func:`send_attempt`, …); they never raise, so instrumentation cannot fail a
C-STORE or a job. Labels are low-cardinality by design: statuses, results, stages and job states —
never UIDs, AE titles or anything about a patient.

``GET /metrics`` is the Prometheus text format of :data:`REGISTRY`; ``GET /healthz`` answers 200 with
``{"status": "ok", "scp": "alive", …}`` while every thread the health callback reports is alive and
503 with the dead ones named otherwise, so a load balancer or a systemd watchdog script can use it.
With an authenticator mounted, every other path answers 401 (with ``WWW-Authenticate``) to a request
without valid credentials; ``/healthz`` stays open, as probes rarely carry credentials and it tells
only which threads are alive.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from upete import __version__

__all__ = [
    "REGISTRY",
    "Authenticator",
    "MetricsServer",
    "Pages",
    "JobStateCollector",
    "association",
    "instance_answered",
    "model_loaded",
    "observe_stages",
    "preview_made",
    "send_attempt",
    "send_reassociation",
]

log = logging.getLogger("upete.metrics")

#: The node's own registry (not prometheus_client's global one): tests and tools that import the
#: node never collide with other users of the default registry.
REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

_BUILD = Info("upete_build", "Version of the node software", registry=REGISTRY)
_BUILD.info({"version": __version__})

INSTANCES = Counter(
    "upete_instances_total",
    "C-STORE requests answered, by outcome (stored or refused) and DIMSE status",
    ["outcome", "status"],
    registry=REGISTRY,
)
ASSOCIATIONS = Counter(
    "upete_associations_total",
    "Association requests, by result (accepted: passed the access checks; rejected) and rejection reason",
    ["result", "reason"],
    registry=REGISTRY,
)
STAGE_SECONDS = Histogram(
    "upete_stage_seconds",
    "Seconds per job stage: load, resample, enhance, write, preview (per job) and send (per destination)",
    ["stage"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
    registry=REGISTRY,
)
SEND_ATTEMPTS = Counter(
    "upete_send_attempts_total",
    "Deliveries of a derived series to a destination, by result: ok, retry (failed, will be retried) "
    "or failed (retries spent)",
    ["result"],
    registry=REGISTRY,
)
SEND_REASSOCIATIONS = Counter(
    "upete_send_reassociations_total",
    "New associations opened within one delivery to resend instances whose response never came",
    registry=REGISTRY,
)
MODEL_LOAD_SECONDS = Gauge(
    "upete_model_load_seconds", "Seconds the enhancers took to load at start", registry=REGISTRY
)
PREVIEWS = Counter(
    "upete_previews_total", "Job previews, by result (ok or failed)", ["result"], registry=REGISTRY
)

_JOB_STATES = ("queued", "running", "sending", "done", "failed")


def _safe(call: Callable[[], None]) -> None:
    # Metrics must never break what they measure.
    try:
        call()
    except Exception:  # noqa: BLE001
        log.debug("metric update failed", exc_info=True)


def instance_answered(status: int) -> None:
    """One C-STORE answered with ``status`` (0x0000 = stored, anything else = refused)."""
    outcome = "stored" if status == 0 else "refused"
    _safe(lambda: INSTANCES.labels(outcome, f"0x{status:04X}").inc())


def association(result: str, reason: str = "") -> None:
    """One association request: ``result`` is ``accepted`` or ``rejected``; ``reason`` a short word."""
    _safe(lambda: ASSOCIATIONS.labels(result, reason).inc())


def observe_stages(seconds_by_stage: Mapping[str, float]) -> None:
    """Durations of one job's stages (``{"load": 0.4, "enhance": 12.0, …}``)."""
    def observe() -> None:
        for stage, seconds in seconds_by_stage.items():
            STAGE_SECONDS.labels(stage).observe(float(seconds))

    _safe(observe)


def send_attempt(result: str, seconds: float) -> None:
    """One delivery attempt to one destination: ``ok``, ``retry`` or ``failed``, and how long it took."""
    def record() -> None:
        SEND_ATTEMPTS.labels(result).inc()
        STAGE_SECONDS.labels("send").observe(seconds)

    _safe(record)


def send_reassociation() -> None:
    _safe(SEND_REASSOCIATIONS.inc)


def model_loaded(seconds: float) -> None:
    _safe(lambda: MODEL_LOAD_SECONDS.set(seconds))


def preview_made(ok: bool, seconds: float | None = None) -> None:
    def record() -> None:
        PREVIEWS.labels("ok" if ok else "failed").inc()
        if seconds is not None:
            STAGE_SECONDS.labels("preview").observe(seconds)

    _safe(record)


class JobStateCollector(Collector):
    """``upete_jobs{state=…}``: jobs per state, counted in the database at each scrape (so the gauge
    is right across restarts and for ``upete resend`` run from another process)."""

    def __init__(self, count_by_state: Callable[[], Mapping[str, int]]) -> None:
        self._count = count_by_state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("upete_jobs", "Jobs in the node database, by state", labels=["state"])
        try:
            counts = dict(self._count())
        except Exception:  # noqa: BLE001 - a busy database must not break the scrape
            log.warning("job counts unavailable for /metrics", exc_info=True)
            return
        for state in _JOB_STATES:
            family.add_metric([state], counts.get(state, 0))
        yield family


#: A mounted site: a request path (query removed) → (status, content type, body), or None when the
#: path is not the site's.
Pages = Callable[[str], "tuple[int, str, bytes] | None"]


class Authenticator(Protocol):
    """Decides on a request's ``Authorization`` header (None when absent)."""

    challenge: str  # the WWW-Authenticate value of a 401

    def allows(self, authorization: str | None) -> bool: ...


class _Site:
    # What mount() set; read by every request thread (one attribute read each: no lock needed).
    def __init__(self) -> None:
        self.pages: Pages | None = None
        self.auth: Authenticator | None = None


def _handler(health: Callable[[], Mapping[str, bool]], site: _Site) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = f"upete/{__version__}"

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0]
            auth, pages = site.auth, site.pages
            if path != "/healthz" and auth is not None and not auth.allows(self.headers.get("Authorization")):
                self._send(401, "text/plain; charset=utf-8", b"authentication required\n",
                           {"WWW-Authenticate": auth.challenge})
                return
            answer = pages(path) if pages is not None and path not in ("/metrics", "/healthz") else None
            if answer is not None:
                self._send(*answer)
            elif path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY))
            elif path == "/healthz":
                try:
                    alive = dict(health())
                except Exception as exc:  # noqa: BLE001
                    alive = {"health_check": False}
                    log.warning("health check failed", extra={"fields": {"error": str(exc)}})
                body = {name: "alive" if ok else "dead" for name, ok in alive.items()}
                healthy = bool(alive) and all(alive.values())
                body = {"status": "ok" if healthy else "unhealthy", **body}
                self._send(200 if healthy else 503, "application/json", json.dumps(body).encode())
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found: try /, /metrics or /healthz\n")

        def _send(
            self, code: int, content_type: str, body: bytes, headers: Mapping[str, str] | None = None
        ) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            # Nothing here may be kept by a proxy or a browser cache: job lists change, and pages
            # behind auth must not outlive the credentials.
            self.send_header("Cache-Control", "no-store")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's name
            # A scrape every 15 s is not worth a log line; errors still reach log_error → DEBUG here.
            log.debug("http " + format % args)

    return Handler


class _Ipv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """``/metrics`` and ``/healthz`` on ``host:port`` (port 0: any free port) in a daemon thread."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        health: Callable[[], Mapping[str, bool]],
        auth: Authenticator | None = None,
    ) -> None:
        server_class = _Ipv6Server if ":" in host else ThreadingHTTPServer
        self._site = _Site()
        self._site.auth = auth  # before the first request can arrive: no unguarded moment at start
        self._server = server_class((host, port), _handler(health, self._site))
        self._server.daemon_threads = True
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="upete-metrics", daemon=True
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def mount(self, pages: Pages | None, *, auth: Authenticator | None = None) -> None:
        """Serve ``pages`` beside /metrics and /healthz, and require ``auth`` on all but /healthz."""
        # Auth first: pages never answer unguarded when a guard is wanted.
        self._site.auth = auth
        self._site.pages = pages

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
