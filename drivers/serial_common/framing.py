"""Framers: cut a byte stream into checked frames. Pure: bytes in, frames out.

Five framings (``line``, ``stx_etx``, ``flag``, ``length``, ``fixed``) share one
frame check: optional byte stuffing inside the frame, then ``body [separator]
checksum [trailer]`` (stx_etx may put the checksum after ETX instead). Each
framer keeps at most ``max_length`` bytes of an unfinished frame (plus a small
checksum tail), so garbage, a wrong baud rate or a babbling device can never
grow memory. Whatever cannot be framed comes out as :class:`Unparsed` with a
reason and a bounded sample of the bytes, for the technician.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass
from typing import NamedTuple

from drivers.serial_common.dialect import Framing

#: At most this many bytes of a bad frame are kept in an :class:`Unparsed` report.
SAMPLE_BYTES = 256
#: Marks a byte that failed the software parity check (7-bit data never has bit 7 set).
PARITY_ERROR = 0xFF


class Frame(NamedTuple):
    """One checked frame: ``body`` without framing bytes or checksum, ``raw`` as
    received, ``check`` the checksum as received (empty without one). A named
    tuple: one is made per frame, and a tuple is the cheapest immutable record."""

    body: bytes
    raw: bytes
    check: bytes = b""


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


class Rejected(Exception):
    """A frame failed a check: ``code`` is the health counter, ``reason`` says why."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


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


class Stuffing:
    """Byte stuffing: ``escape`` + ``b ^ xor`` stands for ``b`` inside a frame
    (``xor`` 0: the escape byte just makes the next byte literal)."""

    def __init__(self, framing: Framing):
        self.escape = int(framing.escape, 16)
        self.xor = framing.escape_xor
        special = {self.escape, *framing.marker_bytes, *bytes.fromhex(framing.escaped)}
        self._encode = [
            bytes([self.escape, b ^ self.xor]) if b in special else bytes([b]) for b in range(256)
        ]

    def decode(self, data: bytes) -> bytes:
        escape = self.escape
        at = data.find(escape)
        if at < 0:
            return data
        out = bytearray(data[:at])
        end = len(data)
        while at >= 0:
            if at + 1 >= end:
                raise Rejected("bad_escape", "escape byte at the end of a frame")
            out.append(data[at + 1] ^ self.xor)
            following = data.find(escape, at + 2)
            out += data[at + 2 : following if following >= 0 else end]
            at = following
        return bytes(out)

    def encode(self, data: bytes) -> bytes:
        return b"".join(self._encode[b] for b in data)

    def take(self, buf: bytearray, pos: int, count: int) -> tuple[bytes, int] | None:
        """``count`` decoded bytes from ``buf[pos:]`` and where they end (None: not yet)."""
        out = bytearray()
        end = len(buf)
        while len(out) < count:
            if pos >= end:
                return None
            byte = buf[pos]
            if byte == self.escape:
                if pos + 1 >= end:
                    return None
                out.append(buf[pos + 1] ^ self.xor)
                pos += 2
            else:
                out.append(byte)
                pos += 1
        return bytes(out), pos

    def escaped_at(self, buf: bytearray, at: int, start: int) -> bool:
        """Is ``buf[at]`` made literal by escape bytes before it (``xor`` 0 only)?"""
        count = 0
        while at - count - 1 >= start and buf[at - count - 1] == self.escape:
            count += 1
        return count % 2 == 1


