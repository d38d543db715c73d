"""The console's tables on SQLite and PostgreSQL: durable, append-only audit, escalation."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft7Validator

from central.config import ReceiverConfig
from central.console.app import Console
from central.console.tables import ConsoleTables
from central.store import Alarm, Batch, Store, StoredEvent, open_store
from tests.contract.test_contract import SCHEMAS


def _alarm(store: Store, kind: str = "panic.pressed", raised_at: float | None = None) -> Alarm:
    from agent.event import uuid7

    at = time.time() if raised_at is None else raised_at
    alarm_id = uuid7()
    event = StoredEvent(
        alarm_id, "er", "desk-1", "panic", kind, "critical", 1, False, at, at, "device", "{}"
    )
    alarm = Alarm(alarm_id, "er", "desk-1", kind, "critical", "device", False, at)
    store.write(Batch(events=[event], alarms=[alarm]))
    return alarm


def test_sessions_notes_audit_survive_a_restart(
    make_config: Callable[..., ReceiverConfig],
) -> None:
    config = make_config()
    store = open_store(config.store)
    console = Console(config, store, None)
    console.add_operator("olga", "operator", "correct horse battery")
    alarm = _alarm(store)
    console.act("olga", alarm.id, "acknowledge", "on my way")
    console.act("olga", alarm.id, "note", "guard 7 at the door")
    token, csrf = console.tables.open_session("olga", time.time())
    store.close()

    reopened = open_store(config.store)  # a receiver restart: the same database, new connection
    try:
        tables = ConsoleTables(reopened)
        session = tables.session(token, time.time(), 60, 3600)
        assert session is not None and session.operator.name == "olga" and session.csrf == csrf
        assert [n.text for n in tables.notes(alarm.id)] == ["guard 7 at the door"]
        actions = [(e.operator, e.action) for e in tables.audit_log(alarm_id=alarm.id)]
        assert ("olga", "acknowledged") in actions and ("olga", "note") in actions
        moved = reopened.alarm(alarm.id)
        assert moved is not None and moved.state == "acknowledged"
        assert moved.acknowledged_by == "olga"
    finally:
        reopened.close()


def test_audit_log_is_append_only(store: Store) -> None:
    tables = ConsoleTables(store)
    tables.audit("olga", "acknowledged", {"note": "x"})
    for statement in ("UPDATE console_audit SET operator = 'mallory'", "DELETE FROM console_audit"):
        with pytest.raises(Exception, match="append-only"), store.transaction():
            store.execute(statement)
    store.reconnect()
    assert [e.operator for e in tables.audit_log()] == ["olga"]


def test_wrong_password_expired_and_disabled_sessions(
    make_config: Callable[..., ReceiverConfig], store: Store
) -> None:
    console = Console(make_config(), store, None)
    console.add_operator("olga", "operator", "correct horse battery")
    assert console.check_password("olga", "correct horse battery")
    assert not console.check_password("olga", "correct horse batter")
    assert not console.check_password("nobody", "correct horse battery")
    with pytest.raises(ValueError, match="8 characters"):
        console.add_operator("short", "operator", "1234567")
    with pytest.raises(ValueError, match="role"):
        console.tables.add_operator("x", "root", "hash")
    now = time.time()
    token, _ = console.tables.open_session("olga", now)
    assert console.tables.session(token, now + 5, idle=10, longest=100) is not None
    assert console.tables.session(token, now + 16, idle=10, longest=100) is None  # idle
    token, _ = console.tables.open_session("olga", now)
    assert console.tables.session(token, now + 101, idle=1000, longest=100) is None  # too long
    token, _ = console.tables.open_session("olga", now)
    console.tables.set_active("olga", False)
    assert console.tables.session(token, now, idle=10, longest=100) is None
    assert not console.check_password("olga", "correct horse battery")


def test_escalation_raises_one_event_per_alarm_and_can_forward(
    make_config: Callable[..., ReceiverConfig], store: Store
) -> None:
    config = make_config(
        console={"escalate_after": 30.0, "escalation_forward": True},
        dc09={"enabled": True, "map": {"alarm.escalated": {"code": 139}}},
    )
    console = Console(config, store, None)
    console.add_operator("olga", "operator", "correct horse battery")
    now = time.time()
    old = _alarm(store, raised_at=now - 60)
    acknowledged = _alarm(store, kind="duress.pressed", raised_at=now - 60)
    console.act("olga", acknowledged.id, "acknowledge", "")
    fresh = _alarm(store, kind="device.tamper", raised_at=now - 5)

    assert console.escalate(now) == 1
    assert console.escalate(now + 1) == 0  # once per alarm
    assert set(console.tables.escalated()) == {old.id}
    events = store.events(kind="alarm.escalated")
    assert [e.id for e in events] == [f"esc-{old.id}"]
    assert events[0].payload["alarm"] == old.id and events[0].priority == "critical"
    contract = json.loads((SCHEMAS / "payloads" / "centre.json").read_text())["definitions"]
    assert not list(Draft7Validator(contract["alarm.escalated"]).iter_errors(events[0].payload))
    assert store.forward_state(f"esc-{old.id}") is not None  # queued for the ARC
    assert console.escalate(now + 40) == 1  # the fresh one's turn
    assert fresh.id in console.tables.escalated()


def test_operator_actions_refused_with_reasons(
    make_config: Callable[..., ReceiverConfig], store: Store
) -> None:
    from central.alarms import AlarmError

    console = Console(make_config(), store, None)
    alarm = _alarm(store)
    cases: list[tuple[str, str, Any]] = [
        ("resolve", "", "needs a note"),
        ("note", " ", "empty"),
        ("face-reject", "", "not a face match"),
        ("dance", "", "unknown action"),
        ("silence", "", "no connection to the devices"),
    ]
    for action, note, message in cases:
        with pytest.raises(AlarmError, match=message):
            console.act("olga", alarm.id, action, note)
    with pytest.raises(AlarmError, match="no alarm"):
        console.act("olga", "nope", "acknowledge", "")


def test_tls_listener_and_secure_cookies(
    make_config: Callable[..., ReceiverConfig], tmp_path: Path
) -> None:
    import http.client
    import ssl

    from central.console.server import ConsoleServer
    from tests.support.tls import TestPKI

    pki = TestPKI(tmp_path / "pki")
    server_identity = pki.issue("localhost", server=True)
    config = make_config(
        console={
            "port": 0,
            "tls_cert_file": str(server_identity.cert_file),
            "tls_key_file": str(server_identity.key_file),
        }
    )
    server = ConsoleServer(config, None).start()
    try:
        assert server.url.startswith("https://")
        context = ssl.create_default_context(cafile=str(pki.ca_file))
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, context=context, timeout=30)
        conn.request("GET", "/login")
        response = conn.getresponse()
        assert response.status == 200 and b"Wardpost console" in response.read()
        cookie = response.getheader("set-cookie") or ""
        assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
        conn.close()
    finally:
        server.stop()


def test_repeats_fold_into_one_row_and_act_together(
    make_config: Callable[..., ReceiverConfig], store: Store
) -> None:
    console = Console(make_config(), store, None)
    now = time.time()
    first = _alarm(store, raised_at=now - 10)
    repeat = _alarm(store, raised_at=now - 5)
    other = _alarm(store, kind="duress.pressed", raised_at=now - 1)
    rows = console.view.queue()
    assert [(r.alarm.id, r.count) for r in rows] == [(first.id, 2), (other.id, 1)]
    console.act("olga", first.id, "acknowledge", "")
    assert {a.id: a.state for a in store.alarms()} == {
        first.id: "acknowledged",
        repeat.id: "acknowledged",
        other.id: "new",
    }
    rows = console.view.queue()
    assert rows[0].alarm.id == other.id  # new before acknowledged
    console.act("olga", repeat.id, "resolve", "handled")
    assert [r.alarm.id for r in console.view.queue()] == [other.id]
