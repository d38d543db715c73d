"""Framers: cut a byte stream into checked frames. Pure: bytes in, frames out.

Each framer keeps at most ``max_length`` bytes of an unfinished frame (plus a
small checksum tail), so garbage, a wrong baud rate or a babbling device can
never grow memory. Whatever cannot be framed comes out as :class:`Unparsed`
with a reason and a bounded sample of the bytes, for the technician.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass

from drivers.serial_common.checksums import ALGORITHMS
from drivers.serial_common.dialect import Framing

#: At most this many bytes of a bad frame are kept in an :class:`Unparsed` report.
SAMPLE_BYTES = 256
#: Marks a byte that failed the software parity check (7-bit data never has bit 7 set).
PARITY_ERROR = 0xFF


@dataclass(frozen=True, slots=True)
class Frame:
    """One checked frame: ``body`` without framing bytes or checksum, ``raw`` as received."""

    body: bytes
    raw: bytes


@dataclass(frozen=True, slots=True)
class Unparsed:
    """Bytes that became no message: a short ``code`` (a health counter name), a
    readable ``reason``, a bounded sample of the bytes and how many there were."""

    code: str
    reason: str
    raw: bytes
    length: int

    @classmethod
    def of(
        cls, code: str, reason: str, data: bytes | bytearray, length: int | None = None
    ) -> Unparsed:
        return cls(
            code, reason, bytes(data[:SAMPLE_BYTES]), len(data) if length is None else length
        )


def _parity_tables(mode: str) -> tuple[bytes | None, bytes | None]:
    """Translate tables (decode, encode) for software 7-bit parity handling."""
    if mode == "none":
        return None, None
    if mode == "strip":
        return bytes(b & 0x7F for b in range(256)), None
    want_odd = mode == "odd"
    decode = bytes(
        (b & 0x7F) if (b.bit_count() % 2 == 1) == want_odd else PARITY_ERROR for b in range(256)
    )
    encode = bytes(
        (b | 0x80) if ((b & 0x7F).bit_count() % 2 == 0) == want_odd else (b & 0x7F)
        for b in range(256)
    )
    return decode, encode


class Framer(abc.ABC):
    """Common buffering, gap timeout, parity and garbage accounting."""

    def __init__(self, framing: Framing):
        self.framing = framing
        self._buffer = bytearray()
        self._garbage = bytearray()
        self._garbage_count = 0
        self._last_bytes_at: float | None = None
        self._decode_parity, self._encode_parity = _parity_tables(framing.parity)
        self._checksum = ALGORITHMS.get(framing.checksum)
        #: line framing: inside a line already reported as overlong, dropping its tail.
        self._overlong = False

    @property
    def buffered(self) -> int:
        """Bytes held for an unfinished frame (bounded by ``max_length``)."""
        return len(self._buffer) + len(self._garbage)

    def feed(self, data: bytes, now: float) -> list[Frame | Unparsed]:
        out: list[Frame | Unparsed] = []
        gap = self.framing.gap_timeout
        if (
            gap > 0
            and self._last_bytes_at is not None
            and now - self._last_bytes_at > gap
            and (self._buffer or self._garbage)
        ):
            self._flush_garbage(out)
            if self._buffer:
                out.append(
                    Unparsed.of(
                        "incomplete", f"incomplete frame (nothing more for {gap:g}s)", self._buffer
                    )
                )
                self._buffer.clear()
            self._overlong = False
        self._last_bytes_at = now
        if self._decode_parity is not None:
            data = data.translate(self._decode_parity)
        self._buffer += data
        self._cut(out)
        if self._garbage_count >= self.framing.max_length:
            self._flush_garbage(out)
        return out

    def flush(self) -> list[Unparsed]:
        """Report and drop whatever is buffered (the end of a capture)."""
        out: list[Frame | Unparsed] = []
        self._flush_garbage(out)
        if self._buffer:
            out.append(Unparsed.of("incomplete", "incomplete frame at the end", self._buffer))
            self._buffer.clear()
        self._overlong = False
        return [item for item in out if isinstance(item, Unparsed)]

    def encode(self, body: bytes) -> bytes:
        """Frame ``body`` for sending (poll requests, acknowledgements)."""
        data = self._wrap(body)
        return data.translate(self._encode_parity) if self._encode_parity is not None else data

    @abc.abstractmethod
    def _cut(self, out: list[Frame | Unparsed]) -> None: ...

    @abc.abstractmethod
    def _wrap(self, body: bytes) -> bytes: ...

    def _discard(self, data: bytes | bytearray) -> None:
        self._garbage_count += len(data)
        room = SAMPLE_BYTES - len(self._garbage)
        if room > 0:  # keep a sample; the count stays exact
            self._garbage += data[:room]

    def _flush_garbage(self, out: list[Frame | Unparsed]) -> None:
        if self._garbage_count:
            out.append(
                Unparsed.of("garbage", "bytes outside a frame", self._garbage, self._garbage_count)
            )
            self._garbage.clear()
            self._garbage_count = 0

    def _emit(self, out: list[Frame | Unparsed], body: bytes, raw: bytes) -> None:
        self._flush_garbage(out)
        if (
            self._decode_parity is not None
            and PARITY_ERROR in raw
            and self.framing.parity != "strip"
        ):
            out.append(Unparsed.of("parity_error", "parity error", raw))
        else:
            out.append(Frame(body, raw))

    def _checksum_value(self, body: bytes, start: bytes, end: bytes) -> bytes | None:
        """The checksum as it should appear on the wire, or None if it cannot be computed."""
        assert self._checksum is not None
        covers = self.framing.checksum_covers
        covered = (start if covers in ("start_data", "all") else b"") + body
        covered += end if covers in ("data_end", "all") else b""
        if self.framing.checksum_input == "hex_decoded":
            try:
                covered = bytes.fromhex(covered.decode("ascii"))
            except (ValueError, UnicodeDecodeError):
                return None
        value = self._checksum.compute(covered).to_bytes(
            self._checksum.width_bytes, self.framing.checksum_byteorder
        )
        return value.hex().upper().encode() if self.framing.checksum_encoding == "hex" else value

    def _checksum_ok(self, body: bytes, start: bytes, end: bytes, received: bytes) -> bool:
        expected = self._checksum_value(body, start, end)
        if self.framing.checksum_encoding == "hex":
            received = received.upper()
        return expected is not None and expected == received


class LineFramer(Framer):
    """Text lines ended by any of the configured terminators."""

    def __init__(self, framing: Framing):
        super().__init__(framing)
        terminators = sorted(
            {t.encode("latin-1") for t in framing.terminators}, key=len, reverse=True
        )
        self._terminator = re.compile(b"|".join(re.escape(t) for t in terminators))
        self._keep = max(len(t) for t in terminators) - 1

    def _cut(self, out: list[Frame | Unparsed]) -> None:
        buf = self._buffer
        limit = self.framing.max_length
        while True:
            match = self._terminator.search(buf)
            if match is None:
                if len(buf) > limit:
                    if not self._overlong:
                        out.append(Unparsed.of("overlong", f"line longer than {limit} bytes", buf))
                    self._overlong = True
                    # Keep a possible first half of a two-byte terminator.
                    del buf[: len(buf) - self._keep]
                return
            line = bytes(buf[: match.start()])
            raw = bytes(buf[: match.end()])
            del buf[: match.end()]
            if self._overlong:  # the tail of a line already reported as overlong
                self._overlong = False
                continue
            if not line:
                continue
            if len(line) > limit:
                out.append(Unparsed.of("overlong", f"line longer than {limit} bytes", line))
                continue
            self._emit(out, line, raw)

    def _wrap(self, body: bytes) -> bytes:
        # Line devices differ in what ends a request (CR, CR LF, nothing): a
        # line dialect's request or reply is sent exactly as written.
        return body


class StxEtxFramer(Framer):
    """``STX data [checksum] ETX [checksum]`` frames."""

    def __init__(self, framing: Framing):
        super().__init__(framing)
        self._stx = bytes([framing.stx])
        self._etx = bytes([framing.etx])
        self._after = framing.checksum_position == "after_etx"
        self._sum_len = framing.checksum_bytes
        # A raw checksum just before ETX may itself contain STX or ETX bytes:
        # then a second STX is no proof of a cut frame, and the first ETX may
        # be part of the checksum (the checksum decides which ETX ends the frame).
        self._raw_before = bool(
            self._sum_len and not self._after and framing.checksum_encoding == "raw"
        )

    def _cut(self, out: list[Frame | Unparsed]) -> None:
        buf = self._buffer
        limit = self.framing.max_length
        while buf:
            start = buf.find(self._stx)
            if start < 0:
                self._discard(buf)
                buf.clear()
                return
            if start:
                self._discard(buf[:start])
                del buf[:start]
            end = buf.find(self._etx, 1)
            if not self._raw_before:
                again = buf.find(self._stx, 1, end if end >= 0 else len(buf))
                if again > 0:
                    self._flush_garbage(out)
                    out.append(
                        Unparsed.of(
                            "incomplete", "incomplete frame (new STX before ETX)", buf[:again]
                        )
                    )
                    del buf[:again]
                    continue
            if end < 0:
                if len(buf) > limit:
                    self._flush_garbage(out)
                    out.append(Unparsed.of("overlong", f"frame longer than {limit} bytes", buf))
                    buf.clear()
                return
            if self._raw_before and end >= 0:
                settled = self._settle_end(buf, end)
                if settled is None:
                    return
                end = settled
            stop = end + 1 + (self._sum_len if self._after else 0)
            if len(buf) < stop:
                return
            raw = bytes(buf[:stop])
            del buf[:stop]
            self._check(out, raw, end)

    def _settle_end(self, buf: bytearray, end: int) -> int | None:
        """Which ETX ends a frame with a raw checksum before ETX (None: wait for bytes)."""
        last = end + self._sum_len  # the checksum can hide at most this many ETX bytes
        candidate = end
        while not self._valid_before(bytes(buf[: candidate + 1]), candidate):
            later = buf.find(self._etx, candidate + 1, last + 1)
            if later < 0:
                return None if len(buf) <= last else end
            candidate = later
        return candidate

    def _valid_before(self, raw: bytes, end: int) -> bool:
        inner = raw[1:end]
        if len(inner) < self._sum_len:
            return False
        return self._checksum_ok(
            inner[: -self._sum_len], self._stx, self._etx, inner[-self._sum_len :]
        )

    def _check(self, out: list[Frame | Unparsed], raw: bytes, end: int) -> None:
        inner = raw[1:end]
        if not self._sum_len:
            self._emit(out, inner, raw)
            return
        if self._after:
            body, received = inner, raw[end + 1 :]
        else:
            if len(inner) < self._sum_len:
                self._flush_garbage(out)
                out.append(Unparsed.of("bad_checksum", "frame too short for its checksum", raw))
                return
            body, received = inner[: -self._sum_len], inner[-self._sum_len :]
        if self._checksum_ok(body, self._stx, self._etx, received):
            self._emit(out, body, raw)
        else:
            self._flush_garbage(out)
            out.append(Unparsed.of("bad_checksum", "bad checksum", raw))

    def _wrap(self, body: bytes) -> bytes:
        if not self._sum_len:
            return self._stx + body + self._etx
        value = self._checksum_value(body, self._stx, self._etx) or b""
        if self._after:
            return self._stx + body + self._etx + value
        return self._stx + body + value + self._etx


class FixedFramer(Framer):
    """Fixed-length binary frames: ``sync body checksum``, ``length`` bytes in all."""

    def __init__(self, framing: Framing):
        super().__init__(framing)
        self._sync = framing.sync_bytes
        self._sum_len = framing.checksum_bytes
        self._length = framing.length

    def _cut(self, out: list[Frame | Unparsed]) -> None:
        buf = self._buffer
        sync, length = self._sync, self._length
        while buf:
            if sync:
                start = buf.find(sync)
                if start < 0:
                    # Keep what could be the first bytes of a sync split across reads.
                    keep = len(sync) - 1
                    self._discard(buf[: len(buf) - keep])
                    del buf[: len(buf) - keep]
                    return
                if start:
                    self._discard(buf[:start])
                    del buf[:start]
            if len(buf) < length:
                return
            raw = bytes(buf[:length])
            body = raw[len(sync) : length - self._sum_len]
            received = raw[length - self._sum_len :]
            if not self._sum_len or self._checksum_ok(body, sync, b"", received):
                del buf[:length]
                self._emit(out, body, raw)
            elif sync:
                # Maybe a sync pattern inside data: report it, look for the next sync.
                self._flush_garbage(out)
                out.append(Unparsed.of("bad_checksum", "bad checksum", raw))
                del buf[: len(sync)]
            else:
                # No sync to align on: slide one byte until a checksum agrees.
                self._discard(buf[:1])
                del buf[:1]

    def _wrap(self, body: bytes) -> bytes:
        if not self._sum_len:
            return self._sync + body
        return self._sync + body + (self._checksum_value(body, self._sync, b"") or b"")


def make_framer(framing: Framing) -> Framer:
    """The framer for a dialect's ``[framing]`` table."""
    if framing.type == "line":
        return LineFramer(framing)
    if framing.type == "stx_etx":
        return StxEtxFramer(framing)
    return FixedFramer(framing)
