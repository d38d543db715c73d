"""The outbox: every accepted event, durable in SQLite until the centre has it.

One writer thread owns the database. Drivers never wait for it: :meth:`Outbox.submit`
queues the event and returns; the writer commits whatever has queued up in one
transaction (group commit), fully synced when the batch holds a critical event,
then marks each :class:`~agent.driver.Emission` durable. That is the moment an
event counts as *accepted*.

Failure handling, because the alarm path must survive the storage under it:

* corrupt or truncated file at start: moved aside as ``outbox.db.corrupt-<time>``,
  readable pending rows salvaged into a fresh database, reported to the caller;
* low space: below ``shed_low_below`` bytes free, low-priority events are held in
  memory instead of written; below ``shed_normal_below``, normal ones too. The last
  free space, and the ballast file (``reserve_bytes``) released when the disk is
  full, are kept for critical and high events;
* disk full, read-only filesystem (an SD card remounted read-only after an error),
  or a state directory that cannot be opened: events are held in memory (delivered
  as usual, lost if the agent stops first) and the fault is reported. Every emission
  says which it got (:class:`~agent.driver.Fate`); the writer keeps retrying the disk
  and moves held events back to it, most urgent first, once it takes them;
* over ``max_rows``/``max_bytes``: published rows go first, then pending rows of
  the lowest priority, oldest first. Critical events are never evicted.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import OutboxConfig
from agent.delivery.salvage import salvage_outbox
from agent.delivery.sequence import SeqReserve
from agent.driver import Emission
from agent.event import Event, Priority

log = logging.getLogger("wardpost.outbox")

SCHEMA_VERSION = 1
_RETRY_DISK_EVERY = 5.0  # seconds between attempts to move in-memory events back to disk
_CHECKPOINT_EVERY = 1.0  # seconds between WAL checkpoints while commits come in
# SQLite's primary result codes (sqlite3.Error.sqlite_errorcode & 0xFF).
_SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_FULL = 8, 10, 13


@dataclass(frozen=True, slots=True)
class PendingRow:
    """A not-yet-published event as the outbox stores it and the publisher sends it."""

    id: str
    rank: int
    seq: int
    kind: str
    accepted: float
    body: str

    @property
    def key(self) -> tuple[int, int]:
        return (self.rank, self.seq)

    @classmethod
    def of(cls, event: Event) -> PendingRow:
        return cls(
            event.id, int(event.priority), event.seq, event.kind, event.time, event.to_json()
        )


@dataclass
class StorageReport:
    """What happened to storage that the centre should hear about (raised as events)."""

    kind: str
    payload: dict[str, Any] = field(default_factory=dict)
    priority: Priority = Priority.HIGH


@dataclass(frozen=True, slots=True)
class Reply:
    """A command result: kept on disk until the broker has it, like an event."""

    id: str
    topic: str
    body: str
    created: float


# What the writer thread is asked to do, in the order asked.
@dataclass(frozen=True, slots=True)
class _Add:
    emission: Emission
    row: PendingRow


@dataclass(frozen=True, slots=True)
class _Release:
    ids: list[str]


@dataclass(frozen=True, slots=True)
class _Statement:
    """A small write committed with the next batch (a meta value, a kept reply)."""

    sql: str
    params: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class _Prune:
    pass


@dataclass(frozen=True, slots=True)
class _Barrier:
    done: threading.Event


@dataclass(frozen=True, slots=True)
class _Stop:
    pass


_Op = _Add | _Release | _Statement | _Prune | _Barrier | _Stop


class StorageFault(Exception):
    pass


class Outbox:
    """Durable event buffer. Thread-safe; all writes go through one writer thread.

    ``on_committed(min_key)`` is called after each commit that added events, with
    the smallest ``(rank, seq)`` among them, so the publisher can rewind its cursor.
    ``on_released(ids)`` is called once releases are committed. ``on_report`` gets
    :class:`StorageReport` items (evictions, disk faults) for the agent to emit.
    """

    def __init__(
        self,
        path: Path,
        config: OutboxConfig,
        *,
        on_committed: Callable[[tuple[int, int]], None] = lambda key: None,
        on_released: Callable[[list[str]], None] = lambda ids: None,
        on_report: Callable[[StorageReport], None] = lambda report: None,
    ):
        self.path = Path(path)
        self.config = config
        self.on_committed = on_committed
        self.on_released = on_released
        self.on_report = on_report
        self._queue: queue.SimpleQueue[_Op] = queue.SimpleQueue()
        #: Sequence numbers, reserved in a file of their own beside the database.
        self.seqs = SeqReserve(self.path.with_name(self.path.stem + ".seq"))
        self._seq_floor = 1  # the next seq according to the database
        self._persisted_seq = 0
        self._memory_seq = 0  # the highest seq ever held in memory (may have been sent)
        self._conn: sqlite3.Connection | None = None
        self._sync_full: bool | None = None
        self._memory: dict[str, PendingRow] = {}  # accepted while the disk cannot take them
        self._memory_emissions: dict[str, Emission] = {}  # to mark durable once on disk
        self._reserve_in_use = False  # the ballast was released: the disk is for alarms only
        self._space_state = "ok"  # "ok", or which priorities are held in memory for space
        self._memory_lock = threading.Lock()
        self._rows = 0
        self._bytes = 0
        self._last_disk_retry = 0.0
        self._disk_fault: str | None = None
        self._unreleased: list[str] = []  # releases whose commit failed, retried next batch
        self._fault_announced = False
        self._last_failure_at = 0.0
        #: Seconds a failed disk must stay writable before recovery is announced.
        self.restore_after = 30.0
        self._thread: threading.Thread | None = None
        self._checkpoints: threading.Thread | None = None
        self._committed = threading.Event()  # set by the writer, cleared by the checkpointer
        self._closing = threading.Event()
        self._readers = threading.local()
        self.boot = 0
        self.counters = {
            "committed": 0,
            "evicted": 0,
            "released": 0,
            "batches": 0,
            "memory_fallback": 0,  # held in memory because the disk failed
            "shed_low": 0,  # held in memory to keep space for alarms
            "shed_normal": 0,
            "dropped": 0,  # discarded from memory over memory_max_events (never critical)
            "faults_folded": 0,
        }

    # ----------------------------------------------------------------- opening

    @property
    def ballast_path(self) -> Path:
        return self.path.with_name(self.path.name + ".reserve")

    def open(self) -> list[StorageReport]:
        """Open (recovering if needed) and start the writer. Returns what to report."""
        reports: list[StorageReport] = []
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = self._open_checked(reports)
            self._load_counters(self._conn)  # writes the boot counter: fails on a read-only disk
        except (sqlite3.Error, OSError) as exc:
            if self._conn is not None:
                self._conn.close()
            self._conn = None
            self._disk_fault = f"cannot open {self.path}: {exc}"
            self._fault_announced, self._last_failure_at = True, time.monotonic()
            if self.path.exists():
                self._load_counters_read_only()
            log.critical(
                "outbox: %s; events are kept in memory until the disk is usable", self._disk_fault
            )
            reports.append(
                StorageReport(
                    "agent.storage_failed",
                    {"path": str(self.path), "error": str(exc)},
                    Priority.CRITICAL,
                )
            )
        self.seqs.resume(self._seq_floor, self.boot)
        self.boot = self.seqs.boot
        if self._conn is not None:
            self._ensure_ballast()
        self._thread = threading.Thread(target=self._writer, name="outbox-writer", daemon=True)
        self._thread.start()
        self._checkpoints = threading.Thread(
            target=self._checkpointer, name="outbox-checkpoint", daemon=True
        )
        self._checkpoints.start()
        return reports

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        # Checkpoints run on their own thread (_checkpointer), never inside a commit: an
        # alarm's commit must not wait for the database file's fsync. They run at least
        # every _CHECKPOINT_EVERY seconds, which keeps the WAL small: on a nearly full SD
        # card a 4 MB WAL can be the last straw.
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute("PRAGMA journal_size_limit=1048576")
        # Command results wait here until the broker has them (a database from before
        # they were kept gets the table on its next open).
        conn.execute(
            "CREATE TABLE IF NOT EXISTS replies "
            "(id TEXT PRIMARY KEY, topic TEXT NOT NULL, body TEXT NOT NULL, created REAL NOT NULL)"
        )
        return conn

    def _open_checked(self, reports: list[StorageReport]) -> sqlite3.Connection:
        try:
            conn = self._connect()
            result = [row[0] for row in conn.execute("PRAGMA quick_check")]
            if result != ["ok"]:
                conn.close()
                raise sqlite3.DatabaseError("; ".join(str(r) for r in result[:3]))
            self._create_schema(conn)
            return conn
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "unable to open" in str(exc):
                raise
            return self._recover(exc, reports)

    def _recover(self, error: Exception, reports: list[StorageReport]) -> sqlite3.Connection:
        found = salvage_outbox(self.path)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        moved_to = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                os.replace(src, Path(str(moved_to) + suffix))
        # Seqs numbered before the damage and found nowhere: events known to be lost
        # unless they were delivered and pruned before it (their rows are gone too).
        numbered = range(min(found.seqs, default=found.next_seq), found.next_seq)
        unaccounted = len(numbered) - len(found.seqs)
        log.error(
            "outbox: %s is corrupt (%s); moved to %s; recovered %d pending events from "
            "%d pages (%d unreadable); %d numbered events not found",
            self.path,
            error,
            moved_to,
            len(found.pending),
            found.pages_read,
            found.pages_unreadable,
            unaccounted,
        )
        conn = self._connect()
        self._create_schema(conn)
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT OR IGNORE INTO events (id, rank, seq, kind, accepted, body, size) VALUES (?,?,?,?,?,?,?)",
            [(r.id, r.rank, r.seq, r.kind, r.accepted, r.body, len(r.body)) for r in found.pending],
        )
        # The numbering goes on after the damaged file's: a seq is never given out twice.
        conn.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (found.next_seq,))
        conn.execute("UPDATE meta SET value = ? WHERE key = 'boot'", (found.meta.get("boot", 0),))
        conn.execute("COMMIT")
        reports.append(
            StorageReport(
                "agent.storage_recovered",
                {
                    "path": str(self.path),
                    "moved_to": str(moved_to),
                    "error": str(error),
                    "salvaged": len(found.pending),
                    "published_found": len(found.published_ids),
                    "seq_range": [numbered.start, numbered.stop - 1] if numbered else None,
                    "unaccounted": unaccounted,
                    "pages_unreadable": found.pages_unreadable,
                },
                Priority.CRITICAL,
            )
        )
        return conn

    @staticmethod
    def _create_schema(conn: sqlite3.Connection) -> None:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'events'").fetchone():
            return
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("VACUUM")  # auto_vacuum only takes effect on an empty database after VACUUM
        # The column order is the record layout salvage.py reads from damaged pages.
        conn.execute(
            "CREATE TABLE events (id TEXT PRIMARY KEY, rank INTEGER NOT NULL, seq INTEGER NOT NULL, "
            "kind TEXT NOT NULL, accepted FLOAT NOT NULL, body TEXT NOT NULL, size INTEGER NOT NULL, "
            "published FLOAT)"
        )
        conn.execute("CREATE INDEX events_pending ON events(rank, seq) WHERE published IS NULL")
        conn.execute(
            "CREATE INDEX events_published ON events(published) WHERE published IS NOT NULL"
        )
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER)")
        conn.execute(
            "INSERT INTO meta VALUES ('schema', ?), ('next_seq', 1), ('boot', 0)", (SCHEMA_VERSION,)
        )

    def _load_counters(self, conn: sqlite3.Connection, *, writable: bool = True) -> None:
        """Sequence, boot and size counters from the database. Never moves the sequence
        backwards (events may already be numbered from memory), and counts this process's
        boot once: persisted when the disk allows, kept in memory until then."""
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        max_seq = conn.execute("SELECT max(seq) FROM events").fetchone()[0] or 0
        self._seq_floor = max(self._seq_floor, int(meta.get("next_seq", 1)), max_seq + 1)
        self._persisted_seq = max_seq
        if self._thread is not None:  # read again after a disk fault, while numbering
            self.seqs.raise_floor(self._seq_floor)
        self._rows, self._bytes = conn.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM events"
        ).fetchone()
        if self.boot == 0:
            self.boot = int(meta.get("boot", 0)) + 1
        if writable:
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('boot', ?)", (self.boot,))

    def _load_counters_read_only(self) -> None:
        """On a disk that cannot be written, still continue the numbering it holds."""
        try:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro&immutable=1", uri=True)
        except sqlite3.Error:
            return
        try:
            self._load_counters(conn, writable=False)
        except sqlite3.Error as exc:
            log.warning("outbox: cannot read counters from %s: %s", self.path, exc)
        finally:
            conn.close()

    def _ensure_ballast(self) -> None:
        """Pre-reserve disk space that can be given back when the disk fills up."""
        size = self.config.reserve_bytes
        if size <= 0 or (self.ballast_path.exists() and self.ballast_path.stat().st_size >= size):
            self._reserve_in_use = False
            return
        free = self._free_space()
        if (
            self._reserve_in_use
            and free is not None
            and free < size + self.config.shed_normal_below
        ):
            return  # not yet: filling the disk again would only fail the next commit
        try:
            with open(self.ballast_path, "wb") as f:
                chunk = b"\0" * min(size, 1 << 20)
                written = 0
                while written < size:
                    written += f.write(chunk[: size - written])
                f.flush()
                os.fsync(f.fileno())
            self._reserve_in_use = False
        except OSError as exc:
            log.warning(
                "outbox: could not reserve %d bytes at %s: %s", size, self.ballast_path, exc
            )
            with contextlib.suppress(OSError):
                self.ballast_path.unlink()

    # ------------------------------------------------------------------ API

    def next_seq(self) -> int:
        return self.seqs.next()

    def submit(self, emission: Emission, row: PendingRow | None = None) -> None:
        """Queue an event for commit. Never blocks."""
        self._queue.put(_Add(emission, row or PendingRow.of(emission.event)))

    def release(self, ids: Iterable[str]) -> None:
        """Mark events published (the centre has them). Never blocks."""
        self._queue.put(_Release(list(ids)))

    def keep_reply(self, reply: Reply) -> None:
        """Store a command result until :meth:`drop_reply`. Never blocks."""
        self._queue.put(
            _Statement(
                "INSERT OR IGNORE INTO replies VALUES (?, ?, ?, ?)",
                (reply.id, reply.topic, reply.body, reply.created),
            )
        )

    def drop_reply(self, reply_id: str) -> None:
        self._queue.put(_Statement("DELETE FROM replies WHERE id = ?", (reply_id,)))

    def pending_replies(self) -> list[Reply]:
        """Command results stored and not yet taken by the broker, oldest first."""
        return [
            Reply(*row)
            for row in self._reader_query(
                "SELECT id, topic, body, created FROM replies ORDER BY created"
            )
        ]

    def set_meta(self, key: str, value: int) -> None:
        self._queue.put(_Statement("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value)))

    def get_meta(self, key: str) -> int | None:
        row = self._reader_query("SELECT value FROM meta WHERE key = ?", (key,))
        return int(row[0][0]) if row else None

    def prune(self) -> None:
        """Drop published rows past the retention age and give the space back."""
        self._queue.put(_Prune())

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is committed (or failed over to memory)."""
        done = threading.Event()
        self._queue.put(_Barrier(done))
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Commit what is queued and stop. Call it after the publisher has stopped: numbers
        handed out but never stored are then free for the next run."""
        if self._thread is None:
            return
        self._queue.put(_Stop())
        self._thread.join(timeout)
        self._thread = None
        self._closing.set()
        if self._checkpoints is not None:
            self._checkpoints.join(timeout)
            self._checkpoints = None
        # Everything submitted is now stored or in memory; a number above both was never
        # sent either (the agent stops its publisher before its outbox).
        self.seqs.close(max(self._persisted_seq, self._memory_seq) + 1)
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._conn.close()
            self._conn = None
        reader = getattr(self._readers, "conn", None)
        if reader is not None:
            reader.close()

    @property
    def in_memory(self) -> int:
        return len(self._memory)

    @property
    def fault(self) -> str | None:
        return self._disk_fault

    def backlog(self) -> tuple[int, float | None]:
        """(pending events, accepted time of the oldest) including in-memory ones."""
        rows = self._reader_query(
            "SELECT count(*), min(accepted) FROM events WHERE published IS NULL"
        )
        count, oldest = rows[0] if rows else (0, None)
        with self._memory_lock:
            if self._memory:
                count += len(self._memory)
                mem_oldest = min(r.accepted for r in self._memory.values())
                oldest = mem_oldest if oldest is None else min(oldest, mem_oldest)
        return int(count), oldest

    def fetch_pending(
        self,
        after: tuple[int, int],
        limit: int,
        exclude: Callable[[str], bool] = lambda event_id: False,
    ) -> list[PendingRow]:
        """Pending events in send order (critical first, then oldest) after ``after``,
        leaving out those ``exclude`` names."""
        rows: list[PendingRow] = []
        cursor = after
        while len(rows) < limit:  # excluded rows are rare (a rewind): read on past them
            batch = self._reader_query(
                "SELECT id, rank, seq, kind, accepted, body FROM events "
                "WHERE published IS NULL AND (rank, seq) > (?, ?) ORDER BY rank, seq LIMIT ?",
                (cursor[0], cursor[1], limit),
            )
            rows.extend(PendingRow(*row) for row in batch if not exclude(row[0]))
            if len(batch) < limit:
                break
            cursor = (batch[-1][1], batch[-1][2])
        with self._memory_lock:
            if self._memory:
                rows.extend(r for r in self._memory.values() if r.key > after and not exclude(r.id))
                rows.sort(key=lambda r: r.key)
        return rows[:limit]

    def recent(self, limit: int = 50, pending_only: bool = False) -> list[dict[str, Any]]:
        where = "WHERE published IS NULL" if pending_only else ""
        rows = self._reader_query(
            f"SELECT id, kind, rank, seq, accepted, published, body FROM events {where} "  # noqa: S608 - fixed strings
            "ORDER BY accepted DESC LIMIT ?",
            (limit,),
        )
        return [
            {
                "id": r[0],
                "kind": r[1],
                "priority": Priority(r[2]).label,
                "seq": r[3],
                "accepted": r[4],
                "published": r[5],
                "body": r[6],
            }
            for r in rows
        ]

    def _reader_query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run a read on this thread's own connection (WAL readers never block the writer).

        While the writer has no database (a read-only disk), rows already on disk are
        still read, through an immutable connection, so they are sent in their turn."""
        writable = self._conn is not None
        if not writable and not self.path.exists():
            return []
        conn: sqlite3.Connection | None = getattr(self._readers, "conn", None)
        if conn is not None and getattr(self._readers, "writable", None) != writable:
            conn.close()  # the disk changed state: reopen in the matching mode
            conn = None
        try:
            if conn is None:
                mode = "mode=ro" if writable else "mode=ro&immutable=1"
                conn = sqlite3.connect(
                    f"file:{self.path}?{mode}",
                    uri=True,
                    isolation_level=None,
                    check_same_thread=False,
                    timeout=5,
                )
                self._readers.conn, self._readers.writable = conn, writable
            return conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            log.warning("outbox: read failed: %s", exc)
            if conn is not None:
                conn.close()
            self._readers.conn = None
            return []

    # ---------------------------------------------------------------- writer

    def _checkpointer(self) -> None:
        """Copy the WAL into the database file, off the commit path.

        PASSIVE: it never blocks the writer or a reader, and does what it can now; the
        next round does the rest. Its own short-lived connection, so a database the
        writer re-opened after a disk fault is the one checkpointed."""
        while not self._closing.wait(_CHECKPOINT_EVERY):
            if not self._committed.is_set() or self._conn is None:
                continue
            self._committed.clear()
            try:
                conn = sqlite3.connect(self.path, isolation_level=None, timeout=1)
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                finally:
                    conn.close()
            except sqlite3.Error as exc:  # the writer reports storage faults
                log.debug("outbox: checkpoint failed: %s", exc)

    def _writer(self) -> None:
        stop = False
        while not stop:
            degraded = bool(self._memory) or self._conn is None
            try:
                ops = [self._queue.get(timeout=_RETRY_DISK_EVERY if degraded else None)]
            except queue.Empty:
                ops = []
            # Let a thread woken with us run first: a critical event's submit is followed at
            # once by its publish, and the network thread putting it on the wire should not
            # wait for this commit's Python work to give up the interpreter.
            time.sleep(0)
            while len(ops) < 5000:
                try:
                    ops.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            adds: list[tuple[Emission, PendingRow]] = []
            releases: list[str] = []
            chores: list[_Statement] = []
            barriers: list[threading.Event] = []
            prune = False
            for op in ops:
                match op:
                    case _Add():
                        adds.append((op.emission, op.row))
                    case _Release():
                        releases.extend(op.ids)
                    case _Statement():
                        chores.append(op)
                    case _Prune():
                        prune = True
                    case _Barrier():
                        barriers.append(op.done)
                    case _Stop():
                        stop = True
            try:
                self._write_batch(adds, releases, chores, prune)
            except Exception:  # the writer must never die: log, keep events in memory
                log.exception("outbox: unexpected error in the writer")
                self._to_memory(adds, "unexpected writer error")
            # Whatever this batch held in memory: a critical event is sent before its commit,
            # so its receipt may be in this very batch (held as unconfirmed, it would go to
            # disk later as pending for good), and its seq must count as lost after a crash.
            # Here, after the batch's commit, so the mark's fdatasync never delays an alarm's.
            self._release_memory(releases)
            self.seqs.note_held(self._memory_seq)
            for barrier in barriers:
                barrier.set()

    def _write_batch(
        self,
        adds: list[tuple[Emission, PendingRow]],
        releases: list[str],
        chores: list[_Statement],
        prune: bool,
    ) -> None:
        degraded = bool(self._memory) or self._conn is None
        if degraded and time.monotonic() - self._last_disk_retry >= _RETRY_DISK_EVERY:
            self._retry_memory()
        self._announce_recovery()
        if not (adds or releases or chores or prune):
            return
        self._release_memory(releases)  # those held before this batch; see _writer for the rest
        if self._conn is None:
            self._to_memory(adds, self._disk_fault or "no database")
            # Rows on a read-only disk stay pending there: keep their releases until they
            # can be recorded (the publisher holds them back from re-sending meanwhile).
            self._unreleased.extend(releases)
            return
        # Releases whose update failed earlier are retried with this batch.
        releases, self._unreleased = self._unreleased + releases, []
        adds = self._keep_space_for_alarms(adds)
        rows = [row for _, row in adds]
        synced = any(row.rank <= self.config.synced_rank for row in rows)
        try:
            self._commit(rows, releases, chores, prune, synced)
        except sqlite3.Error as exc:
            error: sqlite3.Error = exc
            retried = False
            if self._disk_full(exc) and self._free_ballast():
                adds = self._keep_space_for_alarms(adds)
                rows = [row for _, row in adds]
                try:
                    self._commit(rows, releases, chores, prune, synced)
                    retried = True
                except sqlite3.Error as exc2:
                    error = exc2
            if not retried:
                self._unreleased = releases
                read_only = self._read_only()
                reason = self._describe_failure(error, read_only)
                if read_only:
                    # A filesystem that went read-only comes back only as a new mount
                    # (after fsck): the writer reopens the file when it retries.
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.close()
                    self._conn = None
                self._to_memory(adds, reason)
                return
        if self._disk_fault and not self._memory:
            self._storage_restored()
        for emission, _ in adds:
            emission.mark_durable()
        if rows:
            self.on_committed(min(r.key for r in rows))
        if releases:
            self.on_released(releases)

    def _commit(
        self,
        rows: list[PendingRow],
        releases: list[str],
        chores: list[_Statement],
        prune: bool,
        synced: bool,
    ) -> None:
        """One transaction; fsync'd (``synchronous=FULL``) when ``synced``, else only
        written (in WAL mode that survives a crash of the process, not a power cut)."""
        conn = self._conn
        assert conn is not None
        if self._sync_full is not synced:
            conn.execute("PRAGMA synchronous=FULL" if synced else "PRAGMA synchronous=NORMAL")
            self._sync_full = synced
        now = time.time()
        evicted: dict[str, int] = {}
        conn.execute("BEGIN IMMEDIATE")
        try:
            added = 0
            added_bytes = 0
            if rows:
                before = conn.total_changes
                conn.executemany(
                    "INSERT OR IGNORE INTO events (id, rank, seq, kind, accepted, body, size) VALUES (?,?,?,?,?,?,?)",
                    [(r.id, r.rank, r.seq, r.kind, r.accepted, r.body, len(r.body)) for r in rows],
                )
                added = conn.total_changes - before
                added_bytes = sum(len(r.body) for r in rows)
                top = max(r.seq for r in rows)
                if top > self._persisted_seq:
                    conn.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (top + 1,))
            released = 0
            if releases:
                before = conn.total_changes
                conn.executemany(
                    "UPDATE events SET published = ? WHERE id = ? AND published IS NULL",
                    [(now, i) for i in releases],
                )
                released = conn.total_changes - before
            for chore in chores:
                conn.execute(chore.sql, chore.params)
            rows_now, bytes_now = self._rows + added, self._bytes + added_bytes
            pruned = (0, 0)
            if prune:
                pruned = self._prune(conn, now)
                rows_now, bytes_now = rows_now - pruned[0], bytes_now - pruned[1]
            if rows_now > self.config.max_rows or bytes_now > self.config.max_bytes:
                evicted, freed_rows, freed_bytes, evicted_pending = self._evict(
                    conn, rows_now, bytes_now
                )
                rows_now, bytes_now = rows_now - freed_rows, bytes_now - freed_bytes
                released += evicted_pending
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        if rows:
            self._persisted_seq = max(self._persisted_seq, *(r.seq for r in rows))
        self._rows, self._bytes = rows_now, bytes_now
        self.counters["committed"] += added
        self.counters["released"] += released
        self.counters["batches"] += 1
        self._committed.set()
        if prune:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA incremental_vacuum")
        if evicted:
            n = sum(evicted.values())
            self.counters["evicted"] += n
            log.warning(
                "outbox: full (%d rows, %d bytes max); evicted %s",
                self.config.max_rows,
                self.config.max_bytes,
                evicted,
            )
            self.on_report(
                StorageReport(
                    "agent.outbox_evicted", {"evicted": evicted, "count": n, "from": "disk"}
                )
            )

    def _prune(self, conn: sqlite3.Connection, now: float) -> tuple[int, int]:
        cutoff = now - self.config.retention_hours * 3600
        count, size = conn.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM events WHERE published IS NOT NULL AND published <= ?",
            (cutoff,),
        ).fetchone()
        if count:
            conn.execute(
                "DELETE FROM events WHERE published IS NOT NULL AND published <= ?", (cutoff,)
            )
        return int(count), int(size)

    def _evict(
        self, conn: sqlite3.Connection, rows_now: int, bytes_now: int
    ) -> tuple[dict[str, int], int, int, int]:
        """Free space: published rows first, then pending lowest priority oldest first; never critical."""
        evicted: dict[str, int] = {}
        freed_rows = freed_bytes = evicted_pending = 0
        target_rows = int(self.config.max_rows * 0.95)
        target_bytes = int(self.config.max_bytes * 0.95)
        published = (
            "SELECT id, size FROM events WHERE published IS NOT NULL ORDER BY published LIMIT ?"
        )
        by_rank = (
            "SELECT id, size FROM events WHERE published IS NULL AND rank = ? ORDER BY seq LIMIT ?"
        )
        queries: list[tuple[str, str, tuple[int, ...]]] = [
            ("published", published, ()),
            *(
                (p.label, by_rank, (int(p),))
                for p in sorted(Priority, reverse=True)
                if p is not Priority.CRITICAL
            ),
        ]
        for label, sql, params in queries:
            while rows_now - freed_rows > target_rows or bytes_now - freed_bytes > target_bytes:
                victims = conn.execute(sql, (*params, 1000)).fetchall()
                if not victims:
                    break
                conn.executemany("DELETE FROM events WHERE id = ?", [(v[0],) for v in victims])
                freed_rows += len(victims)
                freed_bytes += sum(v[1] for v in victims)
                if label != "published":
                    evicted[label] = evicted.get(label, 0) + len(victims)
                    evicted_pending += len(victims)
        return evicted, freed_rows, freed_bytes, evicted_pending

    # ------------------------------------------------------- disk trouble

    @staticmethod
    def _disk_full(exc: sqlite3.Error) -> bool:
        """A full disk shows as SQLITE_FULL, or as an I/O error on a write SQLite cannot retry."""
        return exc.sqlite_errorcode & 0xFF in (_SQLITE_FULL, _SQLITE_IOERR)

    def _read_only(self) -> bool:
        """Is the state directory's filesystem read-only? ext4 remounts itself read-only
        after an error (``errors=remount-ro``) without always showing it in statvfs, so a
        write is tried."""
        probe = self.path.with_name(f".{self.path.name}.probe")
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        except OSError as exc:
            return exc.errno == errno.EROFS
        os.close(fd)
        with contextlib.suppress(OSError):
            probe.unlink()
        return False

    def _describe_failure(self, exc: sqlite3.Error, read_only: bool) -> str:
        if read_only or exc.sqlite_errorcode & 0xFF == _SQLITE_READONLY:
            return f"the filesystem of {self.path.parent} is read-only ({exc})"
        if exc.sqlite_errorcode & 0xFF == _SQLITE_FULL:
            return f"disk full ({exc})"
        return f"write failed: {exc}"

    def _free_space(self) -> int | None:
        try:
            st = os.statvfs(self.path.parent)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def _least_urgent_on_disk(self, free: int | None) -> Priority:
        """The least urgent priority the disk takes with ``free`` bytes left (see the
        module docstring)."""
        if self._reserve_in_use or (free is not None and free < self.config.shed_normal_below):
            return Priority.HIGH
        if free is not None and free < self.config.shed_low_below:
            return Priority.NORMAL
        return Priority.LOW

    def _keep_space_for_alarms(
        self, adds: list[tuple[Emission, PendingRow]]
    ) -> list[tuple[Emission, PendingRow]]:
        """Hold the priorities the disk does not take now in memory; return the rest."""
        free = self._free_space()
        least = self._least_urgent_on_disk(free)
        state = "ok" if least is Priority.LOW else f"{least.label} and more urgent only"
        if state != self._space_state:
            self._space_state = state
            log.warning("outbox: free space %s bytes; disk takes %s", free, state)
            self.on_report(
                StorageReport(
                    "agent.storage_space",
                    {
                        "path": str(self.path),
                        "free_bytes": free,
                        "reserve_in_use": self._reserve_in_use,
                        "on_disk": [p.label for p in Priority if p <= least],
                    },
                )
            )
        if least is Priority.LOW:
            return adds
        held = [(e, r) for e, r in adds if r.rank > least]
        if not held:
            return adds
        for _, row in held:
            key = f"shed_{Priority(row.rank).label}"
            self.counters[key] = self.counters.get(key, 0) + 1
        self._hold(held)
        return [(e, r) for e, r in adds if r.rank <= least]

    def _free_ballast(self) -> bool:
        try:
            self.ballast_path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.error("outbox: could not release the reserve file %s: %s", self.ballast_path, exc)
            return False
        self._reserve_in_use = True
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        log.critical(
            "outbox: disk full at %s; released the %d-byte reserve for critical and high events",
            self.path,
            self.config.reserve_bytes,
        )
        self.on_report(
            StorageReport(
                "agent.disk_full",
                {"path": str(self.path), "reserve_released": self.config.reserve_bytes},
                Priority.CRITICAL,
            )
        )
        return True

    def _to_memory(self, adds: list[tuple[Emission, PendingRow]], reason: str) -> None:
        """The disk failed: hold the batch in memory and report the fault."""
        if not adds:
            return
        self.counters["memory_fallback"] += len(adds)
        self._disk_fault = reason
        self._report_fault(reason)
        self._hold(adds)

    def _hold(self, adds: list[tuple[Emission, PendingRow]]) -> None:
        """Keep events in memory: delivered as usual, moved to disk when it takes them."""
        with self._memory_lock:
            for emission, row in adds:
                self._memory[row.id] = row
                self._memory_emissions[row.id] = emission
            dropped = self._trim_memory()
        self._memory_seq = max(self._memory_seq, *(row.seq for _, row in adds))
        if not self._last_disk_retry:
            self._last_disk_retry = time.monotonic()  # the first retry comes after a pause
        for emission, _ in adds:
            emission.mark_in_memory()
        self.on_committed(min(row.key for _, row in adds))
        if dropped:
            count = sum(dropped.values())
            self.counters["dropped"] += count
            log.error(
                "outbox: over %d events in memory; dropped %s",
                self.config.memory_max_events,
                dropped,
            )
            self.on_report(
                StorageReport(
                    "agent.outbox_evicted",
                    {"evicted": dropped, "count": count, "from": "memory"},
                    Priority.HIGH,
                )
            )

    def _trim_memory(self) -> dict[str, int]:
        """Over ``memory_max_events``: drop the least urgent, oldest first; never critical."""
        excess = len(self._memory) - self.config.memory_max_events
        if excess <= 0:
            return {}
        victims = sorted(
            (r for r in self._memory.values() if r.rank != Priority.CRITICAL),
            key=lambda r: (-r.rank, r.seq),
        )[:excess]
        dropped: dict[str, int] = {}
        for row in victims:
            del self._memory[row.id]
            self._memory_emissions.pop(row.id, None)
            label = Priority(row.rank).label
            dropped[label] = dropped.get(label, 0) + 1
        return dropped

    def _report_fault(self, reason: str) -> None:
        """Announce a storage failure once; a disk that keeps failing and recovering
        (each small commit that still fits) stays one announced fault."""
        self._last_failure_at = time.monotonic()
        if self._fault_announced:
            self.counters["faults_folded"] += 1
            log.warning("outbox: %s (holding events in memory)", reason)
            return
        self._fault_announced = True
        log.critical("outbox: %s; holding events in memory (not safe against power loss)", reason)
        self.on_report(
            StorageReport(
                "agent.storage_failed", {"path": str(self.path), "error": reason}, Priority.CRITICAL
            )
        )

    def _storage_restored(self) -> None:
        if self._disk_fault is not None:
            log.warning("outbox: storage is writable again")
        self._disk_fault = None

    def _announce_recovery(self) -> None:
        """Announce recovery once the disk has stayed writable for ``restore_after`` s."""
        if (
            self._fault_announced
            and self._disk_fault is None
            and time.monotonic() - self._last_failure_at >= self.restore_after
        ):
            self._fault_announced = False
            self.on_report(StorageReport("agent.storage_restored", {"path": str(self.path)}))

    def _release_memory(self, ids: list[str]) -> None:
        if not ids:
            return
        with self._memory_lock:
            for i in ids:
                self._memory.pop(i, None)
                self._memory_emissions.pop(i, None)

    def _retry_memory(self) -> None:
        """Move events held in memory back to disk once it works again."""
        self._last_disk_retry = time.monotonic()
        if self._conn is None:
            reports: list[StorageReport] = []
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._conn = self._open_checked(reports)
                self._load_counters(self._conn)
                for report in reports:  # a file damaged while it was unreachable
                    self.on_report(report)
            except (sqlite3.Error, OSError):
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
                return
        if self._reserve_in_use:
            self._ensure_ballast()  # the space is back once the reserve fits again
        least = self._least_urgent_on_disk(self._free_space())
        with self._memory_lock:
            rows = [r for r in self._memory.values() if r.rank <= least]
        releases, self._unreleased = self._unreleased, []
        try:
            self._commit(rows, releases, [], False, True)
        except sqlite3.Error:
            self._unreleased = releases + self._unreleased
            return
        with self._memory_lock:
            for row in rows:
                self._memory.pop(row.id, None)
                emission = self._memory_emissions.pop(row.id, None)
                if emission is not None:
                    emission.mark_durable()
        if releases:
            self.on_released(releases)
        self._ensure_ballast()
        if self._disk_fault and (rows or not self._memory):
            self._storage_restored()  # held events left wait for space, not for a fault
