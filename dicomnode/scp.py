"""The Storage SCP: pynetdicom handlers for C-ECHO and C-STORE, access control, TCP_NODELAY.

Handlers are plain functions that get what they need (a :class:`ScpContext`) as an argument; the
service binds them with :func:`build_ae` / :func:`start_server`. What each answers:

- connection, when ``access.tls`` is set: the TLS handshake (TLS >= 1.2, client certificate checked
  against the CA when required) completes within ``acse_timeout_s`` or the connection is closed before
  any DICOM is read; failures are logged and audited with the address (:mod:`dicomnode.tls`);
- association request: refused (A-ASSOCIATE-RJ, permanent) when the called AE title is not ours or
  the calling AE title (and host, where the config names one) is not allowed; logged and audited with
  the title and address. Beyond ``node.max_associations`` at once, pynetdicom refuses the request
  (A-ASSOCIATE-RJ transient, local limit exceeded, PS3.8 9.3.4) and we log and audit it;
- a silent peer: closed after ``acse_timeout_s`` without an A-ASSOCIATE-RQ, and aborted after
  ``network_timeout_s`` without a PDU once associated (also in the middle of a message);
- C-ECHO: Success;
- C-STORE: Success only after :meth:`InstanceStore.put` made the instance durable; otherwise the
  status of :mod:`dicomnode.validate` (0xA900, 0xC000 family) or 0xA700 when it cannot be stored.
  One safety net turns anything unexpected into 0xC211 and a log line, never a dropped association.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.pixels.decoders import (
    JPEG2000LosslessDecoder,
    JPEGLosslessDecoder,
    JPEGLosslessSV1Decoder,
    JPEGLSLosslessDecoder,
    RLELosslessDecoder,
)
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import Verification

from dicomnode import metrics
from dicomnode.audit import AuditLog
from dicomnode.config import AccessSettings, Settings
from dicomnode.statuses import CANNOT_DECODE, OUT_OF_RESOURCES, PROCESSING_FAILURE, SUCCESS, Refusal
from dicomnode.store import InstanceStore, OutOfResources, PutResult, Staged
from dicomnode.tls import handshake, peer_subject, server_context
from dicomnode.validate import (
    SUPPORTED_SOP_CLASSES,
    InstanceMeta,
    instance_uids,
    peek_instance_uids,
    read_received,
    validate_instance,
)

__all__ = [
    "ScpContext",
    "accepted_transfer_syntaxes",
    "build_ae",
    "check_caller",
    "handle_store",
    "handle_tls_open",
    "set_tcp_nodelay",
    "start_server",
]

log = logging.getLogger("upete.scp")

_UNCOMPRESSED = [
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
]
# Lossless compressed syntaxes we accept when a pydicom decoder for them is installed: accepting one we
# cannot decode would turn into a refusal per instance instead of a clean negotiation.
_LOSSLESS_DECODERS = [
    RLELosslessDecoder,
    JPEGLosslessSV1Decoder,
    JPEGLosslessDecoder,
    JPEGLSLosslessDecoder,
    JPEG2000LosslessDecoder,
]

# A-ASSOCIATE-RJ: result 1 = rejected-permanent, source 1 = service user (PS3.8 9.3.4).
_RJ_PERMANENT, _RJ_SERVICE_USER = 0x01, 0x01
_RJ_CALLING_AE_NOT_RECOGNISED, _RJ_CALLED_AE_NOT_RECOGNISED = 0x03, 0x07


def accepted_transfer_syntaxes() -> list[UID]:
    """Uncompressed and deflated syntaxes, plus every lossless compressed one pydicom can decode here."""
    return _UNCOMPRESSED + [decoder.UID for decoder in _LOSSLESS_DECODERS if decoder.is_available]


@dataclass
class _AssociationStats:
    calling_ae: str
    address: str
    started: float = field(default_factory=time.monotonic)
    stored: Counter = field(default_factory=Counter)  # (study, series, modality) -> count
    duplicates: Counter = field(default_factory=Counter)
    refused: int = 0


@dataclass
class ScpContext:
    """Everything the handlers need; one per server."""

    settings: Settings
    store: InstanceStore
    audit: AuditLog
    # Our own output coming back (loop guard): series UIDs this node planned, and derivation tags.
    # is_our_series answers from the node database alone (JobQueue.is_our_series; see our_series).
    is_our_series: Callable[[str], bool] = lambda _uid: False
    is_derived_by_us: Callable[[Dataset], bool] = lambda _ds: False
    _stats: dict[int, _AssociationStats] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # Loop-guard answers by series UID, valid while store.other_changes() stays what it was then.
    _verdicts: tuple[int, dict[str, bool]] = (-1, {})

    def stats(self, assoc: object) -> _AssociationStats | None:
        with self._lock:
            return self._stats.get(id(assoc))

    def our_series(self, series_uid: str) -> bool:
        """:attr:`is_our_series`, asked once per series while the database changes only by instance rows.

        Every instance of a series asked the database the same question (a query, and a thread switch
        while SQLite ran). A job planning a series, a removal or any other write of this process
        changes :meth:`InstanceStore.other_changes`, which drops every answer; an answer is kept only
        when nothing changed while it was asked. So an answer is never older than the last write that
        could change it (job plans are written by this process only).
        """
        changes = self.store.other_changes()
        known_at, verdicts = self._verdicts
        if known_at != changes:
            verdicts = {}
            self._verdicts = (changes, verdicts)
        verdict = verdicts.get(series_uid)
        if verdict is None:
            verdict = self.is_our_series(series_uid)
            if self.store.other_changes() == changes:
                verdicts[series_uid] = verdict
        return verdict


def check_caller(
    calling_ae: str, called_ae: str, address: str, *, access: AccessSettings, our_ae: str
) -> str | None:
    """Why an association request must be refused, or None when it may proceed."""
    if access.check_called_ae_title and called_ae.strip() != our_ae.strip():
        return f"called AE title {called_ae.strip()!r} is not ours ({our_ae.strip()!r})"
    if not access.allowed_callers:
        return None
    try:
        peer = ipaddress.ip_address(address)
    except ValueError:
        peer = None
    for caller in access.allowed_callers:
        if caller.ae_title != calling_ae.strip():
            continue
        if caller.host is None:
            return None
        if peer is not None and peer in ipaddress.ip_network(caller.host, strict=False):
            return None
        return f"calling AE title {calling_ae.strip()!r} is not allowed from {address}"
    return f"calling AE title {calling_ae.strip()!r} is not in access.allowed_callers"


def set_tcp_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN: switch Nagle off (otherwise ~40 ms of delayed-ACK stall per instance)."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # a socket already closed by the peer: nothing to speed up
            log.debug("TCP_NODELAY not set", extra={"fields": {"error": str(exc)}})


def handle_tls_open(event: evt.Event, ctx: ScpContext) -> None:
    """EVT_CONN_OPEN with TLS: finish the deferred handshake in this connection's thread, bounded by
    the ACSE timeout; on failure close the socket, so the DUL sees a closed transport and not one
    byte of DICOM is read from an unauthenticated peer."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if not isinstance(sock, ssl.SSLSocket):
        return
    address = str(event.address[0])
    try:
        handshake(sock, timeout_s=ctx.settings.node.acse_timeout_s)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or type(exc).__name__
        log.warning("TLS handshake failed", extra={"fields": {"address": address, "reason": reason}})
        ctx.audit.record("tls_refused", address=address, reason=reason)
        try:
            sock.close()
        except OSError:
            pass
        return
    log.debug(
        "TLS established",
        extra={"fields": {"address": address, "version": sock.version(), "peer": peer_subject(sock)}},
    )


