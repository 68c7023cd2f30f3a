"""STOW-RS (DICOMweb Store, PS3.18 10.5): one multipart/related POST of a series' files to a
DICOMweb service, and the reading of its answer.

The transport only: :func:`stow_files` never raises for network or server trouble; the sender
(dicomnode/sender.py) turns its :class:`StowResult` into the same outcome, retries and failed-with-
reason state as a C-STORE delivery. The body is streamed from the files with a Content-Length (no
chunked encoding: not every DICOMweb server takes it), so a 160-slice series never sits in memory twice.

Answer (PS3.18 10.5.3): 200 all stored; 202 some stored, the others listed in the Failed SOP Sequence
(0008,1198) with a Failure Reason (0008,1197); 409 none stored; anything else is an HTTP-level error.
An instance counts as stored only when the answer's Referenced SOP Sequence (0008,1199) names it —
a 200 that leaves some out is not taken on trust.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import urllib.parse
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom.filereader import read_file_meta_info

from dicomnode.config import DicomwebDestinationSettings
from dicomnode.tls import TlsError, client_context

__all__ = ["StowResult", "stow_files", "parse_stow_response"]

_CHUNK = 1 << 20
_REFERENCED_SOP_SEQUENCE = "00081199"
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"


@dataclass(frozen=True)
class StowResult:
    """What one STOW-RS request achieved."""

    stored: int  # instances the answer names as stored (with or without a warning)
    refused: int  # instances the answer names as failed
    unacknowledged: int  # instances the answer does not mention, or all when no answer came
    error: str | None  # why the delivery is not complete; None when every instance was stored


def _multipart(paths: Sequence[Path], boundary: str) -> tuple[list[bytes | Path], int]:
    """The body's parts in order (bytes, or a file to stream) and the body's length in bytes."""
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")
    parts: list[bytes | Path] = []
    length = 0
    for path in paths:
        parts += [head, path, b"\r\n"]
        length += len(head) + os.path.getsize(path) + 2
    tail = f"--{boundary}--\r\n".encode("ascii")
    parts.append(tail)
    return parts, length + len(tail)


def _stream(parts: list[bytes | Path]) -> Iterator[bytes]:
    for part in parts:
        if isinstance(part, bytes):
            yield part
            continue
        with open(part, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                yield chunk


def _uids(item: dict, key: str) -> list[str]:
    values = (item.get(key) or {}).get("Value") or []
    return [str(v) for v in values]


def parse_stow_response(
    status: int, body: bytes, sent_uids: Sequence[str], *, reason: str = ""
) -> StowResult:
    """Read a STOW-RS answer (DICOM JSON) for the instances ``sent_uids``; ``reason`` is the HTTP
    reason phrase."""
    if status not in (200, 202, 409):
        # The status line only: an error page's body may echo what it was sent (patient data
        # included), and the error goes into the job's reason, the log and the audit file.
        hint = " (check the destination's auth)" if status in (401, 403) else ""
        return StowResult(0, 0, len(sent_uids), f"HTTP {status} {reason}".rstrip() + hint)
    try:
        document = json.loads(body) if body.strip() else {}
    except ValueError as exc:
        return StowResult(0, 0, len(sent_uids), f"HTTP {status} with an unreadable answer: {exc}")
    if isinstance(document, list):  # some servers wrap the one dataset in a list
        document = document[0] if document else {}
    if not isinstance(document, dict):
        why = f"HTTP {status} with an answer that is not a DICOM JSON dataset"
        return StowResult(0, 0, len(sent_uids), why)
    sequences = {
        key: [item for item in (document.get(key) or {}).get("Value") or [] if isinstance(item, dict)]
        for key in (_REFERENCED_SOP_SEQUENCE, _FAILED_SOP_SEQUENCE)
    }
    ours = set(sent_uids)
    stored = {uid for item in sequences[_REFERENCED_SOP_SEQUENCE]
              for uid in _uids(item, _REFERENCED_SOP_INSTANCE_UID)} & ours
    reasons: dict[str, str] = {}
    for item in sequences[_FAILED_SOP_SEQUENCE]:
        codes = (item.get(_FAILURE_REASON) or {}).get("Value") or []
        reason = f"failure reason 0x{int(codes[0]):04X}" if codes else "no failure reason given"
        for uid in _uids(item, _REFERENCED_SOP_INSTANCE_UID):
            if uid in ours:
                reasons[uid] = reason
    refused = set(reasons) - stored
    missing = ours - stored - refused
    if refused:
        example = reasons[sorted(refused)[0]]
        return StowResult(len(stored), len(refused), len(missing),
                          f"HTTP {status}: {len(refused)} instance(s) refused ({example})")
    if missing:
        return StowResult(len(stored), 0, len(missing),
                          f"HTTP {status}: {len(missing)} instance(s) not named as stored in the answer")
    return StowResult(len(stored), 0, 0, None)


def _connection(destination: DicomwebDestinationSettings) -> http.client.HTTPConnection:
    url = urllib.parse.urlsplit(destination.dicomweb)
    if url.scheme == "https":
        # The server's certificate must chain to the configured CA (or the system's) and name its host.
        tls = destination.tls
        context = client_context(tls) if tls is not None else ssl.create_default_context()
        return http.client.HTTPSConnection(
            url.hostname, url.port, timeout=destination.timeout_s, context=context
        )
    return http.client.HTTPConnection(url.hostname, url.port, timeout=destination.timeout_s)


def stow_files(paths: Sequence[Path], destination: DicomwebDestinationSettings) -> StowResult:
    """POST every file in ``paths`` to ``<dicomweb>/studies`` in one request; never raises for
    network or server trouble (the error says what happened)."""
    if not paths:
        return StowResult(0, 0, 0, None)
    try:
        uids = [str(read_file_meta_info(path).MediaStorageSOPInstanceUID) for path in paths]
        authorization = destination.auth.authorization() if destination.auth is not None else None
        connection = _connection(destination)
    except (OSError, ValueError, TlsError) as exc:  # unreadable spool file, secret or TLS file
        return StowResult(0, 0, len(paths), f"{type(exc).__name__}: {exc}")
    boundary = uuid.uuid4().hex
    parts, length = _multipart(paths, boundary)
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Content-Length": str(length),
        "Accept": "application/dicom+json",
    }
    if authorization is not None:
        headers["Authorization"] = authorization
    target = urllib.parse.urlsplit(destination.dicomweb).path.rstrip("/") + "/studies"
    try:
        connection.request("POST", target, body=_stream(parts), headers=headers)
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        # Nothing is known about what was stored: the next attempt sends the whole series again,
        # which a DICOMweb server keys by SOP Instance UID like any PACS.
        why = f"no answer from {destination.dicomweb}: {type(exc).__name__}: {exc}"
        return StowResult(0, 0, len(paths), why)
    finally:
        connection.close()
    return parse_stow_response(response.status, body, uids, reason=response.reason)
