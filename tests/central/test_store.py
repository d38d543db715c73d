"""The store and the intake rules, on SQLite and on PostgreSQL (every test runs on both)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config import ConfigError
from agent.event import utc_iso, uuid7
from central.alarms import AlarmDesk, AlarmError, MqttCommander, Record
from central.config import ReceiverConfig, load_receiver_config, parse_receiver_config
from central.intake import Inbound, Intake
from central.stats import WEEK, availability, transmission_by_day
from central.store import SCHEMA_VERSION, LinkChange, Store

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
        intake.report_quarantined(now, out.batch)
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


def test_bad_messages_are_quarantined_not_receipted(
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
    assert out.rejected == len(messages) and not out.receipts
    assert store.count_events(origin="device") == 0
    assert [q.topic for q in reversed(store.quarantined())] == [m.topic for m in messages]
    assert store.quarantined()[-1].raw == b"{not json"
    summary = {(q.site, q.device): q.count for q in store.quarantine_summary()}
    assert summary == {("s1", "d1"): 5, ("s1", "d2"): 1}
    # One centre.quarantined per device per interval; the rest is counted into the next one.
    reports = [e for e in store.events() if e.kind == "centre.quarantined"]
    assert sorted((e.device, e.payload["count"]) for e in reports) == [("d1", 1), ("d2", 1)]
    cycle(intake, store, [], T0 + 61, supervise=True)
    reports = [e for e in store.events() if e.kind == "centre.quarantined" and e.device == "d1"]
    assert [e.payload["count"] for e in reports] == [1, 4]
    assert (
        reports[1].payload["reason"] == "status state 'dancing' is not online, stopped or offline"
    )


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
    commands = SentCommands()
    desk = AlarmDesk(store, commands)
    acked = desk.acknowledge(alarm.id, "nurse station 2", "on our way")
    assert (acked.state, acked.acknowledged_by, acked.note) == (
        "acknowledged",
        "nurse station 2",
        "on our way",
    )
    assert acked.acknowledged_at is not None
    with pytest.raises(AlarmError, match="cannot become acknowledged"):
        desk.acknowledge(alarm.id, "someone else")
    assert commands.sent == [("ack", {"alarm": alarm.id, "by": "nurse station 2"})]
    assert acked.at_device == "ack sent, not confirmed (1 sent)"
    assert store.command("cmd-1")["alarm_id"] == alarm.id  # type: ignore[index]
    # Only the device's result makes it acknowledged at the device.
    cycle(intake, store, [result_msg("cmd-1", ok=True)], T0 + 5)
    assert store.command("cmd-1")["ok"] == 1  # type: ignore[index]
    confirmed = store.alarm(alarm.id)
    assert confirmed is not None and confirmed.at_device == "ack confirmed by device"
    assert confirmed.device_confirmed_at == T0 + 5
    resolved = desk.resolve(alarm.id, "guard 7")
    assert (resolved.state, resolved.resolved_by) == ("resolved", "guard 7")
    assert resolved.at_device == "resolve sent, not confirmed (1 sent)"
    assert [name for name, _ in commands.sent] == ["ack", "resolve"]
    # A late copy of the ack's result does not confirm the resolve; the device's refusal shows.
    cycle(intake, store, [result_msg("cmd-1", ok=True)], T0 + 6)
    assert store.alarm(alarm.id).device_state == "sent"  # type: ignore[union-attr]
    cycle(intake, store, [result_msg("cmd-2", ok=False, error="btn: wiring fault")], T0 + 7)
    refused = store.alarm(alarm.id)
    assert (
        refused is not None and refused.at_device == "resolve refused by device: btn: wiring fault"
    )
    assert kinds(store) == ["alarm.acknowledged", "alarm.resolved"]
    with pytest.raises(AlarmError, match="no alarm"):
        desk.resolve("nope", "guard 7")


def result_msg(command_id: str, ok: bool, error: str | None = None) -> Inbound:
    body = {
        "id": command_id,
        "name": "x",
        "ok": ok,
        "result": {} if ok else None,
        "error": error,
        "handled_by": ["btn"],
        "time": utc_iso(T0),
    }
    return Inbound(f"wardpost/s1/d1/cmd_result/{command_id}", json.dumps(body).encode(), T0)


class SentCommands:
    """A Commander that records instead of publishing (the broker path is in test_receiver)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def send(
        self,
        site: str,
        device: str,
        name: str,
        args: dict[str, Any],
        target: str | None = None,
        *,
        record: Record | None = None,
    ) -> str:
        self.sent.append((name, args))
        command_id = f"cmd-{len(self.sent)}"
        if record is not None:
            record(command_id)
        return command_id