def _peer(event: evt.Event) -> tuple[str, str, str]:
    requestor = event.assoc.requestor
    primitive = requestor.primitive
    calling = str(getattr(primitive, "calling_ae_title", requestor.ae_title) or "").strip()
    called = str(getattr(primitive, "called_ae_title", "") or "").strip()
    return calling, called, str(requestor.address)


def handle_requested(event: evt.Event, ctx: ScpContext) -> None:
    """EVT_REQUESTED: access control before any negotiation; refusals logged with title and address."""
    calling, called, address = _peer(event)
    reason = check_caller(
        calling, called, address, access=ctx.settings.access, our_ae=ctx.settings.node.ae_title
    )
    if reason is None:
        with ctx._lock:
            ctx._stats[id(event.assoc)] = _AssociationStats(calling_ae=calling, address=address)
        metrics.association("accepted")
        return
    diagnostic = (
        _RJ_CALLED_AE_NOT_RECOGNISED if reason.startswith("called") else _RJ_CALLING_AE_NOT_RECOGNISED
    )
    log.warning(
        "association refused",
        extra={"fields": {"calling_ae": calling, "called_ae": called, "address": address, "reason": reason}},
    )
    metrics.association("rejected", "called_ae_title" if reason.startswith("called") else "calling_ae_title")
    ctx.audit.record(
        "association_refused", calling_ae=calling, called_ae=called, address=address, reason=reason
    )
    # As pynetdicom's own ACSE does: queue the A-ASSOCIATE-RJ, then kill(), which waits until the DUL
    # has sent it (closing the socket at once would look like an abort to the peer). is_rejected,
    # set by send_reject, makes pynetdicom skip the negotiation.
    event.assoc.acse.send_reject(_RJ_PERMANENT, _RJ_SERVICE_USER, diagnostic)
    event.assoc.kill()


