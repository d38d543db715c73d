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

Numbers given to events the disk could not take (held in memory) are not "unused": if
the process dies they are lost, and the centre must see them as a gap. The highest of
them is therefore written to a second, tiny file (``.held``) that is allocated while the
disk has room and afterwards only overwritten in place, which needs no free block — so
it can be written on the very full disk that made the events memory-only. A restart
reports as skipped only the numbers above it.
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
_HELD_RECORD = 24  # bytes of the .held file: one zero-padded number and a newline


def _held_record(seq: int) -> bytes:
    """The whole .held file: always the same length, so rewriting it needs no new block."""
    return f"{seq:0{_HELD_RECORD - 1}d}\n".encode()


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
        self.held_path = self.path.with_name(self.path.name + ".held")
        self._held_fd: int | None = None
        self._held_written = 0
        self._held_fault: str | None = None

    def resume(self, floor: int, boot: int = 1) -> None:
        """Start numbering at ``floor`` (the outbox's next seq) or above the stored mark,
        whichever is higher, and reserve the first block before returning. ``boot`` is
        this run's boot counter by the outbox: raised above any the mark's file recorded."""
        mark, stored_boot = self._read_mark()
        held = self._open_held()
        self.boot = max(boot, stored_boot + 1)
        with self._lock:
            start = max(self._next, floor, mark)
            first_unused = max(floor, held + 1)  # numbers up to ``held`` went to real events
            if mark > first_unused:
                self.skipped = (first_unused, mark - 1)
            self._next = self.resumed_at = start
        self._reserve(start + self.block)

    def note_held(self, seq: int) -> None:
        """Events up to ``seq`` are held in memory only: should the process die, the next
        run must count their numbers as lost, not as skipped. Called by the outbox's writer."""
        if seq <= self._held_written or self._held_fd is None:
            return
        try:
            os.pwrite(self._held_fd, _held_record(seq), 0)
            os.fdatasync(self._held_fd)
            self._held_written = seq
        except OSError as exc:
            fault = f"cannot write {self.held_path}: {exc}"
            if fault != self._held_fault:
                log.error("%s; a crash now would hide events held in memory from the centre", fault)
            self._held_fault = fault

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
        if self._held_fd is not None:
            os.close(self._held_fd)
            self._held_fd = None

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

    def _open_held(self) -> int:
        """Read the last run's held mark (0 if none) and keep the file open, allocated, for
        this run's. Without it (a read-only disk, say) losses after a crash may be reported
        as skipped numbers, as they were before the file existed: said once in the log."""
        held = 0
        try:
            held = int(self.held_path.read_text() or 0)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:  # a torn write at power loss, say
            log.error("held-seq mark %s unreadable (%s); taken as 0", self.held_path, exc)
        if self._held_fd is not None:
            return held
        try:
            self._held_fd = os.open(self.held_path, os.O_RDWR | os.O_CREAT, 0o640)
            # Real bytes, not a hole or fallocate's unwritten extent: overwriting them
            # later must not need a block from a full disk.
            os.pwrite(self._held_fd, _held_record(held), 0)
            os.fsync(self._held_fd)
        except OSError as exc:
            log.error("held-seq mark %s unusable: %s", self.held_path, exc)
            if self._held_fd is not None:
                os.close(self._held_fd)
                self._held_fd = None
        return held

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
