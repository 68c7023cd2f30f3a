from pathlib import Path

import pytest
from pydantic import ValidationError

from dicomnode.config import DEFAULT_CONFIG, ConfigError, load_settings, parse_settings


def test_embedded_default_is_valid_and_loopback() -> None:
    settings = load_settings(DEFAULT_CONFIG)
    assert settings.node.ae_title == "UPETE"
    assert (settings.node.host, settings.node.port) == ("127.0.0.1", 11112)
    assert settings.storage.root == Path("var/upete")
    assert settings.model.device == "auto"


def test_empty_file_gives_all_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_settings(path).node.port == 11112


def _error(data: object) -> str:
    with pytest.raises(ConfigError) as info:
        parse_settings(data, source="site.yaml")
    return str(info.value)


def test_misspelt_key_is_named_with_the_file() -> None:
    assert _error({"node": {"ae_tittle": "X"}}) == "site.yaml: node.ae_tittle: unknown key"


def test_unknown_section_is_refused() -> None:
    assert "site.yaml: nodes: unknown key" in _error({"nodes": {}})


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_bad_port_is_refused(port: int) -> None:
    assert "site.yaml: node.port:" in _error({"node": {"port": port}})


def test_wrong_type_is_refused_not_coerced() -> None:
    assert "site.yaml: node.port:" in _error({"node": {"port": "11112"}})
    assert "site.yaml: assembly.series_timeout_s:" in _error({"assembly": {"series_timeout_s": "soon"}})


def test_ae_title_rules() -> None:
    assert "longer than 16" in _error({"node": {"ae_title": "A" * 17}})
    assert "site.yaml: access.allowed_callers.0.host:" in _error(
        {"access": {"allowed_callers": [{"ae_title": "PACS", "host": "not an ip"}]}}
    )


def test_destination_needs_host_and_port() -> None:
    message = _error({"destinations": [{"ae_title": "PACS"}]})
    assert "destinations.0.host: required key is missing" in message
    assert "destinations.0.port: required key is missing" in message


def test_unreadable_tls_file_is_named(tmp_path: Path) -> None:
    message = _error({"access": {"tls": {"certificate": str(tmp_path / "nope.pem"),
                                         "private_key": str(tmp_path / "nope.key")}}})
    assert "access.tls.certificate: file" in message and "nope.pem" in message


def test_missing_checkpoint_file_is_named() -> None:
    assert "model.checkpoint: checkpoint file 'missing.safetensors' does not exist" in _error(
        {"model": {"checkpoint": "missing.safetensors"}}
    )


def test_unreadable_or_invalid_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_settings(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("node: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_settings(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_settings(top)


def test_settings_are_frozen() -> None:
    settings = load_settings(DEFAULT_CONFIG)
    with pytest.raises(ValidationError):
        settings.node.port = 1  # type: ignore[misc]
