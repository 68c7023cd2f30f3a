"""Studies shaped like real scanners', through DCMTK storescu → `upete serve` → DCMTK storescp.

Most PET/CT systems reconstruct the PET over 52–70 cm and the CT over 50 cm. The CT then holds the
whole patient but not the PET's box: the CT-guided model must run. A CT that stops short of the patient
must not be used: the PET-only model runs, and the reason is in `upete status`, the audit line, the log
and the derived series. And a site config without a model section runs the shipped uPETe weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread

from dicomnode.testing.peers import (
    ROOT,
    NodeProcess,
    StoreSCP,
    db_rows,
    free_port,
    storescu,
    wait_for,
    write_config,
)
from dicomnode.testing.scanner import StudyInfo
from tests.support.dicomutil import dciodvfy_errors, make_study

pytestmark = [pytest.mark.network, pytest.mark.slow]

# PET: 4 mm × 144 = 57.6 cm across (a box a 50 cm CT holds only (50 / 57.6)² = 75 % of), 12 slices of
# 4 mm. CT: 3.906 mm × 128 = 50 cm across, 3 mm slices. The body: 33 × 24 cm, inside the CT's circle.
WIDE_PET = {"pet_shape": (12, 144, 144), "pet_spacing": (4.0, 4.0, 4.0), "body_scale": 3.0,
            "ct_spacing": (3.0, 500.0 / 128, 500.0 / 128), "ct_centre": (0.0, 0.0, 0.0)}


def _status(config: Path) -> dict:
    result = subprocess.run([sys.executable, "-m", "upete", "status", "--config", str(config), "--json"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT, check=True)
    return json.loads(result.stdout)


def _series(pacs: StoreSCP) -> dict[str, list]:
    by_series: dict[str, list] = {}
    for ds in pacs.datasets():
        by_series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    return by_series


def test_a_50cm_ct_in_a_wider_pet_field_of_view_guides_the_model_and_a_short_one_does_not(
        tmp_path: Path) -> None:
    from tests.support.model_toys import tiny_checkpoint

    # Untrained tiny models of the shipped architectures: what runs, not how well, is under test.
    model = {"checkpoint": str(tiny_checkpoint(tmp_path / "models", "ldm-p-ct")),
             "checkpoint_without_ct": str(tiny_checkpoint(tmp_path / "models", "ldm-p")),
             "device": "cpu", "steps": 1}
    covered = make_study(tmp_path / "covered", ct_shape=(20, 128, 128), **WIDE_PET)
    # Another patient, the same scanner: the CT spans 30 mm of the PET's 48 mm.
    short = make_study(tmp_path / "short", ct_shape=(10, 128, 128), study=StudyInfo(), **WIDE_PET)
    with StoreSCP(tmp_path / "pacs") as pacs:
        config = write_config(tmp_path, port=free_port(), destinations=[pacs.destination()], model=model,
                              ct_wait_s=60.0)
        with NodeProcess(config) as node:
            for study in (covered, short):  # CT first, as scanners send
                sent = storescu(study.ct_paths + study.pet_paths, node.port)
                assert sent.returncode == 0, sent.stderr
            wait_for(lambda: len(db_rows(node.db_path, "SELECT 1 FROM jobs WHERE state = 'done'")) == 2,
                     timeout=240, what="both jobs done", interval=0.5)
            status = _status(config)
        log = node.log()

    jobs = {job["study_uid"]: job for job in status["jobs"]}
    used = jobs[covered.study.study_uid]
    ct_series = str(dcmread(covered.ct_paths[0], stop_before_pixels=True).SeriesInstanceUID)
    assert used["ct_series_uid"] == ct_series
    assert used["ct_note"] is None and used["variant"] == "main"
    assert used["model"]["checkpoint"] == "tiny-ldm-p-ct.safetensors"
    assert used["model"]["name"] == "uPETe LDM-P-CT"

    missed = jobs[short.study.study_uid]
    reason = "the CT's axial range holds 6"
    assert missed["variant"] == "without_ct" and missed["model"]["name"] == "uPETe LDM-P"
    assert missed["ct_note"].startswith(f"PET-only model: {reason}")
    audit = (tmp_path / "audit.log").read_text()
    [paired] = [line for line in audit.splitlines()
                if "event=ct_paired" in line and f"study_uid={covered.study.study_uid}" in line]
    box = float(paired.split("box_coverage=")[1].split()[0])
    assert box < 0.8  # a rule over the PET's box (at least 90 %) would have refused this CT
    assert f'to=sending reason="PET-only model: {reason}' in audit
    assert "enhancing without the CT" in log and reason in log

    series = _series(pacs)
    assert sorted(len(datasets) for datasets in series.values()) == [12, 12]
    with_ct, without_ct = series[used["derived_series_uid"]], series[missed["derived_series_uid"]]
    assert with_ct[0].DerivationDescription.startswith("uPETe LDM-P-CT latent diffusion")
    assert without_ct[0].DerivationDescription.startswith(f"PET-only model: {reason}")
    assert all(ds.SeriesDescription.endswith(" uPETe") for ds in with_ct + without_ct)
    for path in sorted(pacs.out_dir.iterdir())[:2]:
        assert dciodvfy_errors(path) == [], path.name


def test_a_site_config_without_a_model_section_runs_the_shipped_upete_weights(tmp_path: Path) -> None:
    study = make_study(tmp_path / "in")
    with StoreSCP(tmp_path / "pacs") as pacs:
        full = yaml.safe_load(write_config(tmp_path, port=free_port(), destinations=[pacs.destination()])
                              .read_text())
        # What an administrator writes: node, access, storage, destinations. (The audit file and the
        # metrics port only keep this test's files in its folder and its port free of other tests'.)
        minimal = {key: full[key] for key in ("node", "access", "storage", "destinations")}
        minimal |= {"logging": {"audit_file": str(tmp_path / "audit.log")}, "metrics": {"port": 0}}
        config = tmp_path / "site.yaml"
        config.write_text(yaml.safe_dump(minimal, sort_keys=False))
        with NodeProcess(config) as node:
            assert storescu(study.ct_paths + study.pet_paths, node.port).returncode == 0
            wait_for(lambda: db_rows(node.db_path, "SELECT 1 FROM jobs WHERE state IN ('done', 'failed')"),
                     timeout=240, what="the job to finish", interval=0.5)
            status = _status(config)
        log = node.log()

    [job] = status["jobs"]
    assert job["state"] == "done", job["reason"]
    assert job["model"]["checkpoint"] == "upete-ldm-p-ct.safetensors" and job["ct_note"] is None
    digest = job["model"]["version"]
    assert digest and f"version {digest}" in pacs.datasets()[0].DerivationDescription
    assert "checkpoint=upete-ldm-p-ct.safetensors" in log and "checkpoint=upete-ldm-p.safetensors" in log
    derived = pacs.datasets()
    assert len(derived) == len(study.pet_paths)
    assert {ds.SeriesDescription for ds in derived} == {"PET AC uPETe"}
    assert "Gaussian" not in derived[0].DerivationDescription