def handle_rejected(event: evt.Event, ctx: ScpContext) -> None:
    """EVT_REJECTED: pynetdicom's own refusals, i.e. too many associations at once (0x02/0x03/0x02)."""
    with ctx._lock:
        stats = ctx._stats.pop(id(event.assoc), None)
    if stats is None:
        return  # refused by handle_requested: already logged and audited
    reason = f"more than node.max_associations ({ctx.settings.node.max_associations}) at once"
    log.warning(
        "association refused",
        extra={"fields": {"calling_ae": stats.calling_ae, "address": stats.address, "reason": reason}},
    )
    ctx.audit.record("association_refused", calling_ae=stats.calling_ae, address=stats.address, reason=reason)


def handle_echo(event: evt.Event) -> int:
    """C-ECHO: always Success (PS3.4 A.4)."""
    return SUCCESS


def handle_store(event: evt.Event, ctx: ScpContext) -> int:
    """C-STORE: validate, store durably, then answer; never raises."""
    stats = ctx.stats(event.assoc)
    calling = stats.calling_ae if stats else ""
    sop_uid = str(event.request.AffectedSOPInstanceUID)
    try:
        status = _store(event, ctx, stats)
    except Exception:  # noqa: BLE001 - the safety net: a failure status, never a dropped association
        log.exception(
            "unexpected error storing an instance",
            extra={"fields": {"calling_ae": calling, "sop_uid": sop_uid}},
        )
        status = PROCESSING_FAILURE
    if status != SUCCESS and stats is not None:
        stats.refused += 1
    metrics.instance_answered(status)
    return status


def _received_path(event: evt.Event) -> Path | None:
    """The file pynetdicom streamed the data set into (chunked receive), or None when in memory."""
    try:
        path = event.dataset_path  # None, or AttributeError, when received in memory
    except AttributeError:
        return None
    return Path(path) if isinstance(path, (str, Path)) else None


def _received(event: evt.Event, path: Path | None) -> tuple[Dataset, Path | bytes]:
    """The received data set and what the store keeps of it.

    With chunked receive (:func:`start_server` turns it on) pynetdicom has streamed the data set into
    a file: it is read with PixelData left on disk and the store moves that very file into the spool,
    so no instance is held whole in memory or re-encoded. Otherwise (a server built another way) the
    data set was received in memory and its encoded bytes are stored.
    """
    if path is not None:
        return read_received(path), path
    try:
        ds = event.dataset
        ds.file_meta = event.file_meta
    except Exception as exc:  # noqa: BLE001 - whatever the parser raises, the bytes are not a dataset
        raise Refusal(CANNOT_DECODE, "(dataset)", f"does not decode: {exc}") from None
    return ds, event.encoded_dataset(include_meta=True)


