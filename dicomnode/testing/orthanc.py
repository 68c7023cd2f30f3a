"""Orthanc as a PACS for tests and benchmarks: the shipped recipe (config/orthanc/orthanc.json) with only
what a run must change — ephemeral ports, its own directories, the Lua rules, and optionally the
DICOMweb plugin (Debian ``orthanc-dicomweb``) for STOW-RS.

Orthanc has no bind option: it listens on every interface, so the recipe keeps remote access off and
the ports are ephemeral ones; everything the callers do goes to 127.0.0.1.
"""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from dicomnode.testing.peers import ROOT, free_port, peer_env, require_tool, wait_for

__all__ = ["ORTHANC", "DICOMWEB_PLUGIN", "RECIPE", "OrthancServer"]

ORTHANC = "/usr/sbin/Orthanc"
#: Where Debian's orthanc-dicomweb puts the plugin.
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
RECIPE = ROOT / "config" / "orthanc"


class OrthancServer:
    """One Orthanc in ``directory`` (its config, storage and ``orthanc.out`` log); :meth:`start` runs it."""

    def __init__(
        self,
        directory: Path,
        *,
        node_port: int | None = None,
        rules: Sequence[Path] = (),
        dicomweb: bool = False,
    ) -> None:
        self.directory = Path(directory)
        self.http_port, self.dicom_port = free_port(), free_port()
        config = json.loads((RECIPE / "orthanc.json").read_text())
        if config["RemoteAccessAllowed"] is not False:
            raise AssertionError("the recipe must never open Orthanc's REST API to the network")
        config.update({
            "StorageDirectory": str(self.directory / "storage"),
            "IndexDirectory": str(self.directory / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "StableAge": 2,
            "LuaScripts": [str(rule) for rule in rules],
        })
        if node_port is not None:
            config["DicomModalities"]["upete"][2] = node_port
        if dicomweb:
            config["Plugins"] = [str(DICOMWEB_PLUGIN)]
            config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "orthanc.json").write_text(json.dumps(config, indent=2))
        self.process: subprocess.Popen | None = None

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb base URL (STOW-RS posts to ``<this>/studies``)."""
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def start(self) -> OrthancServer:
        exe = require_tool(ORTHANC)
        log = open(self.directory / "orthanc.out", "a")  # noqa: SIM115 - the child holds it; closed below
        try:
            self.process = subprocess.Popen(
                [exe, str(self.directory / "orthanc.json")],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=peer_env(),
            )
        finally:
            log.close()
        wait_for(self._up, timeout=60, interval=0.3, what="Orthanc's REST API")
        return self

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"Orthanc exited: {(self.directory / 'orthanc.out').read_text()[-3000:]}")
        try:
            return bool(self.get("/system"))
        except OSError:
            return False

    def get(self, path: str) -> object:
        """A REST API answer, parsed from JSON."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as response:
            return json.loads(response.read())

    def instances(self) -> int:
        """How many instances Orthanc holds."""
        return int(self.get("/statistics")["CountInstances"])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)  # Orthanc takes a few seconds to stop
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
