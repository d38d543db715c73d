"""Storage faults: disk full, a corrupt or truncated outbox, a read-only state directory."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.faults.harness import Emitter, Rig, fill_disk, remount
from tests.support.broker import Broker
from tests.support.proxy import TcpProxy

pytestmark = pytest.mark.faults

GATE = {"gate": {"type": "simulated", "kind": "gate.alarm", "priority": "high", "rate": 200.0}}
RESERVE = 256 * 1024


def _kinds(rig: Rig) -> set[str]:
    return {e["kind"] for e in rig.recorder.events()}


def _disk_full_run(tmp_path: Path, broker: Broker, small_fs: Path | None) -> tuple[Rig, dict[str, Any]]:
    """Fill the disk under a loaded agent for 6 s, free it, and return what happened."""
    state = small_fs / "state" if small_fs else tmp_path / "state"
    rig = Rig(tmp_path, broker, drivers=GATE, state_dir=state, outbox={"reserve_bytes": RESERVE})
    if small_fs is None:  # no mount here: a per-file size limit makes writes fail the same way
        rig.agent.file_size_limit = 2 * 1024 * 1024
    rig.start()
    steady = Emitter(rig.agent, rig.ledger, kind="panic.pressed", priorities=("critical", "normal"), rate=40, persist=True).start()
    try:
        time.sleep(1.0)
        filled = fill_disk(small_fs) if small_fs else 0
        full_at = len(rig.ledger.accepted)
        time.sleep(4.0)  # long enough to use up the reserve and fall back to memory
        during = [a for a in list(rig.ledger.accepted.values())[full_at:] if a.priority == "critical"]
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
        "criticals_accepted_while_full": len(during), "held_in_memory": in_memory, "filler_bytes": filled,
        "reported": sorted(reported), "delivered_before_stop": delivered, "drained_after_free": drained,
        "stuck_backlog": final["backlog"]["count"], "storage_fault_after_free": final["storage"]["fault"],
        "storage_reports": sum(1 for e in rig.recorder.events() if e["kind"].startswith("agent.storage_")),
    }


def test_disk_full_while_events_arrive(
    tmp_path: Path, fault_broker: Broker, small_fs: Path | None, fault_matrix: Callable[[dict[str, Any]], None]
) -> None:
    rig, notes = _disk_full_run(tmp_path, fault_broker, small_fs)
    verdict = rig.ledger.verdict(rig.recorder)
    fault_matrix(verdict.row("disk full" + ("" if small_fs else " (RLIMIT_FSIZE)"), 1, **notes))
    verdict.assert_promise()
    # 4 s full at 20 critical emits/s: at least half of them must be accepted.
    assert notes["criticals_accepted_while_full"] >= 40, "critical events must still be accepted while the disk is full"
    assert {"agent.disk_full", "agent.storage_failed"} & set(notes["reported"]), "the disk fault was not reported to the centre"


def test_backlog_drains_once_the_disk_is_freed(tmp_path: Path, fault_broker: Broker, small_fs: Path | None) -> None:
    _rig, notes = _disk_full_run(tmp_path, fault_broker, small_fs)
    assert notes["drained_after_free"], f"backlog stuck at {notes['stuck_backlog']} events; storage fault: {notes['storage_fault_after_free']}"


def test_corrupt_outbox_at_start(tmp_path: Path, fault_broker: Broker, fault_matrix: Callable[[dict[str, Any]], None]) -> None:
    rig = Rig(tmp_path, fault_broker)
    rig.state_dir.mkdir(parents=True)
    rig.db_path.write_bytes(b"SQLite format 3\x00" + os.urandom(64 * 1024))
    rig.start()
    try:
        burst = Emitter(rig.agent, rig.ledger, kind="panic.pressed", priorities=("critical", "high", "normal"), limit=300).start()
        burst.thread.join(30)
        verdict = rig.finish()
    finally:
        rig.close()
    moved = sorted(p.name for p in rig.state_dir.glob("outbox.db.corrupt-*"))
    fault_matrix(verdict.row("corrupt outbox at start", 1, moved_aside=len(moved)))
    verdict.assert_promise()
    assert "agent.storage_recovered" in _kinds(rig)
    assert moved, "the corrupt file should be kept aside for inspection"


def test_truncated_outbox_at_start(tmp_path: Path, fault_broker: Broker, fault_matrix: Callable[[dict[str, Any]], None]) -> None:
    with TcpProxy(fault_broker.host, fault_broker.port) as proxy:
        proxy.refuse()  # keep the first events pending in the outbox
        rig = Rig(tmp_path, fault_broker, mqtt_port=proxy.port)
        rig.start()
        try:
            before = Emitter(rig.agent, rig.ledger, kind="fault.before", priorities=("normal", "critical"), limit=400).start()
            before.thread.join(30)
            rig.agent.terminate()
            pending_before = set(rig.ledger.accepted)
            size = rig.db_path.stat().st_size
            os.truncate(rig.db_path, size * 6 // 10)
            proxy.set_pass()
            rig.agent.start()
            after = Emitter(rig.agent, rig.ledger, kind="fault.after", priorities=("critical", "normal"), limit=300).start()
            after.thread.join(30)
            rig.wait_drained()
            rig.agent.terminate()
        finally:
            rig.close()
    # What the truncation destroyed cannot be delivered; everything salvaged or accepted since must be.
    rig.ledger.read_outbox(rig.db_path)
    destroyed = pending_before - set(rig.ledger.committed)
    for event_id in destroyed:
        del rig.ledger.accepted[event_id]
    rig.wait_delivered(rig.ledger.expected_ids(), timeout=10)
    verdict = rig.ledger.verdict(rig.recorder)
    recovered = [e for e in rig.recorder.events("agent.storage_recovered")]
    fault_matrix(verdict.row(
        "truncated outbox at start", 1, destroyed_by_truncation=len(destroyed), pending_before=len(pending_before),
        salvaged=recovered[0]["payload"]["salvaged"] if recovered else None,
    ))
    verdict.assert_promise()
    assert recovered, "the recovery was not reported to the centre"


PANIC = {"panic": {"type": "simulated", "kind": "panic.pressed", "priority": "critical", "rate": 0.0}}


def _read_only_run(rig: Rig, small_fs: Path, fault_matrix: Callable[[dict[str, Any]], None], fault: str) -> None:
    """Start on the read-only disk, press the panic button, make the disk writable again."""
    try:
        rig.agent.start()
        rig.agent.wait_for(lambda s: s["storage"]["fault"] is not None, 10, "the storage fault")
        replies = [rig.agent.simulate("panic") for _ in range(5)]
        assert all(r.get("ok") for r in replies), f"the panic button driver is not running: {replies[0]}"
        presses = [r["result"]["ids"][0] for r in replies]
        steady = Emitter(rig.agent, rig.ledger, kind="fault.readonly", priorities=("critical", "normal"), rate=40).start()
        time.sleep(2.0)
        in_memory = rig.agent.status()["backlog"]["in_memory"]
        assert rig.wait_delivered(presses, timeout=10), "panic presses on a read-only disk did not reach the centre"
        remount(small_fs, "rw")
        rig.agent.wait_for(lambda s: s["storage"]["fault"] is None and s["backlog"]["in_memory"] == 0, 30, "the outbox back on disk")
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
    tmp_path: Path, fault_broker: Broker, small_fs: Path | None, fault_matrix: Callable[[dict[str, Any]], None]
) -> None:
    if small_fs is None:
        pytest.skip("needs a mount to make the state directory read-only for root")
    rig = Rig(tmp_path, fault_broker, drivers={**GATE, **PANIC}, state_dir=small_fs / "state")
    remount(small_fs, "ro")
    rig.recorder.start()  # the centre is listening before the agent starts
    _read_only_run(rig, small_fs, fault_matrix, "read-only state dir (new)")


def test_state_directory_turned_read_only(
    tmp_path: Path, fault_broker: Broker, small_fs: Path | None, fault_matrix: Callable[[dict[str, Any]], None]
) -> None:
    """An SD card the kernel remounted read-only after errors: the outbox exists but can't be written."""
    if small_fs is None:
        pytest.skip("needs a mount to make the state directory read-only for root")
    rig = Rig(tmp_path, fault_broker, drivers={**GATE, **PANIC}, state_dir=small_fs / "state")
    rig.start()  # a first run on a writable disk creates the outbox and the driver folders
    rig.agent.terminate()
    remount(small_fs, "ro")
    _read_only_run(rig, small_fs, fault_matrix, "read-only state dir (existing outbox)")
