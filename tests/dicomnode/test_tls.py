"""DICOM TLS against DCMTK: certificates made here with the openssl CLI, peers on 127.0.0.1 only.

The node serves TLS only when ``access.tls`` is set: plain TCP, a client without a certificate and a
client whose certificate another CA signed are all refused before any DICOM is read; a slow or
plain-TCP peer does not hold up the others; DCMTK echoscu/storescu with a good certificate are
served, and what they store lands in the spool. The sender speaks TLS to a DCMTK storescp.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydicom import dcmread

from dicomnode.audit import AuditLog
from dicomnode.config import DestinationSettings, parse_settings
from dicomnode.db import DB_FILENAME, Database
from dicomnode.scp import ScpContext, start_server
from dicomnode.sender import send_files
from dicomnode.store import InstanceStore
from dicomnode.testing.peers import (
    ROOT,
    NodeProcess,
    db_rows,
    echoscu,
    free_port,
    peer_env,
    storescu,
    wait_for,
    write_config,
)
from dicomnode.testing.scanner import StudyInfo, write_pet_series
from dicomnode.tls import TlsError, server_context
from tests.conftest import require_tool

_DAYS = "2"


def _openssl(*args: str, cwd: Path) -> None:
    exe = shutil.which("openssl")
    if exe is None:
        message = "the openssl command is missing: `make peers` installs it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    subprocess.run([exe, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(directory: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", _DAYS,
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip


def _leaf(directory: Path, name: str, ca: str, extensions: str) -> None:
    (directory / f"{name}.ext").write_text(extensions)
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
        "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", _DAYS, "-out", f"{name}.pem", "-extfile", f"{name}.ext",
        cwd=directory,
    )  # fmt: skip


@dataclass(frozen=True)
class Pki:
    directory: Path

    def path(self, name: str) -> str:
        return str(self.directory / name)

    def dcmtk(self, who: str = "client", ca: str = "ca") -> list[str]:
        """DCMTK options: TLS with ``who``'s key and certificate, the peer verified against ``ca``."""
        return ["+tls", self.path(f"{who}.key"), self.path(f"{who}.pem"), "+cf", self.path(f"{ca}.pem")]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server certificate for 127.0.0.1 (SAN IP), a client certificate, and a client
    certificate from another CA that the node must not trust."""
    directory = tmp_path_factory.mktemp("pki")
    _ca(directory, "ca")
    _ca(directory, "rogue-ca")
    server_ext = (
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
    )
    client_ext = (
        "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
    )
    _leaf(directory, "server", "ca", server_ext)
    _leaf(directory, "client", "ca", client_ext)
    _leaf(directory, "rogue", "rogue-ca", client_ext)
    return Pki(directory)


class TlsServer:
    """The node's SCP with ``access.tls`` on a free loopback port (no worker threads)."""

    def __init__(self, tmp: Path, pki: Pki, *, require_client_certificate: bool = True) -> None:
        self.port = free_port()
        self.tmp = tmp
        self.settings = parse_settings(
            {
                "node": {"ae_title": "UPETE", "port": self.port, "acse_timeout_s": 5.0},
                "access": {
                    "allowed_callers": [{"ae_title": "SCANNER", "host": "127.0.0.1"}],
                    "tls": {
                        "certificate": pki.path("server.pem"),
                        "private_key": pki.path("server.key"),
                        "ca_certificates": pki.path("ca.pem"),
                        "require_client_certificate": require_client_certificate,
                    },
                },
                "storage": {"root": str(tmp / "spool"), "min_free_mb": 0},
            }
        )
        self.db = Database(tmp / DB_FILENAME)
        self.audit = AuditLog(tmp / "audit.log")
        self.store = InstanceStore(tmp / "spool", self.db, min_free_mb=0)
        self.server = start_server(ScpContext(self.settings, self.store, self.audit))

    def audit_text(self) -> str:
        return self.audit.path.read_text()

    def close(self) -> None:
        self.server.shutdown()
        self.audit.close()
        self.db.close()


@pytest.fixture
def tls_server(tmp_path: Path, pki: Pki) -> TlsServer:
    srv = TlsServer(tmp_path, pki)
    yield srv
    srv.close()


