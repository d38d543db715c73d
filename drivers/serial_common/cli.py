"""Technician tools: ``wardpost serial-sniff`` and ``wardpost serial-replay``.

Writing a dialect for a new gate goes: sniff the port while walking through
the gate (``--capture gate.jsonl`` records the session), write a dialect file,
then replay the capture through it until every line turns into the right
event, all without the device::

    wardpost serial-sniff /dev/serial/by-id/usb-FTDI_...-port0 --capture gate.jsonl
    wardpost serial-replay gate.jsonl --dialect ./my-gate.toml

A capture is JSON lines: a header ``{"capture": 1, "port": ..., "started": ...}``
then one ``{"t": seconds, "rx": "hex"}`` per chunk read. ``serial-replay``
also accepts a raw byte dump (``cat /dev/ttyUSB0 > dump.bin``).

``wardpost serial-encode`` goes the other way: it frames a body (text, hex, or
a rule's layout fields) as the dialect's device would send it, checksum,
escaping and all, and shows what the dialect makes of it; for checking a
dialect against a manual's example, or feeding ``wardpost simulate``.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from agent.config import ConfigError
from drivers.serial_common.dialect import builtin_dialects, load_dialect
from drivers.serial_common.driver import printable
from drivers.serial_common.engine import DialectEngine, Message, Output, Reply
from drivers.serial_common.layout import (
    FieldError,
    as_hex_digits,
    layout_size,
    parse_value,
    write_body,
)
from drivers.serial_common.transport import LinkChange, PortSettings, SerialLink

CAPTURE_VERSION = 1


def describe_output(output: Output) -> str:
    """What a dialect made of some bytes: one line, then the message's trace if any."""
    if isinstance(output, Message):
        fields = json.dumps(output.fields, sort_keys=True, default=str)
        return ("\n" + " " * 21).join((f"{output.kind} {fields}", *output.trace))
    if isinstance(output, Reply):
        return f"reply {output.data.hex(' ')} |{printable(output.data)}|"
    return f"unparsed ({output.reason}, {output.length} bytes) {output.raw[:48].hex(' ')}"


class Inspector:
    """Feeds bytes to several dialects at once and prints bytes and results."""

    def __init__(self, dialects: Sequence[str], out: TextIO, explain: bool = False):
        self.engines = [DialectEngine(load_dialect(d, "--dialect"), explain) for d in dialects]
        self.out = out
        self._lock = threading.Lock()

    def show(self, data: bytes, t: float) -> None:
        with self._lock:
            print(
                f"{t:9.3f}  rx {len(data):4d}  {data.hex(' ')}  |{printable(data)}|", file=self.out
            )
            for engine in self.engines:
                for output in engine.feed(data, t):
                    print(f"{'':17}{engine.dialect.name}: {describe_output(output)}", file=self.out)
            self.out.flush()

    def summary(self) -> None:
        for engine in self.engines:
            for output in engine.flush():
                print(f"{'':17}{engine.dialect.name}: {describe_output(output)}", file=self.out)
            counts = ", ".join(f"{k} {v}" for k, v in sorted(engine.stats.items()))
            print(f"{engine.dialect.name}: {counts or 'no bytes'}", file=self.out)


