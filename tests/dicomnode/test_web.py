"""The status page and its preview route (dicomnode/web.py) and the listener's auth (dicomnode/metrics.py),
in process against a spool made here; a real browser against a real node: tests/system/test_status_page.py."""

from __future__ import annotations

import base64
import logging
import re
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dicomnode.audit import AuditLog
from dicomnode.config import HttpAuthSettings, parse_settings
from dicomnode.db import DB_FILENAME, Database
from dicomnode.jobs import JobQueue
from dicomnode.metrics import MetricsServer
from dicomnode.preview import PREVIEW_PNG
from dicomnode.web import HttpAuth, StatusPages, is_loopback, preview_url, serve_status_page
from model.enhance import EnhancerInfo

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32
HOSTILE = '<script>alert("x")</script>'
INFO = EnhancerInfo(name="Gaussian filter", version="sha256:abc123", description="test",
                    uses_ct=False, requires_ct=False)


@pytest.fixture
def spool(tmp_path: Path) -> tuple[StatusPages, dict[str, int]]:
    """A spool with a done job that has a preview, and a failed one with a hostile reason."""
    root = tmp_path / "spool"
    root.mkdir()
    settings = parse_settings({"storage": {"root": str(root)}, "logging": {"audit_file": None}})
    db = Database(root / DB_FILENAME)
    queue = JobQueue(db, AuditLog(None))
    done = queue.create(pet_series_uid="1.2.3.1", study_uid="1.2.3", ct_series_uid=None, variant="main",
                        pet_sop_uids=["1.2.3.1.1"])
    queue.claim_processing(lease_s=60)
    queue.set_plan(done, "{}", derived_series_uid="1.2.3.99")
    out = root / "outputs" / f"job-{done}"
    out.mkdir(parents=True)
    (out / PREVIEW_PNG).write_bytes(PNG)
    queue.processed(done, output_dir=f"outputs/job-{done}", output_count=0, stage_seconds={"enhance": 1.5},
                    destinations=[])
    failed = queue.create(pet_series_uid="1.2.4.1", study_uid="1.2.4", ct_series_uid=None, variant="main",
                          pet_sop_uids=["1.2.4.1.1"])
    queue.claim_processing(lease_s=60)
    queue.fail(failed, HOSTILE)
    yield StatusPages(settings, db, enhancers=[INFO], refresh_s=7), {"done": done, "failed": failed}
    db.close()


def test_page_lists_jobs_escaped_and_self_contained(spool: tuple[StatusPages, dict[str, int]]) -> None:
    pages, ids = spool
    status, content_type, body = pages("/")
    page = body.decode()
    assert status == 200 and content_type.startswith("text/html")
    assert '<meta http-equiv="refresh" content="7">' in page
    assert f'id="job-{ids["done"]}"' in page and f'id="job-{ids["failed"]}"' in page
    assert "1.2.3.99" in page and "enhance 1.5 s" in page
    assert "Gaussian filter" in page and "sha256:abc123" in page
    assert HOSTILE not in page and html_escaped(HOSTILE) in page  # the reason is text, never markup
    assert f'src="{preview_url(ids["done"])}"' in page
    assert f'src="{preview_url(ids["failed"])}"' not in page  # no preview made: no broken image
    # Offline node: nothing is fetched from anywhere else, and there is no script at all.
    assert "<script" not in page
    assert not re.search(r"""(src|href)=["'](https?:)?//""", page)
    assert "@import" not in page and "url(" not in page


def html_escaped(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def test_preview_route_serves_only_the_jobs_own_preview(
    spool: tuple[StatusPages, dict[str, int]], tmp_path: Path
) -> None:
    pages, ids = spool
    assert pages(preview_url(ids["done"])) == (200, "image/png", PNG)
    assert pages(preview_url(ids["failed"]))[0] == 404  # failed before it had outputs
    assert pages("/jobs/999/preview.png")[0] == 404
    for path in ("/jobs/../node.db", f"/jobs/{ids['done']}/../../node.db", "/jobs/1/preview.png.bak",
                 "/jobs/%2e%2e/preview.png", "/jobs/-1/preview.png", "/outputs/job-1/preview.png"):
        answer = pages(path)
        assert answer is None or answer[0] == 404, path
    # A row whose directory leads out of the spool (it cannot come from the node) is still refused.
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / PREVIEW_PNG).write_bytes(PNG)
    with pages.db.transaction() as conn:
        conn.execute("UPDATE jobs SET output_dir = '../elsewhere' WHERE id = ?", (ids["done"],))
    assert pages(preview_url(ids["done"]))[0] == 404


def _auth(**fields: object) -> HttpAuth:
    return HttpAuth(HttpAuthSettings.model_validate(fields))


