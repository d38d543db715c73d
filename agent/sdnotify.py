"""Tell systemd how the agent is doing: the sd_notify protocol, without a dependency.

Under ``Type=notify`` systemd passes the path of a datagram socket in
``$NOTIFY_SOCKET`` (a leading ``@`` means a Linux abstract socket). Each message
is one datagram of ``KEY=value`` lines::

    notifier = Notifier.from_env()          # does nothing outside systemd
    notifier.ready("link down, backlog 0, 3 drivers ok")
    interval = notifier.watchdog_interval()  # seconds between WATCHDOG=1, or None
    ...
    notifier.watchdog()                      # only from the loop that checked health
    notifier.stopping()

Sending never raises and never blocks: losing a status line must not stall
the agent, let alone an alarm. Each method returns whether the datagram went out.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping

log = logging.getLogger("wardpost.sdnotify")


class Notifier:
    """A client for systemd's notification socket; inert when ``address`` is None."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None):
        #: The socket path as given in ``$NOTIFY_SOCKET`` (``@name`` = abstract), or None.
        self.address = address
        self._watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._failing = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """Build from ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID``.

        Without ``NOTIFY_SOCKET`` (started by hand, in tests) the notifier is a no-op.
        ``WATCHDOG_USEC`` counts only when ``WATCHDOG_PID`` is absent or names this
        process, as systemd's own ``sd_watchdog_enabled()`` does.
        """
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        if address is not None and not address.startswith(("/", "@")):
            log.warning("NOTIFY_SOCKET=%r is not a unix socket path; not notifying", address)
            address = None
        return cls(address, _watchdog_usec(env))

    @property
    def enabled(self) -> bool:
        """True when running under a service manager that listens for notifications."""
        return self.address is not None

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: start-up (or a reload) is finished. Send it after every reload too."""
        return self.notify("READY=1", status)

    def status(self, text: str) -> bool:
        """``STATUS=``: the one-line summary shown by ``systemctl status``."""
        return self.notify(None, text)

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the agent checked its own health and found it good."""
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: shutdown has begun."""
        return self.notify("STOPPING=1", status)

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC=`` (required by systemd 253+).

        systemd then shows the unit as reloading until the next :meth:`ready`,
        so follow every reload, successful or rejected, with :meth:`ready`.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}", status)

    def watchdog_interval(self) -> float | None:
        """Seconds between :meth:`watchdog` calls (half ``WatchdogSec=``), or None if off."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2_000_000

    def notify(self, state: str | None, status: str | None = None) -> bool:
        """Send ``state`` lines plus an optional ``STATUS=`` line as one datagram."""
        if self.address is None:
            return False
        lines = [state] if state else []
        if status is not None:
            lines.append("STATUS=" + " ".join(status.split()))
        if not lines:
            return False
        return self._send("\n".join(lines).encode("utf-8"))

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def _send(self, datagram: bytes) -> bool:
        assert self.address is not None
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._sock.setblocking(False)
                self._sock.sendto(datagram, target)
            except OSError as exc:
                # Logged once per failure streak: a vanished manager must not flood the log.
                if not self._failing:
                    log.warning("cannot notify systemd at %s: %s", self.address, exc)
                self._failing = True
                return False
            if self._failing:
                log.info("notifying systemd at %s works again", self.address)
                self._failing = False
            return True


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            log.warning("ignoring WATCHDOG_PID=%r: not a process id", pid)
            return None
    value = env.get("WATCHDOG_USEC")
    if not value:
        return None
    try:
        usec = int(value)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not a number of microseconds", value)
        return None
    return usec if usec > 0 else None