def _pet_files(directory: Path) -> list[Path]:
    activity = np.random.default_rng(1).uniform(0, 20000, (3, 8, 8)).astype(np.float32)
    return write_pet_series(directory, activity, spacing_mm=(3.0, 4.0, 4.0), study=StudyInfo())


def test_dcmtk_echoscu_with_a_certificate_from_our_ca_is_served(tls_server: TlsServer, pki: Pki) -> None:
    result = echoscu(tls_server.port, extra=pki.dcmtk())
    assert result.returncode == 0, result.stdout + result.stderr


def test_dcmtk_storescu_over_tls_lands_in_the_spool(tls_server: TlsServer, pki: Pki, tmp_path: Path) -> None:
    files = _pet_files(tmp_path / "in")
    result = storescu(files, tls_server.port, extra=pki.dcmtk())
    assert result.returncode == 0, result.stdout + result.stderr
    uids = [str(dcmread(p).SOPInstanceUID) for p in files]
    stored = tls_server.store.paths(uids)
    assert sorted(stored) == sorted(uids)
    assert all(Path(p).is_file() for p in stored.values())


def test_plain_tcp_is_refused_and_audited(tls_server: TlsServer, pki: Pki) -> None:
    result = echoscu(tls_server.port)
    assert result.returncode != 0
    wait_for(lambda: "event=tls_refused" in tls_server.audit_text(), timeout=10, what="the tls_refused line")
    assert "address=127.0.0.1" in tls_server.audit_text()
    assert echoscu(tls_server.port, extra=pki.dcmtk()).returncode == 0  # and the node still serves TLS


def test_a_client_without_a_certificate_is_refused(tls_server: TlsServer, pki: Pki) -> None:
    result = echoscu(tls_server.port, extra=["+tla", "+cf", pki.path("ca.pem")])
    assert result.returncode != 0
    wait_for(lambda: "event=tls_refused" in tls_server.audit_text(), timeout=10, what="the tls_refused line")


def test_a_client_certificate_from_another_ca_is_refused(tls_server: TlsServer, pki: Pki) -> None:
    result = echoscu(tls_server.port, extra=pki.dcmtk(who="rogue"))
    assert result.returncode != 0
    wait_for(lambda: "event=tls_refused" in tls_server.audit_text(), timeout=10, what="the tls_refused line")


def test_without_required_client_certificates_an_anonymous_client_is_served(
    tmp_path: Path, pki: Pki
) -> None:
    srv = TlsServer(tmp_path, pki, require_client_certificate=False)
    try:
        result = echoscu(srv.port, extra=["+tla", "+cf", pki.path("ca.pem")])
        assert result.returncode == 0, result.stdout + result.stderr
        # A certificate that is presented must still verify.
        assert echoscu(srv.port, extra=pki.dcmtk(who="rogue")).returncode != 0
    finally:
        srv.close()


def test_access_control_still_applies_over_tls(tls_server: TlsServer, pki: Pki) -> None:
    assert echoscu(tls_server.port, calling="NOBODY", extra=pki.dcmtk()).returncode != 0
    wait_for(
        lambda: "event=association_refused" in tls_server.audit_text(),
        timeout=10,
        what="the association_refused line",
    )


def test_a_silent_peer_does_not_hold_up_other_callers(tls_server: TlsServer, pki: Pki) -> None:
    # pynetdicom would handshake in its single accept thread: one peer that connects and says
    # nothing would block every other caller. The handshake runs in the connection's thread instead.
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=10) as silent:
        time.sleep(0.3)
        started = time.monotonic()
        result = echoscu(tls_server.port, extra=pki.dcmtk(), timeout=30)
        assert result.returncode == 0, result.stdout + result.stderr
        assert time.monotonic() - started < 4.0  # well under the node's 5 s handshake timeout
        # ...and the silent one is dropped after acse_timeout_s (5 s).
        silent.settimeout(15)
        assert silent.recv(1) == b""


def test_python_client_negotiates_tls_1_2_or_newer_only(tls_server: TlsServer, pki: Pki) -> None:
    context = ssl.create_default_context(cafile=pki.path("ca.pem"))
    context.load_cert_chain(pki.path("client.pem"), pki.path("client.key"))
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=10) as raw:
        with pytest.raises(ssl.SSLError):
            context.wrap_socket(raw, server_hostname="127.0.0.1")


