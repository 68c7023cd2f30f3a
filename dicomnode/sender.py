"""The sender: each finished job's derived series to every configured destination — by C-STORE
(DIMSE destinations) or by one STOW-RS request (DICOMweb destinations, dicomnode/stow.py). The kind of
destination only picks the transport: attempts, retries with backoff, the failed-with-reason state and
``upete resend`` are the same for both.

DIMSE: one association per job and destination. Every instance's status is checked: Success and the
Warning statuses of PS3.4 B.2.3 (0xB000, 0xB006, 0xB007: stored, possibly coerced) count as stored,
anything else as refused. pynetdicom 3.0.4's reactor now and then takes a C-STORE response from
under ``send_c_store`` (ARCHITECTURE.md §6); :func:`_keep_stolen_responses` hands it back. An instance whose
response still never comes (DIMSE timeout, aborted association) is sent again on a new association,
up to :data:`MAX_REASSOCIATIONS` times per attempt — safe because a receiver keys instances by SOP
Instance UID. A failed attempt is retried by the job queue with backoff
(``destinations[].max_retries``, ``retry_backoff_s``); after the last one the job fails and its files
stay in the spool for ``upete resend``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, Association, evt

from dicomnode import metrics
from dicomnode.audit import AuditLog
from dicomnode.config import DestinationSettings, DicomwebDestinationSettings, Settings
from dicomnode.jobs import Job, JobQueue, JobState, destination_key
from dicomnode.scp import set_tcp_nodelay
from dicomnode.stow import stow_files
from dicomnode.tls import TlsError, client_context

__all__ = [
    "SendOutcome",
    "Sender",
    "send_files",
    "deliver_files",
    "destination_key_of",
    "MAX_REASSOCIATIONS",
    "DEFAULT_DIMSE_TIMEOUT_S",
]

AnyDestination = DestinationSettings | DicomwebDestinationSettings

log = logging.getLogger("upete.sender")

MAX_REASSOCIATIONS = 3
#: Per-response wait when the destination has no ``dimse_timeout_s`` of its own: short enough that a
#: swallowed response costs seconds, long enough for a PACS that writes synchronously.
DEFAULT_DIMSE_TIMEOUT_S = 20.0
_SUCCESS_OR_WARNING = {0x0000, 0xB000, 0xB006, 0xB007}
_SEND_LEASE_S = 3600.0


@dataclass(frozen=True)
class SendOutcome:
    """The result of one delivery attempt to one destination."""

    sent: int  # instances acknowledged with Success or a Warning
    refused: int  # instances answered with a failure status
    unacknowledged: int  # instances whose response never came
    error: str | None  # why the attempt failed; None when every instance was stored

    @property
    def ok(self) -> bool:
        return self.error is None


def _contexts(paths: Sequence[Path]) -> list[tuple[str, list[str]]]:
    """Presentation contexts for the files: each SOP class with its files' syntaxes plus the two
    uncompressed little-endian ones (pynetdicom converts between uncompressed syntaxes)."""
    by_class: dict[str, set[str]] = {}
    for path in paths:
        meta = read_file_meta_info(path)
        by_class.setdefault(str(meta.MediaStorageSOPClassUID), set()).add(str(meta.TransferSyntaxUID))
    return [
        (sop_class, sorted(syntaxes | {ExplicitVRLittleEndian, ImplicitVRLittleEndian}))
        for sop_class, syntaxes in by_class.items()
    ]


def _keep_stolen_responses(assoc: Association) -> None:
    """Work around pynetdicom 3.0.4's SCU race (ARCHITECTURE.md §6).

    ``send_c_store`` pauses the association's reactor thread through a flag the reactor sets just
    *before* it blocks, so now and then the reactor is still running, takes the C-STORE response off
    the DIMSE queue and drops it as an "unexpected service message" — and ``send_c_store`` waits out
    the whole DIMSE timeout. On a requestor such a message can only be the response ``send_c_store``
    waits for, so it is put back on the queue instead. The DIMSE timeout and the resend of
    unacknowledged instances stay as the second line of defence (e.g. a pynetdicom without
    ``_serve_request``).
    """
    serve = getattr(assoc, "_serve_request", None)
    if serve is None:
        return

    def serve_or_requeue(msg: object, context_id: int) -> None:
        if not getattr(msg, "is_valid_request", True):
            assoc.dimse.msg_queue.put((context_id, msg))
            return
        serve(msg, context_id)

    assoc._serve_request = serve_or_requeue


def send_files(
    paths: Sequence[Path],
    destination: DestinationSettings,
    *,
    calling_ae: str,
    acse_timeout_s: float = 30.0,
    network_timeout_s: float = 60.0,
    dimse_timeout_s: float | None = None,
) -> SendOutcome:
    """C-STORE every file in ``paths`` to ``destination``; never raises for network trouble."""
    if not paths:
        return SendOutcome(0, 0, 0, None)
    ae = AE(ae_title=calling_ae)
    for sop_class, syntaxes in _contexts(paths):
        ae.add_requested_context(sop_class, syntaxes)
    ae.acse_timeout = acse_timeout_s
    ae.network_timeout = network_timeout_s
    ae.dimse_timeout = dimse_timeout_s or getattr(destination, "dimse_timeout_s", DEFAULT_DIMSE_TIMEOUT_S)
    tls = getattr(destination, "tls", None)
    try:
        # TLS: the destination's certificate must chain to its CA and name its host (SAN IP or DNS).
        tls_args = (client_context(tls), destination.host) if tls is not None else None
    except TlsError as exc:
        return SendOutcome(0, 0, len(paths), str(exc))
    remaining = list(paths)
    sent = refused = 0
    errors: list[str] = []
    for _round in range(MAX_REASSOCIATIONS + 1):
        assoc = ae.associate(
            destination.host,
            destination.port,
            ae_title=destination.ae_title,
            evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)],
            tls_args=tls_args,
        )
        if not assoc.is_established:
            why = "association rejected" if assoc.is_rejected else "association failed (no answer or aborted)"
            return SendOutcome(sent, refused, len(remaining), f"{why} by {destination.ae_title}")
        _keep_stolen_responses(assoc)
        unacknowledged: list[Path] = []
        try:
            for index, path in enumerate(remaining):
                status = assoc.send_c_store(path)
                code = status.get("Status") if status else None
                if code is None:
                    # No response: the association is gone (timeout or abort). Resend from here.
                    unacknowledged = remaining[index:]
                    errors.append("no response (DIMSE timeout or association lost)")
                    break
                if code in _SUCCESS_OR_WARNING:
                    sent += 1
                else:
                    refused += 1
                    errors.append(f"status 0x{code:04X} for an instance")
        finally:
            if assoc.is_established:
                assoc.release()
        if not unacknowledged:
            break
        remaining = unacknowledged
        metrics.send_reassociation()
        log.warning(
            "resending unacknowledged instances",
            extra={
                "fields": {
                    "destination": destination_key(destination.ae_title, destination.host, destination.port),
                    "instances": len(remaining),
                }
            },
        )
    else:
        return SendOutcome(sent, refused, len(remaining), f"{len(remaining)} instance(s) never acknowledged")
    if refused:
        return SendOutcome(sent, refused, 0, f"{refused} instance(s) refused ({errors[-1]})")
    return SendOutcome(sent, 0, 0, None)


def destination_key_of(destination: AnyDestination) -> str:
    """The destination's name in the job database: ``AE@host:port`` (DIMSE) or its base URL (DICOMweb)."""
    if isinstance(destination, DicomwebDestinationSettings):
        return destination.dicomweb
    return destination_key(destination.ae_title, destination.host, destination.port)


