"""SIA DC-09 frames and Contact ID data: encode, decode, encrypt, and a sender.

A DC-09 frame on the wire (ASCII)::

    <LF> CRC LEN "ID" SEQ [Rrcvr] Lline [#acct] [DATA] [x-data...] [_HH:MM:SS,MM-DD-YYYY] <CR>

* ``CRC`` is CRC-16/ARC (polynomial 0x8005 reflected, initial value 0, no final
  XOR; check value ``crc16("123456789") == 0xBB3D``) over every byte from the
  opening quote of ``"ID"`` up to, not including, the ``<CR>``, as 4 hex digits;
* ``LEN`` is the length of that same span as ``0LLL`` (4 hex digits);
* ``ID`` is ``SIA-DCS``, ``ADM-CID`` (Contact ID) or ``NULL`` (link supervision),
  with a ``*`` prefix when the frame is encrypted; replies are ``ACK``, ``NAK``
  (carries the receiver's clock so the sender can correct its own) and ``DUH``
  (understood but not accepted);
* ``SEQ`` runs 0001-9999 and wraps; a reply echoes the sequence it answers;
* encrypted frames carry, after ``[``, the hex of AES-CBC (zero IV, 128/192/256
  bit key) over ``pad + data + "]" + x-data + timestamp``; the pad fills the
  plaintext to a multiple of 16 bytes and never contains ``|``, ``[`` or ``]``.
  The timestamp is mandatory in encrypted frames.

Contact ID (``ADM-CID``) data is ``#acct|QEEE PP ZZZ``: qualifier 1 (new event)
or 3 (restore), 3-digit event code (120 panic, 121 duress, 122 silent panic,
137 tamper, 381 loss of supervision, 602 periodic test, ...), 2-digit partition
and 3-digit zone.

:class:`Dc09Sender` delivers one message at a time over TCP or UDP, waits for
the matching reply, corrects its clock from a NAK and re-sends, retries on
timeout, and sends ``NULL`` supervision messages while the link is idle.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Literal

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

log = logging.getLogger("wardpost.central.dc09")

LF = b"\n"
CR = b"\r"
MESSAGE_IDS = ("SIA-DCS", "ADM-CID", "NULL")
REPLY_IDS = ("ACK", "NAK", "DUH")
MAX_SEQUENCE = 9999
#: The receiver accepts a timestamp this far ahead of / behind its own clock (seconds).
TIME_WINDOW_AHEAD = 20.0
TIME_WINDOW_BEHIND = 40.0

_TIMESTAMP_FORMAT = "_%H:%M:%S,%m-%d-%Y"
_HEADER = re.compile(
    r'"(?P<star>\*?)(?P<id>[A-Z][A-Z-]*)"(?P<seq>\d{4})'
    r"(?:R(?P<receiver>[0-9A-F]{1,6}))?(?:L(?P<line>[0-9A-F]{1,6}))?"
    r"(?:A(?P<prefix>[0-9A-F]{1,6}))?(?:#(?P<account>[0-9A-F]{3,16}))?\["
)
_TAIL = re.compile(
    r"^(?P<data>[^\]]*)\](?P<xdata>(?:\[[^\]]*\])*)(?P<ts>_\d\d:\d\d:\d\d,\d\d-\d\d-\d{4})?$"
)
_PAD_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


class Dc09Error(ValueError):
    """A frame that cannot be accepted; ``reason`` says which part is wrong."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def crc16(data: bytes) -> int:
    """CRC-16/ARC as used by SIA DC-09 (poly 0x8005 reflected, init 0, no final XOR)."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
    return crc


def format_timestamp(moment: datetime) -> str:
    """``_HH:MM:SS,MM-DD-YYYY`` in UTC."""
    return moment.astimezone(UTC).strftime(_TIMESTAMP_FORMAT)


def parse_timestamp(text: str) -> datetime:
    try:
        return datetime.strptime(text, _TIMESTAMP_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise Dc09Error(f"bad timestamp {text!r}") from None


def parse_key(hex_key: str) -> bytes:
    """An AES key written as 32, 48 or 64 hex digits (AES-128, -192, -256)."""
    text = hex_key.strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError("the DC-09 key must be hex digits") from None
    if len(key) not in (16, 24, 32):
        raise ValueError(f"the DC-09 key must be 32, 48 or 64 hex digits, got {len(text)}")
    return key


def _aes(key: bytes) -> Cipher[modes.CBC]:
    return Cipher(algorithms.AES(key), modes.CBC(bytes(16)))


def encrypt_block(key: bytes, plaintext: str, pad: str | None = None) -> str:
    """Pad ``plaintext`` at the front to whole AES blocks, encrypt, return upper-case hex."""
    raw = plaintext.encode("ascii")
    if pad is None:
        pad = "".join(secrets.choice(_PAD_ALPHABET) for _ in range((-len(raw)) % 16 or 16))
    if any(c in pad for c in "|[]") or (len(pad) + len(raw)) % 16:
        raise ValueError(
            "pad must avoid '|', '[', ']' and fill the plaintext to whole 16-byte blocks"
        )
    encryptor = _aes(key).encryptor()
    return (encryptor.update(pad.encode("ascii") + raw) + encryptor.finalize()).hex().upper()


def decrypt_block(key: bytes, hex_text: str) -> str:
    """Decrypt the hex after ``[`` of an encrypted frame; the pad is left in front."""
    try:
        blob = bytes.fromhex(hex_text)
    except ValueError:
        raise Dc09Error("encrypted part is not hex") from None
    if not blob or len(blob) % 16:
        raise Dc09Error("encrypted part is not a whole number of AES blocks")
    decryptor = _aes(key).decryptor()
    plain = decryptor.update(blob) + decryptor.finalize()
    try:
        return plain.decode("ascii")
    except UnicodeDecodeError:
        raise Dc09Error("cannot decrypt (wrong key?)") from None


def _strip_pad(text: str) -> str:
    """Data after decryption starts at ``#acct|`` or ``|``; anything before is the pad."""
    bar = text.find("|")
    if bar < 0:
        return ""  # no data block: NULL messages and replies carry only the pad
    hash_at = text.rfind("#", 0, bar)
    return text[hash_at:] if hash_at >= 0 else text[bar:]


@dataclass(frozen=True)
class Frame:
    """One DC-09 message or reply, decrypted."""

    id: str
    seq: int
    account: str = ""
    data: str = ""
    line: str | None = "0"
    receiver: str | None = None
    prefix: str | None = None
    timestamp: datetime | None = None
    xdata: tuple[str, ...] = ()
    encrypted: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.seq <= MAX_SEQUENCE:
            raise ValueError(f"sequence {self.seq} outside 0000-9999")
        if self.encrypted and self.timestamp is None:
            raise ValueError("an encrypted frame needs a timestamp")

    def header(self) -> str:
        text = f'"{"*" if self.encrypted else ""}{self.id}"{self.seq:04d}'
        text += f"R{self.receiver}" if self.receiver is not None else ""
        text += f"L{self.line}" if self.line is not None else ""
        text += f"A{self.prefix}" if self.prefix is not None else ""
        text += f"#{self.account}" if self.account else ""
        return text + "["

    def tail(self) -> str:
        """``data]x-data timestamp``: the part encrypted in an encrypted frame."""
        stamp = format_timestamp(self.timestamp) if self.timestamp is not None else ""
        return f"{self.data}]{''.join(f'[{x}]' for x in self.xdata)}{stamp}"


def encode(frame: Frame, key: bytes | None = None, pad: str | None = None) -> bytes:
    """The bytes on the wire, ``LF`` to ``CR``. ``key`` is required iff the frame is encrypted."""
    if frame.encrypted != (key is not None):
        raise ValueError("pass a key exactly when the frame is encrypted")
    body = frame.header() + (
        encrypt_block(key, frame.tail(), pad) if key is not None else frame.tail()
    )
    raw = body.encode("ascii")
    if len(raw) > 0xFFF:
        raise ValueError(f"frame too long ({len(raw)} bytes, at most 4095)")
    return LF + f"{crc16(raw):04X}{len(raw):04X}".encode("ascii") + raw + CR


def decode(raw: bytes, key_for: Callable[[str], bytes | None] = lambda account: None) -> Frame:
    """Check CRC and length, parse, and decrypt with ``key_for(account)``.

    Raises :class:`Dc09Error` naming what is wrong. A missing leading LF or
    trailing CR is tolerated (UDP datagrams and stream splitting differ).
    """
    text_bytes = raw.strip(b"\r\n\x00")
    if len(text_bytes) < 10:
        raise Dc09Error("frame too short")
    try:
        text = text_bytes.decode("ascii")
    except UnicodeDecodeError:
        raise Dc09Error("frame is not ASCII") from None
    crc_text, len_text, body = text[:4], text[4:8], text[8:]
    try:
        crc, length = int(crc_text, 16), int(len_text, 16)
    except ValueError:
        raise Dc09Error(f"bad CRC/length field {text[:8]!r}") from None
    if length != len(body):
        raise Dc09Error(f"length field says {length}, frame has {len(body)}")
    if crc != crc16(body.encode("ascii")):
        raise Dc09Error(
            f"CRC mismatch: field {crc:04X}, computed {crc16(body.encode('ascii')):04X}"
        )
    head = _HEADER.match(body)
    if head is None:
        raise Dc09Error(f"bad header in {body[:40]!r}")
    encrypted = bool(head["star"])
    rest = body[head.end() :]
    if encrypted:
        key = key_for(head["account"] or "")
        if key is None:
            raise Dc09Error(f"encrypted frame for account {head['account']!r} without a key")
        plain = decrypt_block(key, rest)
        bracket = plain.find("]")
        rest = _strip_pad(plain[:bracket]) + plain[bracket:] if bracket >= 0 else plain
    tail = _TAIL.match(rest)
    if tail is None:
        raise Dc09Error(f"bad data/timestamp part {rest[:60]!r}")
    if encrypted and not tail["ts"]:
        raise Dc09Error("encrypted frame without timestamp")
    return Frame(
        id=head["id"],
        seq=int(head["seq"]),
        account=head["account"] or "",
        data=tail["data"],
        line=head["line"],
        receiver=head["receiver"],
        prefix=head["prefix"],
        timestamp=parse_timestamp(tail["ts"]) if tail["ts"] else None,
        xdata=tuple(re.findall(r"\[([^\]]*)\]", tail["xdata"])),
        encrypted=encrypted,
    )


def reply_to(message: Frame, kind: Literal["ACK", "DUH"], now: datetime) -> Frame:
    """The ACK or DUH for ``message``: same sequence, receiver, line and account."""
    return Frame(
        id=kind,
        seq=message.seq,
        account=message.account,
        line=message.line,
        receiver=message.receiver,
        timestamp=now if message.encrypted else None,
        encrypted=message.encrypted,
    )


def nak(now: datetime) -> Frame:
    """A NAK carries the receiver's clock, never encrypted (``"NAK"0000R0L0A0[]_time``)."""
    return Frame(id="NAK", seq=0, receiver="0", line="0", prefix="0", timestamp=now)


# --- Contact ID ------------------------------------------------------------------------------

QUALIFIER_NEW = 1
QUALIFIER_RESTORE = 3


@dataclass(frozen=True)
class ContactId:
    """One Contact ID report: qualifier, event code, partition, zone."""

    code: int
    zone: int = 0
    partition: int = 0
    qualifier: int = QUALIFIER_NEW

    def __post_init__(self) -> None:
        if not 0 <= self.code <= 999 or not 0 <= self.zone <= 999 or not 0 <= self.partition <= 99:
            raise ValueError(f"Contact ID fields out of range: {self}")
        if self.qualifier not in (QUALIFIER_NEW, QUALIFIER_RESTORE, 6):
            raise ValueError(f"Contact ID qualifier must be 1, 3 or 6, got {self.qualifier}")

    def data(self, account: str) -> str:
        """``#acct|QEEE PP ZZZ``."""
        return f"#{account}|{self.qualifier}{self.code:03d} {self.partition:02d} {self.zone:03d}"

    @classmethod
    def parse(cls, data: str) -> ContactId:
        match = re.fullmatch(r"#?[0-9A-F]*\|([136])(\d{3}) (\d{2}) (\d{3})", data)
        if match is None:
            raise Dc09Error(f"not Contact ID data: {data!r}")
        return cls(
            code=int(match[2]), partition=int(match[3]), zone=int(match[4]), qualifier=int(match[1])
        )


# --- sending ---------------------------------------------------------------------------------


class Dc09Unavailable(Exception):
    """No acknowledgement after every retry: the receiving centre did not take the message."""


class Dc09Rejected(Exception):
    """The receiving centre answered DUH: it will not take this message as sent."""


class _Transport:
    def exchange(self, frame: bytes, timeout: float) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        """Drop the connection; the next exchange opens a new one."""


class TcpTransport(_Transport):
    """One persistent TCP connection, reopened after any error."""

    def __init__(self, host: str, port: int):
        self.address = (host, port)
        self._sock: socket.socket | None = None
        self._buffer = b""

    def exchange(self, frame: bytes, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        try:
            if self._sock is None:
                self._sock = socket.create_connection(self.address, timeout=timeout)
                self._buffer = b""
            self._sock.settimeout(timeout)
            self._sock.sendall(frame)
            while CR not in self._buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("no reply")
                self._sock.settimeout(remaining)
                chunk = self._sock.recv(4096)
                if not chunk:
                    raise ConnectionError("receiver closed the connection")
                self._buffer += chunk
        except OSError:
            self.close()
            raise
        reply, _, self._buffer = self._buffer.partition(CR)
        return reply + CR

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock = None


class UdpTransport(_Transport):
    """One datagram out, one datagram back."""

    def __init__(self, host: str, port: int):
        self.address = (host, port)
        self._sock: socket.socket | None = None

    def exchange(self, frame: bytes, timeout: float) -> bytes:
        if self._sock is None:
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock = self._sock
        sock.settimeout(timeout)
        sock.sendto(frame, self.address)
        deadline = time.monotonic() + timeout
        while True:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            data, peer = sock.recvfrom(4096)  # raises TimeoutError at the deadline
            if peer[1] == self.address[1]:
                return data

    def close(self) -> None:
        """Release the socket; the next exchange opens a new one (a fresh source port)."""
        if self._sock is not None:
            self._sock.close()
        self._sock = None


@dataclass
class SenderStats:
    sent: int = 0
    acked: int = 0
    naks: int = 0
    timeouts: int = 0
    duh: int = 0
    last_error: str | None = None
    clock_offset: float = 0.0
    last_ack: float | None = None


class Dc09Sender:
    """Sends DC-09 messages to one receiving centre; one message in flight at a time.

    ``clock_offset`` (seconds, receiver minus local) is learnt from NAKs and added
    to every timestamp, so a device with a wrong clock still gets through.
    """

    def __init__(
        self,
        transport: _Transport,
        account: str,
        *,
        key: bytes | None = None,
        receiver: str | None = None,
        line: str = "0",
        timeout: float = 5.0,
        attempts: int = 3,
        clock: Callable[[], float] = time.time,
        sequence: Callable[[], int] | None = None,
    ):
        """``sequence``: where the numbers come from when several senders share the account
        (one counter for all, e.g. in the store); default this sender's own counter."""
        if not re.fullmatch(r"[0-9A-F]{3,16}", account):
            raise ValueError(f"DC-09 account must be 3-16 hex digits (0-9, A-F), got {account!r}")
        self.transport = transport
        self.account = account
        self.key = key
        self.receiver = receiver
        self.line = line
        self.timeout = timeout
        self.attempts = attempts
        self.clock = clock
        self.stats = SenderStats()
        self._seq = 0
        self._sequence = sequence
        self._lock = threading.Lock()

    def _next_seq(self) -> int:
        if self._sequence is not None:
            return self._sequence()
        self._seq = self._seq % MAX_SEQUENCE + 1
        return self._seq

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock() + self.stats.clock_offset, UTC)

    def send_contact_id(self, report: ContactId, seq: int | None = None) -> Frame:
        return self.send("ADM-CID", report.data(self.account), seq)

    def send_null(self) -> Frame:
        return self.send("NULL", "")

    def send(self, message_id: str, data: str, seq: int | None = None) -> Frame:
        """Send until ACKed; returns the ACK. Raises Dc09Rejected (DUH) or Dc09Unavailable.

        ``seq``: the sequence number this message already had (sending it again after a
        restart is a retransmission, as after a lost ACK); default the next one."""
        if message_id not in MESSAGE_IDS:
            raise ValueError(f"unknown DC-09 message id {message_id!r}")
        with self._lock:
            frame = Frame(
                id=message_id,
                seq=self._next_seq() if seq is None else seq,
                account=self.account,
                data=data,
                line=self.line,
                receiver=self.receiver,
                timestamp=self.now(),
                encrypted=self.key is not None,
            )
            for attempt in range(1, self.attempts + 1):
                frame = replace(frame, timestamp=self.now())
                self.stats.sent += 1
                try:
                    raw = self.transport.exchange(encode(frame, self.key), self.timeout)
                except OSError as exc:  # TimeoutError and connection errors alike
                    self.stats.timeouts += 1
                    self.stats.last_error = f"attempt {attempt}: {type(exc).__name__}: {exc}"
                    log.warning(
                        "DC-09 %s seq %04d: %s", message_id, frame.seq, self.stats.last_error
                    )
                    continue
                try:
                    reply = decode(raw, lambda account: self.key)
                except Dc09Error as exc:
                    self.stats.last_error = f"attempt {attempt}: unreadable reply: {exc.reason}"
                    log.warning(
                        "DC-09 %s seq %04d: %s", message_id, frame.seq, self.stats.last_error
                    )
                    continue
                if reply.id == "NAK":
                    self._learn_clock(reply)
                    continue
                if reply.seq != frame.seq:
                    self.stats.last_error = (
                        f"reply for sequence {reply.seq:04d}, expected {frame.seq:04d}"
                    )
                    continue
                if reply.id == "DUH":
                    self.stats.duh += 1
                    raise Dc09Rejected(f"receiver answered DUH to {message_id} seq {frame.seq:04d}")
                if reply.id == "ACK":
                    self.stats.acked += 1
                    self.stats.last_ack = self.clock()
                    self.stats.last_error = None
                    return reply
                self.stats.last_error = f"unexpected reply {reply.id!r}"
            raise Dc09Unavailable(
                f"{message_id} seq {frame.seq:04d} not acknowledged after {self.attempts} attempts"
                f" ({self.stats.last_error})"
            )

    def _learn_clock(self, reply: Frame) -> None:
        self.stats.naks += 1
        if reply.timestamp is None:
            self.stats.last_error = "NAK without receiver time"
            return
        # Timestamps have whole seconds; keep the offset to whole seconds too.
        offset = round(
            (reply.timestamp - datetime.fromtimestamp(self.clock(), UTC)).total_seconds()
        )
        self.stats.last_error = f"NAK: receiver clock differs by {offset:+d} s"
        log.warning("DC-09 receiver NAKed; correcting clock offset to %+d s", offset)
        self.stats.clock_offset = float(offset)

    def close(self) -> None:
        self.transport.close()


class NullSupervisor:
    """Sends a NULL message whenever the link has been idle for ``interval`` seconds."""

    def __init__(self, sender: Dc09Sender, interval: float, on_result: Callable[[bool, str], None]):
        self.sender = sender
        self.interval = interval
        self.on_result = on_result
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dc09-null", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.sender.timeout * self.sender.attempts + 1)

    def _run(self) -> None:
        while not self._stop.wait(timeout=min(1.0, self.interval / 4)):
            last = self.sender.stats.last_ack or 0.0
            if self.sender.clock() - last < self.interval:
                continue
            try:
                self.sender.send_null()
                self.on_result(True, "")
            except (Dc09Unavailable, Dc09Rejected) as exc:
                self.on_result(False, str(exc))
                self._stop.wait(timeout=self.interval)


def within_window(sent: datetime, now: datetime) -> bool:
    """The receiver's timestamp check: +20 s ahead / -40 s behind its own clock."""
    return (
        now - timedelta(seconds=TIME_WINDOW_BEHIND)
        <= sent
        <= now + timedelta(seconds=TIME_WINDOW_AHEAD)
    )
