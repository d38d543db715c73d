"""Byte builders for the serial tests: frames as the devices put them on the wire."""

from __future__ import annotations

from functools import reduce

from drivers.serial_common.engine import Message, Output


def rdm6300(data: bytes) -> bytes:
    """An RDM6300 frame for 5 data bytes (version + 4 tag bytes)."""
    checksum = reduce(lambda a, b: a ^ b, data, 0)
    return b"\x02" + data.hex().upper().encode() + f"{checksum:02X}".encode() + b"\x03"


def multizone(body: bytes) -> bytes:
    """A multizone-gate frame: STX body ETX, then the sum mod 256 as two hex digits."""
    return b"\x02" + body + b"\x03" + f"{sum(body) & 0xFF:02X}".encode()


def odd_parity(data: bytes) -> bytes:
    """7-bit bytes with an odd-parity bit in bit 7, as a 7O1 UART sends them."""
    return bytes(b | 0x80 if (b & 0x7F).bit_count() % 2 == 0 else b & 0x7F for b in data)


def messages(outputs: list[Output]) -> list[tuple[str, dict[str, object]]]:
    return [(o.kind, o.fields) for o in outputs if isinstance(o, Message)]