def test_basic_and_bearer_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    basic = _auth(scheme="basic", username="admin", secret="s3cret")
    good = "Basic " + base64.b64encode(b"admin:s3cret").decode()
    assert basic.allows(good) and basic.allows(good.replace("Basic", "basic"))
    assert not basic.allows(None) and not basic.allows("")
    assert not basic.allows("Basic " + base64.b64encode(b"admin:wrong").decode())
    assert not basic.allows("Basic not-base64!") and not basic.allows("Bearer s3cret")
    assert basic.challenge.startswith('Basic realm="uPETe node"')

    secret_file = tmp_path / "token"
    secret_file.write_text("tok-from-file\n")
    bearer = _auth(scheme="bearer", secret_file=str(secret_file))
    assert bearer.allows("Bearer tok-from-file") and not bearer.allows("Bearer tok-from-fil")
    assert bearer.challenge == 'Bearer realm="uPETe node"'

    monkeypatch.setenv("UPETE_TEST_TOKEN", "tok-from-env")
    assert _auth(scheme="bearer", secret_env="UPETE_TEST_TOKEN").allows("Bearer tok-from-env")
    monkeypatch.delenv("UPETE_TEST_TOKEN")
    with pytest.raises(ValueError, match="UPETE_TEST_TOKEN"):
        _auth(scheme="bearer", secret_env="UPETE_TEST_TOKEN")
    with pytest.raises(ValueError, match="missing"):
        _auth(scheme="bearer", secret_file=str(tmp_path / "missing"))


def _get(url: str, authorization: str | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers={"Authorization": authorization} if authorization else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def test_listener_guards_everything_but_healthz(spool: tuple[StatusPages, dict[str, int]]) -> None:
    pages, ids = spool
    server = MetricsServer("127.0.0.1", 0, health=lambda: {"scp": True})
    try:
        assert _get(server.url + "/")[0] == 404  # nothing mounted yet: the metrics server as before
        server.mount(pages, auth=_auth(scheme="bearer", secret="tok"))
        for path in ("/", "/metrics", preview_url(ids["done"])):
            status, headers, _ = _get(server.url + path)
            assert status == 401 and headers["WWW-Authenticate"] == 'Bearer realm="uPETe node"', path
            assert _get(server.url + path, "Bearer wrong")[0] == 401
        assert _get(server.url + "/healthz")[0] == 200
        status, headers, body = _get(server.url + "/", "Bearer tok")
        assert status == 200 and b"uPETe node" in body and headers["Cache-Control"] == "no-store"
        assert _get(server.url + preview_url(ids["done"]), "Bearer tok")[2] == PNG
        assert _get(server.url + "/metrics", "Bearer tok")[0] == 200
        assert _get(server.url + "/nothing", "Bearer tok")[0] == 404
    finally:
        server.close()


class _FakeServer:
    def __init__(self, host: str) -> None:
        self.host, self.url, self.mounted = host, f"http://{host}:9464", None

    def mount(self, pages: object, *, auth: object = None) -> None:
        self.mounted = (pages, auth)


def test_warning_when_the_page_is_open_beyond_loopback(
    spool: tuple[StatusPages, dict[str, int]], caplog: pytest.LogCaptureFixture
) -> None:
    pages, _ = spool
    caplog.set_level(logging.INFO, logger="upete.web")
    for host, auth, warned in (("127.0.0.1", None, False), ("0.0.0.0", None, True),
                               ("0.0.0.0", _auth(scheme="bearer", secret="t"), False)):
        caplog.clear()
        server = _FakeServer(host)
        serve_status_page(server, pages.settings, pages.db, enhancers=[INFO], auth=auth)  # type: ignore[arg-type]
        assert server.mounted is not None and server.mounted[1] is auth
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert bool(warnings) is warned, host
    assert is_loopback("127.0.0.1") and is_loopback("::1") and not is_loopback("10.0.0.5")


def test_a_node_whose_auth_secret_cannot_be_read_refuses_to_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from dicomnode.service import run_node

    settings = parse_settings({
        "storage": {"root": str(tmp_path / "spool")},
        "logging": {"audit_file": None},
        "metrics": {"port": 0, "auth": {"scheme": "bearer", "secret_file": str(tmp_path / "no-such-file")}},
    })
    result: list[int] = []
    # In a thread: run_node installs signal handlers only on the main thread, which is pytest's.
    thread = threading.Thread(target=lambda: result.append(run_node(settings)))
    thread.start()
    thread.join(60)
    assert result == [2]  # never serves the page unguarded
    [record] = [r for r in caplog.records if "metrics.auth does not load" in r.getMessage()]
    assert "no-such-file" in record.fields["error"]  # the log names what is missing
