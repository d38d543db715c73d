"""The store and the intake rules, on SQLite and on PostgreSQL (every test runs on both)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config import ConfigError
from agent.event import utc_iso, uuid7
from central.alarms import AlarmDesk, AlarmError
from central.config import ReceiverConfig, load_receiver_config, parse_receiver_config
from central.intake import Inbound, Intake
from central.stats import WEEK, availability, transmission_by_day
from central.store import LinkChange, Store

T0 = 1_800_000_000.0


def event_msg(
    device: str = "d1",
    seq: int = 1,
    kind: str = "panic.pressed",
    priority: str = "critical",
    at: float = T0,
    event_id: str | None = None,
    **extra: Any,
) -> Inbound:
    body = {
        "schema": 1,
        "id": event_id or uuid7(),
        "site": "s1",
        "device": device,
        "source": "btn",
        "kind": kind,
        "priority": priority,
        "time": utc_iso(at),
        "boottime": 1.0,
        "boot_id": "b",
        "seq": seq,
        "test": False,
        "payload": {"zone": 4},
        **extra,
    }
    return Inbound(f"wardpost/s1/{device}/events/{kind}", json.dumps(body).encode(), at)


def status_msg(state: str, boot: int, connection: int, device: str = "d1") -> Inbound:
    body = {
        "state": state,
        "boot": boot,
        "connection": connection,
        "version": "1",
        "drivers": [],
        "backlog": 0,
    }
    return Inbound(f"wardpost/s1/{device}/status", json.dumps(body).encode(), T0, retain=True)


def heartbeat_msg(interval: float = 10.0, backlog: int = 0, device: str = "d1") -> Inbound:
    body = {
        "uptime": 5,
        "interval": interval,
        "backlog": {"count": backlog, "oldest_age": 0},
        "drivers": {},
    }
    return Inbound(f"wardpost/s1/{device}/heartbeat", json.dumps(body).encode(), T0)


def intake_for(config: ReceiverConfig, store: Store) -> Intake:
    return Intake(config, store.devices(), store.known_ids, started=T0)


def cycle(
    intake: Intake, store: Store, messages: list[Inbound], now: float, supervise: bool = False
) -> Any:
    out = intake.process(messages, now)
    if supervise:
        intake.supervise(now, out.batch)
    store.write(out.batch)
    return out


def kinds(store: Store, origin: str = "centre") -> list[str]:
    return [e.kind for e in store.events(limit=10_000) if e.origin == origin]


def test_events_are_stored_once_and_receipted_every_time(
    make_config: Callable[..., ReceiverConfig], store: Store
) -> None:
    intake = intake_for(make_config(), store)
    first = event_msg(seq=1)
    out = cycle(intake, store, [first, event_msg(seq=2), first], T0 + 0.2)
    ids = out.receipts[("s1", "d1")]
    assert len(ids) == 3 and ids[0] == ids[2] and out.duplicates == 1
    again = cycle(
        intake_for(make_config(), store), store, [first], T0 + 1
    )  # a new receiver process
    assert again.receipts[("s1", "d1")] == [ids[0]] and again.duplicates == 1
    assert store.count_events(origin="device") == 2
    stored = store.events(kind="panic.pressed")[0]
    assert stored.payload == {"zone": 4} and stored.stored_at - stored.event_time == pytest.approx(
        0.2
    )


def test_bad_messages_are_rejected_not_receipted(
    make_config: Callable[..., ReceiverConfig], store: Store
) -> None:
    intake = intake_for(make_config(), store)
    spoofed = event_msg(device="d1")
    messages = [
        Inbound("wardpost/s1/d1/events/panic.pressed", b"{not json", T0),
        Inbound(spoofed.topic.replace("/d1/", "/d2/"), spoofed.payload, T0),
        event_msg(kind="panic.pressed", priority="urgent"),
        event_msg(time="yesterday"),
        event_msg(seq=-3),
        Inbound("wardpost/s1/d1/status", b'{"state":"dancing"}', T0),
    ]
    out = cycle(intake, store, messages, T0)
    assert out.rejected == len(messages) and not out.receipts and store.count_events() == 0


def test_stale_last_will_is_ignored(
    make_config: Callable[..., ReceiverConfig], store: Store
) -> None:
    intake = intake_for(make_config(), store)
    cycle(intake, store, [status_msg("online", 3, 7)], T0)
    cycle(
        intake, store, [status_msg("offline", 3, 6)], T0 + 1
    )  # the Will of the previous connection
    device = store.devices()[0]
    assert (device.state, device.boot, device.connection) == ("online", 3, 7)
    cycle(intake, store, [status_msg("offline", 3, 7)], T0 + 2)  # this connection's own Will
    assert store.devices()[0].state == "offline"
    cycle(intake, store, [status_msg("online", 4, 1)], T0 + 3)  # rebooted: a new boot wins
    assert (store.devices()[0].state, store.devices()[0].boot) == ("online", 4)
    assert [(c.up, c.reason) for c in store.link_history()] == [
        (True, "first seen"),
        (False, "status offline"),
        (True, "status online"),
    ]


def test_supervision_lost_and_restored(
    make_config: Callable[..., ReceiverConfig], store: Store
) -> None:
    intake = intake_for(make_config(supervision={"lost_after": 2.5}), store)
    cycle(intake, store, [heartbeat_msg(interval=10)], T0)
    cycle(intake, store, [], T0 + 24.9, supervise=True)
    assert not store.devices()[0].lost
    cycle(intake, store, [], T0 + 25.1, supervise=True)
    assert store.devices()[0].lost and kinds(store) == ["device.lost"]
    cycle(intake, store, [], T0 + 60, supervise=True)  # raised once, not every check
    cycle(intake, store, [heartbeat_msg(interval=10)], T0 + 61, supervise=True)
    assert not store.devices()[0].lost and kinds(store) == ["device.lost", "device.restored"]
    lost = store.events(kind="device.lost")[0]
    assert lost.priority == "critical" and lost.payload["interval"] == 10
    assert [a.kind for a in store.alarms()] == ["device.lost"]


def test_sequence_gap_reported_when_backlog_is_empty(
    make_config: Callable[..., ReceiverConfig], store: Store
) -> None:
    intake = intake_for(make_config(supervision={"gap_grace": 5}), store)
    cycle(
        intake,
        store,
        [event_msg(seq=s, priority="normal", kind="gate.transit") for s in (1, 2, 5, 3)],
        T0,
    )
    cycle(intake, store, [heartbeat_msg(backlog=0)], T0 + 1)  # too soon: 4 may still be coming
    assert kinds(store) == []
    cycle(intake, store, [heartbeat_msg(backlog=2)], T0 + 10)  # the device still has a backlog
    assert kinds(store) == []
    cycle(
        intake,
        store,
        [event_msg(seq=8, priority="normal", kind="gate.transit"), heartbeat_msg(backlog=0)],
        T0 + 11,
    )
    gaps = [e.payload for e in store.events(kind="sequence.gap")]
    assert [(g["first"], g["last"], g["missing"]) for g in gaps] == [(4, 4, 1), (6, 7, 2)]
    assert store.devices()[0].seq_upto == 8 and store.devices()[0].seq_above == []


def test_out_of_order_sequences_are_not_gaps(
    make_config: Callable[..., ReceiverConfig], store: Store
) -> None:
    intake = intake_for(make_config(supervision={"gap_grace": 0, "gap_timeout": 5}), store)
    cycle(intake, store, [event_msg(seq=s) for s in (10, 13, 12)], T0)
    cycle(intake, store, [event_msg(seq=11)], T0 + 1)
    cycle(intake, store, [heartbeat_msg(backlog=0)], T0 + 2, supervise=True)
    cycle(intake, store, [], T0 + 100, supervise=True)
    assert "sequence.gap" not in kinds(store) and store.devices()[0].seq_upto == 13


def test_alarm_lifecycle_with_command_to_the_device(
    make_config: Callable[..., ReceiverConfig], store: Store
) -> None:
    intake = intake_for(make_config(), store)
    cycle(
        intake,
        store,
        [event_msg(seq=1), event_msg(seq=2, priority="normal", kind="gate.transit")],
        T0,
    )
    (alarm,) = store.alarms()
    assert (alarm.kind, alarm.state, alarm.origin) == ("panic.pressed", "new", "device")
    sent: list[tuple[str, str, str, dict[str, Any]]] = []

    class Recorder:
        def send(
            self, site: str, device: str, name: str, args: dict[str, Any], target: str | None = None
        ) -> str:
            sent.append((site, device, name, args))
            return f"cmd-{len(sent)}"

    desk = AlarmDesk(store, Recorder())
    acked = desk.acknowledge(alarm.id, "nurse station 2", "on our way")
    assert (acked.state, acked.acknowledged_by, acked.note) == (
        "acknowledged",
        "nurse station 2",
        "on our way",
    )
    assert acked.acknowledged_at is not None
    with pytest.raises(AlarmError, match="cannot become acknowledged"):
        desk.acknowledge(alarm.id, "someone else")
    resolved = desk.resolve(alarm.id, "guard 7")
    assert (resolved.state, resolved.resolved_by) == ("resolved", "guard 7")
    assert [s[2] for s in sent] == ["ack", "resolve"] and sent[0][3] == {
        "event": alarm.id,
        "by": "nurse station 2",
    }
    assert store.command("cmd-1") is not None and store.command("cmd-1")["alarm_id"] == alarm.id  # type: ignore[index]
    assert kinds(store) == ["alarm.acknowledged", "alarm.resolved"]
    with pytest.raises(AlarmError, match="no alarm"):
        desk.resolve("nope", "guard 7")
    # A command result from the device is recorded against the command.
    result = {
        "id": "cmd-1",
        "name": "ack",
        "ok": True,
        "result": {},
        "error": None,
        "handled_by": ["btn"],
    }
    cycle(
        intake,
        store,
        [Inbound("wardpost/s1/d1/cmd_result/cmd-1", json.dumps(result).encode(), T0)],
        T0 + 5,
    )
    assert store.command("cmd-1")["ok"] == 1  # type: ignore[index]


def test_statistics_transmission_and_availability() -> None:
    samples = [("s1", "d1", T0, T0 + d) for d in (0.01, 0.02, 0.03, 0.04, 1.0)]
    (day,) = transmission_by_day(samples)
    assert (day.count, day.max, day.p95) == (5, 1.0, 1.0) and day.mean == pytest.approx(0.22)
    history = [
        LinkChange("s1", "d1", T0, True, "first seen"),
        LinkChange("s1", "d1", T0 + 3600, False, "lost"),
        LinkChange("s1", "d1", T0 + 7200, True, "restored"),
    ]
    (week,) = availability(history, now=T0 + 10 * 3600, windows=2)
    assert week.known == 10 * 3600 and week.ratio == pytest.approx(0.9)
    newest, older = availability(history, now=T0 + WEEK + 3600, windows=2)
    assert (newest.known, older.known, older.up) == (WEEK, 3600, 3600)


def test_config_errors_name_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "central.toml"
    path.write_text("[supervision]\nlost_after = 0.5\n")
    with pytest.raises(
        ConfigError, match=r"central.toml: supervision.lost_after: must be at least 1.0"
    ):
        load_receiver_config(path)
    path.write_text('[dc09.map."panic.pressed"]\ncode = 1200\n')
    with pytest.raises(ConfigError, match=r"dc09.map.panic.pressed.code: must be at most 999"):
        load_receiver_config(path)
    path.write_text('[dc09]\nenabled = true\nkey_file = "/nonexistent"\n')
    with pytest.raises(
        ConfigError, match=r"dc09.key_file: secret file '/nonexistent' does not exist"
    ):
        load_receiver_config(path)
    with pytest.raises(ConfigError, match=r"store\.url: must be sqlite"):
        parse_receiver_config({"store": {"url": "mysql://x"}}, "c.toml")
    with pytest.raises(ConfigError, match=r"mqtt\.sites"):
        parse_receiver_config({"mqtt": {"sites": ["a/b"]}}, "c.toml")


def test_example_config_is_valid() -> None:
    config = load_receiver_config(Path(__file__).parents[2] / "config" / "central.example.toml")
    assert config.dc09.map["panic.pressed"].code == 120
