"""The receiver's configuration file (``central.toml``), validated like the agent's.

Every table is a frozen dataclass checked by :func:`agent.config.parse_section`,
so a mistake is reported with the file and the dotted field, e.g.
``central.toml: dc09.map.panic.pressed.code: must be at most 999, got 1200``.
See ``config/central.example.toml`` for every key with its default.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from agent.config import (
    TOPIC_WORD,
    ConfigError,
    TLSConfig,
    check,
    parse_section,
    read_secret,
    read_toml,
)
from agent.event import Priority
from central.console.config import ConsoleConfig
from central.dc09 import ContactId, parse_key

DEFAULT_CENTRAL_CONFIG = Path("/etc/wardpost/central.toml")


def _store_url(url: str) -> bool:
    scheme = urlsplit(url).scheme
    return scheme in ("sqlite", "postgresql", "postgres") and (
        scheme != "sqlite" or url.startswith("sqlite:///")
    )


def _priorities(values: list[str]) -> bool:
    return all(v in {p.label for p in Priority} for v in values)


def _pattern(value: str) -> bool:
    return bool(re.fullmatch(r"[a-z0-9_.*]+", value))


@dataclass(frozen=True)
class ReceiverMQTTConfig:
    """``[mqtt]``: the broker the devices publish to."""

    host: str = "127.0.0.1"
    port: int = field(default=1883, metadata=check(minimum=1, maximum=65535))
    protocol: Literal["5", "3.1.1"] = "5"
    client_id: str = field(default="wardpost-receiver", metadata=TOPIC_WORD)
    keepalive: int = field(default=15, metadata=check(minimum=2, maximum=3600))
    username: str = ""
    password_file: str = ""
    topic_prefix: str = field(default="wardpost", metadata=TOPIC_WORD)
    sites: list[str] = field(
        default_factory=list,
        metadata=check(
            lambda v: all(s and not set(s) & set("/+#\x00 ") for s in v),
            "site names must be words without '/', '+', '#' or spaces",
            help="empty: every site",
        ),
    )
    session_expiry: int = field(
        default=86400,
        metadata=check(
            minimum=0,
            maximum=2**32 - 1,
            help="seconds the broker keeps our queued messages while we are down",
        ),
    )
    share_group: str = field(
        default="",
        metadata=check(
            lambda v: v == "" or bool(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", v)),
            "must be a word of letters, digits, '_' or '-'",
            help="receivers with the same group share the devices' topics"
            " ($share/<group>/..., MQTT 5, PostgreSQL store); empty: one receiver",
        ),
    )
    tls: TLSConfig = field(default_factory=TLSConfig)


@dataclass(frozen=True)
class StoreConfig:
    """``[store]``: where events live. ``sqlite:///path`` or ``postgresql://user@host/db``."""

    url: str = field(
        default="sqlite:////var/lib/wardpost/central.db",
        metadata=check(
            _store_url, "must be sqlite:///<path> or postgresql://<user>@<host>/<database>"
        ),
    )
    schema: str = field(
        default="",
        metadata=check(
            lambda v: v == "" or bool(re.fullmatch(r"[a-z_][a-z0-9_]*", v)),
            "must be a lower-case SQL identifier",
            help="PostgreSQL schema; empty: public",
        ),
    )
    batch_max: int = field(default=500, metadata=check(minimum=1, maximum=10000))


@dataclass(frozen=True)
class SupervisionConfig:
    """``[supervision]``: when a silent device counts as lost, when a sequence hole is a gap."""

    lost_after: float = field(
        default=2.5,
        metadata=check(minimum=1.0, maximum=100.0, help="times the heartbeat interval"),
    )
    default_interval: float = field(default=30.0, metadata=check(minimum=0.1, maximum=86400.0))
    check_every: float = field(default=1.0, metadata=check(minimum=0.05, maximum=60.0))
    gap_grace: float = field(default=30.0, metadata=check(minimum=0.0, maximum=86400.0))
    gap_timeout: float = field(default=3600.0, metadata=check(minimum=1.0, maximum=7 * 86400.0))
    #: How long the supervising receiver's lease lasts without renewal (it renews it every
    #: ``check_every``): another receiver takes supervision over at most this long after
    #: the supervising one died. Keep it well under ``lost_after`` x the heartbeat interval.
    lease: float = field(default=5.0, metadata=check(minimum=0.1, maximum=3600.0))
    #: At most one ``centre.quarantined`` event per device this often (with a count).
    quarantine_report_every: float = field(
        default=60.0, metadata=check(minimum=0.0, maximum=86400.0)
    )


@dataclass(frozen=True)
class AlarmsConfig:
    """``[alarms]``: which events open an alarm at the centre (new → acknowledged → resolved)."""

    priorities: list[str] = field(
        default_factory=lambda: ["critical"],
        metadata=check(_priorities, "priorities are critical, high, normal or low"),
    )
    kinds: list[str] = field(
        default_factory=lambda: ["device.lost", "sequence.gap"],
        metadata=check(
            lambda v: all(_pattern(k) for k in v), "kinds are dotted lower-case words, '*' allowed"
        ),
    )
    include_test: bool = False


@dataclass(frozen=True)
class ContactIdMapping:
    """``[dc09.map."<event kind>"]``: the Contact ID report an event kind becomes."""

    code: int = field(metadata=check(minimum=0, maximum=999))
    zone: int = field(default=0, metadata=check(minimum=0, maximum=999))
    partition: int = field(default=0, metadata=check(minimum=0, maximum=99))
    restore: bool = False
    zone_from: str = field(
        default="", metadata=check(help="payload key whose integer value is the zone")
    )

    def report(self, payload: Mapping[str, Any]) -> ContactId:
        zone = self.zone
        if self.zone_from:
            value = payload.get(self.zone_from)
            if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 999:
                zone = value
        return ContactId(
            self.code, zone=zone, partition=self.partition, qualifier=3 if self.restore else 1
        )


