"""Storage faults: disk full, a corrupt or truncated outbox, a read-only state directory."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.testing.broker import Broker
from tests.faults.harness import Emitter, Rig, fill_disk, remount
from tests.support.proxy import TcpProxy

pytestmark = pytest.mark.faults

GATE = {"gate": {"type": "simulated", "kind": "gate.alarm", "priority": "high", "rate": 200.0}}
RESERVE = 256 * 1024


def _kinds(rig: Rig) -> set[str]:
    return {e["kind"] for e in rig.recorder.events()}


def _disk_full_run(
    tmp_path: Path, broker: Broker, small_fs: Path | None
) -> tuple[Rig, dict[str, Any]]:
    """Fill the disk under a loaded agent for 6 s, free it, and return what happened."""
    state = small_fs / "state" if small_fs else tmp_path / "state"
    rig = Rig(tmp_path, broker, drivers=GATE, state_dir=state, outbox={"reserve_bytes": RESERVE})
    if small_fs is None:  # no mount here: a per-file size limit makes writes fail the same way
        rig.agent.file_size_limit = 2 * 1024 * 1024
    rig.start()
    steady = Emitter(
        rig.agent,
        rig.ledger,
        kind="panic.pressed",
        priorities=("critical", "normal"),
        rate=40,
        persist=True,
    ).start()
    try:
        time.sleep(1.0)
        filled = fill_disk(small_fs) if small_fs else 0
        full_at = len(rig.ledger.accepted)
        time.sleep(4.0)  # long enough to use up the reserve and fall back to memory
        during = [
            a for a in list(rig.ledger.accepted.values())[full_at:] if a.priority == "critical"
        ]
        in_memory = rig.agent.status()["backlog"]["in_memory"]
        if small_fs:
            (small_fs / "filler").unlink()
        rig.ledger.fault_cleared()
        time.sleep(1.0)
        steady.stop()
        rig.quiesce()
        delivered = rig.wait_delivered(rig.ledger.expected_ids(), timeout=30)
        try:
            rig.wait_drained(8)
            drained = True
        except AssertionError:
            drained = False
        final = rig.agent.status()
        rig.agent.terminate()
    finally:
        steady.stop()
        rig.close()
    rig.ledger.read_outbox(rig.db_path)
    rig.wait_delivered(rig.ledger.expected_ids(), timeout=10)
    reported = _kinds(rig) & {"agent.disk_full", "agent.storage_failed", "agent.storage_restored"}
    return rig, {
        "criticals_accepted_while_full": len(during),
        "held_in_memory": in_memory,
        "filler_bytes": filled,
        "reported": sorted(reported),
        "delivered_before_stop": delivered,
        "drained_after_free": drained,
        "stuck_backlog": final["backlog"]["count"],
        "storage_fault_after_free": final["storage"]["fault"],
        "storage_reports": sum(
            1 for e in rig.recorder.events() if e["kind"].startswith("agent.storage_")
        ),
    }


def test_disk_full_while_events_arrive(
    tmp_path: Path,
    fault_broker: Broker,
    small_fs: Path | None,
    fault_matrix: Callable[[dict[str, Any]], None],
) -> None:
    rig, notes = _disk_full_run(tmp_path, fault_broker, small_fs)
    verdict = rig.ledger.verdict(rig.recorder)
    fault_matrix(verdict.row("disk full" + ("" if small_fs else " (RLIMIT_FSIZE)"), 1, **notes))
    verdict.assert_promise()
    # 4 s full at 20 critical emits/s: at least half of them must be accepted.
    assert notes["criticals_accepted_while_full"] >= 40, (
        "critical events must still be accepted while the disk is full"
    )
    assert {"agent.disk_full", "agent.storage_failed"} & set(notes["reported"]), (
        "the disk fault was not reported to the centre"
    )


def test_backlog_drains_once_the_disk_is_freed(
    tmp_path: Path, fault_broker: Broker, small_fs: Path | None
) -> None:
    _rig, notes = _disk_full_run(tmp_path, fault_broker, small_fs)
    assert notes["drained_after_free"], (
        f"backlog stuck at {notes['stuck_backlog']} events; storage fault: {notes['storage_fault_after_free']}"
    )


def test_corrupt_outbox_at_start(
    tmp_path: Path, fault_broker: Broker, fault_matrix: Callable[[dict[str, Any]], None]
) -> None:
    rig = Rig(tmp_path, fault_broker)
    rig.state_dir.mkdir(parents=True)
    rig.db_path.write_bytes(b"SQLite format 3\x00" + os.urandom(64 * 1024))
    rig.start()
    try:
        burst = Emitter(
            rig.agent,
            rig.ledger,
            kind="panic.pressed",
            priorities=("critical", "high", "normal"),
            limit=300,
        ).start()
        burst.thread.join(30)
        verdict = rig.finish()
    finally:
        rig.close()
    moved = sorted(p.name for p in rig.state_dir.glob("outbox.db.corrupt-*"))
    fault_matrix(verdict.row("corrupt outbox at start", 1, moved_aside=len(moved)))
    verdict.assert_promise()
    assert "agent.storage_recovered" in _kinds(rig)
    assert moved, "the corrupt file should be kept aside for inspection"


def _restart_with_damaged_outbox(
    tmp_path: Path,
    broker: Broker,
    damage: Callable[[Rig], None],
    priorities: tuple[str, ...],
    limit: int,
    *,
    after: int,
) -> Rig:
    """Accept ``limit`` events while the broker is unreachable (all pending in the outbox),
    stop the agent, ``damage`` its files, start it again with the broker back, accept
    ``after`` more and wait until everything left is delivered."""
    with TcpProxy(broker.host, broker.port) as proxy:
        proxy.refuse()
        rig = Rig(tmp_path, broker, mqtt_port=proxy.port)
        rig.start()
        try:
            Emitter(
                rig.agent, rig.ledger, kind="fault.before", priorities=priorities, limit=limit
            ).start().thread.join(60)
            rig.agent.terminate()
            damage(rig)
            proxy.set_pass()
            rig.agent.start()
            Emitter(
                rig.agent,
                rig.ledger,
                kind="fault.after",
                priorities=("critical", "normal"),
                limit=after,
            ).start().thread.join(60)
            rig.wait_drained()
            rig.agent.terminate()
        finally:
            rig.close()
    return rig


def test_truncated_outbox_at_start(
    tmp_path: Path, fault_broker: Broker, fault_matrix: Callable[[dict[str, Any]], None]
) -> None:
    pending_before: set[str] = set()

    def truncate(rig: Rig) -> None:
        pending_before.update(rig.ledger.accepted)
        os.truncate(rig.db_path, rig.db_path.stat().st_size * 6 // 10)

    rig = _restart_with_damaged_outbox(
        tmp_path, fault_broker, truncate, ("normal", "critical"), 400, after=300
    )
    # What the truncation destroyed cannot be delivered; everything salvaged or accepted since must be.
    rig.ledger.read_outbox(rig.db_path)
    destroyed = pending_before - set(rig.ledger.committed)
    for event_id in destroyed:
        del rig.ledger.accepted[event_id]
    rig.wait_delivered(rig.ledger.expected_ids(), timeout=10)
    verdict = rig.ledger.verdict(rig.recorder)
    recovered = [e for e in rig.recorder.events("agent.storage_recovered")]
    fault_matrix(
        verdict.row(
            "truncated outbox at start",
            1,
            destroyed_by_truncation=len(destroyed),
            pending_before=len(pending_before),
            salvaged=recovered[0]["payload"]["salvaged"] if recovered else None,
        )
    )
    verdict.assert_promise()
    assert recovered, "the recovery was not reported to the centre"


PANIC = {
    "panic": {"type": "simulated", "kind": "panic.pressed", "priority": "critical", "rate": 0.0}
}


def _read_only_run(
    rig: Rig, small_fs: Path, fault_matrix: Callable[[dict[str, Any]], None], fault: str
) -> None:
    """Start on the read-only disk, press the panic button, make the disk writable again."""
    try:
        rig.agent.start()
        rig.agent.wait_for(lambda s: s["storage"]["fault"] is not None, 10, "the storage fault")
        replies = [rig.agent.simulate("panic") for _ in range(5)]
        assert all(r.get("ok") for r in replies), (
            f"the panic button driver is not running: {replies[0]}"
        )
        presses = [r["result"]["ids"][0] for r in replies]
        steady = Emitter(
            rig.agent, rig.ledger, kind="fault.readonly", priorities=("critical", "normal"), rate=40
        ).start()
        time.sleep(2.0)
        in_memory = rig.agent.status()["backlog"]["in_memory"]
        assert rig.wait_delivered(presses, timeout=10), (
            "panic presses on a read-only disk did not reach the centre"
        )
        remount(small_fs, "rw")
        rig.agent.wait_for(
            lambda s: s["storage"]["fault"] is None and s["backlog"]["in_memory"] == 0,
            30,
            "the outbox back on disk",
        )
        rig.ledger.fault_cleared()
        steady.stop()
        verdict = rig.finish()
    finally:
        remount(small_fs, "rw")
        rig.close()
    reported = _kinds(rig) & {"agent.storage_failed", "agent.storage_restored"}
    fault_matrix(verdict.row(fault, 1, held_in_memory=in_memory, reported=sorted(reported)))
    verdict.assert_promise()
    assert "agent.storage_failed" in reported


def test_fresh_read_only_state_directory(
    tmp_path: Path,
    fault_broker: Broker,
    small_fs: Path | None,
    fault_matrix: Callable[[dict[str, Any]], None],
) -> None:
    if small_fs is None:
        pytest.skip("needs a mount to make the state directory read-only for root")
    rig = Rig(tmp_path, fault_broker, drivers={**GATE, **PANIC}, state_dir=small_fs / "state")
    remount(small_fs, "ro")
    rig.recorder.start()  # the centre is listening before the agent starts
    _read_only_run(rig, small_fs, fault_matrix, "read-only state dir (new)")


def test_state_directory_turned_read_only(
    tmp_path: Path,
    fault_broker: Broker,
    small_fs: Path | None,
    fault_matrix: Callable[[dict[str, Any]], None],
) -> None:
    """An SD card the kernel remounted read-only after errors: the outbox exists but can't be written."""
    if small_fs is None:
        pytest.skip("needs a mount to make the state directory read-only for root")
    rig = Rig(tmp_path, fault_broker, drivers={**GATE, **PANIC}, state_dir=small_fs / "state")
    rig.start()  # a first run on a writable disk creates the outbox and the driver folders
    rig.agent.terminate()
    remount(small_fs, "ro")
    _read_only_run(rig, small_fs, fault_matrix, "read-only state dir (existing outbox)")


