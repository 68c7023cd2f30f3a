"""The node's operations surface, end to end: ``upete serve`` with /metrics and /healthz on loopback,
a study sent with DCMTK storescu, the counters scraped over HTTP, ``upete status`` reading the
heartbeat, the disk and the job (with its preview), then the same after the node stopped.

(tests/model/evaluation/test_metrics.py is about image-quality metrics; this file is about Prometheus.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from dicomnode.testing.peers import (
    ROOT,
    NodeProcess,
    StoreSCP,
    free_port,
    job_states,
    storescu,
    wait_for,
    write_config,
)
from tests.support.dicomutil import make_study

pytestmark = [pytest.mark.network, pytest.mark.slow]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text format (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def _status(config: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "upete", "status", "--config", str(config), "--json"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=True,
    )
    return json.loads(result.stdout)


def test_metrics_healthz_and_status_follow_a_study(tmp_path: Path) -> None:
    study = make_study(tmp_path / "in", shuffle_seed=3)
    metrics_port = free_port()
    with StoreSCP(tmp_path / "pacs") as pacs:
        config = write_config(
            tmp_path, port=free_port(), destinations=[pacs.destination()], series_timeout_s=1.5
        )
        settings = yaml.safe_load(config.read_text())
        settings["metrics"] = {"enabled": True, "host": "127.0.0.1", "port": metrics_port}
        config.write_text(yaml.safe_dump(settings, sort_keys=False))
        base = f"http://127.0.0.1:{metrics_port}"
        with NodeProcess(config) as node:
            code, body = _get(base + "/healthz")
            assert code == 200, body
            health = json.loads(body)
            assert health.pop("status") == "ok"
            assert {"scp", "assembler", "worker", "sender"} <= set(health)  # and any newer thread
            assert set(health.values()) == {"alive"}
            _, before = _get(base + "/metrics")
            assert _sample(before, "upete_model_load_seconds") > 0
            stored_before = _sample(before, "upete_instances_total", outcome="stored", status="0x0000")

            sent = storescu(study.ct_paths + study.pet_paths, node.port)
            assert sent.returncode == 0, sent.stderr
            refused = storescu(study.pet_paths[:1], node.port, calling="STRANGER")
            assert refused.returncode != 0
            wait_for(lambda: set(job_states(node.db_path).values()) == {"done"}, timeout=120,
                     what=f"the job to be done ({node.output})")

            _, after = _get(base + "/metrics")
            stored = _sample(after, "upete_instances_total", outcome="stored", status="0x0000")
            assert stored - stored_before == len(study.ct_paths) + len(study.pet_paths)
            assert _sample(after, "upete_associations_total", result="accepted", reason="") >= 1
            rejected = _sample(after, "upete_associations_total", result="rejected",
                               reason="calling_ae_title")
            assert rejected == 1
            assert _sample(after, "upete_jobs", state="done") == 1
            assert _sample(after, "upete_jobs", state="failed") == 0
            for stage in ("load", "enhance", "write", "send", "preview"):
                assert _sample(after, "upete_stage_seconds_count", stage=stage) >= 1, stage
            assert _sample(after, "upete_send_attempts_total", result="ok") == 1
            assert _sample(after, "upete_previews_total", result="ok") == 1
            assert "process_resident_memory_bytes" in after
            assert _get(base + "/nothing")[0] == 404

            report = _status(config)
            assert report["node"]["running"] is True, report["node"]
            assert report["node"]["heartbeat"]["metrics_url"] == base
            assert report["disk"]["spool_bytes"] > 0 and report["disk"]["free_bytes"] > 0
            assert report["job_counts"]["done"] == 1
            [job] = report["jobs"]
            assert job["study_time"] == "2026-01-15 09:30"  # StudyDate/Time of make_study's study
            assert job["preview"] and Path(job["preview"]).stat().st_size > 10_000
            assert set(job["stage_seconds"]) >= {"load", "enhance", "write"}
            text = subprocess.run([sys.executable, "-m", "upete", "status", "--config", str(config)],
                                  capture_output=True, text=True, timeout=60, cwd=ROOT, check=True).stdout
            assert text.startswith("node      running (pid ") and "1 done, 0 failed" in text
            for leak in ("PHANTOM", "PH0001"):  # the patient name and ID of make_study's study
                assert leak not in text and leak not in json.dumps(report)
            assert node.stop() == 0
    report = _status(config)
    assert report["node"]["running"] is False and "stopped at" in report["node"]["summary"]
    with pytest.raises(OSError):
        _get(base + "/healthz")


def test_healthz_is_503_naming_a_dead_thread() -> None:
    from dicomnode.metrics import MetricsServer

    alive = {"scp": True, "worker": True, "sender": True}
    server = MetricsServer("127.0.0.1", 0, health=lambda: alive)
    try:
        assert _get(server.url + "/healthz")[0] == 200
        alive["worker"] = False
        code, body = _get(server.url + "/healthz")
        assert code == 503
        expected = {"status": "unhealthy", "scp": "alive", "worker": "dead", "sender": "alive"}
        assert json.loads(body) == expected
    finally:
        server.close()
