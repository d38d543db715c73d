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
from functools import cache, cached_property
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from agent.config import ConfigError, check, parse_section
from agent.event import Priority, valid_kind
from drivers.serial_common.checksums import CHECKSUM_NAMES, Checksum, crc, find_checksum

#: Conversions a rule may apply to a captured group (see the README for examples).
FIELD_TYPES = (
    "str",
    "id",
    "int",
    "float",
    "hex_int",
    "hex_as_decimal",
    "int_list",
    "bits",
    "bool",
)
#: What a ``[[rules.layout]]`` field's bytes or bits mean (see the README).
LAYOUT_TYPES = (
    "uint",
    "int",
    "bcd",
    "ascii_dec",
    "ascii_hex",
    "text",
    "hex",
    "bits_set",
    "bool",
    "unix_time",
)
#: Layout types that read whole bytes only (not bit ranges).
BYTE_ONLY_TYPES = ("ascii_dec", "ascii_hex", "text")
#: The field a device's own timestamp goes to (ISO 8601 in the event).
DEVICE_TIME = "device_time"


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


def _one_hex_byte(text: str) -> bool:
    return text == "" or (len(text) == 2 and _is_hex(text))


HEX_BYTES = check(_is_hex, 'must be hex digits, e.g. "AA55"')


@dataclass(frozen=True)
class CrcParameters:
    """``[framing.crc]``: a CRC missing from the catalogue, by its parameters."""

    width: Literal[8, 16, 24, 32] = 16
    poly: int = field(default=0x1021, metadata=check(minimum=1, maximum=0xFFFFFFFF))
    init: int = field(default=0, metadata=check(minimum=0, maximum=0xFFFFFFFF))
    refin: bool = False
    refout: bool = False
    xorout: int = field(default=0, metadata=check(minimum=0, maximum=0xFFFFFFFF))

    def __post_init__(self) -> None:
        for name in ("poly", "init", "xorout"):
            if getattr(self, name) >> self.width:
                raise ConfigError(f"does not fit in {self.width} bits", name)


