"""Configuration: one TOML file, validated at load into typed dataclasses.

Every section (the core's and each driver's) is a dataclass. :func:`parse_section`
checks a TOML table against it: unknown keys, wrong types and failed constraints
raise :class:`ConfigError` naming the file and the dotted field path, e.g.
``/etc/wardpost/wardpost.toml: drivers.gate1.baudrate: expected an integer, got "fast"``.

Constraints live next to the field as ``field(metadata=check(...))`` so a
driver's config class is both its schema and its documentation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

DEFAULT_CONFIG_PATH = Path("/etc/wardpost/wardpost.toml")

T = TypeVar("T")


class ConfigError(Exception):
    """A configuration problem, located by file and dotted field path."""

    def __init__(self, message: str, path: str = "", file: str | os.PathLike[str] | None = None):
        self.message = message
        self.path = path
        self.file = str(file) if file is not None else None
        super().__init__(str(self))

    def located(self, file: str | os.PathLike[str]) -> ConfigError:
        return ConfigError(self.message, self.path, file)

    def under(self, prefix: str) -> ConfigError:
        path = f"{prefix}.{self.path}" if self.path else prefix
        return ConfigError(self.message, path, self.file)

    def __str__(self) -> str:
        where = ": ".join(p for p in (self.file, self.path) if p)
        return f"{where}: {self.message}" if where else self.message


def check(
    predicate: Callable[[Any], bool] | None = None,
    message: str = "",
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    help: str = "",
) -> dict[str, Any]:
    """Field metadata: a range and/or predicate checked at load, plus help text."""
    return {
        "predicate": predicate,
        "message": message,
        "minimum": minimum,
        "maximum": maximum,
        "help": help,
    }


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is bool:
        return "true or false"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return "a list"
    if origin is dict or (dataclasses.is_dataclass(tp)):
        return "a table"
    return str(tp)


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in args:
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if errors else ConfigError(f"unexpected value {value!r}", path)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"expected {_type_name(tp)}, got {value!r}", path)
    elif origin is list:
        if isinstance(value, list):
            return [_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, Mapping):
            return {str(k): _convert(v, args[1], f"{path}.{k}") for k, v in value.items()}
    elif dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, Mapping):
            return parse_section(tp, value, path)
    else:  # pragma: no cover - a programming error in a config class
        raise TypeError(f"unsupported config type {tp!r} at {path}")
    raise ConfigError(f"expected {_type_name(tp)}, got {value!r}", path)


def parse_section(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from a TOML table, rejecting unknown keys and bad values."""
    if not dataclasses.is_dataclass(cls):  # pragma: no cover - programming error
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}

    def at(name: str) -> str:
        return f"{path}.{name}" if path else name

    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields)) or "none"
        raise ConfigError(f"unknown key {unknown[0]!r} (known keys: {known})", at(unknown[0]))
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError("required key is missing", at(name))
            continue
        value = _convert(data[name], hints[name], at(name))
        meta = f.metadata
        if value is not None and meta:
            lo, hi = meta.get("minimum"), meta.get("maximum")
            if lo is not None and value < lo:
                raise ConfigError(f"must be at least {lo}, got {value!r}", at(name))
            if hi is not None and value > hi:
                raise ConfigError(f"must be at most {hi}, got {value!r}", at(name))
            predicate = meta.get("predicate")
            if predicate is not None and not predicate(value):
                raise ConfigError(meta.get("message") or f"invalid value {value!r}", at(name))
        values[name] = value
    try:
        return cls(**values)
    except ConfigError as exc:
        raise exc.under(path) if path else exc from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc), path) from None


