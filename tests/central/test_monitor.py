"""The console's logic without a terminal or broker: alarms from the receiver's store (both
engines), operator lines through the same AlarmDesk as `wardpost receiver ack`, live traffic."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.testing.broker import Broker
from central.alarms import AlarmDesk
from central.config import ReceiverConfig
from central.monitor import LOST_AFTER_INTERVALS, AlarmBoard, Console, LiveView, TerminalView
from central.store import Store
from tests.central.test_receiver import REPO, _write_config
from tests.central.test_store import T0, SentCommands, cycle, event_msg, intake_for, result_msg

BASE = "wardpost/north/ward3-pi"
LOCATION = {"ward": "3B", "room": "12", "floor": ""}


class Desk:
    """A console on a store the receiver's intake fills, with commands recorded."""

    def __init__(self, config: ReceiverConfig, store: Store) -> None:
        self.store = store
        self.intake = intake_for(config, store)
        self.commands = SentCommands()
        self.board = AlarmBoard(store, time.time())
        self.console = Console(
            self.board, AlarmDesk(store, self.commands), self.commands, operator="desk-2"
        )

    def raise_alarm(self, seq: int, **payload: Any) -> str:
        message = event_msg(seq=seq, payload={"location": LOCATION, **payload})
        cycle(self.intake, self.store, [message], T0 + seq)
        self.board.refresh()
        return str(json.loads(message.payload)["id"])


@pytest.fixture
def desk(make_config: Callable[..., ReceiverConfig], store: Store) -> Desk:
    return Desk(make_config(), store)


def test_the_console_shows_the_stores_alarms_and_acks_through_the_desk(desk: Desk) -> None:
    assert not desk.console.execute("ack").ok, "no alarm yet"
    alarm_id = desk.raise_alarm(1)
    record = desk.board.record(desk.board.alarms[alarm_id])
    assert (record["number"], record["state"], record["where"]) == (
        1,
        "new",
        "s1/d1 ward 3B, room 12",
    )
    reply = desk.console.execute("ack")
    assert reply.ok and reply.text.startswith("#1 acknowledged by desk-2: panic.pressed at s1/d1")
    assert "(ack sent, not confirmed (1 sent))" in reply.text
    assert desk.commands.sent == [("ack", {"alarm": alarm_id, "by": "desk-2"})]
    stored = desk.store.alarm(alarm_id)
    assert stored is not None and stored.acknowledged_by == "desk-2"
    # The board shows what the store says, once the device's answer is in.
    (change,) = desk.board.refresh()
    assert (change["state"], change["at_device"]) == (
        "acknowledged",
        "ack sent, not confirmed (1 sent)",
    )
    cycle(desk.intake, desk.store, [result_msg("cmd-1", ok=True)], T0 + 5)
    (confirmed,) = desk.board.refresh()
    assert confirmed["at_device"] == "ack confirmed by device"
    assert desk.board.refresh() == [], "only changes are announced"
    desk.console.execute("silence")
    assert desk.commands.sent[-1] == ("silence", {"alarm": alarm_id, "by": "desk-2"})


def test_the_console_needs_a_number_when_several_alarms_are_open(desk: Desk) -> None:
    desk.raise_alarm(1)
    second = desk.raise_alarm(2)
    assert desk.console.execute("resolve").text == "which alarm? give its number"
    assert desk.console.execute("select 2").ok and desk.console.selected == second
    assert desk.console.execute("resolve").ok
    assert desk.commands.sent[-1] == ("resolve", {"alarm": second, "by": "desk-2"})
    assert desk.console.execute("ack #9").text == "there is no alarm #9"
    assert desk.console.execute("ack x").text == "'x' is not an alarm number"
    desk.board.refresh()
    assert desk.console.execute("ack 2").text == "alarm #2 is already resolved"
    # The desk's own rule holds too (one alarm model): resolved cannot become acknowledged.
    assert [a.id for a in desk.board.listing()][-1] == second


def test_the_console_test_command_targets_the_alarms_driver(desk: Desk) -> None:
    desk.raise_alarm(1)
    desk.console.execute("test 1")
    assert desk.commands.sent[-1] == ("test", {})
    reply = desk.console.execute("test north/ward3-pi button1")
    assert reply.record["target"] == "button1" and reply.record["device"] == "ward3-pi"
    assert not desk.console.execute("test north/").ok
    assert desk.console.execute("alarms").show == "alarms"
    assert desk.console.execute("d").show == "devices"
    assert "acknowledge" in desk.console.execute("help").text
    assert desk.console.execute("quit").quit
    assert not desk.console.execute("launch").ok
    assert desk.console.execute("   ").text == ""


