"""The systemd unit: ``systemd-analyze verify`` accepts it without a single warning, and it keeps
the sandbox and the readiness protocol the README promises.

``verify`` refuses a unit whose ExecStart binary is missing, so the copy it checks points ExecStart
at this checkout's ``.venv/bin/upete``; everything else is verified as shipped (an unknown user is
not an error for ``verify``; a typo in a key or value is a warning, and warnings fail this test).
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from dicomnode.testing.peers import ROOT, VENV_BIN

UNIT = ROOT / "systemd" / "upete.service"
GPU_DROP_IN = ROOT / "systemd" / "upete-gpu.conf"
SHIPPED_EXEC = "/opt/upete/.venv/bin/upete"


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        message = "systemd-analyze is missing: `make peers` installs the systemd package (needs root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return exe


def _verify(text: str, directory: Path) -> subprocess.CompletedProcess:
    upete = VENV_BIN / "upete"
    assert upete.is_file(), f"{upete} missing: run make install"
    assert SHIPPED_EXEC in text
    unit = directory / "upete.service"
    unit.write_text(text.replace(SHIPPED_EXEC, str(upete)))
    return subprocess.run(
        [_systemd_analyze(), "verify", str(unit)], capture_output=True, text=True, timeout=60
    )


def test_systemd_analyze_verify_accepts_the_unit_without_warnings(tmp_path: Path) -> None:
    result = _verify(UNIT.read_text(), tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


def test_the_unit_with_the_gpu_drop_in_verifies_too(tmp_path: Path) -> None:
    # verify takes no drop-ins; appending the drop-in's [Service] lines is what systemd merges.
    drop_in = GPU_DROP_IN.read_text().split("[Service]", 1)[1]
    text = UNIT.read_text().replace("\n[Install]", drop_in + "\n[Install]")
    result = _verify(text, tmp_path)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


def test_verify_is_strict_enough_to_catch_a_typo(tmp_path: Path) -> None:
    # Without this, a verify that silently accepted anything would make the test above worthless.
    result = _verify(UNIT.read_text().replace("ProtectHome=yes", "ProtectHom=yes"), tmp_path)
    assert "ProtectHom" in result.stderr


def test_the_unit_is_sandboxed_and_uses_readiness_notification() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keys are case-sensitive in systemd
    parser.read_string(UNIT.read_text())
    service = parser["Service"]
    expected = {
        "Type": "notify",
        "User": "upete",
        "Group": "upete",
        "Restart": "on-failure",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "CapabilityBoundingSet": "",
        "ReadWritePaths": "/var/lib/upete",
        "ExecStart": f"{SHIPPED_EXEC} serve --config /etc/upete/node.yaml",
    }
    assert {key: service.get(key) for key in expected} == expected