def read_secret(path: str, where: str) -> str:
    """Read a secret from a file (first line, stripped). Never log the value."""
    try:
        with open(path, encoding="utf-8") as f:
            secret = f.readline().strip()
    except FileNotFoundError:
        raise ConfigError(f"secret file {path!r} does not exist", where) from None
    except PermissionError:
        raise ConfigError(f"secret file {path!r} is not readable by this user", where) from None
    except OSError as exc:
        raise ConfigError(f"secret file {path!r} cannot be read: {exc.strerror}", where) from None
    if not secret:
        raise ConfigError(f"secret file {path!r} is empty", where)
    return secret


def _nonempty(value: str) -> bool:
    return bool(value.strip())


def _topic_word(value: str) -> bool:
    return bool(value) and not any(c in value for c in "/+#\x00 ")


TOPIC_WORD = check(_topic_word, "must be a non-empty word without '/', '+', '#' or spaces")


@dataclass(frozen=True)
class AgentConfig:
    """``[agent]``: who this device is and where it keeps its state."""

    site: str = field(metadata=TOPIC_WORD)
    device: str = field(metadata=TOPIC_WORD)
    state_dir: str = "/var/lib/wardpost"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    heartbeat_interval: float = field(default=30.0, metadata=check(minimum=1.0, maximum=86400.0))
    control_socket: str = ""  # default: <state_dir>/control.sock

    @property
    def control_socket_path(self) -> Path:
        return (
            Path(self.control_socket)
            if self.control_socket
            else Path(self.state_dir) / "control.sock"
        )


@dataclass(frozen=True)
class TLSConfig:
    """``[mqtt.tls]``: server verification and client certificate."""

    enabled: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    server_hostname_check: bool = True

    def __post_init__(self) -> None:
        if self.enabled and bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("cert_file and key_file must be given together", "cert_file")
        for name in ("ca_file", "cert_file", "key_file"):
            value = getattr(self, name)
            if self.enabled and value and not os.path.exists(value):
                raise ConfigError(f"file {value!r} does not exist", name)


#: The guarantee each delivery mode gives, in the words of the status, log and check-config.
DELIVERY_GUARANTEES = {
    "receipt": "end to end: an event is released only when the centre's receiver confirms it "
    "stored it",
    "broker": "to the broker only: an event is released when the broker accepts it; a broker "
    "holding no session for the centre (persistence off, centre not subscribed) discards it "
    "unseen. Use receipt with wardpost receiver",
}


@dataclass(frozen=True)
class MQTTConfig:
    """``[mqtt]``: the broker link."""

    host: str = field(default="127.0.0.1", metadata=check(_nonempty, "must not be empty"))
    port: int = field(default=1883, metadata=check(minimum=1, maximum=65535))
    protocol: Literal["5", "3.1.1"] = "5"
    client_id: str = ""  # default: wardpost-<site>-<device>
    # An idle dead link is noticed within about twice this (PINGREQ every 4 s: 2 bytes).
    keepalive: int = field(default=4, metadata=check(minimum=2, maximum=3600))
    username: str = ""
    password_file: str = ""
    topic_prefix: str = field(default="wardpost", metadata=TOPIC_WORD)
    delivery: Literal["broker", "receipt"] = "broker"
    receipt_timeout: float = field(default=30.0, metadata=check(minimum=0.1, maximum=3600.0))
    ack_timeout: float = field(default=20.0, metadata=check(minimum=0.1, maximum=3600.0))
    # While events wait for the broker: no answer at all for this long = a dead link.
    link_timeout: float = field(default=3.0, metadata=check(minimum=1.0, maximum=600.0))
    inflight_window: int = field(default=256, metadata=check(minimum=1, maximum=65535))
    reconnect_min_delay: float = field(default=0.1, metadata=check(minimum=0.01, maximum=60.0))
    reconnect_max_delay: float = field(default=30.0, metadata=check(minimum=0.1, maximum=3600.0))
    tls: TLSConfig = field(default_factory=TLSConfig)


