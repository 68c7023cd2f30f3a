"""`upete serve` starts a node that answers C-ECHO from DCMTK and stops cleanly on SIGTERM."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import require_tool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_answers_dcmtk_echoscu_and_stops_on_sigterm(tmp_path: Path) -> None:
    echoscu = require_tool("/usr/bin/echoscu")
    port = _free_port()
    config = tmp_path / "node.yaml"
    config.write_text(
        f"node: {{ae_title: UPETE, host: 127.0.0.1, port: {port}}}\n"
        f"storage: {{root: {tmp_path / 'spool'}}}\n"
        f"logging: {{audit_file: {tmp_path / 'audit.log'}}}\n"
    )
    node = subprocess.Popen([sys.executable, "-m", "upete", "serve", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            echo = subprocess.run([echoscu, "-aec", "UPETE", "-to", "5", "127.0.0.1", str(port)],
                                  capture_output=True, text=True, timeout=30,
                                  env={**os.environ, "TCP_NODELAY": "1"})
            if echo.returncode == 0 or time.monotonic() > deadline or node.poll() is not None:
                break
            time.sleep(0.3)
        assert echo.returncode == 0, echo.stderr
        node.send_signal(signal.SIGTERM)
        output, _ = node.communicate(timeout=60)
        assert node.returncode == 0, output
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()