def _default_map() -> dict[str, ContactIdMapping]:
    return {
        "panic.pressed": ContactIdMapping(code=120, zone_from="zone"),
        "duress.pressed": ContactIdMapping(code=121),
        "panic.silent": ContactIdMapping(code=122),
        "device.tamper": ContactIdMapping(code=137),
        "device.lost": ContactIdMapping(code=381),
        "device.restored": ContactIdMapping(code=381, restore=True),
    }


@dataclass(frozen=True)
class Dc09Config:
    """``[dc09]``: forward selected events to an alarm receiving centre."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = field(default=12000, metadata=check(minimum=1, maximum=65535))
    transport: Literal["tcp", "udp"] = "tcp"
    account: str = field(
        default="1234",
        metadata=check(
            lambda v: bool(re.fullmatch(r"[0-9A-F]{3,16}", v)), "must be 3-16 hex digits (0-9, A-F)"
        ),
    )
    #: The "R" field. Receivers answer with the frame's own; pysiaalarm (Home Assistant) writes
    #: "None" into its ACK when the frame has none, so the default names receiver 0.
    #: "" leaves the field out.
    receiver: str = field(
        default="0",
        metadata=check(
            lambda v: bool(re.fullmatch(r"[0-9A-F]{0,6}", v)), "must be up to 6 hex digits"
        ),
    )
    line: str = field(
        default="0",
        metadata=check(lambda v: bool(re.fullmatch(r"[0-9A-F]{1,6}", v)), "must be 1-6 hex digits"),
    )
    key_file: str = field(
        default="", metadata=check(help="file holding the AES key as 32/48/64 hex digits")
    )
    timeout: float = field(default=5.0, metadata=check(minimum=0.05, maximum=120.0))
    attempts: int = field(default=3, metadata=check(minimum=1, maximum=100))
    retry_every: float = field(default=10.0, metadata=check(minimum=0.05, maximum=3600.0))
    null_interval: float = field(
        default=60.0, metadata=check(minimum=0.0, maximum=86400.0, help="0: off")
    )
    include_test: bool = False
    map: dict[str, ContactIdMapping] = field(default_factory=_default_map)

    def key(self) -> bytes | None:
        if not self.key_file:
            return None
        try:
            return parse_key(read_secret(self.key_file, "dc09.key_file"))
        except ValueError as exc:
            raise ConfigError(str(exc), "key_file") from None


@dataclass(frozen=True)
class CentreCommandsConfig:
    """``[commands]``: commands the centre sends back to devices (alarm ack/resolve)."""

    signing_key: str = field(
        default="",
        metadata=check(
            lambda v: v == "" or os.path.exists(v),
            "file does not exist",
            help="the centre's Ed25519 private key (PEM); empty: commands go unsigned",
        ),
    )
    #: An ack/resolve the device has not confirmed is sent again (a new signed command) this often.
    retry_every: float = field(default=5.0, metadata=check(minimum=0.1, maximum=3600.0))
    #: After this long without the device's confirmation the alarm shows "device did not confirm".
    confirm_within: float = field(default=60.0, metadata=check(minimum=1.0, maximum=86400.0))


@dataclass(frozen=True)
class ReceiverConfig:
    """The whole ``central.toml``."""

    mqtt: ReceiverMQTTConfig = field(default_factory=ReceiverMQTTConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    supervision: SupervisionConfig = field(default_factory=SupervisionConfig)
    alarms: AlarmsConfig = field(default_factory=AlarmsConfig)
    dc09: Dc09Config = field(default_factory=Dc09Config)
    commands: CentreCommandsConfig = field(default_factory=CentreCommandsConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    source: str = "<memory>"
    digest: str = ""

    def password(self) -> str | None:
        if not self.mqtt.password_file:
            return None
        return read_secret(self.mqtt.password_file, "mqtt.password_file")


def parse_receiver_config(
    data: Mapping[str, Any], source: str = "<memory>", digest: str = ""
) -> ReceiverConfig:
    """Validate a parsed TOML document; errors are located in ``source``."""
    try:
        for computed in ("source", "digest"):
            if computed in data:
                raise ConfigError("unknown key (it is computed, not configured)", computed)
        config = parse_section(ReceiverConfig, data)
        _check_scale_out(config)
        if config.mqtt.password_file:
            config.password()
        if config.dc09.enabled:
            try:
                config.dc09.key()
            except ConfigError as exc:
                raise exc.under("dc09") from None
    except ConfigError as exc:
        raise exc.located(source) from None
    return dataclasses.replace(config, source=source, digest=digest)


def _check_scale_out(config: ReceiverConfig) -> None:
    """Settings that only make sense together."""
    if config.mqtt.share_group:
        if config.mqtt.protocol != "5":
            raise ConfigError('a shared subscription needs MQTT protocol "5"', "mqtt.share_group")
        if config.store.url.startswith("sqlite:"):
            raise ConfigError(
                "receivers sharing the devices' topics must share a PostgreSQL store"
                " (SQLite serves one receiver)",
                "mqtt.share_group",
            )
    sup = config.supervision
    if sup.lease <= sup.check_every:
        raise ConfigError(
            f"must be longer than check_every ({sup.check_every:g} s), which renews it",
            "supervision.lease",
        )


def load_receiver_config(path: str | os.PathLike[str]) -> ReceiverConfig:
    data, digest = read_toml(path)
    return parse_receiver_config(data, str(path), digest)
