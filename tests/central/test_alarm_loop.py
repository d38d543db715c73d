"""The alarm loop with the real parts: the receiver, a real agent with the real panic button
driver (MockFactory pins), a real mosquitto, and both store engines.

What the centre sends is checked against the contract's JSON Schemas on the wire, and the
alarm counts as acknowledged at the device only when the device's result says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft7Validator

from agent.event import uuid7
from agent.testing.agent import DEVICE, SITE, AgentHarness, Recorder
from agent.testing.broker import Broker
from central.alarms import AlarmDesk
from central.config import ReceiverConfig
from central.devicesim import SimulatedDevice
from central.receiver import Receiver
from contract.commands import ContractError
from tests.central.test_receiver import REPO, _write_config, wait_until

SCHEMAS = Path(__file__).parents[2] / "contract" / "schemas"
BUTTON = {
    "type": "panic_button",
    "pin": 17,
    "led_pin": 27,
    "pin_factory": "mock",
    "bounce_time": 0.01,
    "location": {"ward": "3B", "room": "12"},
}


def schema(name: str) -> Draft7Validator:
    return Draft7Validator(json.loads((SCHEMAS / name).read_text()))


@pytest.fixture
def receiver(broker: Broker, make_config: Callable[..., ReceiverConfig]) -> Iterator[Receiver]:
    receiver = Receiver(
        make_config(
            broker,
            supervision={"check_every": 0.1},
            commands={"retry_every": 2.0, "confirm_within": 60},
        )
    ).start()
    assert receiver.wait_connected(10)
    yield receiver
    receiver.stop()


def test_press_ack_resolve_confirmed_by_the_real_panic_button(
    tmp_path: Path, broker: Broker, receiver: Receiver
) -> None:
    with (
        Recorder(broker, f"wardpost/{SITE}/{DEVICE}/cmd/#") as commands,
        AgentHarness(
            tmp_path, broker, drivers={"button": BUTTON}, mqtt={"delivery": "receipt"}
        ) as harness,
    ):
        assert harness.agent is not None
        button = harness.agent.driver("button")
        button.simulate("press", {})
        alarm = wait_until(receiver.store.alarms, 30, "the alarm at the centre")[0]
        assert (alarm.kind, alarm.state, alarm.device_state) == ("panic.pressed", "new", None)
        desk = AlarmDesk(receiver.store, receiver.commander())

        desk.acknowledge(alarm.id, "desk 1")
        acked = wait_until(lambda: confirmed(receiver, alarm.id), 30, "the device's confirmation")
        assert (acked.state, acked.at_device) == ("acknowledged", "ack confirmed by device")
        assert "acknowledged" in button.health().detail  # the LED is steady
        device_ack = wait_until(
            lambda: receiver.store.events(kind="panic.acknowledged"),
            30,
            "the device's panic.acknowledged",
        )[0]
        assert device_ack.payload["alarm"] == alarm.id and device_ack.payload["by"] == "desk 1"

        desk.resolve(alarm.id, "guard 7")
        resolved = wait_until(lambda: confirmed(receiver, alarm.id), 30, "resolve confirmed")
        assert (resolved.state, resolved.at_device) == ("resolved", "resolve confirmed by device")
        assert button.health().detail.endswith("idle")  # the LED is off
        wait_until(lambda: receiver.store.events(kind="panic.resolved"), 30, "panic.resolved")

        # Everything the centre sent matches the contract: envelope and arguments.
        commands.wait_for(lambda msgs: len(msgs) >= 2, 10, "the commands")
        sent = list(commands.messages)
        for message in sent:
            name = message.topic.rsplit("/", 1)[1]
            body = message.json()
            assert not list(schema("command.json").iter_errors(body))
            assert not list(schema(f"command_args/{name}.json").iter_errors(body["args"]))
        names = [m.topic.rsplit("/", 1)[1] for m in sent]
        # A slow answer may be asked for again (a new command each time): more than one is fine.
        assert names[0] == "ack" and set(names) == {"ack", "resolve"}


def confirmed(receiver: Receiver, alarm_id: str) -> Any:
    alarm = receiver.store.alarm(alarm_id)
    return alarm if alarm is not None and alarm.device_state == "confirmed" else None


def test_the_old_argument_name_is_refused_by_the_contract_and_by_the_device(
    tmp_path: Path, broker: Broker
) -> None:
    """Before: the centre sent {"event": id}; the button answered "no driver recognised..."."""
    with (
        Recorder(broker, f"wardpost/{SITE}/{DEVICE}/#") as rec,
        AgentHarness(tmp_path, broker, drivers={"button": BUTTON}) as harness,
    ):
        assert harness.agent is not None
        harness.agent.driver("button").simulate("press", {})
        alarm_id = rec.wait_events("panic.pressed")[0]["id"]
        old = {"event": alarm_id, "by": "desk 1"}
        errors = [e.message for e in schema("command_args/ack.json").iter_errors(old)]
        assert errors == ["Additional properties are not allowed ('event' was unexpected)"]
        command_id = uuid7()
        rec.publish(
            f"wardpost/{SITE}/{DEVICE}/cmd/ack",
            {"id": command_id, "issued_at": 0, "args": old, "target": None},
        )
        rec.wait_for(
            lambda msgs: any(m.topic.endswith(f"/cmd_result/{command_id}") for m in msgs),
            10,
            "the device's answer",
        )
        (result,) = rec.on_topic(f"/cmd_result/{command_id}")
        assert result.json()["ok"] is False
        assert "no driver recognised" in result.json()["error"]


def test_the_commander_refuses_arguments_outside_the_contract(receiver: Receiver) -> None:
    with pytest.raises(ContractError, match="'event' was unexpected"):
        receiver.commander().send("s1", "d1", "ack", {"event": "x"})
    with pytest.raises(ContractError, match="not in the contract"):
        receiver.commander().send("s1", "d1", "launch", {})


def test_a_device_that_never_answers_is_retried_then_shown_unconfirmed(
    broker: Broker, make_config: Callable[..., ReceiverConfig]
) -> None:
    receiver = Receiver(
        make_config(
            broker,
            supervision={"check_every": 0.1},
            commands={"retry_every": 0.3, "confirm_within": 2},
        )
    ).start()
    device = SimulatedDevice(broker.host, broker.port, "s1", "mute").start()
    try:
        assert receiver.wait_connected(10)
        alarm_id = device.event("panic.pressed", "critical")
        wait_until(lambda: receiver.store.alarm(alarm_id), 30, "the alarm")
        AlarmDesk(receiver.store, receiver.commander()).acknowledge(alarm_id, "desk 1")
        unconfirmed = wait_until(
            lambda: [a for a in receiver.store.alarms() if a.device_state == "unconfirmed"],
            30,
            "the operator-visible failure",
        )[0]
        assert unconfirmed.at_device.startswith("device did not confirm ack: no confirmation")
        acks = wait_until(lambda: [c for c in device.commands if c[0] == "ack"], 10, "acks")
        assert len(acks) >= 2, "sent again before giving up"
        ids = {c[1]["id"] for c in acks}
        assert len(ids) == len(acks), "each attempt is a new command (a re-sent id is a replay)"
        assert all(c[1]["args"] == {"alarm": alarm_id, "by": "desk 1"} for c in acks)
        (event,) = receiver.store.events(kind="alarm.unconfirmed")
        assert event.payload["command"] == "ack"
    finally:
        device.stop(clean=False)
        receiver.stop()


def desk_cli(
    config: Path, verb: str, alarm_id: str, *options: str
) -> subprocess.CompletedProcess[str]:
    """``wardpost receiver ack|resolve`` as an operator runs it (``python -m central``)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "central",
            verb,
            alarm_id,
            "--by",
            "desk 1",
            "--config",
            str(config),
            *options,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )


def test_the_cli_exits_0_only_once_the_device_confirmed(
    tmp_path: Path, broker: Broker, receiver: Receiver, store_section: dict[str, Any]
) -> None:
    config = _write_config(tmp_path / "central.toml", broker, store_section, "desk")
    with AgentHarness(tmp_path, broker, drivers={"button": BUTTON}) as harness:
        assert harness.agent is not None
        harness.agent.driver("button").simulate("press", {})
        alarm = wait_until(receiver.store.alarms, 30, "the alarm at the centre")[0]
        done = desk_cli(config, "ack", alarm.id, "--wait", "60")
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[-1] == f"{alarm.id}: ack confirmed by device"
    mute = SimulatedDevice(broker.host, broker.port, "s1", "mute").start()
    try:
        silent_alarm = mute.event("panic.pressed", "critical")
        wait_until(lambda: receiver.store.alarm(silent_alarm), 30, "the second alarm")
        waited = desk_cli(config, "ack", silent_alarm, "--wait", "0.5")
        assert waited.returncode == 3, waited.stderr
        assert "ack sent, not confirmed" in waited.stdout
        assert "the receiver keeps sending it" in waited.stderr
    finally:
        mute.stop(clean=False)