def test_alarm_list_puts_open_alarms_first_by_priority_then_age(desk: Desk) -> None:
    first = desk.raise_alarm(1)
    desk.raise_alarm(2)
    AlarmDesk(desk.store).resolve(first, "guard")
    desk.raise_alarm(3)
    desk.board.refresh()
    assert [desk.board.numbers[a.id] for a in desk.board.listing()] == [2, 3, 1]


def test_status_heartbeat_lost_and_stale_last_will() -> None:
    live = LiveView()
    online = {"state": "online", "boot": 3, "connection": 7, "backlog": 0}
    assert live.apply(f"{BASE}/status", json.dumps(online).encode(), 0.0)[0]["state"] == "online"
    stale_will = {"state": "offline", "boot": 3, "connection": 6}
    assert live.apply(f"{BASE}/status", json.dumps(stale_will).encode(), 0.1) == []
    beat = {
        "interval": 2.0,
        "backlog": {"count": 4, "oldest_age": 1.0},
        "drivers": {"button1": {"state": "ok"}, "gate1": {"state": "degraded"}},
    }
    live.apply(f"{BASE}/heartbeat", json.dumps(beat).encode(), 10.0)
    row = live.device_rows(11.0)[0]
    assert (row["state"], row["backlog"], row["drivers_not_ok"]) == ("online", 4, ["gate1"])
    assert live.supervise(10.0 + LOST_AFTER_INTERVALS * 2.0 - 0.1) == []
    lost = live.supervise(10.0 + LOST_AFTER_INTERVALS * 2.0 + 0.1)
    assert [r["type"] for r in lost] == ["device_lost"] and lost[0]["silent_for"] == 5.1
    assert live.supervise(20.0) == [], "announced once"
    assert live.device_rows(20.0)[0]["state"] == "lost"
    live.apply(f"{BASE}/heartbeat", json.dumps(beat).encode(), 21.0)
    assert [r["type"] for r in live.supervise(21.0)] == ["device_back"]


def test_malformed_messages_raise_value_errors_the_monitor_can_report() -> None:
    live = LiveView()
    with pytest.raises(ValueError):
        live.apply(f"{BASE}/events/x.y", b"{not json", 0)
    with pytest.raises(ValueError):
        live.apply(f"{BASE}/status", b"[1, 2]", 0)
    assert live.apply("wardpost/short", b"{}", 0) == []
    assert live.apply(f"{BASE}/receipts", b"{}", 0) == []


def test_terminal_view_plain_text_and_json(desk: Desk) -> None:
    alarm_id = desk.raise_alarm(1)
    records = [desk.board.record(desk.board.alarms[alarm_id])]
    live = LiveView()
    records += live.apply(
        f"{BASE}/events/panic.pressed",
        json.dumps(
            {
                "id": "e1",
                "priority": "critical",
                "kind": "panic.pressed",
                "source": "button1",
                "payload": {"location": LOCATION},
            }
        ).encode(),
        0.0,
    )
    plain = io.StringIO()
    view = TerminalView(plain)
    view.records(records)
    view.alarms(desk.board)
    view.devices(live, 1.0)
    text = plain.getvalue()
    assert "ALARM #1 NEW" in text and "@ ward 3B, room 12" in text and "ward3-pi" in text
    as_json = io.StringIO()
    view = TerminalView(as_json, as_json=True)
    view.records(records)
    view.alarms(desk.board)
    lines = [json.loads(line) for line in as_json.getvalue().splitlines()]
    assert [line["type"] for line in lines] == ["alarm", "event", "alarms"]
    assert lines[2]["alarms"][0]["state"] == "new"


def test_wardpost_monitor_runs_through_the_entry_point(
    desk: Desk, broker: Broker, store_section: dict[str, Any], tmp_path: Path
) -> None:
    """`wardpost monitor` is the centre's verb now, plugged in through `wardpost.cli`."""
    alarm_id = desk.raise_alarm(1)
    config = _write_config(tmp_path / "central.toml", broker, store_section, "console")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "monitor",
            "--port",
            str(broker.port),
            "--receiver-config",
            str(config),
            "--no-input",
            "--duration",
            "1",
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["id"], r["state"]) for r in records if r["type"] == "alarm"] == [(alarm_id, "new")]
