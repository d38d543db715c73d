"""Reading the rows a damaged outbox file still holds, page by page.

SQLite itself stops at the first page it cannot read: a 4 KiB hole in the middle of
the file ends a table scan, and every row behind the hole is lost although its page
is intact. This module reads the file format directly instead (the format is
documented and stable: https://www.sqlite.org/fileformat2.html). It visits every
page of the database file and of its write-ahead log, decodes every table-leaf cell
(following overflow chains), and keeps the rows shaped like an outbox event or meta
row. A damaged page costs only the rows on it.

A page may exist in several versions (the file, frames of the log, pages freed but
not yet reused). Versions are merged per event id: if any version says the event was
published, it was; otherwise it is pending and is sent again (the centre
de-duplicates by id, so an extra copy costs a duplicate, never a loss).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

_DB_MAGIC = b"SQLite format 3\0"
_WAL_MAGICS = (0x377F0682, 0x377F0683)
_TABLE_LEAF = 0x0D

Value = int | float | str | bytes | None


@dataclass
class SalvagedRow:
    """An outbox event row as found in the file."""

    id: str
    rank: int
    seq: int
    kind: str
    accepted: float
    body: str
    published: float | None


@dataclass
class Salvage:
    """What a damaged outbox still holds."""

    pending: list[SalvagedRow] = field(default_factory=list)
    published_ids: set[str] = field(default_factory=set)
    #: seq of every event found (pending or published)
    seqs: set[int] = field(default_factory=set)
    #: the largest value of each meta key found in any version (next_seq, boot)
    meta: dict[str, int] = field(default_factory=dict)
    pages_read: int = 0
    pages_unreadable: int = 0

    @property
    def next_seq(self) -> int:
        """The first seq no event found, nor the meta table, has used."""
        return max(self.meta.get("next_seq", 1), max(self.seqs, default=0) + 1)


def salvage_outbox(path: Path) -> Salvage:
    """Every readable event and meta row of ``path`` and its ``-wal`` file."""
    versions: dict[str, SalvagedRow] = {}
    result = Salvage()
    for page, usable, pages in _pages(path):
        result.pages_read += 1
        try:
            cells = list(_leaf_cells(page, usable, pages))
        except (IndexError, ValueError, struct.error):
            result.pages_unreadable += 1
            continue
        for values in cells:
            _take(values, versions, result)
    for row in versions.values():
        result.seqs.add(row.seq)
        if row.published is None:
            result.pending.append(row)
        else:
            result.published_ids.add(row.id)
    result.pending.sort(key=lambda r: (r.rank, r.seq))
    return result


def _take(values: list[Value], versions: dict[str, SalvagedRow], result: Salvage) -> None:
    if len(values) == 2:
        key, value = values
        if isinstance(key, str) and isinstance(value, int):
            result.meta[key] = max(result.meta.get(key, value), value)
        return
    row = _event_row(values)
    if row is None:
        return
    seen = versions.get(row.id)
    # Published is only ever set, never cleared: a published version wins.
    if seen is None or (seen.published is None and row.published is not None):
        versions[row.id] = row


def _event_row(values: list[Value]) -> SalvagedRow | None:
    """The outbox's ``events`` columns: id, rank, seq, kind, accepted, body, size, published."""
    if len(values) != 8:
        return None
    id_, rank, seq, kind, accepted, body, size, published = values
    if not (
        isinstance(id_, str)
        and isinstance(rank, int)
        and 0 <= rank <= 3
        and isinstance(seq, int)
        and seq > 0
        and isinstance(kind, str)
        and isinstance(accepted, int | float)
        and isinstance(body, str)
        and isinstance(size, int)
        and (published is None or isinstance(published, int | float))
    ):
        return None
    if size != len(body) or not body.startswith("{"):
        return None  # a torn cell: its text does not match its recorded size
    return SalvagedRow(
        id_, rank, seq, kind, float(accepted), body, None if published is None else float(published)
    )


# ------------------------------------------------------------------ file format