@dataclass(frozen=True)
class OutboxConfig:
    """``[outbox]``: the durable SQLite buffer between drivers and the broker."""

    path: str = ""  # default: <state_dir>/outbox.db
    max_rows: int = field(default=200_000, metadata=check(minimum=100))
    max_bytes: int = field(default=128 * 1024 * 1024, metadata=check(minimum=64 * 1024))
    reserve_bytes: int = field(default=4 * 1024 * 1024, metadata=check(minimum=0))
    retention_hours: float = field(default=24.0, metadata=check(minimum=0.0))


@dataclass(frozen=True)
class CommandsConfig:
    """``[commands]``: how commands from the centre are accepted.

    Commands must be signed with an Ed25519 key whose public half is listed in
    ``public_keys`` (files written by ``wardpost keys generate``), issued within
    ``max_age`` seconds, and never seen before (ids are remembered across restarts).
    """

    enabled: bool = True
    require_signature: bool = True
    public_keys: list[str] = field(default_factory=list)
    max_age: float = field(default=300.0, metadata=check(minimum=1.0, maximum=86400.0))

    def __post_init__(self) -> None:
        for i, path in enumerate(self.public_keys):
            if not os.path.exists(path):
                raise ConfigError(f"public key file {path!r} does not exist", f"public_keys[{i}]")


