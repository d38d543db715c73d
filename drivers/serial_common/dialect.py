"""Dialects: how one device model talks, described in a TOML file, not in code.

A dialect says how bytes are cut into frames (``[framing]``), which checksum
guards them, and which ordered rules (``[[rules]]``, first match wins) turn a
frame into an event kind with named fields. A technician adds a new gate model
by writing one file from a capture of the real unit and checking it offline
with ``wardpost serial-replay capture.jsonl --dialect my-gate.toml``.

Built-in dialects live in ``drivers/serial_common/dialects/`` and are chosen by
name (``dialect = "rdm6300"``); anything with a ``/`` or ending in ``.toml`` is a
path. Errors name the file and the dotted field, like the agent's own config::

    /etc/wardpost/gate.toml: rules[2].match: invalid regular expression: ...
"""

from __future__ import annotations

import codecs
import re
import tomllib
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from agent.config import ConfigError, check, parse_section
from agent.event import Priority, valid_kind
from drivers.serial_common.checksums import ALGORITHMS, CHECKSUM_NAMES

#: Conversions a rule may apply to a captured group (see the README for examples).
FIELD_TYPES = ("str", "int", "float", "hex_int", "hex_as_decimal", "int_list", "bits", "bool")


def _codec_exists(name: str) -> bool:
    try:
        codecs.lookup(name)
    except LookupError:
        return False
    return True


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


def _priority_or_empty(value: str) -> bool:
    if not value:
        return True
    try:
        Priority.parse(value)
    except ValueError:
        return False
    return True


