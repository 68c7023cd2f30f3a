"""systemd's readiness protocol (sd_notify(3)) without libsystemd: one datagram per message.

Under ``Type=notify`` systemd sets ``$NOTIFY_SOCKET`` to an AF_UNIX datagram socket (a path, or an
abstract name written with a leading ``@``) and waits for ``READY=1`` before it calls the unit started.
Outside systemd the variable is unset and every call is a no-op, so the node runs the same in a
terminal, in tests and under systemd. A failed send is logged and otherwise ignored: readiness
reporting must never stop the node from serving.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["notify", "ready", "stopping", "status"]

log = logging.getLogger("upete.sdnotify")


def _address(value: str) -> str:
    # "@name" is Linux's abstract namespace: the kernel wants a leading NUL byte instead.
    return "\0" + value[1:] if value.startswith("@") else value


def notify(*lines: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``lines`` (``KEY=value``) as one message; False when not under systemd or the send failed."""
    target = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not target:
        return False
    if not target.startswith(("/", "@")):
        log.warning("NOTIFY_SOCKET ignored: not a path or an abstract socket name")
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(_address(target))
            sock.sendall("\n".join(lines).encode("utf-8"))
    except OSError as exc:
        log.warning("sd_notify failed", extra={"fields": {"error": str(exc)}})
        return False
    return True


def ready(status_text: str = "") -> bool:
    """READY=1 (and a STATUS line): call once the node accepts associations."""
    return notify("READY=1", *([f"STATUS={status_text}"] if status_text else []))


def stopping(status_text: str = "stopping") -> bool:
    """STOPPING=1: the graceful stop has begun."""
    return notify("STOPPING=1", f"STATUS={status_text}")


def status(status_text: str) -> bool:
    """A one-line status that ``systemctl status upete`` shows (no patient data: counts only)."""
    return notify(f"STATUS={status_text}")