# ------------------------------------------------------------------------------------------
# "Accepted" means durable, or says otherwise: each fault below checks that every event
# reported durable is delivered, every event reported held in memory is counted, and the
# centre's view of loss (seq gaps and the recovery event) equals the true loss.


def _seq_gaps(rig: Rig) -> tuple[int, int]:
    """(seqs never seen, seqs seen under two different ids) in what the centre received.

    Seqs an ``agent.started`` announced as skipped (reserved by the run before a crash,
    held by no stored event) are not gaps: the centre is told they carry nothing."""
    ids_by_seq: dict[int, set[str]] = {}
    skipped: set[int] = set()
    for message in list(rig.recorder.messages):
        if "/events/" in message.topic:
            body = message.json()
            ids_by_seq.setdefault(body["seq"], set()).add(body["id"])
            if body["kind"] == "agent.started" and body["payload"].get("seq_skipped"):
                first, last = body["payload"]["seq_skipped"]
                skipped.update(range(first, last + 1))
    reused = sum(1 for ids in ids_by_seq.values() if len(ids) > 1)
    missing = set(range(1, max(ids_by_seq) + 1)) - ids_by_seq.keys() - skipped
    return len(missing), reused


def test_kill_while_the_disk_is_full_loses_only_events_said_to_be_in_memory(
    tmp_path: Path,
    fault_broker: Broker,
    small_fs: Path | None,
    fault_matrix: Callable[[dict[str, Any]], None],
) -> None:
    if small_fs is None:
        pytest.skip("needs a mount to fill a small filesystem")
    outbox = {
        "reserve_bytes": 2 * 1024 * 1024,
        "shed_low_below": 3 * 1024 * 1024,
        "shed_normal_below": 2 * 1024 * 1024,
    }
    with TcpProxy(fault_broker.host, fault_broker.port) as proxy:
        proxy.refuse()  # the broker is down: everything waits in the outbox
        rig = Rig(
            tmp_path,
            fault_broker,
            state_dir=small_fs / "state",
            mqtt_port=proxy.port,
            outbox=outbox,
        )
        rig.start()
        steady = Emitter(
            rig.agent,
            rig.ledger,
            kind="fault.full",
            priorities=("critical", "normal", "low", "high"),
            rate=80,
            persist=True,
        ).start()
        try:
            time.sleep(1.0)
            fill_disk(small_fs)
            time.sleep(4.0)
            steady.stop()
            rig.ledger.forget_held()
            rig.agent.kill()  # while full: what was only in memory dies with the process
            (small_fs / "filler").unlink()
            proxy.set_pass()
            rig.agent.start()
            rig.wait_drained()
            rig.agent.terminate()
        finally:
            steady.stop()
            rig.close()
    rig.ledger.read_outbox(rig.db_path)
    rig.wait_delivered(rig.ledger.expected_ids(), timeout=10)
    verdict = rig.ledger.verdict(rig.recorder)
    held = rig.ledger.held.values()
    held_by_priority = {
        p: sum(1 for a in held if a.priority == p) for p in ("critical", "high", "normal", "low")
    }
    gaps, reused = _seq_gaps(rig)
    fault_matrix(
        verdict.row(
            "disk full, broker down, kill -9 while full",
            1,
            held_in_memory=held_by_priority,
            seq_gaps=gaps,
            seq_reused=reused,
            reported=sorted(
                _kinds(rig) & {"agent.disk_full", "agent.storage_space", "agent.storage_failed"}
            ),
        )
    )
    verdict.assert_promise(order=False)
    assert held_by_priority["critical"] == held_by_priority["high"] == 0, (
        f"the space kept for alarms did not hold them: {held_by_priority}"
    )
    assert held_by_priority["low"] > 0, "low-priority events were not shed while the disk was full"
    assert {"agent.disk_full", "agent.storage_space"} <= _kinds(rig)
    assert reused == 0, "a seq was given to two different events"
    # Held events the disk took before the kill were delivered; the rest are the true loss.
    held_lost = set(rig.ledger.held) - rig.seen_ids()
    # The seqs of events held in memory are written to the .held mark, so the restart does not
    # announce them as skipped: the centre's gap is the true loss, no more, no less.
    assert gaps == len(held_lost), (
        f"the centre sees {gaps} missing seqs, the true loss is {len(held_lost)}"
    )


