"""Node configuration: YAML file → one frozen, validated settings object.

Every section has defaults (the shape of ARCHITECTURE.md §3); a site only says what differs. Unknown keys,
wrong types, bad ports and unreadable paths are refused with a message that names the file and the
key, e.g. ``config/site.yaml: node.prot: unknown key``.
"""

from __future__ import annotations

import base64
import importlib.util
import ipaddress
import os
import urllib.parse
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "ConfigError",
    "Settings",
    "load_settings",
    "parse_settings",
    "resolve_checkpoint",
    "DEFAULT_CHECKPOINT",
    "DEFAULT_CHECKPOINT_WITHOUT_CT",
    "DEFAULT_CONFIG",
    "SHIPPED_WEIGHTS",
]

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "node.yaml"

Port = Annotated[int, Field(ge=1, le=65535)]


def _check_ae_title(value: str) -> str:
    # PS3.5 6.2: AE is at most 16 characters of the default repertoire, no backslash or control chars;
    # leading/trailing spaces are not significant.
    title = value.strip()
    if not title:
        raise ValueError("AE title must not be empty")
    if len(title) > 16:
        raise ValueError(f"AE title {title!r} is longer than 16 characters")
    if "\\" in title or any(ord(c) < 32 or ord(c) > 126 for c in title):
        raise ValueError(f"AE title {title!r} contains a backslash or a non-printable character")
    return title


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class NodeSettings(_Section):
    ae_title: str = "UPETE"
    host: str = "127.0.0.1"
    port: Port = 11112
    max_associations: int = Field(8, ge=1, le=256)
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)

    _ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        try:
            ipaddress.ip_address(value)
        except ValueError:
            if not value or " " in value:
                raise ValueError(f"{value!r} is not an IP address or host name") from None
        return value


class CallerSettings(_Section):
    ae_title: str
    host: str | None = None

    _ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or network (e.g. 10.0.0.0/24)") from None
        return value


class TlsSettings(_Section):
    certificate: Path
    private_key: Path
    ca_certificates: Path | None = None
    require_client_certificate: bool = True

    @field_validator("certificate", "private_key", "ca_certificates", mode="before")
    @classmethod
    def _readable(cls, value: object) -> object:
        if value is None:
            return value
        if not isinstance(value, str):
            raise ValueError("must be a file path")
        path = Path(value)
        if not path.is_file() or not os.access(path, os.R_OK):
            raise ValueError(f"file {value!r} does not exist or is not readable")
        return path

    @model_validator(mode="after")
    def _ca_for_client_certificates(self) -> TlsSettings:
        # Requiring client certificates without a CA to check them against would refuse everyone.
        if self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("require_client_certificate needs ca_certificates (the CA that signs clients)")
        return self


class DestinationTlsSettings(_Section):
    # The CA that signed the destination's certificate (null: the system's CAs); our client
    # certificate and key when the destination requires one.
    ca_certificates: Path | None = None
    certificate: Path | None = None
    private_key: Path | None = None

    _readable = field_validator("certificate", "private_key", "ca_certificates", mode="before")(
        TlsSettings._readable.__func__
    )

    @model_validator(mode="after")
    def _pair(self) -> DestinationTlsSettings:
        if (self.certificate is None) != (self.private_key is None):
            raise ValueError("certificate and private_key go together")
        return self


class AccessSettings(_Section):
    # Empty list = any calling AE title is accepted (only sensible on loopback); the default config
    # lists the callers it expects.
    allowed_callers: Annotated[tuple[CallerSettings, ...], Field(strict=False)] = ()
    check_called_ae_title: bool = True
    tls: TlsSettings | None = None


class StorageSettings(_Section):
    root: Path = Path("./var/upete")
    retention_days: float = Field(7, gt=0)
    min_free_mb: int = Field(500, ge=0)

    @field_validator("root", mode="before")
    @classmethod
    def _path(cls, value: object) -> object:
        if not isinstance(value, str) or not value:
            raise ValueError("must be a directory path")
        return Path(value)


