"""Peers for tests and benchmarks that run the node on loopback: DCMTK tools, ``upete serve``, the database.

- :func:`free_port`, :func:`wait_for`;
- :func:`write_config`: a node config for a test or benchmark (short timers, its own spool and audit file);
- :class:`NodeProcess`: ``upete serve`` as a subprocess (output to a file, never a pipe that could
  fill), started until it answers C-ECHO, stopped with SIGTERM or killed with SIGKILL;
- :class:`StoreSCP`: DCMTK ``storescp`` playing the PACS;
- :func:`storescu` / :func:`echoscu`: DCMTK's SCUs (always by full path: the venv has pynetdicom's
  apps of the same names);
- :func:`db_rows`, :func:`job_states`: read the node database (as ``upete status`` does);
- :func:`require_tool`: a peer tool's path, or :class:`ToolMissing` (the tests turn it into a skip).

Every process gets ``TCP_NODELAY=1`` (DCMTK leaves Nagle on, ~40 ms per instance) and is stopped by
the helper that started it, also when a test fails. :data:`ROOT` is the source checkout these helpers
run from (``upete serve`` starts there); none of this is used by the running node.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import yaml
from pydicom import dcmread
from pydicom.dataset import Dataset

__all__ = [
    "NODE_AE", "PACS_AE", "ROOT", "SCANNER_AE", "VENV_BIN", "NodeProcess", "StoreSCP", "ToolMissing",
    "db_rows", "echoscu", "free_port", "job_states", "peer_env", "require_tool", "storescu", "wait_for",
    "write_config",
]

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"


class ToolMissing(RuntimeError):
    """A peer tool (DCMTK, dicom3tools) is not installed; the message says how to install it."""


def require_tool(path: str) -> str:
    """The absolute path of a peer tool (a path, or a name looked up on PATH); raises :class:`ToolMissing`."""
    if os.path.isabs(path) and os.access(path, os.X_OK):
        return path
    found = shutil.which(path)
    if found:
        return found
    raise ToolMissing(f"{path} is missing: run `make test` (installs DCMTK, Orthanc and dicom3tools)")


T = TypeVar("T")

NODE_AE = "UPETE"
SCANNER_AE = "SCANNER"
PACS_AE = "PACS"


def peer_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    """An ephemeral TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(
    predicate: Callable[[], T], *, timeout: float, interval: float = 0.1, what: str = "condition"
) -> T:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def write_config(
    directory: Path,
    *,
    port: int,
    destinations: Sequence[dict] = (),
    allowed_callers: Sequence[dict] | None = None,
    series_timeout_s: float = 1.5,
    ct_wait_s: float = 0.0,
    model: dict | None = None,
    min_free_mb: int = 0,
) -> Path:
    """Write ``directory/node.yaml`` for a node on 127.0.0.1:``port`` with its spool in ``directory``."""
    config = {
        "node": {
            "ae_title": NODE_AE,
            "host": "127.0.0.1",
            "port": port,
            "acse_timeout_s": 10.0,
            "dimse_timeout_s": 20.0,
            "network_timeout_s": 20.0,
        },
        "access": {
            "allowed_callers": list(
                allowed_callers
                if allowed_callers is not None
                else [{"ae_title": SCANNER_AE, "host": "127.0.0.1"}]
            )
        },
        "storage": {"root": str(directory / "spool"), "min_free_mb": min_free_mb},
        "assembly": {"series_timeout_s": series_timeout_s, "ct_wait_s": ct_wait_s},
        "destinations": [dict(d) for d in destinations],
        "model": model or {"checkpoint": "classical:gaussian", "device": "cpu"},
        "logging": {"level": "INFO", "audit_file": str(directory / "audit.log")},
        # Any free port: nodes of tests running side by side must not fight over the default 9464.
        "metrics": {"enabled": True, "host": "127.0.0.1", "port": 0},
    }
    path = directory / "node.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def echoscu(
    port: int,
    *,
    calling: str = SCANNER_AE,
    called: str = NODE_AE,
    extra: Sequence[str] = (),
    timeout: float = 10.0,
) -> subprocess.CompletedProcess:
    """C-ECHO with DCMTK echoscu; ``extra`` are more options (e.g. ``+tls KEY CERT +cf CA``)."""
    exe = require_tool("/usr/bin/echoscu")
    return subprocess.run(
        [exe, "-aet", calling, "-aec", called, "-to", "5", "-ta", "5", *extra, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=peer_env(),
    )


def storescu(
    files: Iterable[Path],
    port: int,
    *,
    calling: str = SCANNER_AE,
    called: str = NODE_AE,
    extra: Sequence[str] = (),
    timeout: float = 60.0,
) -> subprocess.CompletedProcess:
    """Send ``files`` with DCMTK storescu in one association; returns the finished process."""
    exe = require_tool("/usr/bin/storescu")
    command = [
        exe,
        "-aet",
        calling,
        "-aec",
        called,
        "-to",
        "10",
        "-ta",
        "10",
        "-td",
        "20",
        *extra,
        "127.0.0.1",
        str(port),
        *[str(f) for f in files],
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=peer_env())


class NodeProcess:
    """``upete serve --config CONFIG`` in a subprocess, output in ``<config dir>/node.out``.

    ``preamble`` is Python run in the node process before the CLI (tests use it to slow the enhancer
    down, so a kill can land while a job runs); production code has no such hook.
    """

    def __init__(
        self, config: Path, *, preamble: str | None = None, echo_extra: Sequence[str] = ()
    ) -> None:
        self.config = Path(config)
        self.directory = self.config.parent
        self.output = self.directory / "node.out"
        self.preamble = preamble
        self.echo_extra = tuple(echo_extra)  # e.g. the TLS options when the node serves TLS only
        settings = yaml.safe_load(self.config.read_text())
        self.port = int(settings["node"]["port"])
        self.db_path = Path(settings["storage"]["root"]) / "node.sqlite3"
        callers = settings.get("access", {}).get("allowed_callers") or [{"ae_title": SCANNER_AE}]
        self.echo_ae = callers[0]["ae_title"]  # C-ECHO as a caller the node accepts
        self.process: subprocess.Popen | None = None

    def start(self, *, timeout: float = 60.0) -> NodeProcess:
        if self.preamble is None:
            command = [sys.executable, "-m", "upete", "serve", "--config", str(self.config)]
        else:
            code = f"{self.preamble}\nimport sys\nfrom upete.cli import main\nsys.exit(main(sys.argv[1:]))"
            command = [sys.executable, "-c", code, "serve", "--config", str(self.config)]
        log = open(self.output, "a")  # noqa: SIM115 - the child holds it; closed below
        try:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=peer_env()
            )
        finally:
            log.close()
        try:
            wait_for(
                self._answers_echo,
                timeout=timeout,
                interval=0.2,
                what=f"the node to answer C-ECHO ({self.output})",
            )
        except BaseException:
            self.kill()  # a node that never answered must not outlive the test that started it
            raise
        return self

    def _answers_echo(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"the node exited with {self.process.returncode}:\n{self.log()}")
        return echoscu(self.port, calling=self.echo_ae, extra=self.echo_extra).returncode == 0

    def log(self) -> str:
        return self.output.read_text() if self.output.exists() else ""

    def stop(self, *, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the node did not stop within {timeout:g} s after SIGTERM") from None

    def kill(self) -> None:
        """SIGKILL: the crash the node must survive."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                self.stop()
            except AssertionError:
                pass


class StoreSCP:
    """DCMTK storescp writing every received instance into ``out_dir``: the PACS of the tests."""

    def __init__(self, out_dir: Path, *, port: int | None = None, ae_title: str = PACS_AE) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.ae_title = ae_title
        self.process: subprocess.Popen | None = None

    def destination(self, **overrides: object) -> dict:
        """This SCP as a ``destinations`` entry of the node config."""
        return {
            "ae_title": self.ae_title,
            "host": "127.0.0.1",
            "port": self.port,
            "max_retries": 3,
            "retry_backoff_s": 0.5,
            **overrides,
        }

    def start(self) -> StoreSCP:
        exe = require_tool("/usr/bin/storescp")
        log = open(self.out_dir.parent / f"storescp-{self.port}.out", "a")  # noqa: SIM115
        try:
            self.process = subprocess.Popen(
                [exe, "-aet", self.ae_title, "-od", str(self.out_dir), "-td", "20", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=peer_env(),
            )
        finally:
            log.close()
        wait_for(self._listening, timeout=20, what="storescp to listen")
        return self

    def _listening(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            log = (self.out_dir.parent / f"storescp-{self.port}.out").read_text()
            raise AssertionError(f"storescp exited with {self.process.returncode}:\n{log}")
        return _listening(self.port)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def datasets(self) -> list[Dataset]:
        return [dcmread(path) for path in sorted(self.out_dir.iterdir()) if path.is_file()]

    def __enter__(self) -> StoreSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def db_rows(db_path: Path, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
    """Rows of a query on the node database (opened read-only, WAL: safe beside a running node)."""
    if not db_path.exists():
        return []
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def job_states(db_path: Path) -> dict[str, str]:
    """PET series UID → job state."""
    return {row["pet_series_uid"]: row["state"] for row in db_rows(db_path, "SELECT * FROM jobs")}
