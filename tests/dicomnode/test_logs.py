"""dicomnode/logs.py: one line per event (key=value or JSON) and per-module levels from the config."""

from __future__ import annotations

import json
import logging

import pytest

from dicomnode.config import ConfigError, parse_settings
from dicomnode.logs import setup_logging


@pytest.fixture(autouse=True)
def _restore_logging():
    # setup_logging changes process-wide state; give the next test what this one found.
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    names = ("upete.scp", "upete.worker", "pynetdicom", "matplotlib", "PIL")
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    setup_logging("WARNING")  # forget the per-module levels it set
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, name_level in levels.items():
        logging.getLogger(name).setLevel(name_level)


def test_levels_per_module_override_the_root_level(capsys: pytest.CaptureFixture[str]) -> None:
    settings = parse_settings({"logging": {"level": "WARNING", "levels": {"upete.scp": "debug"}}})
    setup_logging(settings.logging.level, "keyvalue", settings.logging.levels)
    logging.getLogger("upete.scp").debug("pdu", extra={"fields": {"calling_ae": "SCANNER"}})
    logging.getLogger("upete.scp.detail").debug("child follows its parent")
    logging.getLogger("upete.worker").info("not shown: the root level is WARNING")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert "level=DEBUG logger=upete.scp event=pdu calling_ae=SCANNER" in lines[0]
    assert "logger=upete.scp.detail" in lines[1]


def test_a_later_setup_forgets_earlier_levels(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO", levels={"upete.worker": "ERROR"})
    logging.getLogger("upete.worker").warning("hidden")
    setup_logging("INFO")
    logging.getLogger("upete.worker").warning("shown")
    err = capsys.readouterr().err
    assert "hidden" not in err and "event=shown" in err


def test_pynetdicom_stays_quiet_unless_named(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("DEBUG")
    logging.getLogger("pynetdicom").info("pdu dump")
    setup_logging("DEBUG", levels={"pynetdicom": "INFO"})
    logging.getLogger("pynetdicom").info("pdu summary")
    err = capsys.readouterr().err
    assert "pdu dump" not in err and "pdu summary" in err


def test_json_is_one_object_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO", "json")
    logging.getLogger("upete.sender").info("send\nattempt", extra={"fields": {"job_id": 3}})
    [line] = capsys.readouterr().err.splitlines()
    record = json.loads(line)
    assert record["event"] == "send\nattempt" and record["job_id"] == 3 and record["logger"] == "upete.sender"


@pytest.mark.parametrize(
    ("levels", "message"),
    [
        ({"pynetdicom": "DEBUG"}, "patient data"),
        ({"pynetdicom.dsutils": "debug"}, "patient data"),
        ({"upete.scp": "LOUD"}, "logging.levels.upete.scp"),
        ({"": "INFO"}, "non-empty"),
    ],
)
def test_bad_levels_are_config_errors(levels: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_settings({"logging": {"levels": levels}}, source="site.yaml")