class AssemblySettings(_Section):
    series_timeout_s: float = Field(30.0, gt=0)
    ct_wait_s: float = Field(120.0, ge=0)


class HttpAuthSettings(_Section):
    """HTTP authentication: ``basic`` (``username`` and a password) or ``bearer`` (a token).

    The secret (password or token) is given inline (``secret``), as the first line of a file
    (``secret_file``) or in an environment variable (``secret_env``): exactly one. It is read when it is
    used, not when the config is loaded, so ``upete status`` run by another user (who cannot read the
    service's secret file or environment) still loads the same config.
    """

    scheme: Literal["basic", "bearer"]
    username: str | None = None
    secret: str | None = Field(None, repr=False)
    secret_file: str | None = None
    secret_env: str | None = None

    @model_validator(mode="after")
    def _shape(self) -> HttpAuthSettings:
        given = [key for key in ("secret", "secret_file", "secret_env") if getattr(self, key) is not None]
        if len(given) != 1:
            found = ", ".join(given) or "none"
            raise ValueError(f"give exactly one of secret, secret_file or secret_env (found: {found})")
        if self.scheme == "basic" and not self.username:
            raise ValueError("scheme basic needs a username")
        if self.scheme == "basic" and ":" in (self.username or ""):
            raise ValueError(f"username {self.username!r} must not contain ':' (RFC 7617)")
        if self.scheme == "bearer" and self.username is not None:
            raise ValueError("scheme bearer takes no username")
        return self

    def read_secret(self) -> str:
        """The password or token; raises :class:`ValueError` naming the file or variable it lacks."""
        if self.secret is not None:
            value = self.secret
        elif self.secret_file is not None:
            try:
                lines = Path(self.secret_file).read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise ValueError(f"secret_file {self.secret_file!r}: {exc.strerror or exc}") from None
            value = lines[0].strip() if lines else ""
        else:
            value = os.environ.get(str(self.secret_env), "")
            if not value:
                raise ValueError(f"secret_env: environment variable {self.secret_env!r} is not set or empty")
        if not value:
            raise ValueError(f"the {self.scheme} secret is empty")
        return value

    def authorization(self) -> str:
        """The ``Authorization`` header value these credentials make (reads the secret now)."""
        if self.scheme == "bearer":
            return f"Bearer {self.read_secret()}"
        pair = f"{self.username}:{self.read_secret()}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")


class _DeliverySettings(_Section):
    # The same retry rules for every kind of destination (dicomnode/sender.py, dicomnode/jobs.py).
    max_retries: int = Field(5, ge=0)
    retry_backoff_s: float = Field(10.0, ge=0)


class DestinationSettings(_DeliverySettings):
    """A DIMSE destination: C-STORE to ``ae_title`` at ``host:port``."""

    ae_title: str
    host: str
    port: Port
    # How long to wait for each C-STORE response before the unacknowledged instances are sent again.
    dimse_timeout_s: float = Field(20.0, gt=0)
    # DICOM TLS to this destination; null: plain TCP.
    tls: DestinationTlsSettings | None = None

    _ae = field_validator("ae_title")(_check_ae_title)


class DicomwebDestinationSettings(_DeliverySettings):
    """A DICOMweb destination: STOW-RS to ``<dicomweb>/studies`` (PS3.18 10.5)."""

    # The service's base URL, e.g. https://pacs.example.org/dicom-web (no credentials in it: use auth).
    dicomweb: str
    auth: HttpAuthSettings | None = None
    # Seconds to connect, and to wait for each read of the answer (a PACS may store before it answers).
    timeout_s: float = Field(120.0, gt=0)
    # For https URLs: the CA of the server's certificate (null: the system's CAs), our client certificate.
    tls: DestinationTlsSettings | None = None

    @field_validator("dicomweb")
    @classmethod
    def _url(cls, value: str) -> str:
        url = urllib.parse.urlsplit(value)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"{value!r} is not an http:// or https:// URL with a host")
        if url.username is not None or url.password is not None:
            raise ValueError(f"{url.hostname}: put credentials under auth, not in the URL")
        if url.query or url.fragment:
            raise ValueError(f"{value!r}: a base URL takes no query or fragment")
        try:
            url.port  # noqa: B018 - raises for a port out of range
        except ValueError as exc:
            raise ValueError(f"{value!r}: {exc}") from None
        return value.rstrip("/")

    @model_validator(mode="after")
    def _tls_needs_https(self) -> DicomwebDestinationSettings:
        if self.tls is not None and not self.dicomweb.startswith("https://"):
            raise ValueError(f"tls is set but {self.dicomweb!r} is not an https:// URL")
        return self


