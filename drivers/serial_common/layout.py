"""Byte and bit fields of a frame's body (``[[rules.layout]]``) and the parity and
sum checks over them (``[[rules.checks]]``), both ways: reading a received body,
and writing one (the encoder that tests and ``serial-encode`` build frames with).

Bit numbering is stated by each field: ``msb0`` counts from 0 at the most
significant bit of the first byte (the order bits arrive on a Wiegand wire),
``lsb0`` from 0 at the least significant bit of the last byte.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from drivers.serial_common.dialect import LayoutCheck, LayoutField
from drivers.serial_common.framing import Rejected


class FieldError(ValueError):
    """A field cannot be read from this frame (too short, not BCD, not digits ...)."""


def bit_span(bits: Sequence[int], order: str, total: int) -> tuple[int, int]:
    """(shift from the least significant end, width) of a bit range in ``total`` bits."""
    first, last = bits
    if last >= total:
        raise FieldError(f"bits {first}-{last}: the frame has only {total} bits")
    width = last - first + 1
    return (total - 1 - last if order == "msb0" else first), width


def byte_span(spec: LayoutField, size: int) -> slice:
    start = spec.offset + size if spec.offset < 0 else spec.offset
    stop = start + spec.size if spec.size else size
    if start < 0 or stop > size or start >= stop:
        raise FieldError(f"bytes {spec.offset}..+{spec.size or 'end'}: the frame has {size} bytes")
    return slice(start, stop)


def _bcd(value: int, width: int) -> int:
    digits = f"{value:0{(width + 3) // 4}x}"
    if not digits.isdigit():
        raise FieldError(f"{digits} is not BCD")
    return int(digits)


def _bits_set(value: int) -> list[int]:
    """Set bits numbered from 1 at the least significant (zone bitmaps)."""
    return [i + 1 for i in range(value.bit_length()) if value >> i & 1]


def _from_int(kind: str, value: int, width: int) -> Any:
    """An integer read from ``width`` bits, as its layout type says."""
    if kind == "uint":
        return value
    if kind == "int":
        return value - (1 << width) if value >> (width - 1) else value
    if kind == "bcd":
        return _bcd(value, width)
    if kind == "hex":
        return f"{value:0{(width + 3) // 4}X}"
    if kind == "bits_set":
        return _bits_set(value)
    if kind == "bool":
        return value != 0
    try:  # unix_time
        return datetime.fromtimestamp(value, UTC).isoformat()
    except (OverflowError, OSError, ValueError):
        raise FieldError(f"{value} s is not a time") from None


def _from_bytes(spec: LayoutField, chunk: bytes) -> Any:
    kind = spec.type
    if kind == "text":
        text = chunk.decode("latin-1")
        return text.strip(" \x00") if spec.trim else text
    if kind == "ascii_dec":
        text = chunk.decode("latin-1").strip(" \x00")
        if not text.lstrip("+-").isdigit():
            raise FieldError(f"{text!r} is not decimal digits")
        return int(text)
    if kind == "ascii_hex":
        try:
            return int(chunk.decode("latin-1").strip(" \x00"), 16)
        except ValueError:
            raise FieldError(f"{chunk!r} is not hex digits") from None
    if kind == "hex":
        return chunk.hex().upper()
    return _from_int(kind, int.from_bytes(chunk, spec.byteorder), 8 * len(chunk))


class BodyReader:
    """One body, read as bytes and as bits (the bit view is built once, if needed)."""

    def __init__(self, data: bytes):
        self.data = data
        self._number: int | None = None

    @property
    def number(self) -> int:
        if self._number is None:
            self._number = int.from_bytes(self.data, "big")
        return self._number

    def bits(self, bits: Sequence[int], order: str) -> tuple[int, int]:
        """(value, width) of a bit range."""
        shift, width = bit_span(bits, order, 8 * len(self.data))
        return (self.number >> shift) & ((1 << width) - 1), width

    def field(self, spec: LayoutField) -> tuple[Any, str]:
        """A field's value and where it came from (for ``serial-replay --explain``)."""
        if spec.bits:
            raw, width = self.bits(spec.bits, spec.bit_order)
            value = _from_int(spec.type, raw, width)
            where = f"bits {spec.bits[0]}-{spec.bits[1]} ({spec.bit_order}) {raw:0{width}b}"
        else:
            span = byte_span(spec, len(self.data))
            chunk = self.data[span]
            value = _from_bytes(spec, chunk)
            where = f"bytes {span.start}-{span.stop - 1} {chunk.hex(' ')}"
        if spec.digits and isinstance(value, int) and not isinstance(value, bool):
            value = f"{value:0{spec.digits}d}"
        if spec.lookup:
            value = spec.lookup.get(str(value), value)
        return value, where

    def verify(self, check: LayoutCheck) -> str:
        """Raise :class:`Rejected` unless the check holds; else say what was checked."""
        value, width = self.bits(check.bits, check.bit_order)
        mark, _ = self.bits(check.against, check.bit_order)
        expected = check_value(check, value, width)
        span = f"bits {check.bits[0]}-{check.bits[1]}"
        first, last = check.against
        at = f"bit {first} holds" if first == last else f"bits {first}-{last} hold"
        if mark != expected:
            code = "bad_parity" if check.type.endswith("parity") else "bad_sum"
            raise Rejected(
                code,
                f"{check.type.replace('_', ' ')} over {span} failed"
                f" ({at} {mark}, should be {expected})",
            )
        return f"{check.type} over {span} -> {mark} ok"


