"""The administrator's window: a read-only status page at ``/`` of the node's HTTP listener, and each
job's preview image at ``/jobs/<id>/preview.png``.

The page shows what ``upete status`` shows (it renders the same report, :func:`collect_status`):
node health and versions, the spool's disk, the jobs with their state, reason, durations per stage,
study date/time, UIDs, deliveries and preview, and the PET series that were not processed. Never a
patient name, ID or birth date: the report holds none. Plain HTML from the standard library, every
value through :func:`html.escape`, inline CSS, no script, font or anything fetched from elsewhere (the
node runs offline); it reloads itself (meta refresh).

The preview route maps a job id to that job's own ``preview.png`` (the path comes from the job's row,
never from the URL) and serves nothing else. :class:`HttpAuth` is the optional basic or bearer guard
that dicomnode/metrics.py puts in front of every path but ``/healthz``.
"""

from __future__ import annotations

import base64
import hmac
import html
import logging
import re
from collections.abc import Sequence

from dicomnode.config import HttpAuthSettings, Settings
from dicomnode.db import Database
from dicomnode.metrics import MetricsServer
from dicomnode.preview import PREVIEW_PNG

# The text report's formats, so that the page and `upete status` read alike.
from dicomnode.status import SpoolSize, collect_status, format_size, format_time
from model.enhance import EnhancerInfo
from upete import __version__

__all__ = [
    "HttpAuth",
    "StatusPages",
    "is_loopback",
    "load_auth",
    "preview_url",
    "render_page",
    "serve_status_page",
]

log = logging.getLogger("upete.web")

