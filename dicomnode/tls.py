"""DICOM TLS (PS3.15 B.1, BCP 195): the SSL contexts of the SCP and of the sender.

Both sides speak TLS 1.2 or newer only (PS3.15 B.1 retired everything older). The SCP presents
``access.tls.certificate`` and, with ``require_client_certificate``, refuses any peer whose certificate
does not chain to ``ca_certificates`` (``CERT_REQUIRED``). The sender verifies the destination's
certificate against its ``ca_certificates`` (or the system's CAs) and presents its own when one is
configured.

pynetdicom wraps an accepted socket in the server's single accept thread, where the handshake would
block every other caller for as long as one slow or plain-TCP peer likes. :class:`_ServerContext`
therefore wraps without handshaking; :func:`handshake` completes it in the connection's own thread,
bounded by a timeout (the SCP binds it to ``EVT_CONN_OPEN``).
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from dicomnode.config import DestinationTlsSettings, TlsSettings

__all__ = ["TlsError", "client_context", "handshake", "peer_subject", "server_context"]

_MINIMUM = ssl.TLSVersion.TLSv1_2


class TlsError(ValueError):
    """The TLS configuration cannot be used (unreadable or mismatched certificate/key); names the file."""


class _ServerContext(ssl.SSLContext):
    """An SSLContext whose server-side sockets defer the handshake to :func:`handshake`."""

    def wrap_socket(self, sock: socket.socket, server_side: bool = False, **kwargs: object) -> ssl.SSLSocket:
        if server_side:
            kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, server_side=server_side, **kwargs)  # type: ignore[arg-type]


def _no_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal of a service; we have no key password
    # setting, so an encrypted key is a configuration error (protect the key with file permissions).
    raise ValueError("encrypted private keys are not supported; store the key unencrypted, mode 0600")


def _load_chain(context: ssl.SSLContext, certificate: Path, private_key: Path, key: str) -> None:
    try:
        context.load_cert_chain(certificate, private_key, password=_no_password)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise TlsError(f"{key}: cannot use certificate {certificate} with key {private_key}: {exc}") from None


def _load_ca(context: ssl.SSLContext, ca_certificates: Path, key: str) -> None:
    try:
        context.load_verify_locations(cafile=ca_certificates)
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"{key}: cannot read CA certificates {ca_certificates}: {exc}") from None


def server_context(tls: TlsSettings) -> ssl.SSLContext:
    """The SCP's context from ``access.tls``; raises :class:`TlsError` naming the file that fails."""
    context = _ServerContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _MINIMUM
    _load_chain(context, tls.certificate, tls.private_key, "access.tls")
    if tls.ca_certificates is not None:
        _load_ca(context, tls.ca_certificates, "access.tls.ca_certificates")
    if tls.require_client_certificate:
        context.verify_mode = ssl.CERT_REQUIRED
    elif tls.ca_certificates is not None:
        context.verify_mode = ssl.CERT_OPTIONAL  # a certificate presented must still verify
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_context(tls: DestinationTlsSettings) -> ssl.SSLContext:
    """The sender's context for one destination: the peer's certificate and host name are verified."""
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_certificates) if tls.ca_certificates else None
    )
    context.minimum_version = _MINIMUM
    if tls.certificate is not None and tls.private_key is not None:
        _load_chain(context, tls.certificate, tls.private_key, "destinations[].tls")
    return context


def handshake(sock: ssl.SSLSocket, *, timeout_s: float) -> None:
    """Complete a deferred server-side handshake within ``timeout_s``; raises ``OSError`` on failure
    (``ssl.SSLError`` for a refused certificate or a peer not speaking TLS, ``TimeoutError``)."""
    previous = sock.gettimeout()
    sock.settimeout(timeout_s)
    sock.do_handshake()
    sock.settimeout(previous)


def peer_subject(sock: ssl.SSLSocket) -> str:
    """The peer certificate's common name (a device or site name, not patient data), or ``""``."""
    cert = sock.getpeercert() or {}
    for rdn in cert.get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return str(value)
    return ""
