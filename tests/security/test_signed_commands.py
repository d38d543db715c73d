"""Signed commands end to end: agent and centre over the TLS broker with the shipped ACL."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.security import Signer
from agent.testing.agent import DEADLINE, DEVICE, SITE, AgentHarness, Recorder, wait_until
from central.alarms import command_message, unsigned
from central.config import parse_receiver_config
from central.monitor import Monitor, TerminalView
from central.receiver import Receiver
from tests.security.conftest import TLSSetup

pytest.importorskip("drivers.panic_button")

OWN = f"wardpost/{SITE}/{DEVICE}"
MAX_AGE = 60.0
PANIC = {
    "panic": {
        "type": "panic_button",
        "pin": 17,
        "location": {"ward": "3B", "room": "12"},
        "pin_factory": "mock",
        "bounce_time": 0.01,
    }
}


@pytest.fixture
def harness(tmp_path: Path, tls: TLSSetup) -> Iterator[AgentHarness]:
    h = AgentHarness(
        tmp_path,
        tls.broker,
        drivers=PANIC,
        mqtt=tls.agent_mqtt(),
        commands={
            "require_signature": True,
            "public_keys": [str(tls.centre_pub)],
            "max_age": MAX_AGE,
        },
    )
    h.start()
    yield h
    h.stop()


@pytest.fixture
def centre(tls: TLSSetup, harness: AgentHarness) -> Iterator[Recorder]:
    with tls.recorder(f"{OWN}/#") as rec:
        # Commands sent before the agent has subscribed would be dropped: it publishes
        # "online" (replacing the last test's "stopped") only after subscribing.
        rec.wait_for(lambda _: bool(online_statuses(rec)), DEADLINE, "the agent online")
        yield rec


@pytest.fixture
def signer(tls: TLSSetup) -> Signer:
    return Signer.from_file(str(tls.centre_key))


def online_statuses(centre: Recorder) -> list[Any]:
    return [m for m in centre.on_topic(f"{OWN}/status") if m.json()["state"] == "online"]


def send(centre: Recorder, name: str, message: dict[str, Any] | bytes) -> dict[str, Any]:
    """Publish a command as the centre and return the device's result."""
    raw = message if isinstance(message, bytes) else json.dumps(message).encode()
    command_id = json.loads(raw)["id"]
    topic = f"{OWN}/cmd_result/{command_id}"
    before = len(centre.on_topic(topic))
    centre.publish(f"{OWN}/cmd/{name}", raw)
    centre.wait_for(
        lambda msgs: sum(m.topic == topic for m in msgs) > before,
        DEADLINE,
        f"the result of {command_id}",
    )
    result: dict[str, Any] = centre.on_topic(topic)[-1].json()
    return result


def rejection_for(centre: Recorder, command_id: str) -> dict[str, Any]:
    """The ``security.command_rejected`` event the device reported for ``command_id``."""
    centre.wait_for(
        lambda _: any(
            e["payload"]["id"] == command_id for e in centre.events("security.command_rejected")
        ),
        10,
        f"a security event about {command_id}",
    )
    return next(
        e for e in centre.events("security.command_rejected") if e["payload"]["id"] == command_id
    )


def ping(signer: Signer | None, **changes: Any) -> dict[str, Any]:
    message = command_message(SITE, DEVICE, "ping", {}, sign=signer.sign if signer else unsigned)
    return {**message, **changes}


def signed_at(signer: Signer, issued_at: float) -> dict[str, Any]:
    message = {"id": f"t-{issued_at:.0f}", "issued_at": issued_at, "args": {}, "target": None}
    return signer.sign(SITE, DEVICE, "ping", message)


