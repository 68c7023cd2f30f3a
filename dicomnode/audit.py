"""The audit log: one line per association, stored series, job transition and send.

Lines carry UIDs, AE titles, addresses and counts — never patient names, IDs or birth dates. They go
to the audit file (``logging.audit_file``, appended, flushed per line so a crash loses nothing that
was acknowledged) and to the ``upete.audit`` logger, so journald has them too.

Line format: ``ts=… event=… key=value …`` (values with spaces or quotes JSON-quoted), the same as
:class:`dicomnode.logs.KeyValueFormatter` writes.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

__all__ = ["AuditLog", "format_line"]

log = logging.getLogger("upete.audit")


def _quote(value: object) -> str:
    text = "" if value is None else str(value)
    if not text or any(c in text for c in ' "=\t\n\\'):
        return json.dumps(text)
    return text


def format_line(event: str, fields: dict[str, object], *, now: float | None = None) -> str:
    """``ts=<UTC ISO time> event=<event> k=v …`` on one line."""
    now = time.time() if now is None else now
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
    parts = [f"ts={ts}", f"event={_quote(event)}"]
    parts += [f"{key}={_quote(value)}" for key, value in fields.items()]
    return " ".join(parts)


class AuditLog:
    """Thread-safe append-only audit lines; ``path=None`` logs to the logger only."""

    def __init__(self, path: Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._file = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Line-buffered append: each line reaches the kernel at once (a crash of this process
            # loses nothing written); power loss is the page cache's business, as for any log.
            self._file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
            os.chmod(self.path, 0o640)

    def record(self, event: str, **fields: object) -> None:
        """Write one audit line. Callers pass UIDs and counts only (no patient identifiers)."""
        line = format_line(event, fields)
        with self._lock:
            if self._file is not None:
                self._file.write(line + "\n")
        log.info(event, extra={"fields": fields})

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
