"""Logging: one line per event, ``key=value`` or JSON, to stderr for journald.

Log calls pass fields as ``extra={"fields": {...}}``; the formatters render them. Never put patient
names, IDs or birth dates into fields: log UIDs and counts.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping


class _Base(logging.Formatter):
    def _fields(self, record: logging.LogRecord) -> dict[str, object]:
        fields = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info).replace("\n", " | ")
        return fields


class KeyValueFormatter(_Base):
    def format(self, record: logging.LogRecord) -> str:
        parts = []
        for key, value in self._fields(record).items():
            text = str(value)
            if not text or any(c in text for c in ' "=\t\n'):
                text = json.dumps(text)
            parts.append(f"{key}={text}")
        return " ".join(parts)


class JsonFormatter(_Base):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(self._fields(record), default=str)


#: Logger names whose level :func:`setup_logging` set (so a later call can undo them).
_configured: set[str] = set()

#: Loggers quieter than the root level unless ``logging.levels`` names them.
_QUIET = {
    # pynetdicom logs every PDU at INFO (and dataset contents at DEBUG, which may hold PHI).
    "pynetdicom": "WARNING",
    # matplotlib (job previews) reports font cache and backend choices at INFO/DEBUG.
    "matplotlib": "WARNING",
    "PIL": "WARNING",
}


def setup_logging(
    level: str = "INFO", fmt: str = "keyvalue", levels: Mapping[str, str] | None = None
) -> None:
    """Configure the root logger once for a process (idempotent).

    ``levels`` maps logger names to levels over the root ``level`` (``logging.levels`` in the config,
    e.g. ``{"upete.scp": "DEBUG"}``); a name covers its children (``upete`` covers ``upete.scp``).
    A logger named by an earlier call and not by this one goes back to following the root.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    wanted = {**_QUIET, **dict(levels or {})}
    for name in _configured - set(wanted):
        logging.getLogger(name).setLevel(logging.NOTSET)
    for name, name_level in wanted.items():
        logging.getLogger(name).setLevel(name_level)
    _configured.clear()
    _configured.update(wanted)
