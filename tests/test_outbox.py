"""The outbox on its own: durability, sequence numbers, eviction, corruption, full disk."""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from agent.config import OutboxConfig
from agent.delivery.outbox import Outbox, StorageReport
from agent.delivery.sequence import BLOCK
from agent.driver import Emission, Fate
from agent.event import Event, Priority
from agent.testing.agent import DEADLINE


class Box:
    """An outbox with its callbacks recorded."""

    def __init__(self, path: Path, **config: int | float) -> None:
        self.reports: list[StorageReport] = []
        self.released: list[str] = []
        self.committed = threading.Event()
        self.outbox = Outbox(
            path,
            OutboxConfig(**config),  # type: ignore[arg-type]
            on_committed=lambda key: self.committed.set(),
            on_released=self.released.extend,
            on_report=self.reports.append,
        )
        self.reports.extend(self.outbox.open())

    def add(
        self, kind: str = "test.event", priority: Priority = Priority.NORMAL, size: int = 0
    ) -> Emission:
        e = Emission(
            Event(
                kind=kind,
                source="t",
                priority=priority,
                site="s",
                device="d",
                seq=self.outbox.next_seq(),
                payload={"pad": "x" * size},
            )
        )
        self.outbox.submit(e)
        return e

    def fill_disk(self) -> sqlite3.Connection:
        """Commit what is queued, then let the database grow no more: every commit that
        needs a new page fails with SQLITE_FULL, as on a full disk. Returns the writer's
        connection (``PRAGMA max_page_count = 1000000`` frees the disk again)."""
        self.outbox.flush()
        conn = self.outbox._conn
        assert conn is not None
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages + 2}")
        return conn

    def pending(self) -> list[str]:
        return [r.id for r in self.outbox.fetch_pending((-1, -1), 1_000_000)]

    def kinds(self) -> list[str]:
        return [r.kind for r in self.reports]


def test_submit_commits_and_marks_durable(tmp_path: Path) -> None:
    box = Box(tmp_path / "o.db")
    emissions = [box.add() for _ in range(500)]
    assert box.outbox.flush()
    assert all(e.is_durable for e in emissions)
    assert box.pending() == [e.event.id for e in emissions]
    box.outbox.close()


def test_pending_order_is_critical_first_then_oldest(tmp_path: Path) -> None:
    box = Box(tmp_path / "o.db")
    low = box.add(priority=Priority.LOW)
    normal = box.add()
    critical = box.add(priority=Priority.CRITICAL)
    high = box.add(priority=Priority.HIGH)
    box.outbox.flush()
    assert box.pending() == [critical.event.id, high.event.id, normal.event.id, low.event.id]
    box.outbox.close()


def test_release_marks_published_and_survives_reopen_with_seq_and_boot(tmp_path: Path) -> None:
    box = Box(tmp_path / "o.db")
    a, b = box.add(), box.add()
    box.outbox.flush()
    box.outbox.release([a.event.id])
    box.outbox.flush()
    assert box.released == [a.event.id]
    assert box.pending() == [b.event.id]
    boot = box.outbox.boot
    box.outbox.close()
    again = Box(tmp_path / "o.db")
    assert again.pending() == [b.event.id]
    assert again.outbox.next_seq() == b.event.seq + 1
    assert again.outbox.boot == boot + 1
    again.outbox.close()


def test_eviction_spares_critical_and_takes_lowest_priority_oldest_first(tmp_path: Path) -> None:
    box = Box(tmp_path / "o.db", max_rows=100)
    critical = [box.add(priority=Priority.CRITICAL) for _ in range(60)]
    normal = [box.add() for _ in range(30)]
    low = [box.add(priority=Priority.LOW) for _ in range(30)]
    box.outbox.flush()
    pending = set(box.pending())
    assert {e.event.id for e in critical} <= pending, "a critical event was evicted"
    assert not {e.event.id for e in low[:20]} & pending, (
        "oldest low-priority events should go first"
    )
    assert {e.event.id for e in normal} <= pending
    assert "agent.outbox_evicted" in box.kinds()
    # Batching decides how many reports there are; together they account for every eviction.
    reports = [r.payload["evicted"] for r in box.reports if r.kind == "agent.outbox_evicted"]
    assert all(set(r) == {"low"} for r in reports)
    assert sum(r["low"] for r in reports) == sum(1 for e in low if e.event.id not in pending)
    box.outbox.close()


