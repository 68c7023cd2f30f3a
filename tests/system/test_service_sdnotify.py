"""sd_notify: the node tells systemd READY=1 only once it accepts associations, and STOPPING=1.

The test plays systemd: it binds an AF_UNIX datagram socket, starts ``upete serve`` with
``$NOTIFY_SOCKET`` pointing at it, and reads what arrives.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicomnode import sdnotify
from dicomnode.testing.peers import ROOT, SCANNER_AE, free_port, peer_env, write_config


def _datagram_socket(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(10)
    return sock


def _messages(sock: socket.socket, *, until: str, timeout: float) -> list[str]:
    """Messages received until one contains ``until`` (fails after ``timeout`` s)."""
    sock.settimeout(timeout)
    received = []
    while True:
        try:
            received.append(sock.recv(4096).decode())
        except TimeoutError:
            pytest.fail(f"no {until!r} within {timeout:g} s; received {received!r}")
        if until in received[-1]:
            return received


def test_notify_is_a_no_op_outside_systemd() -> None:
    assert sdnotify.notify("READY=1", environ={}) is False


def test_notify_sends_one_datagram_to_a_path(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with _datagram_socket(path) as sock:
        assert sdnotify.notify("READY=1", "STATUS=ok", environ={"NOTIFY_SOCKET": path})
        assert sock.recv(4096) == b"READY=1\nSTATUS=ok"


def test_notify_understands_abstract_socket_names() -> None:
    name = f"upete-test-{os.getpid()}-{free_port()}"
    with _datagram_socket("\0" + name) as sock:
        assert sdnotify.notify("STATUS=abstract", environ={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"STATUS=abstract"


def test_a_missing_socket_is_reported_not_raised(tmp_path: Path) -> None:
    assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False


def _echo(port: int) -> int:
    ae = AE(ae_title=SCANNER_AE)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="UPETE")
    if not assoc.is_established:
        return -1
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def test_serve_notifies_ready_after_listening_and_stopping_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, port=port)
    notify_path = str(tmp_path / "notify")
    with _datagram_socket(notify_path) as sock:
        node = subprocess.Popen(
            [sys.executable, "-m", "upete", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "node.err", "w"),  # noqa: SIM115 - the child holds it
            cwd=ROOT,
            env={**peer_env(), "NOTIFY_SOCKET": notify_path},
        )
        try:
            ready = _messages(sock, until="READY=1", timeout=90)
            # READY=1 means "serving": the very first association after it must succeed.
            assert _echo(port) == 0
            assert f"STATUS=listening on 127.0.0.1:{port}" in ready[-1]
            node.send_signal(signal.SIGTERM)
            stopping = _messages(sock, until="STOPPING=1", timeout=30)
            assert node.wait(timeout=60) == 0, (tmp_path / "node.err").read_text()
            assert "READY=1" not in "".join(stopping)  # ready once, not again on the way down
        finally:
            if node.poll() is None:
                node.kill()
                node.wait(timeout=30)