def _file_uids(ds: Dataset, sop_class: str, sop_instance: str) -> tuple[str, str, str]:
    """The UIDs that name the instance's file; a refusal worded exactly as validate_instance words it.

    Checked before the rest of the instance, so that the file's name becomes durable during the
    validation; an instance refused here gets the refusal of the full validation (which checks the
    elements first), so its status and attribute do not depend on this order.
    """
    try:
        return instance_uids(ds, sop_instance_uid=sop_instance)
    except Refusal:
        validate_instance(ds, sop_class_uid=sop_class, sop_instance_uid=sop_instance)
        raise


def _validate_and_commit(
    ctx: ScpContext, staged: Staged, ds: Dataset, request_ids: tuple[str, str, str], *, from_file: bool
) -> tuple[InstanceMeta, PutResult]:
    sop_class, sop_instance, calling = request_ids
    if from_file and not staged.duplicate:
        ds.filename = str(staged.path)  # values left on disk are read from the file's new name
    meta = validate_instance(ds, sop_class_uid=sop_class, sop_instance_uid=sop_instance)
    if ctx.our_series(meta.series_uid) or ctx.is_derived_by_us(ds):
        meta = dataclasses.replace(meta, derived_by_us=True)
    return meta, staged.commit(meta, calling_ae=calling)


def _store_named_first(
    event: evt.Event,
    ctx: ScpContext,
    path: Path,
    guess: tuple[str, str, str],
    request_ids: tuple[str, str, str],
) -> tuple[InstanceMeta, PutResult] | None:
    """Name the received file by the UIDs peeked from its first bytes, then read and validate it.

    Its name's directory fsync then overlaps the reading as well as the validation (one wait for the
    disk on the association's path: the row). The full read confirms the UIDs: the same checks and
    refusals as in the reference order, and a file whose UIDs differ from the peek's is renamed to
    its own. None when the store could not name the file (no room, a write error): the caller then
    reads first, as without a peek, so the answer is the one the reference order gives.
    """
    entered = False
    try:
        with ctx.store.staging(*guess, path) as staged:
            entered = True
            ds, _ = _received(event, path if staged.duplicate else staged.path)
            study, series, _sop = _file_uids(ds, request_ids[0], request_ids[1])
            staged.rename(study, series)
            return _validate_and_commit(ctx, staged, ds, request_ids, from_file=True)
    except OutOfResources:
        if entered:
            raise
        return None


def _store(event: evt.Event, ctx: ScpContext, stats: _AssociationStats | None) -> int:
    calling = stats.calling_ae if stats else ""
    request = event.request
    sop_class, sop_instance = str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID)
    fields: dict[str, object] = {"calling_ae": calling, "sop_uid": sop_instance}
    path = _received_path(event)
    request_ids = (sop_class, sop_instance, calling)
    try:
        # The disk makes the file and its name durable while the CPU reads and validates (dicomnode.store):
        # named first when its UIDs can be peeked (both fsyncs then start together), else fsynced first.
        guess = peek_instance_uids(path, sop_instance) if path is not None else None
        stored = _store_named_first(event, ctx, path, guess, request_ids) if guess else None
        synced = ctx.store.begin_sync(path) if stored is None and path is not None else None
        if stored is None:  # the reference order: read, check the UIDs, name the file, validate
            ds, source = _received(event, path)
            uids = _file_uids(ds, sop_class, sop_instance)
            with ctx.store.staging(*uids, source, synced=synced) as staged:
                stored = _validate_and_commit(ctx, staged, ds, request_ids, from_file=path is not None)
        meta, result = stored
    except Refusal as refusal:
        log.warning(
            "instance refused",
            extra={
                "fields": {
                    **fields,
                    "status": f"0x{refusal.status:04X}",
                    "attribute": refusal.attribute,
                    "reason": refusal.reason,
                }
            },
        )
        return refusal.status
    except OutOfResources as exc:
        log.error(
            "instance not stored",
            extra={"fields": {**fields, "status": f"0x{OUT_OF_RESOURCES:04X}", "reason": str(exc)}},
        )
        return OUT_OF_RESOURCES
    if stats is not None:
        key = (meta.study_uid, meta.series_uid, meta.modality)
        (stats.stored if result is PutResult.STORED else stats.duplicates)[key] += 1
    return SUCCESS


