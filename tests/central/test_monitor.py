"""The console's logic without a terminal or broker: state from messages, operator lines."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

import pytest

from agent.monitor import LOST_AFTER_INTERVALS, Console, MonitorState, TerminalView

BASE = "wardpost/north/ward3-pi"
_counter = iter(range(1, 10_000))


def event(kind: str, priority: str = "normal", source: str = "button1", test: bool = False,
          **payload: Any) -> tuple[str, bytes, str]:
    event_id = f"0190-{next(_counter):04d}"
    body = {"schema": 1, "id": event_id, "site": "north", "device": "ward3-pi", "source": source,
            "kind": kind, "priority": priority, "time": "2026-01-05T10:11:12.000000Z",
            "test": test, "payload": payload}
    return f"{BASE}/events/{kind}", json.dumps(body).encode(), event_id


LOCATION = {"ward": "3B", "room": "12", "floor": ""}


class FakeSink:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def send(self, site: str, device: str, name: str, *, args: Mapping[str, Any],
             target: str | None, alarm: int | None = None) -> str:
        self.sent.append({"site": site, "device": device, "name": name, "args": dict(args),
                          "target": target, "alarm": alarm})
        return f"cmd-{len(self.sent)}"


def raise_alarm(state: MonitorState, **extra: Any) -> str:
    topic, payload, event_id = event("panic.pressed", "critical", location=LOCATION, **extra)
    state.apply(topic, payload, 0.0)
    return event_id


def test_an_alarm_goes_new_acknowledged_resolved_from_device_events() -> None:
    state = MonitorState()
    topic, payload, alarm_id = event("panic.pressed", "critical", location=LOCATION, presses=1)
    records = state.apply(topic, payload, 0.0)
    assert [r["type"] for r in records] == ["event", "alarm"]
    assert records[1]["state"] == "new" and records[1]["where"] == "north/ward3-pi ward 3B, room 12"
    ack = event("panic.acknowledged", "high", alarm=alarm_id, by="desk-2", location=LOCATION)
    assert state.apply(*ack[:2], 1.0)[1]["state"] == "acknowledged"
    alarm = state.alarms[alarm_id]
    assert (alarm.number, alarm.state, alarm.by, alarm.open) == (1, "acknowledged", "desk-2", True)
    state.apply(*event("panic.resolved", "high", alarm=alarm_id, location=LOCATION)[:2], 2.0)
    assert alarm.state == "resolved" and not alarm.open and alarm.by == "desk-2"


def test_a_late_or_resent_event_never_moves_an_alarm_back() -> None:
    state = MonitorState()
    alarm_id = raise_alarm(state)
    ack = event("panic.acknowledged", "high", alarm=alarm_id)
    state.apply(*event("panic.resolved", "high", alarm=alarm_id)[:2], 1.0)
    assert state.apply(*ack[:2], 2.0) == [{"type": "event", **json.loads(ack[1])}]
    assert state.alarms[alarm_id].state == "resolved"
    assert state.apply(*ack[:2], 3.0) == [], "the same event id twice is a re-send"


def test_follow_ups_of_an_alarm_raised_before_the_console_started_make_a_placeholder() -> None:
    state = MonitorState()
    state.apply(*event("panic.acknowledged", "high", alarm="0190-older", location=LOCATION)[:2], 0)
    alarm = state.alarms["0190-older"]
    assert alarm.state == "acknowledged" and alarm.where.endswith("ward 3B, room 12")


def test_superseded_and_expired_close_alarms_and_core_criticals_are_not_alarms() -> None:
    state = MonitorState()
    test_alarm = raise_alarm(state, test=True)
    state.apply(*event("panic.resolved", alarm=test_alarm, reason="superseded")[:2], 0)
    real = raise_alarm(state)
    state.apply(*event("panic.expired", alarm=real, state="new")[:2], 0)
    assert [(a.state, a.test) for a in state.alarms.values()] == \
        [("superseded", True), ("expired", False)]
    state.apply(*event("agent.disk_full", "critical", source="agent", path="/x")[:2], 0)
    state.apply(*event("gate.alarm", "critical", source="gate1")[:2], 0)
    assert [(a.number, a.kind) for a in state.alarm_list()] == \
        [(3, "gate.alarm"), (2, "panic.pressed"), (1, "panic.pressed")]


def test_alarm_list_puts_open_alarms_first_by_priority_then_age() -> None:
    state = MonitorState()
    first = raise_alarm(state)
    state.apply(*event("gate.alarm", "critical", source="gate1")[:2], 0)
    state.apply(*event("panic.resolved", alarm=first)[:2], 0)
    third = raise_alarm(state)
    numbers = [a.number for a in state.alarm_list()]
    assert numbers == [2, 3, 1]
    assert state.alarms[third].number == 3


def test_status_heartbeat_lost_and_stale_last_will() -> None:
    state = MonitorState()
    online = {"state": "online", "boot": 3, "connection": 7, "backlog": 0}
    assert state.apply(f"{BASE}/status", json.dumps(online).encode(), 0.0)[0]["state"] == "online"
    stale_will = {"state": "offline", "boot": 3, "connection": 6}
    assert state.apply(f"{BASE}/status", json.dumps(stale_will).encode(), 0.1) == []
    beat = {"interval": 2.0, "backlog": {"count": 4, "oldest_age": 1.0},
            "drivers": {"button1": {"state": "ok"}, "gate1": {"state": "degraded"}}}
    state.apply(f"{BASE}/heartbeat", json.dumps(beat).encode(), 10.0)
    row = state.device_rows(11.0)[0]
    assert (row["state"], row["backlog"], row["drivers_not_ok"]) == ("online", 4, ["gate1"])
    assert state.supervise(10.0 + LOST_AFTER_INTERVALS * 2.0 - 0.1) == []
    lost = state.supervise(10.0 + LOST_AFTER_INTERVALS * 2.0 + 0.1)
    assert [r["type"] for r in lost] == ["device_lost"] and lost[0]["silent_for"] == 5.1
    assert state.supervise(20.0) == [], "announced once"
    assert state.device_rows(20.0)[0]["state"] == "lost"
    state.apply(f"{BASE}/heartbeat", json.dumps(beat).encode(), 21.0)
    assert [r["type"] for r in state.supervise(21.0)] == ["device_back"]


def test_malformed_messages_raise_value_errors_the_monitor_can_report() -> None:
    state = MonitorState()
    with pytest.raises(ValueError):
        state.apply(f"{BASE}/events/x.y", b"{not json", 0)
    with pytest.raises(ValueError):
        state.apply(f"{BASE}/status", b"[1, 2]", 0)
    assert state.apply("wardpost/short", b"{}", 0) == []
    assert state.apply(f"{BASE}/cmd/ack", b"{}", 0) == []


def test_console_acknowledges_the_only_open_alarm_and_targets_its_driver() -> None:
    state, sink = MonitorState(), FakeSink()
    console = Console(state, sink, operator="desk-2")
    assert not console.execute("ack").ok, "no alarm yet"
    alarm_id = raise_alarm(state)
    reply = console.execute("ack")
    assert reply.ok and "sent ack for alarm #1 to north/ward3-pi" in reply.text
    assert sink.sent[-1] == {"site": "north", "device": "ward3-pi", "name": "ack",
                             "args": {"alarm": alarm_id, "by": "desk-2"}, "target": "button1",
                             "alarm": 1}
    assert reply.record["type"] == "command_sent" and reply.record["id"] == "cmd-1"
    console.execute("silence")
    assert sink.sent[-1]["name"] == "silence" and sink.sent[-1]["target"] is None


def test_console_needs_a_number_when_several_alarms_are_open() -> None:
    state, sink = MonitorState(), FakeSink()
    console = Console(state, sink)
    raise_alarm(state)
    second = raise_alarm(state)
    assert console.execute("resolve").text == "which alarm? give its number"
    assert console.execute("select 2").ok and console.selected == second
    console.execute("resolve")
    assert sink.sent[-1]["args"] == {"alarm": second}
    assert console.execute("ack #9").text == "there is no alarm #9"
    assert console.execute("ack x").text == "'x' is not an alarm number"
    state.apply(*event("panic.resolved", alarm=second)[:2], 0)
    assert console.execute("ack 2").text == "alarm #2 is already resolved"


def test_console_test_command_and_housekeeping() -> None:
    state, sink = MonitorState(), FakeSink()
    console = Console(state, sink)
    console.execute("test north/ward3-pi button1")
    assert sink.sent[-1] == {"site": "north", "device": "ward3-pi", "name": "test", "args": {},
                             "target": "button1", "alarm": None}
    assert not console.execute("test north/").ok
    assert console.execute("alarms").show == "alarms" and console.execute("d").show == "devices"
    assert "acknowledge" in console.execute("help").text
    assert console.execute("quit").quit
    assert not console.execute("launch").ok
    assert console.execute("   ").text == ""


def test_terminal_view_plain_text_and_json() -> None:
    state = MonitorState()
    topic, payload, _ = event("panic.pressed", "critical", location=LOCATION)
    records = state.apply(topic, payload, 0.0)
    plain = io.StringIO()
    view = TerminalView(plain)
    view.records(records)
    view.alarms(state)
    view.devices(state, 1.0)
    text = plain.getvalue()
    assert "CRITICAL" in text and "panic.pressed" in text and "@ ward 3B, room 12" in text
    assert "ALARM #1 NEW" in text and "alarms" in text and "ward3-pi" in text
    as_json = io.StringIO()
    view = TerminalView(as_json, as_json=True)
    view.records(records)
    view.alarms(state)
    lines = [json.loads(line) for line in as_json.getvalue().splitlines()]
    assert [line["type"] for line in lines] == ["event", "alarm", "alarms"]
    assert lines[2]["alarms"][0]["state"] == "new"
