"""Checksums used by serial devices, selected by name in a dialect file.

Every algorithm maps ``bytes`` to an unsigned integer of ``width_bytes`` bytes.
The CRC variants follow the parameter catalogue of the "CRC RevEng" reference
(poly, init, reflect in/out, xorout), so a technician can copy a manual's
wording: ``CRC-16/MODBUS``, ``crc16-modbus`` and ``CRC16_MODBUS`` are the same
name (case, ``-``, ``/``, ``_`` and spaces do not matter). A CRC missing from
the catalogue is given by its parameters (``checksum = "crc"`` with a
``[framing.crc]`` table). Each catalogue entry is checked against its published
check value for ``b"123456789"`` in the tests.
"""

from __future__ import annotations

import operator
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


def crc(
    width: int, poly: int, *, init: int, refin: bool, refout: bool, xorout: int
) -> Callable[[bytes], int]:
    """A table-driven CRC of ``width`` bits (8..64, a multiple of 8) with catalogue parameters."""
    top = 1 << (width - 1)
    mask = (1 << width) - 1
    table = []
    for byte in range(256):
        reg = byte << (width - 8)
        for _ in range(8):
            reg = ((reg << 1) ^ poly) if reg & top else (reg << 1)
        table.append(reg & mask)
    shift = width - 8

    def compute(data: bytes) -> int:
        reg = init
        for byte in data.translate(_REFLECTED_BYTES) if refin else data:
            reg = ((reg << 8) & mask) ^ table[((reg >> shift) ^ byte) & 0xFF]
        if refout:
            reg = _reflect(reg, width)
        return reg ^ xorout

    return compute


def _xor(data: bytes) -> int:
    return reduce(operator.xor, data, 0)


def _sum8(data: bytes) -> int:
    return sum(data) & 0xFF


def _sum16(data: bytes) -> int:
    return sum(data) & 0xFFFF


def _lrc(data: bytes) -> int:
    """Two's complement of the byte sum (Modbus ASCII style longitudinal check)."""
    return (-sum(data)) & 0xFF


def canonical(name: str) -> str:
    """The lookup form of a checksum name: ``CRC-16/X-25`` -> ``CRC16X25``."""
    return "".join(c for c in name.upper() if c.isalnum())


#: Catalogue name -> (width bits, poly, init, refin, refout, xorout), from CRC RevEng.
CRC_CATALOGUE: dict[str, tuple[int, int, int, bool, bool, int]] = {
    "CRC-8/SMBUS": (8, 0x07, 0x00, False, False, 0x00),
    "CRC-8/MAXIM-DOW": (8, 0x31, 0x00, True, True, 0x00),
    "CRC-8/CDMA2000": (8, 0x9B, 0xFF, False, False, 0x00),
    "CRC-16/ARC": (16, 0x8005, 0x0000, True, True, 0x0000),
    "CRC-16/MODBUS": (16, 0x8005, 0xFFFF, True, True, 0x0000),
    "CRC-16/UMTS": (16, 0x8005, 0x0000, False, False, 0x0000),
    "CRC-16/MAXIM-DOW": (16, 0x8005, 0x0000, True, True, 0xFFFF),
    "CRC-16/USB": (16, 0x8005, 0xFFFF, True, True, 0xFFFF),
    "CRC-16/IBM-3740": (16, 0x1021, 0xFFFF, False, False, 0x0000),
    "CRC-16/XMODEM": (16, 0x1021, 0x0000, False, False, 0x0000),
    "CRC-16/KERMIT": (16, 0x1021, 0x0000, True, True, 0x0000),
    "CRC-16/IBM-SDLC": (16, 0x1021, 0xFFFF, True, True, 0xFFFF),
    "CRC-16/GENIBUS": (16, 0x1021, 0xFFFF, False, False, 0xFFFF),
    "CRC-16/MCRF4XX": (16, 0x1021, 0xFFFF, True, True, 0x0000),
    "CRC-16/SPI-FUJITSU": (16, 0x1021, 0x1D0F, False, False, 0x0000),
    "CRC-16/DNP": (16, 0x3D65, 0x0000, True, True, 0xFFFF),
    "CRC-16/EN-13757": (16, 0x3D65, 0x0000, False, False, 0xFFFF),
    "CRC-16/CDMA2000": (16, 0xC867, 0xFFFF, False, False, 0x0000),
    "CRC-32/ISO-HDLC": (32, 0x04C11DB7, 0xFFFFFFFF, True, True, 0xFFFFFFFF),
}

#: Other names the catalogue and manuals use for the same CRCs.
CRC_ALIASES: dict[str, str] = {
    "CRC-8": "CRC-8/SMBUS",
    "CRC-8/MAXIM": "CRC-8/MAXIM-DOW",
    "CRC-16": "CRC-16/ARC",
    "CRC-16/IBM": "CRC-16/ARC",
    "CRC-16/BUYPASS": "CRC-16/UMTS",
    "CRC-16/MAXIM": "CRC-16/MAXIM-DOW",
    "CRC-16/CCITT-FALSE": "CRC-16/IBM-3740",
    "CRC-16/AUTOSAR": "CRC-16/IBM-3740",
    "CRC-16/ZMODEM": "CRC-16/XMODEM",
    "CRC-16/ACORN": "CRC-16/XMODEM",
    "CRC-16/CCITT": "CRC-16/KERMIT",
    "CRC-16/CCITT-TRUE": "CRC-16/KERMIT",
    "CRC-16/X-25": "CRC-16/IBM-SDLC",
    "CRC-16/ISO-HDLC": "CRC-16/IBM-SDLC",
    "CRC-16/AUG-CCITT": "CRC-16/SPI-FUJITSU",
    "CRC-32": "CRC-32/ISO-HDLC",
}


def _catalogue_checksum(name: str) -> Checksum:
    width, poly, init, refin, refout, xorout = CRC_CATALOGUE[name]
    return Checksum(
        name,
        width // 8,
        crc(width, poly, init=init, refin=refin, refout=refout, xorout=xorout),
    )


_SIMPLE = (
    Checksum("xor", 1, _xor),
    Checksum("sum8", 1, _sum8),
    Checksum("sum16", 2, _sum16),
    Checksum("lrc", 1, _lrc),
)

#: Canonical name (see :func:`canonical`) -> checksum; every catalogue name and alias.
ALGORITHMS: dict[str, Checksum] = {canonical(c.name): c for c in _SIMPLE}
ALGORITHMS.update({canonical(n): _catalogue_checksum(n) for n in CRC_CATALOGUE})
ALGORITHMS.update({canonical(a): ALGORITHMS[canonical(n)] for a, n in CRC_ALIASES.items()})

#: Names a dialect's ``framing.checksum`` may use (besides any spelling of these).
CHECKSUM_NAMES = ("none", "crc", *(c.name for c in _SIMPLE), *CRC_CATALOGUE, *CRC_ALIASES)


def find_checksum(name: str) -> Checksum | None:
    """The checksum a dialect names (any spelling), or None for an unknown name."""
    return ALGORITHMS.get(canonical(name))
