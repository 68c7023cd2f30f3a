from pathlib import Path

import pytest
from pydantic import ValidationError

from dicomnode.config import (
    DEFAULT_CHECKPOINT,
    DEFAULT_CHECKPOINT_WITHOUT_CT,
    DEFAULT_CONFIG,
    ConfigError,
    load_settings,
    parse_settings,
    resolve_checkpoint,
)


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


def test_dicomweb_destination_beside_a_dimse_one() -> None:
    settings = parse_settings({"destinations": [
        {"ae_title": "PACS", "host": "127.0.0.1", "port": 104},
        {"dicomweb": "https://pacs.example.org/dicom-web/", "max_retries": 2, "timeout_s": 30,
         "auth": {"scheme": "bearer", "secret_env": "PACS_TOKEN"}},
    ]})
    dimse, web = settings.destinations
    assert (dimse.ae_title, dimse.port) == ("PACS", 104)
    assert web.dicomweb == "https://pacs.example.org/dicom-web"  # one spelling: the job's destination key
    assert (web.max_retries, web.retry_backoff_s, web.timeout_s) == (2, 10.0, 30)
    assert web.auth.scheme == "bearer" and web.auth.secret_env == "PACS_TOKEN"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"dicomweb": "ftp://pacs/dw"}, "destinations.0.dicomweb: 'ftp://pacs/dw' is not an http"),
        ({"dicomweb": "http://u:pw@pacs/dw"}, "destinations.0.dicomweb: pacs: put credentials under auth"),
        ({"dicomweb": "http://pacs/dw?x=1"}, "takes no query"),
        ({"dicomweb": "http://pacs/dw", "ae_title": "X"}, "destinations.0.ae_title: unknown key"),
        ({"dicomweb": "http://pacs/dw", "tls": {}}, "tls is set but 'http://pacs/dw' is not an https"),
        ({"dicomweb": "http://pacs/dw", "auth": {"scheme": "basic", "secret": "pw"}}, "needs a username"),
        ({"dicomweb": "http://pacs/dw", "auth": {"scheme": "bearer"}}, "give exactly one of secret"),
        ({"dicomweb": "http://pacs/dw", "auth": {"scheme": "bearer", "secret": "a", "secret_env": "B"}},
         "(found: secret, secret_env)"),
        ({"dicomweb": "http://pacs/dw", "auth": {"scheme": "digest", "secret": "a"}},
         "destinations.0.auth.scheme"),
    ],
)
def test_bad_dicomweb_destination_is_named(entry: dict, message: str) -> None:
    assert message in _error({"destinations": [entry]})


def test_listener_auth_is_optional_and_its_secret_stays_out_of_reprs() -> None:
    assert parse_settings({}).metrics.auth is None
    settings = parse_settings(
        {"metrics": {"host": "0.0.0.0", "auth": {"scheme": "basic", "username": "admin", "secret": "pw-123"}}}
    )
    assert settings.metrics.auth.authorization() == "Basic YWRtaW46cHctMTIz"
    assert "pw-123" not in repr(settings)  # settings get logged and printed; the secret must not be
    # A secret file or variable is read when used, so another user's `upete status` still loads the config.
    parse_settings({"metrics": {"auth": {"scheme": "bearer", "secret_file": "/nonexistent/token"}}})


def test_without_a_model_section_the_shipped_upete_weights_run(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # any working directory: the weights are found beside the model package
    import model

    weights = Path(model.__file__).resolve().parent / "weights"
    settings = parse_settings({"node": {"port": 11112}, "destinations": []})
    assert settings.model.checkpoint == str(weights / "upete-ldm-p-ct.safetensors") == DEFAULT_CHECKPOINT
    assert settings.model.checkpoint_without_ct == str(weights / "upete-ldm-p.safetensors")
    assert Path(resolve_checkpoint(settings.model.checkpoint)).is_file()
    # the documented relative spelling resolves from here too
    relative = resolve_checkpoint("model/weights/upete-ldm-p.safetensors")
    assert relative == str(weights / "upete-ldm-p.safetensors")
    assert settings.output.series_description_suffix is None  # the method names the series


def test_the_gaussian_runs_only_when_named_and_brings_no_pet_only_model() -> None:
    named = parse_settings({"model": {"checkpoint": "classical:gaussian"}}).model
    assert (named.checkpoint, named.checkpoint_without_ct) == ("classical:gaussian", None)
    steps_only = parse_settings({"model": {"steps": 1, "device": "cpu"}}).model
    assert steps_only.checkpoint == DEFAULT_CHECKPOINT
    assert steps_only.checkpoint_without_ct == DEFAULT_CHECKPOINT_WITHOUT_CT
    explicit = parse_settings({"model": {"checkpoint_without_ct": None}}).model
    assert (explicit.checkpoint, explicit.checkpoint_without_ct) == (DEFAULT_CHECKPOINT, None)