def compile_pattern(pattern: str, where: str) -> re.Pattern[str]:
    """Compile a rule's regex, turning a syntax error into a located :class:`ConfigError`."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"invalid regular expression: {exc}", where) from None


def _one_byte_chars(text: str) -> bool:
    return all(ord(c) < 256 for c in text)


BYTE_TEXT = check(
    _one_byte_chars,
    "every character must be a single byte (use \\u0002-style escapes up to \\u00ff)",
)
PRIORITY = check(_priority_or_empty, "must be critical, high, normal or low")


@dataclass(frozen=True)
class SerialSettings:
    """``[serial]``: the port settings the device expects (a driver's config may override)."""

    baudrate: int = field(default=9600, metadata=check(minimum=50, maximum=4_000_000))
    bytesize: Literal[5, 6, 7, 8] = 8
    parity: Literal["N", "E", "O", "M", "S"] = "N"
    stopbits: float = field(
        default=1.0, metadata=check(lambda v: v in (1, 1.5, 2), "must be 1, 1.5 or 2")
    )
    xonxoff: bool = False
    rtscts: bool = False


@dataclass(frozen=True)
class Framing:
    """``[framing]``: how the byte stream is cut into frames and checked."""

    type: Literal["line", "stx_etx", "fixed"] = "line"
    #: line: any of these ends a line (empty lines are skipped).
    terminators: list[str] = field(default_factory=lambda: ["\r\n", "\n", "\r"])
    encoding: str = field(default="ascii", metadata=check(_codec_exists, "unknown text encoding"))
    #: How a frame's body is given to the rules: as text, or as upper-case hex digits.
    decode: Literal["text", "hex"] = "text"
    #: The longest frame kept; longer input is reported and skipped (bounded memory).
    max_length: int = field(default=512, metadata=check(minimum=4, maximum=65536))
    #: Software 7-bit handling for links that pass 8-bit bytes (network servers,
    #: converters): check odd/even parity in bit 7, or just clear it ("strip").
    parity: Literal["none", "odd", "even", "strip"] = "none"
    #: A partial frame older than this many seconds when new bytes arrive is
    #: reported as incomplete (a device reset mid-frame must not glue onto the next).
    gap_timeout: float = field(default=0.5, metadata=check(minimum=0.0, maximum=3600.0))
    stx: int = field(default=0x02, metadata=check(minimum=0, maximum=255))
    etx: int = field(default=0x03, metadata=check(minimum=0, maximum=255))
    #: fixed: total frame length in bytes, including sync and checksum.
    length: int = field(default=0, metadata=check(minimum=0, maximum=65536))
    #: fixed: bytes (hex) every frame starts with, used to find frame boundaries.
    sync: str = field(default="", metadata=check(_is_hex, 'must be hex digits, e.g. "AA55"'))
    checksum: str = field(
        default="none",
        metadata=check(
            lambda v: v in CHECKSUM_NAMES,
            "unknown checksum (known: " + ", ".join(CHECKSUM_NAMES) + ")",
        ),
    )
    #: stx_etx: checksum just before ETX or just after it (fixed: always at the end).
    checksum_position: Literal["before_etx", "after_etx"] = "after_etx"
    #: Checksum sent as raw bytes, or as ASCII hex digits.
    checksum_encoding: Literal["raw", "hex"] = "raw"
    #: Checksum computed over the body's bytes, or over the bytes its hex pairs
    #: encode (RDM6300: XOR of the 5 bytes the 10 hex digits stand for).
    checksum_input: Literal["raw", "hex_decoded"] = "raw"
    #: Which framing bytes the checksum covers besides the body.
    checksum_covers: Literal["data", "start_data", "data_end", "all"] = "data"
    checksum_byteorder: Literal["big", "little"] = "big"

    def __post_init__(self) -> None:
        if self.type == "line" and (not self.terminators or "" in self.terminators):
            raise ConfigError("line framing needs non-empty terminators", "terminators")
        if self.type == "fixed":
            overhead = len(self.sync) // 2 + self.checksum_bytes
            if self.length <= overhead:
                raise ConfigError(
                    f"fixed framing needs a length above sync + checksum ({overhead} bytes)",
                    "length",
                )
        if self.type == "line" and self.checksum != "none":
            raise ConfigError("line framing has no checksum; use stx_etx or fixed", "checksum")
        if self.type == "stx_etx" and self.stx == self.etx:
            raise ConfigError("stx and etx must differ", "etx")

    @property
    def checksum_bytes(self) -> int:
        """Bytes the checksum takes on the wire."""
        if self.checksum == "none":
            return 0
        width = ALGORITHMS[self.checksum].width_bytes
        return width * 2 if self.checksum_encoding == "hex" else width

    @property
    def sync_bytes(self) -> bytes:
        return bytes.fromhex(self.sync)


@dataclass(frozen=True)
class Rule:
    """``[[rules]]``: a regex over a frame and the event it becomes."""

    match: str
    kind: str = ""
    #: Overrides the driver's default priority for this kind.
    priority: str = field(default="", metadata=PRIORITY)
    #: Named group -> conversion (one of FIELD_TYPES); groups not listed stay strings.
    fields: dict[str, str] = field(default_factory=dict)
    #: Constant fields added to every match (e.g. ``{class = "warble"}``).
    constants: dict[str, Any] = field(default_factory=dict)
    #: Fields holding absolute device counters: events carry the increase since
    #: the previous reading; a decrease means the device was reset.
    counters: list[str] = field(default_factory=list)
    #: Counter -> event kind emitted with ``count`` = its increase (alarm passages -> gate.alarm).
    counter_events: dict[str, str] = field(default_factory=dict)
    #: This message says the device restarted: counters restart from zero.
    resets_counters: bool = False
    #: Sent back to the device when this rule matches (framed like a poll request).
    reply: str = field(default="", metadata=BYTE_TEXT)
    #: A known, uninteresting message (prompt, keep-alive): counted, no event.
    ignore: bool = False

    def __post_init__(self) -> None:
        if not self.ignore and not valid_kind(self.kind):
            raise ConfigError(f"expected a dotted lowercase event kind, got {self.kind!r}", "kind")
        groups = set(compile_pattern(self.match, "match").groupindex)
        for name, conversion in self.fields.items():
            if conversion not in FIELD_TYPES:
                raise ConfigError(
                    f"unknown conversion {conversion!r} (known: {', '.join(FIELD_TYPES)})",
                    f"fields.{name}",
                )
            if name not in groups:
                raise ConfigError(f"the regex has no group named {name!r}", f"fields.{name}")
        for name in self.counters:
            if name not in groups:
                raise ConfigError(f"the regex has no group named {name!r}", "counters")
        for name, kind in self.counter_events.items():
            if name not in self.counters:
                raise ConfigError(f"{name!r} is not listed in counters", f"counter_events.{name}")
            if not valid_kind(kind):
                raise ConfigError(
                    f"expected a dotted lowercase event kind, got {kind!r}",
                    f"counter_events.{name}",
                )


@dataclass(frozen=True)
class PollSettings:
    """``[poll]``: devices that only answer questions (statistics are polled, not pushed)."""

    #: Request sent every ``interval`` seconds ("" = the device pushes, no polling).
    request: str = field(default="", metadata=BYTE_TEXT)
    interval: float = field(default=5.0, metadata=check(minimum=0.05, maximum=86400.0))
    #: After this many requests in a row without any valid answer the link is reported offline.
    offline_after: int = field(default=3, metadata=check(minimum=1, maximum=1000))


@dataclass(frozen=True)
class Dialect:
    """One device model's wire format."""

    name: str
    description: str = ""
    serial: SerialSettings = field(default_factory=SerialSettings)
    framing: Framing = field(default_factory=Framing)
    rules: list[Rule] = field(default_factory=list)
    #: A regex with one group finding the message number in a frame; a number seen
    #: among the last ``duplicate_memory`` frames is a repeat and is dropped.
    message_number: str = ""
    duplicate_memory: int = field(default=8, metadata=check(minimum=1, maximum=1000))
    #: Kind emitted when counters go backwards (the device rebooted or was cleared).
    reset_kind: str = field(
        default="device.reset", metadata=check(valid_kind, "must be an event kind")
    )
    poll: PollSettings = field(default_factory=PollSettings)
    source: str = "<memory>"

    def __post_init__(self) -> None:
        if not self.rules:
            raise ConfigError("a dialect needs at least one [[rules]] table", "rules")
        if (
            self.message_number
            and compile_pattern(self.message_number, "message_number").groups != 1
        ):
            raise ConfigError("needs exactly one capturing group", "message_number")


BUILTIN_PACKAGE = "drivers.serial_common.dialects"


def builtin_dialects() -> list[str]:
    """Names of the dialects shipped with Wardpost."""
    folder = resources.files(BUILTIN_PACKAGE)
    return sorted(
        p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml")
    )


def parse_dialect(data: dict[str, Any], source: str) -> Dialect:
    """Validate a parsed TOML document as a dialect; errors are located in ``source``."""
    try:
        return parse_section(Dialect, {**data, "source": source})
    except ConfigError as exc:
        raise exc.located(source) from None


@cache
def _load_builtin(name: str) -> Dialect:
    text = resources.files(BUILTIN_PACKAGE).joinpath(f"{name}.toml").read_text("utf-8")
    return parse_dialect(tomllib.loads(text), f"built-in dialect {name!r}")


def load_dialect(name_or_path: str, where: str = "dialect") -> Dialect:
    """A built-in dialect by name, or a dialect file by path.

    Raises :class:`ConfigError` naming the file and field, or listing the
    built-in names when ``name_or_path`` is neither.
    """
    if "/" not in name_or_path and not name_or_path.endswith(".toml"):
        if name_or_path not in builtin_dialects():
            known = ", ".join(builtin_dialects())
            raise ConfigError(
                f"unknown dialect {name_or_path!r} (built-in: {known}; or a path to a .toml file)",
                where,
            )
        return _load_builtin(name_or_path)
    path = Path(name_or_path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"dialect file {str(path)!r} cannot be read: {exc.strerror}", where
        ) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"dialect file is not valid TOML: {exc}", file=path) from None
    data.setdefault("name", path.stem)
    return parse_dialect(data, str(path))


def text_to_bytes(text: str) -> bytes:
    """A request/reply string from a dialect as bytes (TOML escapes like ``\\r`` or
    ``\\u0002`` are already decoded; every character must fit in one byte)."""
    return text.encode("latin-1")
