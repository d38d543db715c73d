"""Sequence numbers that no crash can give out twice.

A critical event is published before its commit completes, so after a ``kill -9`` the
outbox may not know the highest seq already on the wire. The numbers are therefore
reserved in blocks: the end of the current block (the *high-water mark*) is written to
a small file of its own — to a temporary file, fsync'd, renamed over the old one, the
directory fsync'd — before any number of the block is used. A restart continues above
the mark, whatever happened to the process or to the outbox file (deleted, corrupt,
restored from an older copy).

The next block is reserved on a background thread once half the current one is used,
so an emitting thread waits for the disk only if a whole half block is numbered during
one fsync. A clean stop writes back the number after the last one stored or sent, so a
restart leaves no gap; after a crash, the unused rest of the block is reported as skipped (see
:attr:`SeqReserve.skipped`) so the centre does not count those numbers as lost.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

log = logging.getLogger("wardpost.outbox")

BLOCK = 1024  # numbers reserved per write of the high-water mark
_RETRY_AFTER = 5.0  # seconds between attempts to write the mark on a failing disk


class SeqReserve:
    """Hands out increasing sequence numbers, each above any a previous run could have used.

    If the mark cannot be written (read-only or failing disk) numbering goes on from
    memory and :attr:`fault` says why: nothing durable can be promised then anyway."""

    def __init__(self, path: Path, block: int = BLOCK):
        self.path = Path(path)
        self.block = block
        self._lock = threading.Lock()
        self._extended = threading.Condition(self._lock)
        self._next = 1
        self._limit = 1  # numbers below this are reserved on disk
        self._extending = False
        self._closed = False
        self._failed_at = -_RETRY_AFTER
        self.fault: str | None = None
        #: ``(first, last)``: numbers an earlier run reserved that the outbox does not hold.
        self.skipped: tuple[int, int] | None = None
        self.resumed_at = 1
        #: This run's boot counter, kept in the mark's file too, so that it survives the
        #: loss of the outbox (the centre tells a restarted device from a stale Will by it).
        self.boot = 0

    def resume(self, floor: int, boot: int = 1) -> None:
        """Start numbering at ``floor`` (the outbox's next seq) or above the stored mark,
        whichever is higher, and reserve the first block before returning. ``boot`` is
        this run's boot counter by the outbox: raised above any the mark's file recorded."""
        mark, stored_boot = self._read_mark()
        self.boot = max(boot, stored_boot + 1)
        with self._lock:
            start = max(self._next, floor, mark)
            if mark > floor:
                self.skipped = (floor, mark - 1)
            self._next = self.resumed_at = start
        self._reserve(start + self.block)

    def raise_floor(self, floor: int) -> None:
        """Never number below ``floor`` (an outbox read again after a disk fault)."""
        with self._lock:
            if floor <= self._next:
                return
            self._next = floor
            short = self._next >= self._limit
        if short:
            self._reserve(floor + self.block)

    def next(self) -> int:
        with self._lock:
            while self._next >= self._limit and self.fault is None and not self._closed:
                if not self._extending:  # reserve here: nothing else will in time
                    self._extending = True
                    self._lock.release()
                    try:
                        self._write_mark(self._next + self.block)
                    finally:
                        self._lock.acquire()
                else:
                    self._extended.wait(1.0)
            seq = self._next
            self._next += 1
            if (
                not self._closed
                and self._limit - self._next < self.block // 2
                and not self._extending
                and time.monotonic() - self._failed_at >= _RETRY_AFTER
            ):
                self._extending = True
                threading.Thread(
                    target=self._write_mark,
                    args=(self._limit + self.block,),
                    name="seq-reserve",
                    daemon=True,
                ).start()
            return seq

    def close(self, used_below: int) -> None:
        """A clean stop: give back the numbers from ``used_below`` on (no gap after a
        restart). The caller vouches that none of them is stored or was ever sent; numbers
        handed out from here on are neither (the outbox has closed), so none is reserved."""
        with self._lock:
            while self._extending:
                self._extended.wait(1.0)
            self._extending = self._closed = True
        self._write_mark(min(used_below, self._next))

    def _reserve(self, limit: int) -> None:
        with self._lock:
            while self._extending:
                self._extended.wait(1.0)
            self._extending = True
        self._write_mark(limit)

    def _write_mark(self, limit: int) -> None:
        """Make ``limit`` the durable mark, then let numbers below it be used."""
        try:
            tmp = self.path.with_name(self.path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            try:
                os.write(fd, f"{limit}\n{self.boot}\n".encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            fault = None
        except OSError as exc:
            fault = f"cannot write the sequence mark {self.path}: {exc}"
        with self._lock:
            if fault is None:
                self._limit = limit
                self.fault = None
            else:
                self._failed_at = time.monotonic()
                if fault != self.fault:
                    log.error("%s; numbering goes on from memory", fault)
                self.fault = fault
            self._extending = False
            self._extended.notify_all()

    def _read_mark(self) -> tuple[int, int]:
        """(the mark, the boot counter of the run that wrote it; 0 in files written before
        the counter was kept there)."""
        try:
            lines = self.path.read_text().split()
            return int(lines[0]), int(lines[1]) if len(lines) > 1 else 0
        except FileNotFoundError:
            return 0, 0
        except (OSError, ValueError, IndexError) as exc:
            log.error(
                "sequence mark %s unreadable (%s); the outbox's numbering is used", self.path, exc
            )
            return 0, 0