def check_value(check: LayoutCheck, value: int, width: int) -> int:
    """What the ``against`` bits must hold for ``width`` bits of ``value``."""
    if check.type == "even_parity":
        return value.bit_count() & 1
    if check.type == "odd_parity":
        return (value.bit_count() & 1) ^ 1
    mask = (1 << check.word) - 1
    words = [(value >> shift) & mask for shift in range(0, width, check.word)]
    if check.type == "sum":
        return sum(words) & mask
    result = 0
    for word in words:
        result ^= word
    return result


# -- writing a body (the inverse) -----------------------------------------------------


def _to_int(spec: LayoutField, value: Any, width: int) -> int:
    """The ``width``-bit pattern of a field value (the inverse of :func:`_from_int`)."""
    kind = spec.type
    if kind == "int":
        number = int(value)
        if not -(1 << (width - 1)) <= number < 1 << (width - 1):
            raise FieldError(f"{spec.name}: {value!r} does not fit in {width} signed bits")
        return number & ((1 << width) - 1)
    if kind == "bcd":
        number = int(str(int(value)), 16)
    elif kind == "hex":
        number = int(str(value), 16)
    elif kind == "bits_set":
        number = sum(1 << (bit - 1) for bit in value)
    elif kind == "bool":
        number = int(bool(value))
    elif kind == "unix_time":  # seconds, or an ISO 8601 time
        text = str(value)
        number = int(text) if text.isdigit() else int(datetime.fromisoformat(text).timestamp())
    else:
        number = int(value)
    if not 0 <= number < 1 << width:
        raise FieldError(f"{spec.name}: {value!r} does not fit in {width} bits")
    return number


def _to_bytes(spec: LayoutField, value: Any, size: int) -> bytes:
    kind = spec.type
    if kind == "text":
        chunk = str(value).encode("latin-1").ljust(size, b" ")
    elif kind == "ascii_dec":
        chunk = str(int(value)).rjust(size, "0").encode()
    elif kind == "ascii_hex":
        chunk = f"{int(value):0{size}X}".encode()
    elif kind == "hex":
        chunk = bytes.fromhex(str(value))
    else:
        return _to_int(spec, value, 8 * size).to_bytes(size, spec.byteorder)
    if len(chunk) != size:
        raise FieldError(f"{spec.name}: {value!r} does not fit in {size} bytes")
    return chunk


_TRUE_WORDS = frozenset({"1", "y", "yes", "true", "on", "t"})


def parse_value(spec: LayoutField, text: str) -> Any:
    """A field value typed on a command line, as :func:`write_body` takes it."""
    if spec.lookup and text in spec.lookup.values():
        return text  # a label: written as the value it stands for
    kind = spec.type
    try:
        if kind == "bits_set":
            return [int(part) for part in text.replace(" ", ",").split(",") if part]
        if kind == "bool":
            return text.strip().lower() in _TRUE_WORDS
        if kind in ("text", "hex", "unix_time"):
            return text
        return int(text, 0)
    except ValueError:
        raise FieldError(f"{spec.name}: {text!r} is not a value for {kind}") from None


def layout_size(layout: Sequence[LayoutField]) -> int:
    """The smallest body holding every field (byte ranges need an explicit size)."""
    size = 0
    for spec in layout:
        if spec.bits:
            size = max(size, spec.bits[1] // 8 + 1)
        elif spec.offset >= 0 and spec.size:
            size = max(size, spec.offset + spec.size)
    return size


def write_body(
    layout: Sequence[LayoutField],
    checks: Sequence[LayoutCheck],
    values: Mapping[str, Any],
    size: int,
    base: bytes = b"",
) -> bytes:
    """A ``size``-byte body (over ``base``, zeros by default) holding ``values``
    where the layout puts them, with every check's parity or sum bit set."""
    total = 8 * size
    number = int.from_bytes(base.ljust(size, b"\0")[:size], "big")
    for spec in layout:
        value = values[spec.name]
        if spec.lookup:
            reverse = {label: key for key, label in spec.lookup.items()}
            value = reverse.get(value, value)
            value = int(value) if isinstance(value, str) and value.lstrip("-").isdigit() else value
        if spec.bits:
            shift, width = bit_span(spec.bits, spec.bit_order, total)
            mask = ((1 << width) - 1) << shift
            number = (number & ~mask) | (_to_int(spec, value, width) << shift)
        else:
            span = byte_span(spec, size)
            chunk = _to_bytes(spec, value, span.stop - span.start)
            shift = 8 * (size - span.stop)
            mask = ((1 << (8 * len(chunk))) - 1) << shift
            number = (number & ~mask) | (int.from_bytes(chunk, "big") << shift)
    for check in checks:
        shift, width = bit_span(check.bits, check.bit_order, total)
        covered = (number >> shift) & ((1 << width) - 1)
        at, at_width = bit_span(check.against, check.bit_order, total)
        mask = ((1 << at_width) - 1) << at
        number = (number & ~mask) | (check_value(check, covered, width) << at)
    return number.to_bytes(size, "big")


def as_hex_digits(
    layout: Sequence[LayoutField], checks: Sequence[LayoutCheck], body: bytes
) -> bytes:
    """A body for ``bytes_from = "hex_digits"``: upper-case hex digits, as few as the
    highest lsb0-numbered bit needs (a Wiegand-34 converter prints 9, not 10)."""
    ranges = [(f.bits, f.bit_order) for f in layout if f.bits]
    ranges += [(r, c.bit_order) for c in checks for r in (c.bits, c.against)]
    if ranges and all(order == "lsb0" for _, order in ranges):
        digits = (max(bits[1] for bits, _ in ranges) + 4) // 4
    else:
        digits = 2 * len(body)
    return f"{int.from_bytes(body, 'big'):0{digits}X}".encode()