@dataclass(frozen=True)
class Framing:
    """``[framing]``: how the byte stream is cut into frames and checked."""

    type: Literal["line", "stx_etx", "flag", "length", "fixed"] = "line"
    #: line: any of these ends a line (empty lines are skipped).
    terminators: list[str] = field(default_factory=lambda: ["\r\n", "\n", "\r"])
    #: line: text every frame starts with (NMEA "$"); bytes before its last
    #: occurrence in a line are noise, so noise never glues onto a sentence.
    start: str = field(default="", metadata=BYTE_TEXT)
    encoding: str = field(default="ascii", metadata=check(_codec_exists, "unknown text encoding"))
    #: How a frame's body is given to the rules: as text, or as upper-case hex digits.
    decode: Literal["text", "hex"] = "text"
    #: Where ``[[rules.layout]]`` fields read bytes and bits: the body as received,
    #: or the bytes its ASCII hex digits spell (converters printing raw card bits).
    bytes_from: Literal["raw", "hex_digits"] = "raw"
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
    #: flag: the byte that both opens and closes a frame (HDLC: 0x7E); one flag
    #: between two frames serves both, repeated flags are idle fill.
    flag: int = field(default=0x7E, metadata=check(minimum=0, maximum=255))
    #: fixed: total frame length in bytes, including sync, checksum and trailer.
    length: int = field(default=0, metadata=check(minimum=0, maximum=65536))
    #: fixed, length: bytes (hex) every frame starts with, used to find frame boundaries.
    sync: str = field(default="", metadata=HEX_BYTES)
    #: length: where the length field is (bytes after the sync), its size and byte order.
    length_offset: int = field(default=0, metadata=check(minimum=0, maximum=256))
    length_size: Literal[1, 2] = 1
    length_byteorder: Literal["big", "little"] = "big"
    #: length: what the length field counts: the whole ``frame`` (sync to trailer),
    #: the ``rest`` after the length field, or only the ``data`` between the length
    #: field and the checksum; ``length_adjust`` is added first (a manual's "+2").
    length_counts: Literal["frame", "rest", "data"] = "rest"
    length_adjust: int = field(default=0, metadata=check(minimum=-256, maximum=256))
    #: Byte stuffing (hex byte, e.g. "7D"): inside a frame, this byte and the next
    #: stand for one byte: the next XOR ``escape_xor`` (HDLC: 0x20), or the next
    #: byte itself when ``escape_xor`` is 0 (DLE doubling).
    escape: str = field(
        default="", metadata=check(_one_hex_byte, 'must be one hex byte, e.g. "7D"')
    )
    escape_xor: int = field(default=0x20, metadata=check(minimum=0, maximum=255))
    #: Bytes (hex) the sender escapes besides the frame markers and the escape byte.
    escaped: str = field(default="", metadata=HEX_BYTES)
    checksum: str = field(
        default="none",
        metadata=check(
            lambda v: v in ("none", "crc") or find_checksum(v) is not None,
            "unknown checksum (known: " + ", ".join(CHECKSUM_NAMES) + ")",
        ),
    )
    #: ``checksum = "crc"``: the CRC's parameters.
    crc: CrcParameters | None = None
    #: stx_etx: checksum just before ETX or just after it (other framings: at the end).
    checksum_position: Literal["before_etx", "after_etx"] = "after_etx"
    #: Checksum sent as raw bytes, or as ASCII hex digits.
    checksum_encoding: Literal["raw", "hex"] = "raw"
    #: Checksum computed over the body's bytes, or over the bytes its hex pairs
    #: encode (RDM6300: XOR of the 5 bytes the 10 hex digits stand for).
    checksum_input: Literal["raw", "hex_decoded"] = "raw"
    #: Which framing bytes the checksum covers besides the body.
    checksum_covers: Literal["data", "start_data", "data_end", "all"] = "data"
    checksum_byteorder: Literal["big", "little"] = "big"
    #: The covered part of the body, as a Python slice: from byte ``checksum_start``
    #: (0-based) to ``checksum_stop`` (0 = the end; -2 = all but the last two bytes).
    checksum_start: int = field(default=0, metadata=check(minimum=0, maximum=65536))
    checksum_stop: int = field(default=0, metadata=check(minimum=-65536, maximum=0))
    #: Text between the body and the checksum, not covered (NMEA: "*").
    checksum_separator: str = field(default="", metadata=BYTE_TEXT)
    #: Bytes (hex) that follow the checksum in every frame (e.g. "0D0A").
    trailer: str = field(default="", metadata=HEX_BYTES)

    def __post_init__(self) -> None:
        if self.type == "line" and (not self.terminators or "" in self.terminators):
            raise ConfigError("line framing needs non-empty terminators", "terminators")
        if self.type == "line" and self.trailer:
            raise ConfigError("line framing ends with its terminators; no trailer", "trailer")
        if self.checksum == "crc" and self.crc is None:
            raise ConfigError('checksum = "crc" needs a [framing.crc] table', "crc")
        if self.crc is not None and self.checksum != "crc":
            raise ConfigError('[framing.crc] is used only with checksum = "crc"', "crc")
        if self.type == "fixed":
            overhead = len(self.sync_bytes) + self.checksum_bytes + len(self.trailer_bytes)
            if self.length <= overhead:
                raise ConfigError(
                    f"fixed framing needs a length above sync + checksum + trailer"
                    f" ({overhead} bytes)",
                    "length",
                )
        if self.type == "length":
            if not self.sync and self.checksum == "none":
                raise ConfigError(
                    "length framing needs a sync or a checksum to find frames again after noise",
                    "sync",
                )
            if self.length_offset + self.length_size > self.max_length:
                raise ConfigError("the length field lies beyond max_length", "length_offset")
        if self.type == "stx_etx" and self.stx == self.etx:
            raise ConfigError('stx and etx must differ (same byte both ends: type = "flag")', "etx")
        if self.escape and int(self.escape, 16) in self.marker_bytes:
            raise ConfigError("the escape byte cannot be a frame marker", "escape")
        if self.escape and self.type not in ("stx_etx", "flag") and self.escape_xor == 0:
            raise ConfigError(
                "only stx_etx and flag framings can escape with escape_xor = 0"
                " (a marker must never appear inside a frame)",
                "escape_xor",
            )
        if (
            self.escape
            and self.escape_xor
            and any((m ^ self.escape_xor) in self.marker_bytes for m in self.marker_bytes)
        ):
            raise ConfigError("escaped markers would still be markers", "escape_xor")
        if self.checksum_separator and (
            self.checksum == "none"
            or (self.type == "stx_etx" and self.checksum_position == "after_etx")
        ):
            raise ConfigError(
                "a separator sits between body and checksum inside the frame", "checksum_separator"
            )
        if self.bytes_from == "hex_digits" and self.decode == "hex":
            raise ConfigError('decode = "hex" frames are bytes already', "bytes_from")

    @property
    def marker_bytes(self) -> bytes:
        """Bytes that delimit frames, which never appear unescaped inside one."""
        if self.type == "stx_etx":
            return bytes([self.stx, self.etx])
        if self.type == "flag":
            return bytes([self.flag])
        if self.type == "line":
            text = "".join(self.terminators) + self.start
            return bytes(sorted(set(text.encode("latin-1"))))
        return self.sync_bytes[:1]

    @cached_property
    def checksum_algorithm(self) -> Checksum | None:
        """The checksum guarding every frame (None: no checksum)."""
        if self.checksum == "none":
            return None
        if self.crc is not None:
            p = self.crc
            compute = crc(
                p.width, p.poly, init=p.init, refin=p.refin, refout=p.refout, xorout=p.xorout
            )
            return Checksum(f"crc{p.width}", p.width // 8, compute)
        return find_checksum(self.checksum)

    @property
    def checksum_bytes(self) -> int:
        """Bytes the checksum takes on the wire."""
        algorithm = self.checksum_algorithm
        if algorithm is None:
            return 0
        width = algorithm.width_bytes
        return width * 2 if self.checksum_encoding == "hex" else width

    @property
    def sync_bytes(self) -> bytes:
        return bytes.fromhex(self.sync)

    @property
    def trailer_bytes(self) -> bytes:
        return bytes.fromhex(self.trailer)


def _bit_range_ok(value: list[int]) -> bool:
    return not value or (len(value) == 2 and 0 <= value[0] <= value[1] < 65536 * 8)


BIT_RANGE = check(_bit_range_ok, "must be [first, last] bit numbers, first <= last")


@dataclass(frozen=True)
class LayoutField:
    """``[[rules.layout]]``: a named byte range or bit range of the frame's body.

    Bytes are numbered from 0 at the first body byte (a negative ``offset``
    counts from the end). Bits: ``bit_order = "msb0"`` numbers them from 0 at the
    most significant bit of the first byte, in the order they arrive on a
    Wiegand wire; ``"lsb0"`` numbers them from 0 at the least significant bit of
    the last byte (the body read as one big-endian number). ``bits = [a, b]``
    includes both ends and is read with bit ``a`` as the most significant
    (msb0) or the least significant (lsb0), as a manual draws it.
    """

    name: str
    offset: int = field(default=0, metadata=check(minimum=-65536, maximum=65535))
    #: Bytes from ``offset`` (0 = to the end of the body).
    size: int = field(default=0, metadata=check(minimum=0, maximum=65536))
    bits: list[int] = field(default_factory=list, metadata=BIT_RANGE)
    bit_order: Literal["msb0", "lsb0"] = "msb0"
    type: str = field(
        default="uint",
        metadata=check(lambda v: v in LAYOUT_TYPES, "must be one of " + ", ".join(LAYOUT_TYPES)),
    )
    byteorder: Literal["big", "little"] = "big"
    #: An integer written as a decimal string of this many digits, leading zeros
    #: kept (card numbers, ids); 0 = a number.
    digits: int = field(default=0, metadata=check(minimum=0, maximum=40))
    #: Value -> label (``{ "1" = "armed" }``); a value not listed is kept as it is.
    lookup: dict[str, str] = field(default_factory=dict)
    #: text: strip spaces and NUL padding.
    trim: bool = True

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ConfigError("a field name is letters, digits and _", "name")
        if self.bits and self.type in BYTE_ONLY_TYPES:
            raise ConfigError(f"{self.type} reads whole bytes: give offset/size, not bits", "type")
        if self.bits and (self.offset or self.size):
            raise ConfigError("give either bits or offset/size", "bits")


@dataclass(frozen=True)
class LayoutCheck:
    """``[[rules.checks]]``: a parity or sum the frame must satisfy (bit numbering as
    in :class:`LayoutField`). Parity counts the set bits of ``bits`` and of the
    parity bit ``against = [p, p]``; a sum (or xor) adds the ``bits`` in
    ``word``-bit words modulo 2**word and compares with the value at ``against``."""

    type: Literal["even_parity", "odd_parity", "sum", "xor"]
    bits: list[int] = field(metadata=BIT_RANGE)
    against: list[int] = field(metadata=BIT_RANGE)
    bit_order: Literal["msb0", "lsb0"] = "msb0"
    word: int = field(default=8, metadata=check(minimum=1, maximum=32))

    def __post_init__(self) -> None:
        if not self.bits:
            raise ConfigError("needs [first, last] bit numbers", "bits")
        if not self.against:
            raise ConfigError("needs the [first, last] bits of the check value", "against")
        width = self.against[1] - self.against[0] + 1
        if self.type.endswith("parity"):
            if width != 1:
                raise ConfigError("a parity check is one bit: against = [p, p]", "against")
        else:
            if width != self.word:
                raise ConfigError(f"must be {self.word} bits (one word)", "against")
            if (self.bits[1] - self.bits[0] + 1) % self.word:
                raise ConfigError(f"bits must be whole {self.word}-bit words", "bits")


@dataclass(frozen=True)
class Rule:
    """``[[rules]]``: a regex over a frame and the event it becomes."""

    #: Regex searched in the frame ("" matches every frame).
    match: str = ""
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
    #: Named byte and bit ranges of the body (binary and bit-level formats).
    layout: list[LayoutField] = field(default_factory=list)
    #: Parity and sum checks the frame must pass before anything is taken from it.
    checks: list[LayoutCheck] = field(default_factory=list)
    #: strptime format of the ``device_time`` field (e.g. "%y%m%d%H%M%S"): the
    #: device's own time becomes ``device_time`` in ISO 8601.
    time_format: str = ""
    #: A state name: a message of this rule is emitted only when it differs from
    #: the last one emitted for the same state (a polled device repeating the same
    #: alarm every second gives one event), not on every answer.
    state: str = ""
    #: This message says the ``state`` condition is over: emitted once, and only
    #: if the state was set (e.g. kind "gate.alarm_cleared").
    clears: bool = False

    def __post_init__(self) -> None:
        if not self.ignore and not valid_kind(self.kind):
            raise ConfigError(f"expected a dotted lowercase event kind, got {self.kind!r}", "kind")
        groups = set(compile_pattern(self.match, "match").groupindex)
        names: set[str] = set()
        for index, spec in enumerate(self.layout):
            if spec.name in names:
                raise ConfigError(f"field {spec.name!r} is given twice", f"layout[{index}].name")
            names.add(spec.name)
            if spec.name in groups or spec.name in self.constants:
                raise ConfigError(
                    f"field {spec.name!r} is also a regex group or constant",
                    f"layout[{index}].name",
                )
        if self.time_format and DEVICE_TIME not in groups | {f.name for f in self.layout}:
            raise ConfigError(
                f"no regex group or layout field named {DEVICE_TIME!r}", "time_format"
            )
        if self.time_format and "%" not in self.time_format:
            raise ConfigError("expected a strptime format like %y%m%d%H%M%S", "time_format")
        if self.clears and not self.state:
            raise ConfigError("clears needs the state it clears", "clears")
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
    #: Keep-alive supervision for devices that push: no valid frame for this many
    #: seconds while the port is open -> device.offline (0 = not supervised).
    silent_after: float = field(default=0.0, metadata=check(minimum=0.0, maximum=86400.0))
    source: str = "<memory>"

    def __post_init__(self) -> None:
        if not self.rules:
            raise ConfigError("a dialect needs at least one [[rules]] table", "rules")
        if (
            self.message_number
            and compile_pattern(self.message_number, "message_number").groups != 1
        ):
            raise ConfigError("needs exactly one capturing group", "message_number")
        set_states = {rule.state for rule in self.rules if rule.state and not rule.clears}
        # The longest body a frame can carry, in the bytes layout fields read.
        longest = self.framing.max_length // (2 if self.framing.bytes_from == "hex_digits" else 1)
        for index, rule in enumerate(self.rules):
            if rule.clears and rule.state not in set_states:
                raise ConfigError(
                    f"no rule sets the state {rule.state!r} this one clears",
                    f"rules[{index}].state",
                )
            for position, spec in enumerate(rule.layout):
                end = spec.bits[1] // 8 + 1 if spec.bits else spec.offset + spec.size
                if end > longest:
                    raise ConfigError(
                        f"reaches byte {end - 1}, beyond the longest frame ({longest} bytes,"
                        " framing.max_length)",
                        f"rules[{index}].layout[{position}]",
                    )
            for position, layout_check in enumerate(rule.checks):
                end = max(layout_check.bits[1], layout_check.against[1]) // 8 + 1
                if end > longest:
                    raise ConfigError(
                        f"reaches byte {end - 1}, beyond the longest frame ({longest} bytes)",
                        f"rules[{index}].checks[{position}]",
                    )


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