def _pages(path: Path) -> Iterator[tuple[bytes, int, dict[int, bytes]]]:
    """(page, usable size, all pages by number) for the database file, then the log."""
    try:
        data = path.read_bytes()
    except OSError:
        data = b""
    page_size, reserved = 4096, 0
    if data.startswith(_DB_MAGIC) and len(data) >= 100:
        raw = int.from_bytes(data[16:18], "big")
        page_size = 65536 if raw == 1 else raw
        reserved = data[20]
    if page_size < 512 or page_size & (page_size - 1):
        page_size = 4096  # a damaged header: the outbox is created with 4096-byte pages
    pages = {
        n + 1: data[n * page_size : (n + 1) * page_size] for n in range(len(data) // page_size)
    }
    wal_pages = _wal_pages(Path(str(path) + "-wal"))
    usable = page_size - reserved
    for page in pages.values():
        yield page, usable, pages
    if wal_pages:
        merged = {**pages, **wal_pages}  # overflow chains follow the newest version
        wal_usable = len(next(iter(wal_pages.values()))) - reserved
        for page in wal_pages.values():
            yield page, wal_usable, merged


def _wal_pages(path: Path) -> dict[int, bytes]:
    """The newest version of each page in the log's current generation (salts match)."""
    try:
        data = path.read_bytes()
    except OSError:
        return {}
    if len(data) < 32 or int.from_bytes(data[0:4], "big") not in _WAL_MAGICS:
        return {}
    page_size = int.from_bytes(data[8:12], "big")
    if page_size < 512 or page_size > 65536:
        return {}
    salts = data[16:24]
    pages: dict[int, bytes] = {}
    offset = 32
    while offset + 24 + page_size <= len(data):
        number = int.from_bytes(data[offset : offset + 4], "big")
        if data[offset + 8 : offset + 16] == salts and number > 0:
            pages[number] = data[offset + 24 : offset + 24 + page_size]
        offset += 24 + page_size
    return pages


def _leaf_cells(page: bytes, usable: int, pages: dict[int, bytes]) -> Iterator[list[Value]]:
    """The records of a table-leaf page (page 1's header starts after the file header)."""
    start = 100 if page.startswith(_DB_MAGIC) else 0
    if len(page) <= start + 8 or page[start] != _TABLE_LEAF:
        return
    count = int.from_bytes(page[start + 3 : start + 5], "big")
    pointers = start + 8
    for i in range(count):
        offset = int.from_bytes(page[pointers + 2 * i : pointers + 2 * i + 2], "big")
        try:
            payload = _cell_payload(page, offset, usable, pages)
            yield _record(payload)
        except (IndexError, ValueError, struct.error, UnicodeDecodeError):
            continue  # one damaged cell: the others on the page may be fine


def _cell_payload(page: bytes, offset: int, usable: int, pages: dict[int, bytes]) -> bytes:
    size, offset = _varint(page, offset)
    _rowid, offset = _varint(page, offset)
    most_local = usable - 35
    if size <= most_local:
        local = size
    else:
        least = (usable - 12) * 32 // 255 - 23
        local = least + (size - least) % (usable - 4)
        if local > most_local:
            local = least
    payload = bytearray(page[offset : offset + local])
    if len(payload) != local:
        raise ValueError("cell runs past its page")
    if local < size:
        following = int.from_bytes(page[offset + local : offset + local + 4], "big")
        hops = 0
        while len(payload) < size:
            hops += 1
            overflow = pages.get(following)
            if overflow is None or hops > len(pages):
                raise ValueError("broken overflow chain")
            payload += overflow[4:usable]
            following = int.from_bytes(overflow[0:4], "big")
        del payload[size:]
    return bytes(payload)


def _record(payload: bytes) -> list[Value]:
    header_size, offset = _varint(payload, 0)
    types: list[int] = []
    while offset < header_size:
        kind, offset = _varint(payload, offset)
        types.append(kind)
    body = header_size
    values: list[Value] = []
    for kind in types:
        value, body = _value(payload, body, kind)
        values.append(value)
    if body != len(payload):
        raise ValueError("record size does not match its header")
    return values


_INT_SIZES = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 8}


def _value(data: bytes, offset: int, kind: int) -> tuple[Value, int]:
    if kind == 0:
        return None, offset
    if kind in _INT_SIZES:
        n = _INT_SIZES[kind]
        chunk = data[offset : offset + n]
        if len(chunk) != n:
            raise ValueError("truncated integer")
        return int.from_bytes(chunk, "big", signed=True), offset + n
    if kind == 7:
        return struct.unpack(">d", data[offset : offset + 8])[0], offset + 8
    if kind in (8, 9):
        return kind - 8, offset
    if kind >= 12:
        n = (kind - 12) // 2
        chunk = data[offset : offset + n]
        if len(chunk) != n:
            raise ValueError("truncated text or blob")
        return (chunk.decode("utf-8") if kind % 2 else bytes(chunk)), offset + n
    raise ValueError(f"reserved serial type {kind}")


def _varint(data: bytes, offset: int) -> tuple[int, int]:
    """SQLite's varint: up to 8 bytes of 7 bits (high bit: more follow), then a full byte."""
    value = 0
    for i in range(8):
        byte = data[offset + i]
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            return value, offset + i + 1
    return (value << 8) | data[offset + 8], offset + 9
