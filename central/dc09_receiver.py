"""A minimal SIA DC-09 receiver: validates frames and answers ACK, NAK or DUH.

Made for tests and commissioning (``wardpost receiver dc09-listen``), not to run
an alarm receiving centre. It listens on TCP and UDP on the same port and:

* answers **NAK** with its own clock for a frame with a bad CRC, length or layout,
  one it cannot decrypt, or one whose timestamp is outside +20/-40 s of its clock;
* answers **DUH** for an unknown account or a message type it does not take;
* answers **ACK** otherwise (encrypted when the message was), and hands the
  frame to ``on_frame``.

``clock_offset`` makes the receiver's clock run ahead or behind, and
``ignore_next`` makes it stay silent for that many frames, so tests can drive
a sender's clock correction and retries.
"""

from __future__ import annotations

import contextlib
import logging
import socketserver
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from central.dc09 import (
    CR,
    MESSAGE_IDS,
    Dc09Error,
    Frame,
    decode,
    encode,
    nak,
    reply_to,
    within_window,
)

log = logging.getLogger("wardpost.central.dc09_receiver")


@dataclass
class Received:
    """One frame as the receiver judged it."""

    raw: bytes
    reply: str
    frame: Frame | None = None
    error: str = ""
    transport: str = "tcp"
    at: float = field(default_factory=time.time)


class Dc09Receiver:
    """Listens on ``host:port`` (TCP and UDP). ``accounts`` maps account → AES key or None."""

    def __init__(
        self,
        accounts: Mapping[str, bytes | None],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        on_frame: Callable[[Received], None] = lambda received: None,
        clock_offset: float = 0.0,
        accept: tuple[str, ...] = MESSAGE_IDS,
    ):
        self.accounts = dict(accounts)
        self.on_frame = on_frame
        self.clock_offset = clock_offset
        self.accept = accept
        self.ignore_next = 0
        self.received: list[Received] = []
        self._lock = threading.Lock()
        receiver = self

        class _Tcp(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                buffer = b""
                while True:
                    try:
                        chunk = self.request.recv(4096)
                    except OSError:
                        return
                    if not chunk:
                        return
                    buffer += chunk
                    while CR in buffer:
                        raw, _, buffer = buffer.partition(CR)
                        answer = receiver.handle(raw + CR, "tcp")
                        if answer is not None:
                            self.request.sendall(answer)

        class _Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                answer = receiver.handle(data, "udp")
                if answer is not None:
                    sock.sendto(answer, self.client_address)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self._tcp = socketserver.ThreadingTCPServer((host, port), _Tcp)
        self._tcp.daemon_threads = True
        self.host, self.port = host, int(self._tcp.server_address[1])
        self._udp = socketserver.ThreadingUDPServer((host, self.port), _Udp)
        self._udp.daemon_threads = True
        self._threads = [
            threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
            )
            for server in (self._tcp, self._udp)
        ]

    def now(self) -> datetime:
        return datetime.fromtimestamp(time.time() + self.clock_offset, UTC)

    def start(self) -> Dc09Receiver:
        for thread in self._threads:
            thread.start()
        log.info("DC-09 receiver listening on %s:%d (TCP and UDP)", self.host, self.port)
        return self

    def stop(self) -> None:
        for server in (self._tcp, self._udp):
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> Dc09Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _key(self, account: str) -> bytes | None:
        return self.accounts.get(account)

    def handle(self, raw: bytes, transport: str) -> bytes | None:
        """Judge one frame; returns the reply bytes (None: stay silent)."""
        with self._lock:
            if self.ignore_next > 0:
                self.ignore_next -= 1
                self.received.append(Received(raw, "ignored", transport=transport))
                return None
        now = self.now()
        frame: Frame | None = None
        try:
            frame = decode(raw, self._key)
            if frame.account not in self.accounts:
                raise LookupError(f"unknown account {frame.account!r}")
            if frame.encrypted != (self.accounts[frame.account] is not None):
                raise LookupError(
                    f"account {frame.account!r} is configured"
                    f" {'with' if frame.encrypted else 'without'}"
                    " encryption the other way"
                )
            if frame.id not in self.accept:
                raise LookupError(f"message type {frame.id!r} not accepted")
            if frame.timestamp is not None and not within_window(frame.timestamp, now):
                raise Dc09Error(
                    f"timestamp {frame.timestamp.isoformat()} outside the window"
                    f" around {now.isoformat()}"
                )
        except Dc09Error as exc:
            return self._answer(
                Received(raw, "NAK", frame, exc.reason, transport), encode(nak(now))
            )
        except LookupError as exc:
            assert frame is not None
            duh = reply_to(frame, "DUH", now)
            return self._answer(
                Received(raw, "DUH", frame, str(exc), transport),
                encode(duh, self._key(frame.account)),
            )
        ack = reply_to(frame, "ACK", now)
        return self._answer(
            Received(raw, "ACK", frame, "", transport), encode(ack, self._key(frame.account))
        )

    def _answer(self, received: Received, reply: bytes) -> bytes:
        with self._lock:
            self.received.append(received)
        if received.reply != "ACK":
            log.warning("DC-09 %s over %s: %s", received.reply, received.transport, received.error)
        with contextlib.suppress(Exception):  # a faulty callback must not stop the replies
            self.on_frame(received)
        return reply

    def wait_for(self, count: int, timeout: float = 5.0, reply: str = "ACK") -> list[Received]:
        """Block until ``count`` frames got ``reply``; returns them (bounded by ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                found = [r for r in self.received if r.reply == reply]
            if len(found) >= count:
                return found
            time.sleep(0.01)
        raise TimeoutError(f"{len(found)} of {count} frames answered {reply} within {timeout} s")
