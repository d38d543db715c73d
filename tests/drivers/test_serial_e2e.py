"""End to end through the real agent and a real broker: bytes on a pty (or a level on a
GPIO pin) -> event at an MQTT subscriber, one test per driver family."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gpiozero import Device
from gpiozero.pins.mock import MockFactory

from agent.testing.agent import DEVICE, SITE, AgentHarness, Recorder, wait_until
from agent.testing.broker import Broker
from agent.testing.serial_frames import rdm6300
from agent.testing.serial_pty import PtyDevice

FAST = {"reconnect_min": 0.05, "reconnect_max": 0.2, "read_timeout": 0.05}


@pytest.fixture
def device(tmp_path: Path) -> Iterator[PtyDevice]:
    dev = PtyDevice(tmp_path / "ttyUSB-by-id")
    yield dev
    dev.close()


def run(tmp_path: Path, broker: Broker, drivers: dict[str, Any]) -> tuple[Recorder, AgentHarness]:
    rec = Recorder(broker, f"wardpost/{SITE}/{DEVICE}/#").start()
    harness = AgentHarness(tmp_path, broker, drivers=drivers)
    harness.start()
    return rec, harness


def test_gate_alarm_reaches_the_subscriber(
    tmp_path: Path, broker: Broker, device: PtyDevice
) -> None:
    rec, harness = run(
        tmp_path, broker, {"gate1": {"type": "serial_gate", "port": str(device.link), **FAST}}
    )
    try:
        rec.wait_events("device.online")
        device.write(b"ALARM ZONE 3,4 LEVEL 85\r\n")
        [alarm] = rec.wait_events("gate.alarm")
        assert alarm["priority"] == "high" and alarm["source"] == "gate1"
        assert alarm["payload"]["zones"] == [3, 4] and alarm["payload"]["intensity"] == 85
        device.unplug()
        [offline] = rec.wait_events("device.offline")
        assert offline["priority"] == "high"
    finally:
        harness.stop()
        rec.stop()


def test_xray_alert_reaches_the_subscriber(
    tmp_path: Path, broker: Broker, device: PtyDevice
) -> None:
    rec, harness = run(
        tmp_path, broker, {"xray1": {"type": "xray", "port": str(device.link), **FAST}}
    )
    try:
        rec.wait_events("device.online")
        device.write(b"ALARM OPERATOR 17 BAG 000231\r\nTAMPER COVER\r\n")
        [alert] = rec.wait_events("xray.alert")
        assert alert["priority"] == "high" and alert["payload"]["operator"] == "17"
        assert rec.wait_events("xray.tamper")[0]["priority"] == "high"
    finally:
        harness.stop()
        rec.stop()


def test_patrol_checkpoint_reaches_the_subscriber(
    tmp_path: Path, broker: Broker, device: PtyDevice
) -> None:
    patrol = {
        "type": "rfid_patrol",
        "port": str(device.link),
        **FAST,
        "checkpoints": {"0013477100": "East stairs"},
    }
    rec, harness = run(tmp_path, broker, {"patrol": patrol})
    try:
        rec.wait_events("device.online")
        device.write(rdm6300(bytes.fromhex("0100CDA4EC")) * 5)
        [checkpoint] = rec.wait_events("patrol.checkpoint")
        assert checkpoint["priority"] == "normal"
        assert checkpoint["payload"]["checkpoint"] == "East stairs"
    finally:
        harness.stop()
        rec.stop()


def relays_at_rest(harness: AgentHarness) -> bool:
    assert harness.agent is not None
    return harness.agent.drivers_health()["relays"].health.detail == "gate relay: rest"


def test_dry_contact_alarm_reaches_the_subscriber(tmp_path: Path, broker: Broker) -> None:
    Device.pin_factory = MockFactory()
    relays = {
        "type": "contact_input",
        "pin_factory": "mock",
        "check_interval": 0.05,
        "inputs": [{"pin": 17, "kind": "gate.alarm", "name": "gate relay", "debounce": 0.01}],
    }
    rec, harness = run(tmp_path, broker, {"relays": relays})
    try:
        rec.wait_events("gate.alarm")  # an open input at start is reported (fail-safe)
        Device.pin_factory.pin(17).drive_low()  # the relay's NC contact is wired and closed
        # The closing counts only once it has held for the 10 ms debounce: wait until the
        # driver reports the contact at rest, or the opening below would be a mere bounce.
        wait_until(lambda: relays_at_rest(harness), 30, "the relay contact at rest")
        Device.pin_factory.pin(17).drive_high()  # alarm: the relay opens
        alarm = rec.wait_events("gate.alarm", 2)[-1]
        assert alarm["priority"] == "high" and alarm["payload"]["input"] == "gate relay"
        assert "at_start" not in alarm["payload"]
    finally:
        harness.stop()
        rec.stop()
        Device.pin_factory = None