def split_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:9108"`` or ``"[::1]:9108"`` -> (host, port); ValueError says what is wrong."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected host:port, got {listen!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write IPv6 addresses in brackets, like [::1]:9108, got {listen!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"port must be a number, got {port_text!r}") from None
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be 1-65535, got {port}")
    return host, port


@dataclass(frozen=True)
class MetricsConfig:
    """``[metrics]``: an optional Prometheus endpoint (``GET /metrics``)."""

    enabled: bool = False
    #: host:port to listen on. Keep it on loopback unless a firewall guards the port:
    #: the page shows driver names, backlog and link state (no event contents).
    listen: str = "127.0.0.1:9108"

    def __post_init__(self) -> None:
        try:
            split_listen(self.listen)
        except ValueError as exc:
            raise ConfigError(str(exc), "listen") from None

    @property
    def address(self) -> tuple[str, int]:
        return split_listen(self.listen)


@dataclass(frozen=True)
class DriverSection:
    """One ``[drivers.<name>]`` table before its driver validates the rest."""

    name: str
    type: str
    enabled: bool
    options: Mapping[str, Any]


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    agent: AgentConfig
    mqtt: MQTTConfig
    outbox: OutboxConfig
    commands: CommandsConfig
    drivers: tuple[DriverSection, ...]
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    source: str = "<memory>"
    digest: str = ""
    sections: Mapping[str, Any] = field(default_factory=dict)

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"wardpost-{self.agent.site}-{self.agent.device}"

    @property
    def outbox_path(self) -> Path:
        return (
            Path(self.outbox.path) if self.outbox.path else Path(self.agent.state_dir) / "outbox.db"
        )

    def password(self) -> str | None:
        if not self.mqtt.password_file:
            return None
        return read_secret(self.mqtt.password_file, "mqtt.password_file").replace("\n", "")


KNOWN_SECTIONS = ("agent", "mqtt", "outbox", "commands", "metrics", "drivers")

#: Extra top-level sections registered by optional core features (e.g. metrics).
EXTRA_SECTIONS: dict[str, type[Any]] = {}


def parse_config(data: Mapping[str, Any], source: str = "<memory>", digest: str = "") -> Config:
    """Validate a parsed TOML document. Raises :class:`ConfigError` located in ``source``."""
    try:
        unknown = sorted(set(data) - set(KNOWN_SECTIONS) - set(EXTRA_SECTIONS))
        if unknown:
            known = ", ".join(sorted((*KNOWN_SECTIONS, *EXTRA_SECTIONS)))
            raise ConfigError(f"unknown section (known sections: {known})", unknown[0])
        if "agent" not in data:
            raise ConfigError("required section is missing", "agent")
        for name in (*CORE_SECTIONS, *EXTRA_SECTIONS):
            if name in data and not isinstance(data[name], Mapping):
                raise ConfigError("expected a table", name)
        drivers_table = data.get("drivers", {})
        if not isinstance(drivers_table, Mapping):
            raise ConfigError("expected a table of driver instances", "drivers")
        drivers = []
        for name, table in drivers_table.items():
            where = f"drivers.{name}"
            if not _topic_word(name):
                raise ConfigError(
                    "driver names must be words without '/', '+', '#' or spaces", where
                )
            if not isinstance(table, Mapping):
                raise ConfigError("expected a table", where)
            dtype = table.get("type")
            if not isinstance(dtype, str) or not dtype:
                raise ConfigError("required key is missing (the driver type)", f"{where}.type")
            enabled = table.get("enabled", True)
            if not isinstance(enabled, bool):
                raise ConfigError(f"expected true or false, got {enabled!r}", f"{where}.enabled")
            options = {k: v for k, v in table.items() if k not in ("type", "enabled")}
            drivers.append(DriverSection(name, dtype, enabled, options))
        sections = {
            name: parse_section(cls, data.get(name, {}), name)
            for name, cls in EXTRA_SECTIONS.items()
        }
        mqtt = parse_section(MQTTConfig, data.get("mqtt", {}), "mqtt")
        if mqtt.password_file:
            read_secret(mqtt.password_file, "mqtt.password_file")
        return Config(
            agent=parse_section(AgentConfig, data["agent"], "agent"),
            mqtt=mqtt,
            outbox=parse_section(OutboxConfig, data.get("outbox", {}), "outbox"),
            commands=parse_section(CommandsConfig, data.get("commands", {}), "commands"),
            drivers=tuple(drivers),
            metrics=parse_section(MetricsConfig, data.get("metrics", {}), "metrics"),
            source=source,
            digest=digest,
            sections=sections,
        )
    except ConfigError as exc:
        raise exc.located(source) from None


CORE_SECTIONS = ("agent", "mqtt", "outbox", "commands", "metrics")


def field_paths(cls: type[Any], prefix: str) -> list[str]:
    """Every leaf field of config class ``cls`` as a dotted path (``mqtt.tls.enabled``)."""
    hints = typing.get_type_hints(cls)
    paths: list[str] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            paths += field_paths(tp, f"{prefix}.{f.name}")
        else:
            paths.append(f"{prefix}.{f.name}")
    return paths


def core_field_paths() -> list[str]:
    """Every field of the core's sections, the extra sections' included."""
    hints = typing.get_type_hints(Config)
    paths = [p for name in CORE_SECTIONS for p in field_paths(hints[name], name)]
    return paths + [p for name, cls in EXTRA_SECTIONS.items() for p in field_paths(cls, name)]


def lookup(config: Config, path: str) -> Any:
    """The value of dotted field ``path`` (as from :func:`core_field_paths`) in ``config``."""
    first, *rest = path.split(".")
    value: Any = config.sections.get(first) if first in EXTRA_SECTIONS else getattr(config, first)
    for name in rest:
        value = getattr(value, name, None)
    return value


def changed_fields(old: Config, new: Config) -> list[str]:
    """The dotted fields of the core's sections whose values differ (drivers aside)."""
    return [p for p in core_field_paths() if lookup(old, p) != lookup(new, p)]


def read_toml(path: str | os.PathLike[str]) -> tuple[dict[str, Any], str]:
    """Read a TOML file: (document, short sha256 digest). Errors name the file."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError("config file does not exist", file=p) from None
    except PermissionError:
        raise ConfigError("config file is not readable by this user", file=p) from None
    except IsADirectoryError:
        raise ConfigError("config path is a directory, not a file", file=p) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", file=p) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"TOML syntax error: {exc}", file=p) from None
    return data, hashlib.sha256(raw).hexdigest()[:16]


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file. Driver options are validated by :func:`agent.registry`."""
    data, digest = read_toml(path)
    return parse_config(data, str(path), digest)