def handle_closed(event: evt.Event, ctx: ScpContext) -> None:
    """EVT_CONN_CLOSE: one audit line per stored series and one for the association."""
    with ctx._lock:
        stats = ctx._stats.pop(id(event.assoc), None)
    if stats is None:
        return  # refused at request time: already audited
    for key in sorted(set(stats.stored) | set(stats.duplicates)):
        study, series, modality = key
        ctx.audit.record(
            "series_stored",
            calling_ae=stats.calling_ae,
            study_uid=study,
            series_uid=series,
            modality=modality,
            instances=stats.stored[key],
            duplicates=stats.duplicates[key],
        )
    ctx.audit.record(
        "association_closed",
        calling_ae=stats.calling_ae,
        address=stats.address,
        stored=sum(stats.stored.values()),
        duplicates=sum(stats.duplicates.values()),
        refused=stats.refused,
        series=len(set(stats.stored) | set(stats.duplicates)),
        seconds=round(time.monotonic() - stats.started, 3),
    )


#: Largest P-DATA PDU we accept (A-ASSOCIATE-AC Maximum Length, PS3.8 D.1).
MAX_PDU_BYTES = 131072


def build_ae(settings: Settings, transfer_syntaxes: Sequence[str] | None = None) -> AE:
    """An AE with Verification and the PET/CT storage contexts, timeouts from ``settings.node``."""
    node = settings.node
    ae = AE(ae_title=node.ae_title)
    syntaxes = list(transfer_syntaxes) if transfer_syntaxes is not None else accepted_transfer_syntaxes()
    ae.add_supported_context(Verification)
    for sop_class in SUPPORTED_SOP_CLASSES:
        ae.add_supported_context(sop_class, syntaxes)
    ae.maximum_associations = node.max_associations
    ae.acse_timeout = node.acse_timeout_s
    ae.dimse_timeout = node.dimse_timeout_s
    ae.network_timeout = node.network_timeout_s
    # pynetdicom's default (16 kB) cuts a 512×512 CT slice into 32 PDUs, each parsed in Python: 128 kB
    # (DCMTK's largest) takes ≈2 ms less per instance (benchmarks/results/receive.md) and still bounds
    # what one PDU can make us hold in memory.
    ae.maximum_pdu_size = MAX_PDU_BYTES
    # Access control happens in handle_requested (titles, hosts, logging), not pynetdicom's own lists.
    ae.require_called_aet = False
    ae.require_calling_aet = []
    return ae


def start_server(ctx: ScpContext):  # -> pynetdicom.transport.ThreadedAssociationServer
    """Bind the node's address and serve in background threads; returns the server (``shutdown()`` it).

    With ``access.tls`` every connection is TLS or nothing: there is no plain-TCP fallback. Raises
    :class:`dicomnode.tls.TlsError` when the certificate, key or CA file cannot be used.
    """
    tls = ctx.settings.access.tls
    ssl_context = server_context(tls) if tls is not None else None
    # C-STORE data sets are streamed to a temporary file instead of memory (see _received); a
    # pynetdicom-wide setting, so every server in this process receives this way.
    pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
    ae = build_ae(ctx.settings)
    handlers = [
        (evt.EVT_CONN_OPEN, set_tcp_nodelay),
        *([(evt.EVT_CONN_OPEN, handle_tls_open, [ctx])] if ssl_context is not None else []),
        (evt.EVT_REQUESTED, handle_requested, [ctx]),
        (evt.EVT_REJECTED, handle_rejected, [ctx]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [ctx]),
        (evt.EVT_CONN_CLOSE, handle_closed, [ctx]),
    ]
    node = ctx.settings.node
    return ae.start_server(
        (node.host, node.port), block=False, evt_handlers=handlers, ssl_context=ssl_context
    )