_HTML = "text/html; charset=utf-8"
_TEXT = "text/plain; charset=utf-8"
_PREVIEW_ROUTE = re.compile(r"/jobs/([0-9]{1,18})/preview\.png")
_REALM = "uPETe node"

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d232a;background:#f6f7f9}
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{border:1px solid #d5d9de;padding:.35em .5em;text-align:left;vertical-align:top}
th{background:#eceff3;font-weight:600}
.uid{font-family:ui-monospace,monospace;font-size:12px;word-break:break-all}
.state{font-weight:600;text-transform:uppercase;font-size:12px}
.done{color:#176b2c}.failed{color:#a4161a}.sending,.running{color:#7a5a00}.queued{color:#3d4f63}
.bad{color:#a4161a;font-weight:600}.muted{color:#69737d}
img.preview{max-width:360px;display:block;border:1px solid #d5d9de}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.2em 1em;margin:0}dt{font-weight:600}
"""


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    return host in ("localhost", "::1") or host.startswith("127.")


class HttpAuth:
    """Basic or bearer authentication against the configured credentials, compared in constant time.

    The secret is read once, here (at start): a node whose secret cannot be read refuses to start
    rather than serve without the guard its config asks for.
    """

    def __init__(self, settings: HttpAuthSettings) -> None:
        self.scheme = settings.scheme
        expected = settings.authorization()  # raises ValueError naming the missing file or variable
        self._credentials = expected.split(" ", 1)[1].encode()
        # RFC 7617 2.1: charset="UTF-8" tells browsers how to encode a non-ASCII password.
        self.challenge = (f'Basic realm="{_REALM}", charset="UTF-8"' if self.scheme == "basic"
                          else f'Bearer realm="{_REALM}"')

    def allows(self, authorization: str | None) -> bool:
        if not authorization:
            return False
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() != self.scheme:  # RFC 9110 11.1: the scheme is case-insensitive
            return False
        offered = credentials.strip().encode("utf-8", "replace")
        if self.scheme == "basic":
            # Compare the decoded user:password, so equivalent base64 paddings do not matter.
            try:
                offered = base64.b64decode(offered, validate=True)
            except ValueError:
                return False
            return hmac.compare_digest(offered, base64.b64decode(self._credentials))
        return hmac.compare_digest(offered, self._credentials)


def preview_url(job_id: int) -> str:
    return f"/jobs/{int(job_id)}/preview.png"


def _e(value: object) -> str:
    # An enum member (a job or send state) shows its value, not its Python name.
    value = getattr(value, "value", value)
    return html.escape("" if value is None else str(value), quote=True)


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.1f} s"


def _node_section(report: dict, enhancers: Sequence[EnhancerInfo]) -> str:
    node, disk, counts = report["node"], report["disk"], report["job_counts"]
    healthy = node["running"] and "unhealthy" not in node["summary"]
    rows = [
        ("Node", f'<span class="{"" if healthy else "bad"}">{_e(node["summary"])}</span>'),
        ("Software", f"uPETe node {_e(__version__)}"),
    ]
    for label, info in zip(("Model", "PET-only model"), enhancers, strict=False):
        rows.append((label, f'{_e(info.name)} <span class="uid">{_e(info.version)}</span>'))
    low = ' <span class="bad">below storage.min_free_mb: new instances are refused</span>' \
        if disk["below_min_free"] else ""
    free, total = format_size(disk["free_bytes"]), format_size(disk["total_bytes"])
    spool = format_size(disk["spool_bytes"])
    rows.append(("Disk", f"{_e(free)} free of {_e(total)}; spool {_e(spool)}{low}"))
    rows.append(("Jobs", ", ".join(f"{int(n)} {_e(state)}" for state, n in counts.items())))
    rows.append(("Updated", _e(format_time(report["generated_at"]))))
    items = "".join(f"<dt>{label}</dt><dd>{value}</dd>" for label, value in rows)
    return f"<dl>{items}</dl>"


def _durations(job: dict) -> str:
    parts = [f"{label} {_e(_seconds(job[key]))}" for key, label in
             (("waiting_s", "waiting"), ("processing_s", "processing"), ("total_s", "total"))
             if job[key] is not None]
    stages = job["stage_seconds"] or {}
    if stages:
        parts.append('<span class="muted">' + ", ".join(
            f"{_e(stage)} {_e(_seconds(seconds))}" for stage, seconds in stages.items()) + "</span>")
    return "<br>".join(parts)


def _uids(job: dict) -> str:
    rows = [("study", job["study_uid"]), ("PET", job["pet_series_uid"]),
            ("CT", job["ct_series_uid"] or "none"), ("derived", job["derived_series_uid"])]
    return "<br>".join(f'{label} <span class="uid">{_e(uid)}</span>' for label, uid in rows if uid)


def _sends(job: dict) -> str:
    lines = []
    for send in job["sends"]:
        error = f': <span class="bad">{_e(send["last_error"])}</span>' if send["last_error"] else ""
        lines.append(f'{_e(send["destination"])} <span class="state {_e(send["state"])}">{_e(send["state"])}'
                     f'</span> ({int(send["attempts"])} attempt(s), {int(send["sent"])} sent){error}')
    return "<br>".join(lines)


def _job_row(job: dict) -> str:
    reason = f'<br><span class="bad">{_e(job["reason"])}</span>' if job["reason"] else ""
    preview = ""
    if job["preview"]:
        url = _e(preview_url(job["id"]))
        preview = (f'<a href="{url}"><img class="preview" src="{url}" '
                   f'alt="preview of job {int(job["id"])}" loading="lazy"></a>')
    count = f' ({int(job["output_instances"])} instances)' if job["output_instances"] is not None else ""
    created, study = format_time(job["created_at"]), job["study_time"] or "date unknown"
    return (
        f'<tr id="job-{int(job["id"])}"><td>{int(job["id"])}</td>'
        f'<td><span class="state {_e(job["state"])}">{_e(job["state"])}</span>{reason}</td>'
        f"<td>created {_e(created)}<br>study {_e(study)}</td>"
        f"<td>{_durations(job)}</td><td>{_uids(job)}{_e(count)}</td><td>{_sends(job)}</td><td>{preview}</td></tr>"
    )


def render_page(report: dict, *, enhancers: Sequence[EnhancerInfo] = (), refresh_s: int = 10) -> str:
    """The whole page for a :func:`collect_status` report."""
    jobs = "".join(_job_row(job) for job in report["jobs"]) or '<tr><td colspan="7">no jobs</td></tr>'
    series = "".join(
        f'<tr><td class="uid">{_e(item["series_uid"])}</td><td class="uid">{_e(item["study_uid"])}</td>'
        f'<td>{_e(item["state"])}</td><td>{_e(item["reason"])}</td><td>{_e(format_time(item["updated_at"]))}</td></tr>'
        for item in report["series"]
    ) or '<tr><td colspan="5">none</td></tr>'
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{int(refresh_s)}">
<meta name="referrer" content="no-referrer">
<title>uPETe node status</title><style>{_CSS}</style></head>
<body><h1>uPETe node</h1>
{_node_section(report, enhancers)}
<h2>Jobs (newest first)</h2>
<table id="jobs"><thead><tr><th>Job</th><th>State</th><th>When</th><th>Durations</th><th>Study and series</th>
<th>Deliveries</th><th>Preview</th></tr></thead><tbody>{jobs}</tbody></table>
<h2>PET series not processed</h2>
<table id="series"><thead><tr><th>Series</th><th>Study</th><th>State</th><th>Reason</th><th>Updated</th>
</tr></thead><tbody>{series}</tbody></table>
<p class="muted">Read-only; reloads every {int(refresh_s)} s; the same report as
<code>upete status</code>.</p>
</body></html>
"""


class StatusPages:
    """The routes of the page (``/``) and the previews, as :class:`dicomnode.metrics.Pages`."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        *,
        enhancers: Sequence[EnhancerInfo] = (),
        refresh_s: int = 10,
        limit: int = 50,
    ) -> None:
        self.settings = settings
        self.db = db
        self.enhancers = tuple(enhancers)
        self.refresh_s = refresh_s
        self.limit = limit
        self.root = settings.storage.root.resolve()
        self.spool_size = SpoolSize(max_age_s=60.0)

    def __call__(self, path: str) -> tuple[int, str, bytes] | None:
        if path in ("/", "/index.html"):
            report = collect_status(self.settings, self.db, limit=self.limit, spool_size=self.spool_size)
            return 200, _HTML, render_page(report, enhancers=self.enhancers,
                                           refresh_s=self.refresh_s).encode("utf-8")
        match = _PREVIEW_ROUTE.fullmatch(path)
        if match:
            return self._preview(int(match.group(1)))
        if path.startswith("/jobs/"):
            return 404, _TEXT, b"not found\n"
        return None

    def _preview(self, job_id: int) -> tuple[int, str, bytes]:
        rows = self.db.query("SELECT output_dir FROM jobs WHERE id = ?", (job_id,))
        if not rows or not rows[0]["output_dir"]:
            return 404, _TEXT, f"job {job_id} has no preview\n".encode()
        path = (self.root / rows[0]["output_dir"] / PREVIEW_PNG).resolve()
        # The directory comes from the node's own database; still, serve nothing outside the spool.
        if not path.is_relative_to(self.root):
            log.warning("preview outside the spool refused", extra={"fields": {"job_id": job_id}})
            return 404, _TEXT, f"job {job_id} has no preview\n".encode()
        try:
            return 200, "image/png", path.read_bytes()
        except OSError:  # not made (preview off or failed) or removed by retention
            return 404, _TEXT, f"job {job_id} has no preview\n".encode()



def load_auth(settings: Settings) -> HttpAuth | None:
    """The listener's guard from ``metrics.auth`` (None: none configured); raises :class:`ValueError`
    when its secret cannot be read."""
    auth = settings.metrics.auth
    return HttpAuth(auth) if auth is not None else None


def serve_status_page(
    server: MetricsServer,
    settings: Settings,
    db: Database,
    *,
    enhancers: Sequence[EnhancerInfo],
    auth: HttpAuth | None,
) -> None:
    """Mount the page and previews on the node's HTTP listener, behind ``auth`` when there is one."""
    server.mount(StatusPages(settings, db, enhancers=enhancers), auth=auth)
    if auth is None and not is_loopback(server.host):
        # Job states and study UIDs are not for every machine on the network.
        log.warning(
            "HTTP listener reachable beyond loopback without authentication: set metrics.auth",
            extra={"fields": {"url": server.url}},
        )
    scheme = auth.scheme if auth is not None else "none"
    log.info("status page", extra={"fields": {"url": server.url + "/", "auth": scheme}})
