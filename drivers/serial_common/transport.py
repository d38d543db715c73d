"""The serial link: one reader thread per port that survives unplugging.

:class:`SerialLink` opens a port by stable path (``/dev/serial/by-id/...``
symlinks are resolved again on every open, because a re-enumerated USB adapter
comes back as a different ``ttyUSB``), reads with a timeout so it can always be
stopped, and when the device disappears closes, reports the link down, and
reopens with exponential backoff. It never blocks its caller: ``start()``
returns at once, ``write()`` queues bytes for the reader thread to send.

Ports given as a URL (``socket://10.0.0.5:4001`` for RS-232-over-Ethernet
servers, ``loop://`` for experiments) go through :func:`serial.serial_for_url`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

import serial

from agent.backoff import Backoff

#: Largest single read; a busy port is drained in chunks of this size.
READ_CHUNK = 4096


_CANCEL_ERRORS = (AttributeError, NotImplementedError, OSError, serial.SerialException)


class _Port(Protocol):
    """What the reader uses of a pyserial port (``Serial`` or a ``serial_for_url`` one)."""

    @property
    def in_waiting(self) -> int: ...
    def read(self, size: int = 1) -> bytes: ...
    def write(self, data: bytes, /) -> int | None: ...
    def close(self) -> None: ...
    def cancel_read(self) -> None: ...


@dataclass(frozen=True)
class PortSettings:
    """Everything needed to open one port."""

    port: str
    baudrate: int = 9600
    bytesize: int = 8
    parity: str = "N"
    stopbits: float = 1.0
    xonxoff: bool = False
    rtscts: bool = False
    exclusive: bool = True
    read_timeout: float = 0.2
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0

    @property
    def is_url(self) -> bool:
        return "://" in self.port


@dataclass(frozen=True)
class LinkChange:
    """The link came up (``online``) or went down, with the path it resolved to."""

    online: bool
    port: str
    resolved: str
    reason: str = ""


def describe(exc: BaseException) -> str:
    """A short, technician-readable reason for a failed open or read."""
    code = getattr(exc, "errno", None)
    if isinstance(exc, FileNotFoundError) or code == errno.ENOENT:
        return "device not present (unplugged or wrong path)"
    if isinstance(exc, PermissionError) or code in (errno.EACCES, errno.EPERM):
        return "permission denied (is the service user in the dialout group?)"
    if code in (errno.EIO, errno.ENXIO, errno.ENODEV):
        return f"device disconnected ({os.strerror(code)})"
    text = str(exc) or type(exc).__name__
    if "readiness to read but returned no data" in text:
        return "device disconnected"
    return text


class SerialLink:
    """A self-healing serial port.

    ``on_data(data, monotonic_time)`` is called on the reader thread for every
    chunk read; ``on_change(LinkChange)`` when the link goes up or down
    (transitions only, the first failed open included). Exceptions raised by
    either callback are logged and counted, never fatal to the reader.
    """

    def __init__(
        self,
        settings: PortSettings,
        on_data: Callable[[bytes, float], None],
        on_change: Callable[[LinkChange], None],
        log: logging.Logger | None = None,
    ):
        self.settings = settings
        self._on_data = on_data
        self._on_change = on_change
        self.log = log or logging.getLogger("wardpost.serial")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._port: _Port | None = None
        self._outgoing: deque[bytes] = deque(maxlen=32)
        self._lock = threading.Lock()
        self.online: bool | None = None  # None until the first open attempt
        self.resolved = ""
        self.reason = "starting"
        self.counters = {
            "opens": 0,
            "open_failures": 0,
            "disconnects": 0,
            "bytes_in": 0,
            "bytes_out": 0,
            "writes_dropped": 0,
            "callback_errors": 0,
        }

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"serial {self.settings.port}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        with self._lock:
            port = self._port
        if port is not None:
            # Without cancel_read support the read timeout bounds the wait instead.
            with contextlib.suppress(*_CANCEL_ERRORS):
                port.cancel_read()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def write(self, data: bytes) -> bool:
        """Queue ``data`` for the device; False if the link is down (nothing queued)."""
        if not self.online:
            self.counters["writes_dropped"] += 1
            return False
        if len(self._outgoing) == self._outgoing.maxlen:
            self.counters["writes_dropped"] += 1
        self._outgoing.append(data)
        with self._lock:
            port = self._port
        if port is not None:
            # Wake the reader so the request goes out now, not after the read timeout.
            with contextlib.suppress(*_CANCEL_ERRORS):
                port.cancel_read()
        return True

    # -- reader thread ---------------------------------------------------------

    def _open(self) -> _Port:
        s = self.settings
        if s.is_url:
            port = serial.serial_for_url(s.port, do_not_open=True)
            self.resolved = s.port
        else:
            # A by-id symlink may point at a different ttyUSB after re-enumeration.
            self.resolved = os.path.realpath(s.port)
            if not os.path.exists(self.resolved):
                raise FileNotFoundError(2, "no such device", s.port)
            port = serial.Serial()
            port.port = self.resolved
            port.exclusive = s.exclusive
        port.baudrate = s.baudrate
        port.bytesize = s.bytesize
        port.parity = s.parity
        port.stopbits = s.stopbits
        port.xonxoff = s.xonxoff
        port.rtscts = s.rtscts
        port.timeout = s.read_timeout
        port.write_timeout = 1.0
        port.open()
        return cast(_Port, port)

    def _report(self, online: bool, reason: str) -> None:
        if self.online == online:
            return
        self.online = online
        self.reason = reason
        change = LinkChange(online, self.settings.port, self.resolved, reason)
        try:
            self._on_change(change)
        except Exception:
            self.counters["callback_errors"] += 1
            self.log.exception("link change handler failed for %s", self.settings.port)

    def _run(self) -> None:
        retry = Backoff(self.settings.reconnect_min, self.settings.reconnect_max)
        while not self._stop.is_set():
            try:
                port = self._open()
            except (OSError, ValueError, serial.SerialException) as exc:
                self.counters["open_failures"] += 1
                self._report(False, describe(exc))
                self._stop.wait(retry.next())
                continue
            retry.reset()
            self.counters["opens"] += 1
            with self._lock:
                self._port = port
            self.log.info("serial port %s open (%s)", self.settings.port, self.resolved)
            self._report(True, "")
            reason = self._pump(port)
            with self._lock:
                self._port = None
            with contextlib.suppress(OSError, serial.SerialException):
                port.close()
            if not self._stop.is_set():
                self.counters["disconnects"] += 1
                self.log.warning("serial port %s lost: %s", self.settings.port, reason)
                self._report(False, reason)
        self._outgoing.clear()

    def _pump(self, port: _Port) -> str:
        """Read until the port fails or we are stopped; returns why it ended."""
        while not self._stop.is_set():
            try:
                while self._outgoing:
                    data = self._outgoing.popleft()
                    port.write(data)
                    self.counters["bytes_out"] += len(data)
                data = port.read(min(max(port.in_waiting, 1), READ_CHUNK))
            except (OSError, serial.SerialException) as exc:
                return describe(exc)
            if not data:
                continue
            self.counters["bytes_in"] += len(data)
            try:
                self._on_data(data, time.monotonic())
            except Exception:
                self.counters["callback_errors"] += 1
                self.log.exception("handling bytes from %s failed", self.settings.port)
        return "stopped"