def deliver_files(paths: Sequence[Path], destination: AnyDestination, settings: Settings) -> SendOutcome:
    """One delivery attempt of ``paths`` to ``destination`` by its transport; never raises for network
    trouble."""
    if isinstance(destination, DicomwebDestinationSettings):
        result = stow_files(paths, destination)
        return SendOutcome(result.stored, result.refused, result.unacknowledged, result.error)
    return send_files(
        paths,
        destination,
        calling_ae=settings.node.ae_title,
        acse_timeout_s=settings.node.acse_timeout_s,
        network_timeout_s=settings.node.network_timeout_s,
    )


class Sender:
    """Delivers jobs in state ``sending``; :meth:`run_once` is called in a loop by the service."""

    def __init__(self, jobs: JobQueue, audit: AuditLog, settings: Settings, *, storage_root: Path) -> None:
        self.jobs = jobs
        self.audit = audit
        self.settings = settings
        self.root = Path(storage_root)
        self.destinations = {destination_key_of(d): d for d in settings.destinations}

    def destination_keys(self) -> list[str]:
        return list(self.destinations)

    def run_once(self) -> bool:
        """Deliver one due job (every pending destination whose retry time came); False if none was due."""
        job = self.jobs.claim_sending(lease_s=_SEND_LEASE_S)
        if job is None:
            return False
        try:
            self._deliver(job)
        except Exception as exc:  # noqa: BLE001 - a bug must not kill the thread nor lose the job
            log.exception("sending failed unexpectedly", extra={"fields": {"job_id": job.id}})
            self.jobs.fail(job.id, f"internal error while sending: {type(exc).__name__}: {exc}")
        return True

    def _deliver(self, job: Job) -> None:
        files = sorted((self.root / job.output_dir).glob("*.dcm")) if job.output_dir else []
        if job.output_count is not None and len(files) != job.output_count:
            self.jobs.fail(
                job.id, f"derived series incomplete in the spool: {len(files)} of {job.output_count} files"
            )
            return
        now = time.time()
        for target in self.jobs.sends(job.id):
            if target.state != "pending" or (target.next_attempt_at or 0) > now:
                continue
            destination = self.destinations.get(target.destination)
            if destination is None:
                self.jobs.record_send(
                    job.id,
                    target.destination,
                    ok=False,
                    sent=0,
                    max_retries=0,
                    backoff_s=0,
                    error="destination no longer in the configuration",
                )
                continue
            started = time.monotonic()
            outcome = deliver_files(files, destination, self.settings)
            recorded = self.jobs.record_send(
                job.id,
                target.destination,
                ok=outcome.ok,
                sent=outcome.sent,
                error=outcome.error,
                max_retries=destination.max_retries,
                backoff_s=destination.retry_backoff_s,
            )
            metrics.send_attempt(
                "ok" if outcome.ok else "retry" if recorded.state == "pending" else "failed",
                time.monotonic() - started,
            )
            self.audit.record(
                "send",
                job_id=job.id,
                destination=target.destination,
                series_uid=job.derived_series_uid,
                instances=len(files),
                sent=outcome.sent,
                refused=outcome.refused,
                unacknowledged=outcome.unacknowledged,
                attempt=recorded.attempts,
                result="ok" if outcome.ok else recorded.state,
                seconds=round(time.monotonic() - started, 3),
                error=outcome.error or "",
            )
            if not outcome.ok:
                log.warning(
                    "send attempt failed",
                    extra={
                        "fields": {
                            "job_id": job.id,
                            "destination": target.destination,
                            "attempt": recorded.attempts,
                            "error": outcome.error,
                            "next_attempt_at": recorded.next_attempt_at,
                        }
                    },
                )
        state = self.jobs.settle_sending(job.id)
        if state is not JobState.SENDING:
            log.info("job finished", extra={"fields": {"job_id": job.id, "state": state.value}})
