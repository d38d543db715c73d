"""A pretend serial device on a real pseudo-terminal, for the serial driver tests.

The driver opens ``link`` (a symlink in the test's tmp dir, like a
``/dev/serial/by-id`` link); the test writes bytes on the master side as the
device would. ``unplug()`` closes the pty (the driver's read fails exactly as
with a yanked USB adapter); ``plug()`` makes a new pty and points the same
symlink at it, as udev does when the adapter comes back.
"""

from __future__ import annotations

import os
import select
import time
import tty
from pathlib import Path


class PtyDevice:
    def __init__(self, link: Path, *, plugged: bool = True):
        self.link = link
        self.master: int | None = None
        self._slave: int | None = None
        if plugged:
            self.plug()

    def plug(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)  # no echo, no line editing until the driver configures it
        self.master, self._slave = master, slave
        tmp = self.link.with_name(self.link.name + ".new")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.ttyname(slave))
        os.replace(tmp, self.link)

    def unplug(self) -> None:
        for fd in (self.master, self._slave):
            if fd is not None:
                os.close(fd)
        self.master = self._slave = None

    def write(self, data: bytes) -> None:
        assert self.master is not None, "device is unplugged"
        os.write(self.master, data)

    def read(self, size: int, timeout: float = 5.0) -> bytes:
        """What the driver sent to the device (at least ``size`` bytes, or what came in time)."""
        assert self.master is not None
        got = b""
        deadline = time.monotonic() + timeout
        while len(got) < size and (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                got += os.read(self.master, 4096)
        return got

    def close(self) -> None:
        if self.master is not None:
            self.unplug()
        self.link.unlink(missing_ok=True)
