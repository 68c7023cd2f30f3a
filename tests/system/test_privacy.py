"""No patient data in any log: the whole node end to end at DEBUG, then every line is searched.

The study carries a patient name, ID and birth date that occur nowhere else, goes DCMTK storescu →
``upete serve`` → DCMTK storescp, with the paths that log most on the way: a caller that is refused,
an instance that is refused, a job that is enhanced and sent. Not one of those values (nor a part of
the name) may appear in the node's stderr log or the audit file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicomnode.testing.peers import (
    NodeProcess,
    StoreSCP,
    db_rows,
    free_port,
    storescu,
    wait_for,
    write_config,
)
from dicomnode.testing.scanner import StudyInfo
from tests.support.dicomutil import make_study

pytestmark = [pytest.mark.network, pytest.mark.slow]

PATIENT = StudyInfo(
    patient_name="QZXPRIVFAMILY^QZXPRIVGIVEN",
    patient_id="QZXPID7731",
    birth_date="19230817",
)
# The name as DICOM holds it, its components, and the ways a formatter might render the date.
FORBIDDEN = ("QZXPRIVFAMILY", "QZXPRIVGIVEN", "QZXPID7731", "19230817", "1923-08-17")


def _leaks(text: str) -> list[str]:
    """Each line holding a forbidden value (case-insensitive), with the value."""
    return [
        f"{value} in: {line.strip()[:200]}"
        for line in text.splitlines()
        for value in FORBIDDEN
        if value in line.upper()
    ]


def test_no_patient_name_id_or_birth_date_in_any_log_line(tmp_path: Path) -> None:
    study = make_study(tmp_path / "in", study=PATIENT)
    first = dcmread(study.pet_paths[0])
    assert str(first.PatientName) == PATIENT.patient_name and first.PatientID == PATIENT.patient_id

    # An instance the node must refuse (no geometry), from the same patient: its refusal is logged.
    broken = dcmread(study.pet_paths[0])
    del broken.ImagePositionPatient
    broken.SOPInstanceUID = generate_uid()
    broken.file_meta.MediaStorageSOPInstanceUID = broken.SOPInstanceUID
    broken_path = tmp_path / "broken.dcm"
    broken.save_as(broken_path)

    with StoreSCP(tmp_path / "pacs") as pacs:
        config = write_config(
            tmp_path, port=free_port(), destinations=[pacs.destination()], series_timeout_s=2
        )
        data = yaml.safe_load(config.read_text())
        data["logging"]["level"] = "DEBUG"  # the most a site can switch on
        config.write_text(yaml.safe_dump(data))
        with NodeProcess(config) as node:
            assert storescu(study.pet_paths[:1], node.port, calling="STRANGER").returncode != 0
            storescu([broken_path], node.port)  # refused with a failure status (its exit code varies)
            sent = storescu(study.ct_paths + study.pet_paths, node.port)
            assert sent.returncode == 0, sent.stderr
            wait_for(
                lambda: db_rows(node.db_path, "SELECT 1 FROM jobs WHERE state = 'done'"),
                timeout=120,
                what="the job to be done",
            )
        assert node.process.returncode == 0, node.log()
        assert len(pacs.datasets()) == len(study.pet_paths)
        # The data itself did carry the patient: the derived series at the PACS has the same name.
        assert str(pacs.datasets()[0].PatientName) == PATIENT.patient_name

    log_text = node.log()
    audit_text = (tmp_path / "audit.log").read_text()
    # The paths above did log (else an empty log would pass): refusals, the job, the send.
    assert "instance refused" in log_text and "association_refused" in audit_text
    assert "event=send" in audit_text and "level=DEBUG" in log_text
    leaks = _leaks(log_text) + _leaks(audit_text)
    assert not leaks, "\n".join(leaks)