def read_capture(path: Path) -> Iterator[tuple[float, bytes]]:
    """(time, bytes) chunks from a capture file, or one chunk from a raw dump."""
    raw = path.read_bytes()
    first = raw.split(b"\n", 1)[0]
    try:
        header = json.loads(first)
    except ValueError:
        header = None
    if not (isinstance(header, dict) and "capture" in header):
        yield 0.0, raw
        return
    for number, line in enumerate(raw.splitlines()[1:], start=2):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            yield float(record["t"]), bytes.fromhex(record["rx"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"line {number} is not a capture record ({exc})", file=path) from None


def cmd_replay(args: argparse.Namespace) -> int:
    inspector = Inspector(args.dialect, sys.stdout, args.explain)
    path = Path(args.file)
    if not path.is_file():
        raise ConfigError("capture file does not exist", file=path)
    for t, data in read_capture(path):
        inspector.show(data, t)
    inspector.summary()
    return 0


class Capture:
    """Writes a sniffing session as JSON lines, flushed per chunk (a crash keeps it)."""

    def __init__(self, path: Path, settings: PortSettings):
        self.file = path.open("w", encoding="utf-8")
        header = {
            "capture": CAPTURE_VERSION,
            "port": settings.port,
            "baudrate": settings.baudrate,
            "bytesize": settings.bytesize,
            "parity": settings.parity,
            "stopbits": settings.stopbits,
            "started": datetime.now(UTC).isoformat(),
        }
        self.file.write(json.dumps(header) + "\n")

    def write(self, t: float, data: bytes) -> None:
        self.file.write(json.dumps({"t": round(t, 6), "rx": data.hex()}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def cmd_sniff(args: argparse.Namespace) -> int:
    dialects = args.dialect or builtin_dialects()
    inspector = Inspector(dialects, sys.stdout, args.explain)
    wanted = inspector.engines[0].dialect.serial if args.dialect else None
    settings = PortSettings(
        port=args.port,
        baudrate=args.baudrate or (wanted.baudrate if wanted else 9600),
        bytesize=args.bytesize or (wanted.bytesize if wanted else 8),
        parity=args.parity or (wanted.parity if wanted else "N"),
        stopbits=args.stopbits or (wanted.stopbits if wanted else 1.0),
        exclusive=True,
        reconnect_max=2.0,
    )
    capture = Capture(Path(args.capture), settings) if args.capture else None
    started = time.monotonic()

    def on_data(data: bytes, now: float) -> None:
        if capture is not None:
            capture.write(now - started, data)
        inspector.show(data, now - started)

    def on_change(change: LinkChange) -> None:
        state = "open" if change.online else f"unavailable: {change.reason}"
        print(
            f"{time.monotonic() - started:9.3f}  {change.port} ({change.resolved}) {state}",
            flush=True,
        )

    link = SerialLink(settings, on_data, on_change)
    print(
        f"sniffing {settings.port} at {settings.baudrate} {settings.bytesize}{settings.parity}"
        f"{settings.stopbits:g}; dialects: {', '.join(e.dialect.name for e in inspector.engines)}",
        flush=True,
    )
    link.start()
    try:
        deadline = started + args.duration if args.duration > 0 else None
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.1 if deadline is None else min(0.1, max(0.0, deadline - time.monotonic())))
    except KeyboardInterrupt:
        pass
    finally:
        link.stop()
        if capture is not None:
            capture.close()
    inspector.summary()
    return 0


def encode_frame(
    dialect_name: str, body_text: str, body_hex: str, rule: int, values: Sequence[str]
) -> bytes:
    """The frame ``serial-encode`` prints: a body framed as the dialect's device sends it."""
    dialect = load_dialect(dialect_name, "--dialect")
    try:
        base = bytes.fromhex(body_hex) if body_hex else body_text.encode("latin-1")
    except (ValueError, UnicodeEncodeError):
        raise ConfigError(
            "must be hex digits (--hex) or single-byte text (--body)", "body"
        ) from None
    if values:
        if not 0 <= rule < len(dialect.rules):
            raise ConfigError(f"the dialect has rules 0..{len(dialect.rules) - 1}", "--rule")
        layout, checks = dialect.rules[rule].layout, dialect.rules[rule].checks
        specs = {spec.name: spec for spec in layout}
        given: dict[str, Any] = {}
        for item in values:
            name, sep, text = item.partition("=")
            if not sep or name not in specs:
                known = ", ".join(specs) or "none"
                raise ConfigError(f"expected FIELD=VALUE with a layout field ({known})", item)
            try:
                given[name] = parse_value(specs[name], text)
            except FieldError as exc:
                raise ConfigError(str(exc), item) from None
        missing = [name for name in specs if name not in given]
        if missing:
            raise ConfigError(f"no value for {', '.join(missing)}", "FIELD=VALUE")
        try:
            base = write_body(layout, checks, given, max(layout_size(layout), len(base)), base)
        except (ValueError, OverflowError) as exc:
            raise ConfigError(f"cannot write these values: {exc}", "FIELD=VALUE") from None
        if dialect.framing.bytes_from == "hex_digits":
            base = as_hex_digits(layout, checks, base)
    try:
        return DialectEngine(dialect).framer.frame(base)
    except ValueError as exc:
        raise ConfigError(str(exc), "body") from None


def cmd_encode(args: argparse.Namespace) -> int:
    frame = encode_frame(args.dialect, args.body, args.hex, args.rule, args.values)
    print(f"{frame.hex(' ')}  |{printable(frame)}|")
    engine = DialectEngine(load_dialect(args.dialect, "--dialect"))
    for output in [*engine.feed(frame, 0.0), *engine.flush()]:
        print(f"{engine.dialect.name}: {describe_output(output)}")
    return 0


def _parity(value: str) -> str:
    if not value:  # argparse passes the default through here too
        return ""
    letter = value.upper()[:1]
    if letter not in ("N", "E", "O", "M", "S"):
        raise argparse.ArgumentTypeError("parity is N, E, O, M or S")
    return letter


def add_cli(subparsers: Any) -> None:
    """Add ``serial-sniff`` and ``serial-replay`` to the ``wardpost`` command."""
    known = ", ".join(builtin_dialects())
    sniff = subparsers.add_parser(
        "serial-sniff",
        help="show raw bytes from a serial port and what each dialect makes of them",
        description=f"Built-in dialects: {known}. --dialect may repeat; default: all built-ins.",
    )
    sniff.add_argument("port", metavar="PORT", help="device path (/dev/serial/by-id/...) or URL")
    sniff.add_argument(
        "--dialect", action="append", metavar="D", help="built-in name or .toml path"
    )
    sniff.add_argument("--capture", metavar="FILE", help="record the session for serial-replay")
    sniff.add_argument(
        "--baudrate", type=int, default=0, help="default: the first dialect's, else 9600"
    )
    sniff.add_argument("--bytesize", type=int, choices=(5, 6, 7, 8), default=0)
    sniff.add_argument("--parity", type=_parity, default="")
    sniff.add_argument("--stopbits", type=float, choices=(1, 1.5, 2), default=0.0)
    sniff.add_argument(
        "--duration", type=float, default=0.0, help="stop after SECONDS (default: Ctrl-C)"
    )
    sniff.add_argument(
        "--explain",
        action="store_true",
        help="per frame: framing, checksum verdict, each field's bytes or bits -> value",
    )
    sniff.set_defaults(func=cmd_sniff)

    replay = subparsers.add_parser(
        "serial-replay",
        help="run a serial capture through a dialect offline",
        description=f"Built-in dialects: {known}.",
    )
    replay.add_argument(
        "file", metavar="FILE", help="a serial-sniff --capture file or a raw byte dump"
    )
    replay.add_argument(
        "--dialect", action="append", required=True, metavar="D", help="built-in name or .toml path"
    )
    replay.add_argument(
        "--explain",
        action="store_true",
        help="per frame: framing, checksum verdict, each field's bytes or bits -> value",
    )
    replay.set_defaults(func=cmd_replay)

    encode = subparsers.add_parser(
        "serial-encode",
        help="frame a body as a dialect's device sends it (checksum, escaping) and decode it back",
        description=(
            "Give the body as --body TEXT or --hex HEX, and/or a rule's layout fields as"
            " FIELD=VALUE (written over the --hex bytes; parity and sum bits are set)."
        ),
    )
    encode.add_argument("--dialect", required=True, metavar="D", help="built-in name or .toml path")
    encode.add_argument("--body", default="", help="the body as text")
    encode.add_argument("--hex", default="", help="the body (or the bytes under the fields) as hex")
    encode.add_argument(
        "--rule", type=int, default=0, help="the rule whose layout FIELD=VALUE fill (0-based)"
    )
    encode.add_argument("values", nargs="*", metavar="FIELD=VALUE")
    encode.set_defaults(func=cmd_encode)