def test_damaged_outbox_loss_is_what_the_centre_sees(
    tmp_path: Path, fault_broker: Broker, fault_matrix: Callable[[dict[str, Any]], None]
) -> None:
    """4 KiB overwritten in the middle of the file: only the rows on the damaged pages are lost,
    and the centre's seq gap and the recovery event both count exactly those."""
    numbered: set[str] = set()

    def overwrite(rig: Rig) -> None:
        rig.ledger.read_outbox(rig.db_path)  # every event numbered so far, the agent's own too
        numbered.update(rig.ledger.expected_ids())
        with open(rig.db_path, "r+b") as f:
            f.seek(rig.db_path.stat().st_size // 2)
            f.write(os.urandom(4096))

    rig = _restart_with_damaged_outbox(
        tmp_path, fault_broker, overwrite, ("normal", "critical", "high"), 600, after=100
    )
    since = set(rig.ledger.accepted) - numbered
    assert rig.wait_delivered(since, timeout=10), "events accepted after the recovery were lost"
    lost = numbered - rig.seen_ids()
    gaps, reused = _seq_gaps(rig)
    recovered = [e["payload"] for e in rig.recorder.events("agent.storage_recovered")]
    fault_matrix(
        {
            "fault": "4 KiB overwritten mid-file, restart",
            "iterations": 1,
            "accepted": len(numbered) + len(since),
            "delivered": len(numbered) + len(since) - len(lost),
            "lost": len(lost),
            "seq_gaps": gaps,
            "seq_reused": reused,
            "recovery_event": recovered[0] if recovered else None,
        }
    )
    assert recovered, "the recovery was not reported to the centre"
    assert reused == 0, "a seq was given to two different events"
    assert gaps == len(lost), f"the centre sees {gaps} missing seqs, the true loss is {len(lost)}"
    assert recovered[0]["unaccounted"] == len(lost), "the recovery event must count the loss"
    assert len(lost) <= 40, f"salvage lost {len(lost)} events to two damaged pages"


def test_power_cut_keeps_every_synced_event(
    tmp_path: Path,
    fault_broker: Broker,
    powercut_library: Path,
    fault_matrix: Callable[[dict[str, Any]], None],
) -> None:
    """Everything not fsync'd is gone after a power cut; critical events are synced before they
    count as durable (``[outbox] sync = "critical"``, the default), so none may be lost."""
    synced = tmp_path / "synced"
    synced.mkdir()
    with TcpProxy(fault_broker.host, fault_broker.port) as proxy:
        proxy.refuse()
        rig = Rig(tmp_path, fault_broker, mqtt_port=proxy.port)
        rig.agent.env.update(
            {
                "LD_PRELOAD": str(powercut_library),
                "POWERCUT_WATCH": str(rig.state_dir),
                "POWERCUT_SNAPSHOT": str(synced),
            }
        )
        rig.start()
        try:
            burst = Emitter(
                rig.agent,
                rig.ledger,
                kind="fault.power",
                priorities=("critical", "normal", "high", "low"),
                limit=400,
            ).start()
            burst.thread.join(60)
            rig.agent.kill()
            for stale in rig.state_dir.glob("outbox.db*"):
                stale.unlink()
            for kept in synced.iterdir():  # the files as the disk holds them after the cut
                if not kept.name.endswith(".partial"):
                    shutil.copy(kept, rig.state_dir / kept.name)
            rig.agent.env = {}
            proxy.set_pass()
            rig.agent.start()
            rig.wait_drained()
            rig.agent.terminate()
        finally:
            rig.close()
    by_priority = {
        p: {i for i, a in rig.ledger.accepted.items() if a.priority == p}
        for p in ("critical", "high", "normal", "low")
    }
    rig.wait_delivered(by_priority["critical"], timeout=10)
    seen = rig.seen_ids()
    lost = {p: len(ids - seen) for p, ids in by_priority.items()}
    fault_matrix(
        {
            "fault": "power cut (unsynced writes dropped)",
            "iterations": 1,
            "accepted": len(rig.ledger.accepted),
            "delivered": len(set(rig.ledger.accepted) & seen),
            "lost": sum(lost.values()),
            "lost_by_priority": lost,
        }
    )
    assert lost["critical"] == 0, (
        f"{lost['critical']} critical events reported durable did not survive the power cut"
    )


def test_sd_card_remounted_read_only(
    tmp_path: Path,
    fault_broker: Broker,
    sd_card: Any,
    fault_matrix: Callable[[dict[str, Any]], None],
) -> None:
    """ext4 ``errors=remount-ro`` after an I/O error: alarms still go out over the live link, every
    emit says it is held in memory, and the centre is told. Such a filesystem comes back only
    through unmount and fsck (at the next boot, or by a technician): after that the restarted
    agent has every event it had committed."""
    rig = Rig(tmp_path, fault_broker, drivers=PANIC, state_dir=sd_card.mount_point / "state")
    rig.start()
    steady = Emitter(
        rig.agent, rig.ledger, kind="fault.sdcard", priorities=("critical", "normal"), rate=40
    ).start()
    try:
        time.sleep(1.0)
        sd_card.fail()
        status = rig.agent.wait_for(
            lambda s: s["storage"]["fault"] is not None and s["backlog"]["in_memory"] > 0,
            30,
            "the read-only filesystem noticed",
        )
        assert "read-only" in status["storage"]["fault"], status["storage"]
        replies = [rig.agent.simulate("panic") for _ in range(3)]
        presses = [r["result"]["ids"][0] for r in replies]
        assert rig.wait_delivered(presses, timeout=30), (
            "panic presses on a read-only SD card did not reach the centre"
        )
        deadline = time.monotonic() + 30
        while "agent.storage_failed" not in _kinds(rig) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "agent.storage_failed" in _kinds(rig), (
            "the centre was not told while the disk was failing"
        )
        steady.stop()
        held = set(rig.ledger.held)
        assert rig.wait_delivered(held, timeout=30), (
            "events held in memory were not delivered while the agent ran"
        )
        rig.agent.terminate()
        sd_card.repair()
        rig.ledger.fault_cleared()
        rig.agent.start()
        rig.agent.wait_for(
            lambda s: s["storage"]["fault"] is None, 30, "the outbox writable after fsck"
        )
        verdict = rig.finish()
    finally:
        steady.stop()
        rig.close()
    fault_matrix(
        verdict.row(
            "SD card remounted read-only, fsck, restart",
            1,
            held_in_memory=len(held),
            reported=sorted(_kinds(rig) & {"agent.storage_failed", "agent.storage_restored"}),
        )
    )
    verdict.assert_promise()
    assert held, "emits on a read-only disk must say they are held in memory"
    assert "agent.storage_failed" in _kinds(rig), "the centre was not told"