def test_unconfirmed_commands_are_sent_again_then_reported(
    make_config: Callable[..., ReceiverConfig], store: Store
) -> None:
    intake = intake_for(make_config(), store)
    cycle(intake, store, [event_msg(seq=1)], T0)
    (alarm,) = store.alarms()
    commands = SentCommands()
    desk = AlarmDesk(store, commands)
    sent_at = desk.acknowledge(alarm.id, "desk 1").device_sent_at
    assert sent_at is not None
    assert desk.follow_up(sent_at + 1, retry_every=5, confirm_within=30) == []
    assert len(commands.sent) == 1, "not due yet"
    desk.follow_up(sent_at + 6, retry_every=5, confirm_within=30)
    assert [c[0] for c in commands.sent] == ["ack", "ack"]
    assert commands.sent[1][1] == {"alarm": alarm.id, "by": "desk 1"}
    again = store.alarm(alarm.id)
    assert again is not None and again.at_device == "ack sent, not confirmed (2 sent)"
    (given_up,) = desk.follow_up(sent_at + 31, retry_every=5, confirm_within=30)
    assert given_up.device_state == "unconfirmed" and given_up.at_device.startswith(
        "device did not confirm ack: no confirmation within 30 s (2 sent)"
    )
    assert "alarm.unconfirmed" in kinds(store)
    desk.follow_up(sent_at + 100, retry_every=5, confirm_within=30)
    assert len(commands.sent) == 2, "given up: no more attempts"
    # The second attempt's late answer still confirms it.
    cycle(intake, store, [result_msg("cmd-2", ok=True)], T0 + 200)
    assert store.alarm(alarm.id).device_state == "confirmed"  # type: ignore[union-attr]


class AnsweringClient:
    """Stands in for the MQTT client under :class:`MqttCommander` as the fastest device a
    receiver can meet: the device's answer is stored before ``publish`` even returns."""

    def __init__(self, intake: Intake, store: Store) -> None:
        self.intake, self.store = intake, store

    def publish(self, topic: str, payload: str, qos: int = 0) -> None:
        command = json.loads(payload)
        cycle(self.intake, self.store, [result_msg(command["id"], ok=True)], T0 + 1)


def test_a_device_answering_at_once_confirms_the_command(
    make_config: Callable[..., ReceiverConfig], store: Store
) -> None:
    """The command is in the store before it leaves: an answer faster than the sender's next
    step still finds it (recorded after publishing, the answer was lost and the console never
    showed "confirmed by device")."""
    intake = intake_for(make_config(), store)
    cycle(intake, store, [event_msg(seq=1)], T0)
    (alarm,) = store.alarms()
    desk = AlarmDesk(store, MqttCommander(AnsweringClient(intake, store)))  # type: ignore[arg-type]
    desk.acknowledge(alarm.id, "desk 1")
    acked = store.alarm(alarm.id)
    assert acked is not None and acked.device_state == "confirmed", acked and acked.at_device


def test_centre_alarms_need_no_device_confirmation(
    make_config: Callable[..., ReceiverConfig], store: Store
) -> None:
    intake = intake_for(make_config(supervision={"default_interval": 1}), store)
    cycle(intake, store, [heartbeat_msg(backlog=0)], T0)
    cycle(intake, store, [], T0 + 100, supervise=True)
    (lost,) = store.alarms()
    commands = SentCommands()
    acked = AlarmDesk(store, commands).acknowledge(lost.id, "desk 1")
    assert (acked.kind, acked.device_state, acked.at_device, commands.sent) == (
        "device.lost",
        None,
        "",
        [],
    )


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