def _destination_kind(value: object) -> str:
    # A ``dicomweb`` key makes a STOW-RS destination; anything else is read as DIMSE (and its errors
    # name the DIMSE keys). The tags start with a capital so error messages leave them out.
    if isinstance(value, DicomwebDestinationSettings) or (isinstance(value, dict) and "dicomweb" in value):
        return "DICOMweb"
    return "DIMSE"


AnyDestination = Annotated[
    Union[  # noqa: UP007 - Tag needs the explicit Union form inside Annotated
        Annotated[DestinationSettings, Tag("DIMSE")],
        Annotated[DicomwebDestinationSettings, Tag("DICOMweb")],
    ],
    Discriminator(_destination_kind),
]


class OutputSettings(_Section):
    # Appended to the source's SeriesDescription. null: a space and the method that made the pixels
    # ("uPETe", "Gaussian", "supervised"; dicomnode.derived.method_label), so the name never lies.
    series_description_suffix: str | None = None
    series_number_offset: int = Field(1000, ge=1)
    # A PNG beside each finished job's outputs (LPET, enhanced, CT; dicomnode/preview.py).
    preview: bool = True
    # Also send that preview to the destinations as a Secondary Capture series of the same study.
    preview_secondary_capture: bool = False


def _model_package_dir() -> Path:
    """Where the installed ``model`` package lives, found without importing it (torch loads late)."""
    spec = importlib.util.find_spec("model")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))).resolve()
    return Path(__file__).resolve().parent.parent / "model"


#: The shipped uPETe weights (model/weights/README.md): LDM-P-CT, and LDM-P for studies without a CT.
SHIPPED_WEIGHTS = _model_package_dir() / "weights"
DEFAULT_CHECKPOINT = str(SHIPPED_WEIGHTS / "upete-ldm-p-ct.safetensors")
DEFAULT_CHECKPOINT_WITHOUT_CT = str(SHIPPED_WEIGHTS / "upete-ldm-p.safetensors")


class ModelSettings(_Section):
    # A path to a .safetensors checkpoint (its JSON config beside it), or "classical:gaussian" for the
    # classical filter (named explicitly: it never stands in for a missing model). Relative paths are
    # taken from the working directory, else from the folder holding the model package. Default: the
    # shipped uPETe weights, wherever the package is installed.
    checkpoint: str = DEFAULT_CHECKPOINT
    # Used for studies without a usable CT when the main model needs one (PET-only variant). Default:
    # the shipped PET-only weights, but only while `checkpoint` is the default too.
    checkpoint_without_ct: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # null: the checkpoint's own default (the shipped models': chosen from the steps-vs-quality curve).
    steps: int | None = Field(None, ge=1, le=1000)
    # Known dose fraction of the low-dose acquisition (0 < d <= 1); null = estimate from the image.
    dose_fraction: float | None = Field(None, gt=0, le=1)
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _shipped_pair(cls, data: object) -> object:
        # The shipped PET-only model goes with the shipped main model; a site naming its own checkpoint
        # names its PET-only model too (or has none), so no unrelated model is loaded behind its back.
        if isinstance(data, dict) and "checkpoint" not in data and "checkpoint_without_ct" not in data:
            return {**data, "checkpoint_without_ct": DEFAULT_CHECKPOINT_WITHOUT_CT}
        return data


LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class LoggingSettings(_Section):
    level: LogLevel = "INFO"
    format: Literal["keyvalue", "json"] = "keyvalue"
    audit_file: Path | None = Path("./var/upete/audit.log")
    # Per-logger levels over ``level``, e.g. {upete.scp: DEBUG, upete.worker: WARNING}.
    levels: Annotated[dict[str, LogLevel], Field(strict=False)] = {}

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("levels", mode="before")
    @classmethod
    def _levels(cls, value: object) -> object:
        if not isinstance(value, dict):
            return value
        levels = {}
        for name, level in value.items():
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"logger name {name!r} must be a non-empty string")
            level = level.upper() if isinstance(level, str) else level
            # pynetdicom at DEBUG logs every dataset it receives, patient names and IDs included.
            if name.strip().split(".")[0] == "pynetdicom" and level == "DEBUG":
                raise ValueError("pynetdicom at DEBUG logs dataset contents (patient data); use INFO at most")
            levels[name.strip()] = level
        return levels

    @field_validator("audit_file", mode="before")
    @classmethod
    def _path(cls, value: object) -> object:
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise ValueError("must be a file path or null")
        return Path(value)


class MetricsSettings(_Section):
    # The node's HTTP listener (dicomnode/metrics.py): the status page at /, Prometheus /metrics and
    # /healthz. Loopback by default. Port 0 = any free port (written to the heartbeat file).
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535)
    # Basic or bearer authentication for every path but /healthz; null: none (a warning in the log
    # when the listener is not on loopback).
    auth: HttpAuthSettings | None = None

    _host = field_validator("host")(NodeSettings._host.__func__)


class Settings(_Section):
    node: NodeSettings = NodeSettings()
    access: AccessSettings = AccessSettings()
    storage: StorageSettings = StorageSettings()
    assembly: AssemblySettings = AssemblySettings()
    destinations: Annotated[tuple[AnyDestination, ...], Field(strict=False)] = ()
    output: OutputSettings = OutputSettings()
    model: ModelSettings = ModelSettings()
    logging: LoggingSettings = LoggingSettings()
    metrics: MetricsSettings = MetricsSettings()

    @model_validator(mode="after")
    def _resolve_checkpoints(self) -> Settings:
        for key in ("checkpoint", "checkpoint_without_ct"):
            spec = getattr(self.model, key)
            if spec is None or spec.startswith("classical:"):
                continue
            if not _resolve(Path(spec)).is_file():
                raise ValueError(f"model.{key}: checkpoint file {spec!r} does not exist")
        return self


def _resolve(path: Path) -> Path:
    """A relative path in the config means: relative to the working directory, else to the folder that
    holds the model package (the project root in a checkout, site-packages when installed), so
    ``model/weights/…`` names the shipped weights from any working directory."""
    if path.is_absolute() or path.exists():
        return path
    return _model_package_dir().parent / path


def resolve_checkpoint(spec: str) -> str:
    """The checkpoint spec with a relative file path made absolute (classical specs unchanged)."""
    if spec.startswith("classical:"):
        return spec
    return os.path.abspath(_resolve(Path(spec)))


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and every offending key."""


def _format_errors(source: str, error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"] if not str(p).startswith("function-"))
        # Pydantic puts a union's branch name ("tuple[...]", "TlsSettings") into loc; drop class-like parts.
        key = ".".join(p for p in key.split(".") if not p[:1].isupper() and "[" not in p) or "(top level)"
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "missing":
            message = "required key is missing"
        else:
            message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {key}: {message}")
    return "\n".join(dict.fromkeys(lines))


def parse_settings(data: object, *, source: str = "<config>") -> Settings:
    """Validate an already-parsed YAML document."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        found = type(data).__name__
        raise ConfigError(f"{source}: the top level must be a mapping of sections, found {found}")
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc)) from None


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read and validate a YAML config file (the embedded default when ``path`` is None)."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_settings(data, source=str(path))