class FrameCheck:
    """The end of a frame: ``body [separator] checksum [trailer]``, and the checksum."""

    def __init__(self, framing: Framing):
        self.algorithm = framing.checksum_algorithm
        self.name = framing.checksum
        self.size = framing.checksum_bytes
        self.separator = framing.checksum_separator.encode("latin-1")
        self.trailer = framing.trailer_bytes
        self.tail = self.size + len(self.separator)
        self._hex = framing.checksum_encoding == "hex"
        self._hex_input = framing.checksum_input == "hex_decoded"
        self._with_start = framing.checksum_covers in ("start_data", "all")
        self._with_end = framing.checksum_covers in ("data_end", "all")
        self._range = (
            slice(framing.checksum_start, framing.checksum_stop or None)
            if framing.checksum_start or framing.checksum_stop
            else None
        )
        self._byteorder = framing.checksum_byteorder
        #: The checksum covers exactly the body (the usual case, kept fast).
        self._body_only = self._range is None and not (self._with_start or self._with_end)

    def covered(self, body: bytes, start: bytes, end: bytes) -> bytes:
        """The bytes the checksum is computed over."""
        covered = body[self._range] if self._range is not None else body
        if self._with_start:
            covered = start + covered
        return covered + end if self._with_end else covered

    def value(self, body: bytes, start: bytes, end: bytes) -> bytes:
        """The checksum as it should appear on the wire (empty without a checksum)."""
        if self.algorithm is None:
            return b""
        covered = body if self._body_only else self.covered(body, start, end)
        if self._hex_input:
            try:
                covered = bytes.fromhex(covered.decode("ascii"))
            except (ValueError, UnicodeDecodeError):
                raise Rejected("bad_checksum", "checksummed text is not hex digits") from None
        value = self.algorithm.compute(covered).to_bytes(
            self.algorithm.width_bytes, self._byteorder
        )
        return value.hex().upper().encode() if self._hex else value

    def split(self, content: bytes, with_trailer: bool) -> tuple[bytes, bytes]:
        """(body, received checksum) from the end of a frame's content."""
        end = len(content)
        if with_trailer and self.trailer:
            if not content.endswith(self.trailer):
                raise Rejected("bad_trailer", f"frame does not end with {self.trailer.hex(' ')}")
            end -= len(self.trailer)
        if end < self.tail:
            raise Rejected("bad_checksum", "frame too short for its checksum")
        body_end = end - self.tail
        if self.separator and content[body_end : body_end + len(self.separator)] != self.separator:
            raise Rejected("bad_checksum", f"no {self.separator!r} before the checksum")
        return content[:body_end], content[end - self.size : end]

    def verify(self, body: bytes, start: bytes, end: bytes, received: bytes) -> None:
        if self.algorithm is None:
            return
        expected = self.value(body, start, end)
        if self._hex:
            received = received.upper()
        if expected != received:
            raise Rejected(
                "bad_checksum",
                f"bad checksum ({self.name}: expected {expected.hex(' ')}, got {received.hex(' ')})",
            )

    def seal(self, body: bytes, start: bytes, end: bytes) -> bytes:
        """``body separator checksum`` for sending."""
        return body + self.separator + self.value(body, start, end) if self.size else body