ATTACKS: dict[str, tuple[Callable[[Signer], dict[str, Any]], str]] = {
    "unsigned": (lambda s: ping(None), "unsigned command"),
    "forged (another key)": (lambda s: ping(Signer(Ed25519PrivateKey.generate())), "bad signature"),
    "tampered args": (lambda s: ping(s, args={"extra": 1}), "bad signature"),
    "tampered target": (lambda s: ping(s, target="panic"), "bad signature"),
    "signed for another device": (
        lambda s: s.sign(SITE, "other-device", "ping", ping(None)),
        "bad signature",
    ),
    "garbage signature": (lambda s: ping(s, signature="not base64!"), "not base64"),
    "expired": (lambda s: signed_at(s, time.time() - 2 * MAX_AGE), "expired"),
    "from the future": (lambda s: signed_at(s, time.time() + 2 * MAX_AGE), "expired"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_bad_commands_are_rejected_and_reported(
    harness: AgentHarness, centre: Recorder, signer: Signer, attack: str
) -> None:
    make, reason = ATTACKS[attack]
    message = make(signer)
    result = send(centre, "ping", message)
    assert result["ok"] is False and result["handled_by"] == []
    assert result["error"].startswith("rejected: ") and reason in result["error"]
    event = rejection_for(centre, message["id"])
    assert event["priority"] == "high" and event["source"] == "agent"
    assert event["payload"]["command"] == "ping" and reason in event["payload"]["reason"]
    assert harness.agent is not None and harness.agent.dispatcher.counters["rejected"] == 1


def test_a_replay_is_refused_even_after_a_restart(
    harness: AgentHarness, centre: Recorder, signer: Signer
) -> None:
    raw = json.dumps(ping(signer)).encode()
    assert send(centre, "ping", raw)["ok"] is True
    again = send(centre, "ping", raw)
    assert again["ok"] is False and "replayed" in again["error"]
    harness.stop()
    online = len(online_statuses(centre))
    harness.start()
    # The agent subscribes to its commands before it publishes "online": once the centre sees
    # that status, a command cannot arrive before the subscription (and be dropped).
    centre.wait_for(lambda _: len(online_statuses(centre)) > online, DEADLINE, "online again")
    after_restart = send(centre, "ping", raw)
    assert after_restart["ok"] is False and "replayed" in after_restart["error"]
    assert rejection_for(centre, json.loads(raw)["id"])["payload"]["reason"].startswith("replayed")
    assert send(centre, "ping", ping(signer))["ok"] is True, "fresh commands still work"


@pytest.fixture
def receiver(tmp_path: Path, tls: TLSSetup) -> Iterator[Receiver]:
    """The centre's receiver on the TLS broker as CN "receiver", signing its re-sends."""
    config = parse_receiver_config(
        {
            "mqtt": {
                "host": tls.broker.host,
                "port": tls.broker.port,
                "client_id": "receiver",
                "tls": {
                    "enabled": True,
                    "ca_file": str(tls.pki.ca_file),
                    "cert_file": str(tls.receiver.cert_file),
                    "key_file": str(tls.receiver.key_file),
                },
            },
            "store": {"url": f"sqlite:///{tmp_path / 'central.db'}"},
            "supervision": {"check_every": 0.1},
            "commands": {"signing_key": str(tls.centre_key), "retry_every": 5.0},
        }
    )
    running = Receiver(config).start()
    assert running.wait_connected(10)
    yield running
    running.stop()


def shown_alarms(monitor: Monitor) -> dict[str, Any]:
    monitor.tick()
    return monitor.board.alarms


def device_state(receiver: Receiver, wanted: str) -> Callable[[], bool]:
    return lambda: any(a.device_state == wanted for a in receiver.store.alarms())


def test_the_consoles_signed_ack_and_resolve_are_confirmed_by_the_device(
    harness: AgentHarness, receiver: Receiver, tls: TLSSetup, signer: Signer
) -> None:
    out = io.StringIO()
    monitor = Monitor(
        tls.options(),
        receiver.store,
        SITE,
        signer=signer,
        operator="desk-2",
        view=TerminalView(out, as_json=True),
    )
    monitor.start()
    try:
        assert harness.agent is not None
        harness.agent.driver("panic").simulate("press", {})
        wait_until(lambda: bool(shown_alarms(monitor)), DEADLINE, "the alarm at the console")
        (alarm,) = monitor.board.alarms.values()
        assert (alarm.state, alarm.kind, alarm.priority) == ("new", "panic.pressed", "critical")
        assert monitor.board.where(alarm) == f"{SITE}/{DEVICE} ward 3B, room 12"

        reply = monitor.execute("ack")
        assert reply.ok, reply.text
        wait_until(device_state(receiver, "confirmed"), DEADLINE, "the device's confirmation")
        assert receiver.store.alarms()[0].acknowledged_by == "desk-2"
        monitor.tick()
        monitor.execute("resolve 1")
        wait_until(lambda: receiver.store.alarms()[0].state == "resolved", DEADLINE, "resolved")
        wait_until(device_state(receiver, "confirmed"), DEADLINE, "the device's confirmation")
        monitor.tick()

        records = [json.loads(line) for line in out.getvalue().splitlines()]
        results = [r for r in records if r["type"] == "cmd_result"]
        # A slow answer may have been asked for again (a new signed command): each is ok.
        assert {(r["name"], r["ok"]) for r in results} == {("ack", True), ("resolve", True)}
        shown = [(r["state"], r["at_device"]) for r in records if r["type"] == "alarm"]
        assert shown[0] == ("new", "") and shown[-1] == ("resolved", "resolve confirmed by device")
        assert ("acknowledged", "ack confirmed by device") in shown
        assert harness.agent.dispatcher.counters["rejected"] == 0
    finally:
        monitor.stop()


def test_an_unsigned_console_cannot_acknowledge(
    harness: AgentHarness, centre: Recorder, receiver: Receiver, tls: TLSSetup
) -> None:
    monitor = Monitor(
        tls.options(),
        receiver.store,
        SITE,
        signer=None,
        operator="desk-3",
        view=TerminalView(io.StringIO(), as_json=True),
    )
    monitor.start()
    try:
        assert harness.agent is not None
        harness.agent.driver("panic").simulate("press", {})
        wait_until(lambda: bool(shown_alarms(monitor)), DEADLINE, "the alarm at the console")
        assert monitor.execute("ack 1").ok
        wait_until(device_state(receiver, "refused"), DEADLINE, "the device's refusal")
        (refused,) = receiver.store.alarms()
        assert refused.at_device == "ack refused by device: rejected: unsigned command"
        command_id = centre.on_topic("/cmd/ack")[0].json()["id"]
        assert rejection_for(centre, command_id)["payload"]["reason"] == "unsigned command"
    finally:
        monitor.stop()


def test_monitor_run_reads_operator_lines_and_quits(
    tls: TLSSetup, signer: Signer, receiver: Receiver
) -> None:
    out = io.StringIO()
    monitor = Monitor(
        tls.options(),
        receiver.store,
        SITE,
        signer=signer,
        operator="desk-1",
        view=TerminalView(out, as_json=True),
    )
    started = time.monotonic()
    assert monitor.run(duration=10, lines=iter(["devices", "ack", "quit"])) == 0
    assert time.monotonic() - started < 5, "quit ends the session"
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    replies = [r for r in records if r["type"] in ("devices", "reply")]
    assert replies[0]["type"] == "devices"
    assert {"type": "reply", "ok": False, "text": "no open alarm"} in replies