def test_a_key_that_does_not_match_the_certificate_is_a_named_error(pki: Pki) -> None:
    settings = parse_settings(
        {
            "access": {
                "tls": {
                    "certificate": pki.path("server.pem"),
                    "private_key": pki.path("client.key"),
                    "ca_certificates": pki.path("ca.pem"),
                }
            }
        }
    )
    with pytest.raises(TlsError, match="access.tls: cannot use certificate .*server.pem"):
        server_context(settings.access.tls)


def test_serve_with_tls_stores_over_tls_and_refuses_a_bad_key(tmp_path: Path, pki: Pki) -> None:
    config = write_config(tmp_path, port=free_port())
    data = yaml.safe_load(config.read_text())
    data["access"]["tls"] = {
        "certificate": pki.path("server.pem"),
        "private_key": pki.path("server.key"),
        "ca_certificates": pki.path("ca.pem"),
    }
    config.write_text(yaml.safe_dump(data))
    node = NodeProcess(config, echo_extra=pki.dcmtk())
    with node:
        assert echoscu(node.port).returncode != 0  # no clear text
        files = _pet_files(tmp_path / "in")
        result = storescu(files, node.port, extra=pki.dcmtk())
        assert result.returncode == 0, result.stdout + result.stderr
        assert len(db_rows(node.db_path, "SELECT * FROM instances")) == len(files)
    assert "tls=True" in (tmp_path / "audit.log").read_text()

    data["access"]["tls"]["private_key"] = pki.path("client.key")  # not the certificate's key
    config.write_text(yaml.safe_dump(data))
    bad = subprocess.run(
        [sys.executable, "-m", "upete", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=peer_env(),
    )
    assert bad.returncode == 2
    assert "access.tls" in bad.stderr + bad.stdout


@pytest.fixture
def tls_storescp(tmp_path: Path, pki: Pki):
    """DCMTK storescp serving TLS only and requiring a client certificate from our CA."""
    exe = require_tool("/usr/bin/storescp")
    port = free_port()
    out = tmp_path / "received"
    out.mkdir()
    log = open(tmp_path / "storescp.out", "w")  # noqa: SIM115 - the child holds it
    process = subprocess.Popen(
        [exe, "-aet", "PACS", "-od", str(out), *pki.dcmtk(who="server"), str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=peer_env(),
    )
    log.close()
    try:
        wait_for(lambda: _listening(port), timeout=20, what="storescp to listen")
        yield port, out
    finally:
        process.terminate()
        process.wait(timeout=20)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_the_sender_speaks_tls_to_a_dcmtk_storescp(tls_storescp, pki: Pki, tmp_path: Path) -> None:
    port, out = tls_storescp
    files = _pet_files(tmp_path / "out")
    base = {"ae_title": "PACS", "host": "127.0.0.1", "port": port}
    good = DestinationSettings.model_validate(
        {
            **base,
            "tls": {
                "ca_certificates": pki.path("ca.pem"),
                "certificate": pki.path("client.pem"),
                "private_key": pki.path("client.key"),
            },
        }
    )
    outcome = send_files(files, good, calling_ae="UPETE", acse_timeout_s=10, network_timeout_s=10)
    assert outcome.ok, outcome.error
    assert outcome.sent == len(files) == len(list(out.iterdir()))

    # A destination whose certificate our CA did not sign is not sent to.
    untrusted = DestinationSettings.model_validate(
        {**base, "tls": {**good.tls.model_dump(mode="json"), "ca_certificates": pki.path("rogue-ca.pem")}}
    )
    outcome = send_files(files, untrusted, calling_ae="UPETE", acse_timeout_s=10, network_timeout_s=10)
    assert not outcome.ok and outcome.sent == 0
    # Plain TCP to a TLS-only peer fails too (nothing goes out in clear text by accident).
    plain = DestinationSettings.model_validate(base)
    outcome = send_files(files, plain, calling_ae="UPETE", acse_timeout_s=10, network_timeout_s=10)
    assert not outcome.ok