class Framer(abc.ABC):
    """Common buffering, gap timeout, parity, stuffing and garbage accounting."""

    #: Whether a trailer is part of a frame's content (not after an end marker).
    trailer_inside = True
    #: A partial frame may hide whole frames behind a false start: the driver
    #: calls :meth:`expire` on a timer instead of waiting for the next bytes.
    expires_on_timer = False

    def __init__(self, framing: Framing):
        self.framing = framing
        self._buffer = bytearray()
        self._garbage = bytearray()
        self._garbage_count = 0
        self._last_bytes_at: float | None = None
        self._decode_parity, self._encode_parity = _parity_tables(framing.parity)
        self._parity_checked = framing.parity in ("odd", "even")
        self.check = FrameCheck(framing)
        self.stuffing = Stuffing(framing) if framing.escape else None
        #: DLE-style stuffing: a marker after an escape byte is data, not a marker.
        self._literal = (
            self.stuffing if self.stuffing is not None and not self.stuffing.xor else None
        )
        #: Checks beyond parity: checksum, separator or trailer.
        self._checked = bool(self.check.tail or self.check.trailer)
        #: line and flag framing: inside a frame already reported as overlong, dropping its tail.
        self._overlong = False

    @property
    def buffered(self) -> int:
        """Bytes held for an unfinished frame (bounded by ``max_length``)."""
        return len(self._buffer) + len(self._garbage)

    def feed(self, data: bytes, now: float) -> list[Frame | Unparsed]:
        out: list[Frame | Unparsed] = []
        self._expire_if_stale(out, now)
        self._last_bytes_at = now
        if self._decode_parity is not None:
            data = data.translate(self._decode_parity)
        self._buffer += data
        self._cut(out)
        if self._garbage_count >= self.framing.max_length:
            self._flush_garbage(out)
        return out

    def expire(self, now: float) -> list[Frame | Unparsed]:
        """Report a partial frame older than ``gap_timeout`` without waiting for more bytes."""
        out: list[Frame | Unparsed] = []
        self._expire_if_stale(out, now)
        return out

    def _expire_if_stale(self, out: list[Frame | Unparsed], now: float) -> None:
        gap = self.framing.gap_timeout
        if (
            gap > 0
            and self._last_bytes_at is not None
            and now - self._last_bytes_at > gap
            and (self._buffer or self._garbage)
        ):
            self._flush_garbage(out)
            self._expire(out, f"incomplete frame (nothing more for {gap:g}s)")
            self._overlong = False

    def _expire(self, out: list[Frame | Unparsed], reason: str) -> None:
        """The unfinished frame is over: report it (sync framers look inside it again)."""
        if self._buffer:
            out.append(Unparsed.of("incomplete", reason, self._buffer))
            self._buffer.clear()

    def flush(self) -> list[Frame | Unparsed]:
        """Report whatever is buffered (the end of a capture)."""
        out: list[Frame | Unparsed] = []
        self._flush_garbage(out)
        self._expire(out, "incomplete frame at the end")
        self._flush_garbage(out)
        self._overlong = False
        return out

    def encode(self, body: bytes) -> bytes:
        """Frame ``body`` for sending (poll requests, acknowledgements)."""
        data = self._wrap(body)
        return data.translate(self._encode_parity) if self._encode_parity is not None else data

    def frame(self, body: bytes) -> bytes:
        """``body`` as the device would send it (a line framer adds start and terminator)."""
        return self.encode(body)

    @abc.abstractmethod
    def _cut(self, out: list[Frame | Unparsed]) -> None: ...

    @abc.abstractmethod
    def _wrap(self, body: bytes) -> bytes: ...

    def _find_marker(self, buf: bytearray, marker: bytes, start: int, stop: int) -> int:
        """The next ``marker`` in ``buf[start:stop]`` that an escape byte does not make
        data (-1: none); the frame starts at 0, so escapes are counted from 1."""
        at = buf.find(marker, start, stop)
        while at >= 0 and self._literal is not None and self._literal.escaped_at(buf, at, 1):
            at = buf.find(marker, at + 1, stop)
        return at

    def _stuff(self, data: bytes) -> bytes:
        return self.stuffing.encode(data) if self.stuffing is not None else data

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

    def _reject(
        self, out: list[Frame | Unparsed], code: str, reason: str, raw: bytes | bytearray
    ) -> None:
        self._flush_garbage(out)
        out.append(Unparsed.of(code, reason, raw))

    def _open(
        self, content: bytes, start: bytes, end: bytes, stuffed: bool = True
    ) -> tuple[bytes, bytes]:
        """(body, checksum) of a frame's content, checked; raises :class:`Rejected`."""
        if stuffed and self.stuffing is not None:
            content = self.stuffing.decode(content)
        if not self._checked:
            return content, b""
        body, received = self.check.split(content, self.trailer_inside)
        self.check.verify(body, start, end, received)
        return body, received

    def _accept(
        self, out: list[Frame | Unparsed], raw: bytes, content: bytes, start: bytes, end: bytes
    ) -> bool:
        """Check and emit one delimited frame; False (reported) if it failed a check."""
        try:
            body, received = self._open(content, start, end)
        except Rejected as exc:
            self._reject(out, exc.code, exc.reason, raw)
            return False
        self._emit(out, body, raw, received)
        return True

    def _emit(
        self, out: list[Frame | Unparsed], body: bytes, raw: bytes, check: bytes = b""
    ) -> None:
        if self._garbage_count:  # (tested here: this runs for every frame)
            self._flush_garbage(out)
        if self._parity_checked and PARITY_ERROR in raw:
            out.append(Unparsed.of("parity_error", "parity error (software 7-bit check)", raw))
        else:
            out.append(Frame(body, raw, check))


class LineFramer(Framer):
    """Text lines ended by any of the configured terminators, optionally with a start
    text (bytes before it are noise) and a checksum at the end of the line."""

    def __init__(self, framing: Framing):
        super().__init__(framing)
        terminators = sorted(
            {t.encode("latin-1") for t in framing.terminators}, key=len, reverse=True
        )
        self._terminator = re.compile(b"|".join(re.escape(t) for t in terminators))
        self._first_terminator = framing.terminators[0].encode("latin-1")
        self._keep = max(len(t) for t in terminators) - 1
        self._start = framing.start.encode("latin-1")
        self._simple = not (self._start or self._checked or self.stuffing)

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
            if self._simple:
                self._emit(out, line, raw)
                continue
            if self._start:
                begin = line.rfind(self._start)
                if begin < 0:
                    self._discard(raw)
                    continue
                if begin:
                    self._discard(line[:begin])
                    raw = raw[begin:]
                line = line[begin + len(self._start) :]
            self._accept(out, raw, line, self._start, b"")

    def _wrap(self, body: bytes) -> bytes:
        # Line devices differ in what ends a request (CR, CR LF, nothing): a
        # line dialect's request or reply is sent exactly as written.
        return body

    def frame(self, body: bytes) -> bytes:
        sealed = self.check.seal(body, self._start, b"")
        data = self._start + self._stuff(sealed) + self._first_terminator
        return data.translate(self._encode_parity) if self._encode_parity is not None else data


