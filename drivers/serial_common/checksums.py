"""Checksums used by serial devices, selected by name in a dialect file.

Every algorithm maps ``bytes`` to an unsigned integer of ``width`` bits. The CRC
variants follow the parameter catalogue of the "CRC RevEng" reference (poly,
init, reflect in/out, xorout), so a technician can match a manual's wording
("CRC-16/MODBUS", "CCITT-FALSE") to a name here; each is checked against its
published check value for ``b"123456789"`` in the tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import reduce


@dataclass(frozen=True)
class Checksum:
    """One named checksum: ``compute(data)`` gives an integer ``width_bytes`` wide."""

    name: str
    width_bytes: int
    compute: Callable[[bytes], int]


def _reflect(value: int, bits: int) -> int:
    return int(f"{value:0{bits}b}"[::-1], 2)


_REFLECTED_BYTES = bytes(_reflect(i, 8) for i in range(256))


def _crc(
    width: int, poly: int, *, init: int, refin: bool, refout: bool, xorout: int
) -> Callable[[bytes], int]:
    """A table-driven CRC of ``width`` bits with the given catalogue parameters."""
    top = 1 << (width - 1)
    mask = (1 << width) - 1
    table = []
    for byte in range(256):
        reg = byte << (width - 8)
        for _ in range(8):
            reg = ((reg << 1) ^ poly) if reg & top else (reg << 1)
        table.append(reg & mask)

    def compute(data: bytes) -> int:
        reg = init
        for byte in data.translate(_REFLECTED_BYTES) if refin else data:
            reg = ((reg << 8) & mask) ^ table[((reg >> (width - 8)) ^ byte) & 0xFF]
        if refout:
            reg = _reflect(reg, width)
        return reg ^ xorout

    return compute


def _xor(data: bytes) -> int:
    return reduce(lambda acc, b: acc ^ b, data, 0)


def _sum8(data: bytes) -> int:
    return sum(data) & 0xFF


def _lrc(data: bytes) -> int:
    """Two's complement of the byte sum (Modbus ASCII style longitudinal check)."""
    return (-sum(data)) & 0xFF


ALGORITHMS: dict[str, Checksum] = {
    c.name: c
    for c in (
        Checksum("xor", 1, _xor),
        Checksum("sum8", 1, _sum8),
        Checksum("lrc", 1, _lrc),
        Checksum("crc8", 1, _crc(8, 0x07, init=0x00, refin=False, refout=False, xorout=0x00)),
        Checksum("crc8-maxim", 1, _crc(8, 0x31, init=0x00, refin=True, refout=True, xorout=0x00)),
        Checksum(
            "crc16-modbus", 2, _crc(16, 0x8005, init=0xFFFF, refin=True, refout=True, xorout=0x0000)
        ),
        Checksum(
            "crc16-arc", 2, _crc(16, 0x8005, init=0x0000, refin=True, refout=True, xorout=0x0000)
        ),
        Checksum(
            "crc16-ccitt-false",
            2,
            _crc(16, 0x1021, init=0xFFFF, refin=False, refout=False, xorout=0x0000),
        ),
        Checksum(
            "crc16-xmodem",
            2,
            _crc(16, 0x1021, init=0x0000, refin=False, refout=False, xorout=0x0000),
        ),
        Checksum(
            "crc16-kermit", 2, _crc(16, 0x1021, init=0x0000, refin=True, refout=True, xorout=0x0000)
        ),
        Checksum(
            "crc16-x25", 2, _crc(16, 0x1021, init=0xFFFF, refin=True, refout=True, xorout=0xFFFF)
        ),
    )
}

#: Accepted values of a dialect's ``framing.checksum``.
CHECKSUM_NAMES = ("none", *ALGORITHMS)