def test_corrupt_database_is_moved_aside_and_replaced(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    path.write_bytes(b"this is not a database" * 500)
    box = Box(path)
    assert box.kinds() == ["agent.storage_recovered"]
    moved = Path(box.reports[0].payload["moved_to"])
    assert moved.exists() and moved.read_bytes().startswith(b"this is not")
    e = box.add(priority=Priority.CRITICAL)
    box.outbox.flush()
    assert e.is_durable and box.pending() == [e.event.id]
    box.outbox.close()


def test_truncated_database_salvages_readable_pending_rows(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    box = Box(path)
    kept = [box.add(size=200) for _ in range(2000)]
    box.outbox.flush()
    box.outbox.close()
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size * 6 // 10)  # a copy or a power cut that left the file short
    again = Box(path)
    assert again.kinds() == ["agent.storage_recovered"]
    salvaged = again.reports[0].payload["salvaged"]
    assert 0 < salvaged < len(kept)
    pending = again.pending()
    assert len(pending) == salvaged
    assert set(pending) <= {e.event.id for e in kept}
    e = again.add(priority=Priority.CRITICAL)
    again.outbox.flush()
    assert e.is_durable
    again.outbox.close()


def test_unwritable_state_dir_falls_back_to_memory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    box = Box(blocker / "sub" / "o.db")  # parent is a file: cannot be created, even by root
    assert box.kinds() == ["agent.storage_failed"]
    e = box.add(priority=Priority.CRITICAL)
    box.outbox.flush()
    assert e.fate is Fate.MEMORY and not e.is_durable, "held in memory, and said so"
    assert box.pending() == [e.event.id]
    assert box.outbox.backlog()[0] == 1
    box.outbox.release([e.event.id])
    box.outbox.flush()
    assert box.pending() == []
    box.outbox.close()


def test_full_disk_keeps_accepting_and_recovers(tmp_path: Path) -> None:
    box = Box(tmp_path / "o.db", reserve_bytes=0)
    conn = box.fill_disk()
    emissions = [box.add(size=4000) for _ in range(20)]
    critical = box.add(priority=Priority.CRITICAL, size=4000)
    box.outbox.flush()
    everything = [*emissions, critical]
    assert all(e.fate is not None for e in everything), "every event's fate is decided"
    held = [e for e in everything if e.fate is Fate.MEMORY]
    assert held and len(held) == box.outbox.in_memory, (
        "events held in memory are said so, and counted"
    )
    assert not any(e.is_durable for e in held)
    assert "agent.storage_failed" in box.kinds()
    assert critical.event.id in box.pending()
    assert box.kinds().count("agent.storage_failed") == 1, "one announcement per fault"
    conn.execute("PRAGMA max_page_count = 1000000")
    box.outbox.restore_after = 0.2
    box.outbox._last_disk_retry = 0.0
    box.add()
    box.outbox.flush()
    assert box.outbox.in_memory == 0 and box.outbox.fault is None
    assert all(e.is_durable and e.fate is Fate.DURABLE for e in everything), (
        "on disk once it takes them"
    )
    assert "agent.storage_restored" not in box.kinds(), "announced only once the disk stays good"
    time.sleep(0.3)
    box.outbox.flush()
    assert box.kinds().count("agent.storage_restored") == 1
    assert len(box.pending()) == 22
    box.outbox.close()


def test_an_alarm_released_in_the_batch_that_fails_to_store_it_stays_released(
    tmp_path: Path,
) -> None:
    """A critical event is sent before its commit, so its receipt can reach the writer in
    the same batch as the event itself. If the disk refuses that batch, the event must not
    wait in memory as if unconfirmed: moved to disk later, it would stay pending for good."""
    box = Box(tmp_path / "o.db", reserve_bytes=0)
    conn = box.fill_disk()
    for _ in range(3):
        box.add(size=4000)
    box.outbox.flush()
    with box.outbox._memory_lock:  # the writer stops in its next hold: the queue fills
        box.add(size=4000)
        time.sleep(0.2)
        alarm = box.add(priority=Priority.CRITICAL, size=4000)
        box.outbox.release([alarm.event.id])  # its receipt, before the writer saw the add
    box.outbox.flush()
    assert alarm.event.id not in box.pending(), "released: not held in memory"
    conn.execute("PRAGMA max_page_count = 1000000")
    box.outbox._last_disk_retry = time.monotonic()  # the disk works, no retry due yet
    box.add()
    box.outbox.flush()
    box.outbox._last_disk_retry = 0.0  # now the held events go back to disk
    box.add()
    box.outbox.flush()
    assert box.outbox.in_memory == 0
    assert alarm.event.id not in box.pending(), "a released alarm came back as pending"
    box.outbox.close()


def test_retention_prunes_published_rows_only(tmp_path: Path) -> None:
    box = Box(tmp_path / "o.db", retention_hours=0.0)
    a, b = box.add(), box.add()
    box.outbox.flush()
    box.outbox.release([a.event.id])
    box.outbox.prune()
    box.outbox.flush()
    ids = [r["id"] for r in box.outbox.recent(10)]
    assert ids == [b.event.id]
    box.outbox.close()


@pytest.mark.parametrize("count", [1, 3000])
def test_group_commit_of_bursts(tmp_path: Path, count: int) -> None:
    box = Box(tmp_path / "o.db")
    emissions = [box.add() for _ in range(count)]
    assert emissions[-1].wait_durable(DEADLINE)
    assert box.outbox.counters["committed"] == count
    assert box.outbox.counters["batches"] <= count
    box.outbox.close()


def _snapshot(src: Path, dest: Path) -> Path:
    """The outbox's files as a ``kill -9`` at this instant would leave them on disk."""
    dest.mkdir()
    for path in src.parent.iterdir():
        if path.name.startswith(src.stem):
            shutil.copyfile(path, dest / path.name)
    return dest / src.name


def test_a_crash_never_gives_a_used_seq_out_again(tmp_path: Path) -> None:
    """Critical events are numbered and published before their commit: after a crash the
    restart must number above them, and say which numbers it skipped."""
    box = Box(tmp_path / "live" / "o.db")
    committed = [box.add() for _ in range(3)]
    assert box.outbox.flush()
    on_the_wire = [box.outbox.next_seq() for _ in range(5)]  # published, never committed
    crashed = _snapshot(box.outbox.path, tmp_path / "after-crash")
    box.outbox.close()

    again = Box(crashed)
    fresh = again.outbox.next_seq()
    assert fresh > max(on_the_wire), f"seq {fresh} given out again after a crash"
    first, last = again.outbox.seqs.skipped or (0, 0)
    assert first == committed[-1].event.seq + 1 and last == fresh - 1
    assert again.outbox.seqs.resumed_at == fresh
    again.outbox.close()


def test_a_crash_while_events_are_held_in_memory_shows_them_as_lost(tmp_path: Path) -> None:
    """Numbers of events the full disk could not take are lost with the process: the restart
    must not announce them as skipped (reserved but unused), or the centre never counts them."""
    box = Box(tmp_path / "live" / "o.db", reserve_bytes=0)
    stored = box.add()
    box.fill_disk()
    emitted = [box.add(size=4000) for _ in range(10)]
    box.outbox.flush()
    held = {e.event.seq for e in emitted if e.fate is Fate.MEMORY}
    assert held and max(held) == emitted[-1].event.seq, "the last events are memory-only"
    crashed = _snapshot(box.outbox.path, tmp_path / "after-crash")
    box.outbox.close()

    again = Box(crashed)
    fresh = again.outbox.next_seq()
    assert fresh > max(held)
    first, last = again.outbox.seqs.skipped or (fresh, fresh - 1)
    assert first == max(held) + 1 and last == fresh - 1, (
        f"skipped {first}..{last} hides events held in memory {sorted(held)}"
    )
    on_disk = {r.seq for r in again.outbox.fetch_pending((-1, -1), 1000)}
    lost = set(range(stored.event.seq + 1, first)) - on_disk
    assert lost == held - on_disk and lost, "every number the centre sees missing was an event"
    again.outbox.close()


def test_seq_survives_the_loss_of_the_outbox_file(tmp_path: Path) -> None:
    box = Box(tmp_path / "o.db")
    last = [box.add() for _ in range(5)][-1].event.seq
    box.outbox.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{box.outbox.path}{suffix}").unlink(missing_ok=True)
    again = Box(tmp_path / "o.db")
    assert again.outbox.next_seq() == last + 1, "the numbering restarted with a new outbox file"
    assert again.outbox.boot == box.outbox.boot + 1, (
        "the boot counter restarted with a new outbox file"
    )
    again.outbox.close()


def test_a_clean_stop_leaves_no_gap_and_blocks_are_reserved_ahead(tmp_path: Path) -> None:
    box = Box(tmp_path / "o.db")
    seqs = [box.add().event.seq for _ in range(3 * BLOCK)]  # crosses several blocks
    assert seqs == list(range(1, 3 * BLOCK + 1))
    mark = int((tmp_path / "o.seq").read_text().split()[0])
    assert mark > seqs[-1], "every number handed out is below the durable mark"
    box.outbox.close()
    assert int((tmp_path / "o.seq").read_text().split()[0]) == seqs[-1] + 1
    again = Box(tmp_path / "o.db")
    assert again.outbox.seqs.skipped is None
    assert again.outbox.next_seq() == seqs[-1] + 1
    again.outbox.close()


def test_salvage_reads_past_a_damaged_page(tmp_path: Path) -> None:
    """4 KiB overwritten in the middle of the file costs only the rows on those pages."""
    path = tmp_path / "o.db"
    box = Box(path)
    kept = [box.add(size=200) for _ in range(2000)]
    box.outbox.flush()
    box.outbox.close()
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2 + 1000)  # not page aligned: two pages damaged
        f.write(os.urandom(4096))
    again = Box(path)
    assert again.kinds() == ["agent.storage_recovered"]
    report = again.reports[0].payload
    pending = set(again.pending())
    assert pending <= {e.event.id for e in kept}
    # A 4096-byte page holds about 9 of these rows: two damaged pages cost at most ~20.
    assert len(pending) >= len(kept) - 30, f"only {len(pending)} of {len(kept)} rows recovered"
    assert report["salvaged"] == len(pending)
    assert report["unaccounted"] == len(kept) - len(pending), "the loss is counted exactly"
    assert report["seq_range"] == [1, len(kept)]
    # The numbering goes on after the damaged file's.
    assert again.add().event.seq == len(kept) + 1
    again.outbox.close()


def test_salvage_reads_rows_only_in_the_write_ahead_log(tmp_path: Path) -> None:
    """A crash before a checkpoint leaves the newest rows only in the -wal file."""
    path = tmp_path / "o.db"
    box = Box(path)
    older = [box.add(size=200) for _ in range(1000)]
    box.outbox.flush()
    box.outbox.close()  # checkpointed into the database file
    box = Box(path)
    newest = [box.add(priority=Priority.CRITICAL, size=100) for _ in range(50)]
    box.outbox.flush()
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    for suffix in ("", "-wal"):  # the files as a crash leaves them
        shutil.copy(str(path) + suffix, str(crashed / "o.db") + suffix)
    box.outbox.close()
    size = (crashed / "o.db").stat().st_size
    with open(crashed / "o.db", "r+b") as f:
        f.seek(size // 3)
        f.write(os.urandom(8192))
    again = Box(crashed / "o.db")
    assert again.kinds() == ["agent.storage_recovered"]
    pending = set(again.pending())
    assert {e.event.id for e in newest} <= pending, "rows in the log were not recovered"
    assert len(pending & {e.event.id for e in older}) >= len(older) - 40
    again.outbox.close()


def test_low_space_keeps_the_disk_for_alarms(tmp_path: Path) -> None:
    """Below the thresholds low, then normal events are held in memory, said so and counted."""
    huge = 1 << 60  # "free space is always below the threshold"
    box = Box(tmp_path / "o.db", shed_low_below=huge)
    low, normal = box.add(priority=Priority.LOW), box.add(priority=Priority.NORMAL)
    box.outbox.flush()
    assert (low.fate, normal.fate) == (Fate.MEMORY, Fate.DURABLE)
    assert box.outbox.counters["shed_low"] == 1 and box.outbox.fault is None
    box.outbox.close()

    box = Box(tmp_path / "o2.db", shed_low_below=huge, shed_normal_below=huge)
    events = {p: box.add(priority=p) for p in Priority}
    box.outbox.flush()
    assert {p: e.fate for p, e in events.items()} == {
        Priority.CRITICAL: Fate.DURABLE,
        Priority.HIGH: Fate.DURABLE,
        Priority.NORMAL: Fate.MEMORY,
        Priority.LOW: Fate.MEMORY,
    }
    space = [r.payload for r in box.reports if r.kind == "agent.storage_space"]
    assert space and space[0]["on_disk"] == ["critical", "high"], space
    assert set(box.pending()) == {e.event.id for e in events.values()}, "held events are still sent"
    box.outbox.close()


def test_memory_is_bounded_and_never_drops_critical_events(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    box = Box(blocker / "sub" / "o.db", memory_max_events=100)  # no disk: everything in memory
    low = [box.add(priority=Priority.LOW) for _ in range(150)]
    critical = [box.add(priority=Priority.CRITICAL) for _ in range(120)]
    box.outbox.flush()
    pending = set(box.pending())
    assert {e.event.id for e in critical} <= pending, "a critical event was dropped"
    assert box.outbox.counters["dropped"] == 150
    assert not {e.event.id for e in low} & pending
    dropped = [r.payload for r in box.reports if r.kind == "agent.outbox_evicted"]
    assert sum(d["count"] for d in dropped) == 150 and all(d["from"] == "memory" for d in dropped)