class StxEtxFramer(Framer):
    """``STX data [checksum] ETX [checksum] [trailer]`` frames."""

    trailer_inside = False

    def __init__(self, framing: Framing):
        super().__init__(framing)
        self._stx = bytes([framing.stx])
        self._etx = bytes([framing.etx])
        self._after = bool(self.check.size) and framing.checksum_position == "after_etx"
        # What follows ETX: a checksum after ETX, then the trailer.
        self._after_len = (self.check.size if self._after else 0) + len(self.check.trailer)
        # A raw checksum just before ETX may itself contain STX or ETX bytes:
        # then a second STX is no proof of a cut frame, and the first ETX may
        # be part of the checksum (the checksum decides which ETX ends the frame).
        self._raw_before = bool(
            self.check.size and not self._after and framing.checksum_encoding == "raw"
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
            # (buf.find directly unless DLE stuffing: this runs for every frame)
            if self._literal is None:
                end = buf.find(self._etx, 1)
            else:
                end = self._find_marker(buf, self._etx, 1, len(buf))
            if not self._raw_before:
                stop = end if end >= 0 else len(buf)
                if self._literal is None:
                    again = buf.find(self._stx, 1, stop)
                else:
                    again = self._find_marker(buf, self._stx, 1, stop)
                if again > 0:
                    self._reject(
                        out, "incomplete", "incomplete frame (new STX before ETX)", buf[:again]
                    )
                    del buf[:again]
                    continue
            if end < 0:
                if len(buf) > limit:
                    self._reject(out, "overlong", f"frame longer than {limit} bytes", buf)
                    buf.clear()
                return
            if self._raw_before:
                inner = self._inner_start(buf, end)
                if inner:
                    self._reject(
                        out, "incomplete", "incomplete frame (a later STX checks)", buf[:inner]
                    )
                    del buf[:inner]
                    continue
                settled = self._settle_end(buf, end)
                if settled is None:
                    return
                end = settled
            stop = end + 1 + self._after_len
            if len(buf) < stop:
                return
            raw = bytes(buf[:stop])
            if self._check(out, raw, end):
                del buf[:stop]
                continue
            # A failed frame: look again from an STX inside it (noise before a
            # frame must not cost the frame), else drop it.
            again = raw.find(self._stx, 1)
            del buf[: again if again > 0 else stop]

    def _inner_start(self, buf: bytearray, end: int) -> int:
        """An STX after the first whose frame checks at this ETX when the first's does
        not (noise with an STX before a frame), else 0."""
        if self._valid_before(bytes(buf[1:end])):
            return 0
        inner = buf.find(self._stx, 1, end)
        while inner > 0 and not self._valid_before(bytes(buf[inner + 1 : end])):
            inner = buf.find(self._stx, inner + 1, end)
        return max(inner, 0)

    def _settle_end(self, buf: bytearray, end: int) -> int | None:
        """Which ETX ends a frame with a raw checksum before ETX (None: wait for bytes)."""
        last = end + self.check.size  # the checksum can hide at most this many ETX bytes
        candidate = end
        while not self._valid_before(bytes(buf[1:candidate])):
            later = buf.find(self._etx, candidate + 1, last + 1)
            if later < 0:
                return None if len(buf) <= last else end
            candidate = later
        return candidate

    def _valid_before(self, inner: bytes) -> bool:
        try:
            self._open(inner, self._stx, self._etx)
        except Rejected:
            return False
        return True

    def _check(self, out: list[Frame | Unparsed], raw: bytes, end: int) -> bool:
        content = raw[1:end]
        if not self._after_len:
            return self._accept(out, raw, content, self._stx, self._etx)
        tail = raw[end + 1 :]
        try:
            if self.check.trailer and not tail.endswith(self.check.trailer):
                raise Rejected(
                    "bad_trailer", f"frame does not end with {self.check.trailer.hex(' ')}"
                )
            body = self.stuffing.decode(content) if self.stuffing is not None else content
            if not self._after:
                body, received = self.check.split(body, with_trailer=False)
            else:
                received = tail[: self.check.size]
            self.check.verify(body, self._stx, self._etx, received)
        except Rejected as exc:
            self._reject(out, exc.code, exc.reason, raw)
            return False
        self._emit(out, body, raw, received)
        return True

    def _wrap(self, body: bytes) -> bytes:
        value = self.check.value(body, self._stx, self._etx) if self.check.size else b""
        trailer = self.check.trailer
        if self._after:
            return self._stx + self._stuff(body) + self._etx + value + trailer
        return self._stx + self._stuff(body + self.check.separator + value) + self._etx + trailer


class FlagFramer(Framer):
    """HDLC-like ``FLAG content FLAG`` frames: the same byte opens and closes a frame,
    one flag between two frames serves both, repeated flags are idle fill."""

    def __init__(self, framing: Framing):
        super().__init__(framing)
        self._flag = bytes([framing.flag])

    def _cut(self, out: list[Frame | Unparsed]) -> None:
        buf = self._buffer
        flag = self._flag
        limit = self.framing.max_length
        while buf:
            start = buf.find(flag)
            if start < 0:
                if self._overlong:
                    buf.clear()
                else:
                    self._discard(buf)
                    buf.clear()
                return
            if start:
                if not self._overlong:
                    self._discard(buf[:start])
                del buf[:start]
            self._overlong = False
            if self._literal is None:
                end = buf.find(flag, 1)
            else:
                end = self._find_marker(buf, flag, 1, len(buf))
            if end < 0:
                if len(buf) > limit + 1:
                    self._reject(out, "overlong", f"frame longer than {limit} bytes", buf)
                    self._overlong = True
                    buf.clear()
                return
            if end == 1:  # idle fill between frames
                del buf[:1]
                continue
            raw = bytes(buf[: end + 1])
            del buf[:end]  # the closing flag may open the next frame
            if end - 1 > limit:
                self._reject(out, "overlong", f"frame longer than {limit} bytes", raw)
                continue
            self._accept(out, raw, raw[1:end], flag, flag)

    def _expire(self, out: list[Frame | Unparsed], reason: str) -> None:
        if self._buffer == self._flag:  # the last frame's closing flag, not a new frame
            self._buffer.clear()
        super()._expire(out, reason)

    def _wrap(self, body: bytes) -> bytes:
        sealed = self.check.seal(body, self._flag, self._flag) + self.check.trailer
        return self._flag + self._stuff(sealed) + self._flag


class SyncFramer(Framer):
    """Frames found by a sync pattern and a known length (``fixed`` and ``length``).

    Without a sync the framer slides one byte at a time until a checksum agrees;
    a failed frame right after a good one is reported, further slides are garbage.
    """

    def __init__(self, framing: Framing):
        super().__init__(framing)
        self._sync = framing.sync_bytes
        #: The previous frame ended exactly where the buffer starts.
        self._aligned = False
        self._candidate = 0
        self.expires_on_timer = bool(self._sync) and framing.gap_timeout > 0

    def _take(self, buf: bytearray, pos: int, count: int) -> tuple[bytes, int] | None:
        if self.stuffing is not None:
            return self.stuffing.take(buf, pos, count)
        if len(buf) - pos < count:
            return None
        return bytes(buf[pos : pos + count]), pos + count

    def _align(self, buf: bytearray) -> bool:
        """Drop bytes before the next sync; False: no complete sync in the buffer yet."""
        sync = self._sync
        if not sync:
            return True
        start = buf.find(sync)
        if start < 0:
            # Keep what could be the first bytes of a sync split across reads.
            keep = len(sync) - 1
            self._discard(buf[: len(buf) - keep])
            del buf[: len(buf) - keep]
            return False
        if start:
            self._discard(buf[:start])
            del buf[:start]
            self._aligned = False
        return True

    #: Bytes after the sync needed before a frame's length is known.
    _header_length: int

    @abc.abstractmethod
    def _content_length(self, buf: bytearray) -> int | None:
        """Decoded bytes after the sync in the frame at the buffer's start
        (None: not known yet); raises :class:`Rejected` for an impossible length."""

    def _cut(self, out: list[Frame | Unparsed]) -> None:
        buf = self._buffer
        sync = self._sync
        while buf:
            if not self._align(buf):
                return
            #: How far the frame being looked at goes (a report's sample).
            self._candidate = len(sync) + self._header_length
            try:
                length = self._content_length(buf)
                if length is None:
                    return
                got = self._take(buf, len(sync), length)
                if got is None:
                    return
                content, stop = got
                self._candidate = stop
                body, received = self._open(content, sync, b"", stuffed=False)
            except Rejected as exc:
                self._failed(out, exc)
                continue
            raw = bytes(buf[:stop])
            del buf[:stop]
            self._aligned = True
            self._emit(out, body, raw, received)

    def _failed(self, out: list[Frame | Unparsed], exc: Rejected) -> None:
        buf = self._buffer
        if self._sync:
            # Maybe a sync pattern inside data: report it, look for the next sync.
            self._reject(out, exc.code, exc.reason, buf[: self._candidate])
            del buf[: len(self._sync)]
        else:
            if self._aligned:
                self._reject(out, exc.code, exc.reason, buf[: self._candidate])
            else:
                self._discard(buf[:1])
            del buf[:1]
        self._aligned = False

    def _expire(self, out: list[Frame | Unparsed], reason: str) -> None:
        if not self._sync:
            super()._expire(out, reason)
            return
        # A sync with a false length may hold a whole frame behind it: report the
        # unfinished one, skip its sync and look at the rest again.
        buf = self._buffer
        while buf:
            if not buf.startswith(self._sync):  # the first bytes of a sync, at most
                self._discard(buf)
                buf.clear()
                break
            self._reject(out, "incomplete", reason, buf)
            del buf[: len(self._sync)]
            self._cut(out)
        self._flush_garbage(out)

    def _sealed(self, body: bytes) -> bytes:
        return self.check.seal(body, self._sync, b"") + self.check.trailer


class FixedFramer(SyncFramer):
    """Fixed-length binary frames: ``sync body checksum trailer``, ``length`` bytes in all."""

    def __init__(self, framing: Framing):
        super().__init__(framing)
        self._content = framing.length - len(self._sync)

    _header_length = 0

    def _content_length(self, buf: bytearray) -> int:
        return self._content

    def _wrap(self, body: bytes) -> bytes:
        return self._sync + self._stuff(self._sealed(body))


class LengthFramer(SyncFramer):
    """``sync header length ... checksum trailer``: a length field says where a frame ends."""

    def __init__(self, framing: Framing):
        super().__init__(framing)
        self._field = slice(framing.length_offset, framing.length_offset + framing.length_size)
        self._head = framing.length_offset + framing.length_size
        self._order = framing.length_byteorder
        self._adjust = framing.length_adjust
        self._counts = framing.length_counts
        self._tail = self.check.tail + len(self.check.trailer)
        self._header_length = self._head

    def _content_length(self, buf: bytearray) -> int | None:
        got = self._take(buf, len(self._sync), self._head)
        if got is None:
            return None
        declared = int.from_bytes(got[0][self._field], self._order)
        value = declared + self._adjust
        if self._counts == "frame":
            length = value - len(self._sync)
        elif self._counts == "rest":
            length = self._head + value
        else:
            length = self._head + value + self._tail
        if length < self._head + self._tail or length > self.framing.max_length:
            raise Rejected(
                "bad_length", f"length field says {declared}: not a frame of this dialect"
            )
        return length

    def _wrap(self, body: bytes) -> bytes:
        if len(body) < self._head:
            raise ValueError(f"a body needs at least {self._head} bytes (up to its length field)")
        sealed_len = len(body) + self._tail
        if self._counts == "frame":
            value = len(self._sync) + sealed_len
        elif self._counts == "rest":
            value = sealed_len - self._head
        else:
            value = len(body) - self._head
        size = self._field.stop - self._field.start
        field = (value - self._adjust).to_bytes(size, self._order)
        body = body[: self._field.start] + field + body[self._field.stop :]
        return self._sync + self._stuff(self._sealed(body))


def make_framer(framing: Framing) -> Framer:
    """The framer for a dialect's ``[framing]`` table."""
    framers: dict[str, type[Framer]] = {
        "line": LineFramer,
        "stx_etx": StxEtxFramer,
        "flag": FlagFramer,
        "length": LengthFramer,
        "fixed": FixedFramer,
    }
    return framers[framing.type](framing)