def test_a_version_1_store_is_upgraded_in_place(
    make_config: Callable[..., ReceiverConfig], store: Store
) -> None:
    """A store written by the first release opens with its rows kept and the new columns added."""
    from central.store import open_store

    store.close()
    config = make_config()
    version_1 = Version1Store(config)
    version_1.write_first_release_rows()
    upgraded = open_store(config.store)
    try:
        assert upgraded.schema_version() == SCHEMA_VERSION
        (alarm,) = upgraded.alarms()
        assert (alarm.id, alarm.state, alarm.device_state, alarm.device_attempts) == (
            "a-1",
            "new",
            None,
            0,
        )
        assert upgraded.devices()[0].seq_first is None
        assert upgraded.quarantine_summary() == []
        (queued,) = upgraded.claim_forwards("receiver-1", 60.0)  # a forward queued before 3
        assert queued[0].id == "e-1" and upgraded.claim_forwards("receiver-2", 60.0) == []
        upgraded.migrate()  # opening it again changes nothing
        assert upgraded.schema_version() == SCHEMA_VERSION
    finally:
        upgraded.close()


class Version1Store:
    """Writes a store exactly as the first release did: its tables, ``schema = 1``, rows."""

    def __init__(self, config: ReceiverConfig) -> None:
        self.config = config

    def write_first_release_rows(self) -> None:
        from central.store import _SCHEMA

        statements = [
            *_SCHEMA,
            "INSERT INTO meta (key, value) VALUES ('schema', '1')",
            "INSERT INTO alarms (id, site, device, kind, priority, origin, test, raised_at, state)"
            " VALUES ('a-1', 's1', 'd1', 'panic.pressed', 'critical', 'device', 0, 1.0, 'new')",
            "INSERT INTO devices (site, device, state, first_seen, last_seen, lost, seq_above)"
            " VALUES ('s1', 'd1', 'online', 1.0, 1.0, 0, '[]')",
            "INSERT INTO events (id, site, device, source, kind, priority, seq, test, event_time,"
            " stored_at, origin, body) VALUES ('e-1', 's1', 'd1', 'panic', 'panic.pressed',"
            " 'critical', 1, 0, 1.0, 1.0, 'device', '{}')",
            "INSERT INTO forwards (event_id, queued_at, attempts) VALUES ('e-1', 1.0, 0)",
        ]
        url, schema = self.config.store.url, self.config.store.schema
        if url.startswith("sqlite:///"):
            import sqlite3

            with sqlite3.connect(url[len("sqlite:///") :]) as conn:
                for name in (
                    "meta",
                    "events",
                    "devices",
                    "alarms",
                    "links",
                    "forwards",
                    "commands",
                    "quarantine",
                    "leases",
                    "centre_states",
                ):
                    conn.execute(f"DROP TABLE IF EXISTS {name}")
                for statement in statements:
                    conn.execute(statement)
            return
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            conn.execute(f'CREATE SCHEMA "{schema}"')
            conn.execute(f'SET search_path TO "{schema}"')
            for statement in statements:
                conn.execute(statement)


def test_one_attempts_success_outweighs_anothers_refusal(
    make_config: Callable[..., ReceiverConfig], store: Store
) -> None:
    """Attempts queued while the device was away arrive together: the first may be refused
    as expired, the next one done. The device did it: confirmed."""
    intake = intake_for(make_config(), store)
    cycle(intake, store, [event_msg(seq=1)], T0)
    (alarm,) = store.alarms()
    desk = AlarmDesk(store, SentCommands())
    sent_at = desk.acknowledge(alarm.id, "desk 1").device_sent_at
    assert sent_at is not None
    desk.follow_up(sent_at + 6, retry_every=5, confirm_within=60)
    cycle(
        intake,
        store,
        [result_msg("cmd-1", ok=False, error="rejected: expired"), result_msg("cmd-2", ok=True)],
        T0 + 70,
    )
    confirmed = store.alarm(alarm.id)
    assert confirmed is not None and confirmed.at_device == "ack confirmed by device"
