"""Dry contacts through gpiozero's own MockFactory pins, driven like real pins."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from gpiozero import Device
from gpiozero.pins.mock import MockFactory

from agent.config import ConfigError, parse_section
from agent.driver import CommandError
from agent.testing.agent import wait_until
from drivers.contact_input import ContactInputDriver, NoGpioError
from tests.support.context import RecordingContext

Starter = Callable[..., ContactInputDriver]


@pytest.fixture
def ctx(tmp_path: Path) -> RecordingContext:
    return RecordingContext(tmp_path, name="relays")


@pytest.fixture
def start(ctx: RecordingContext) -> Iterator[Starter]:
    started: list[ContactInputDriver] = []
    Device.pin_factory = MockFactory()  # a fresh board per test

    def _start(
        inputs: list[dict[str, Any]], closed: tuple[int, ...] = (), **options: Any
    ) -> ContactInputDriver:
        table = {"pin_factory": "mock", "check_interval": 0.02, "inputs": inputs, **options}
        driver = ContactInputDriver(
            ctx, parse_section(ContactInputDriver.config_class, table, "drivers.relays")
        )
        driver.start()
        started.append(driver)
        for pin in closed:  # wire the contact: a closed contact pulls the pin low
            Device.pin_factory.pin(pin).drive_low()
        return driver

    yield _start
    for driver in started:
        driver.stop()
    Device.pin_factory = None


def pin(number: int) -> Any:
    return Device.pin_factory.pin(number)


def settle(seconds: float = 0.15) -> None:
    time.sleep(seconds)


def at_rest(driver: ContactInputDriver) -> None:
    """Wait until every input has settled closed (at rest), however late the debounce runs."""
    wait_until(
        lambda: all(part.endswith(": rest") for part in driver.health().detail.split(", ")),
        what="inputs at rest",
    )


def test_normally_closed_alarm_relay_opens_on_alarm(ctx: RecordingContext, start: Starter) -> None:
    driver = start(
        [{"pin": 17, "kind": "gate.alarm", "name": "main gate", "payload": {"gate": "main"}}],
        closed=(17,),
    )
    at_rest(driver)
    alarms_at_start = [e for e in ctx.events if e.kind == "gate.alarm"]
    pin(17).drive_high()  # the relay opens: alarm
    alarm = ctx.wait_for("gate.alarm", len(alarms_at_start) + 1)[-1]
    assert alarm.priority.label == "high"
    assert alarm.payload == {"gate": "main", "input": "main gate", "pin": 17, "wiring": "nc"}
    pin(17).drive_low()
    at_rest(driver)
    assert [e.kind for e in ctx.events].count("gate.alarm") == len(alarms_at_start) + 1


def test_bounces_shorter_than_debounce_are_ignored(ctx: RecordingContext, start: Starter) -> None:
    # A debounce far longer than the chatter: it stays inside even when this thread runs late.
    driver = start([{"pin": 5, "kind": "xray.alert", "debounce": 1.0}], closed=(5,))
    at_rest(driver)
    before = len(ctx.events)
    for _ in range(5):  # contact chatter, 5 ms each
        pin(5).drive_high()
        time.sleep(0.005)
        pin(5).drive_low()
        time.sleep(0.005)
    settle(1.2)  # past the debounce
    assert len(ctx.events) == before
    pin(5).drive_high()
    alert = ctx.wait_for("xray.alert")[-1]
    assert alert.priority.label == "high"


def test_cut_wire_becomes_a_fault_and_its_repair_is_reported(
    ctx: RecordingContext, start: Starter
) -> None:
    driver = start(
        [{"pin": 22, "kind": "gate.alarm", "fault_after": 0.2, "debounce": 0.01}], closed=(22,)
    )
    at_rest(driver)
    pin(22).drive_high()  # wire cut: reads as an alarm at once, then as a fault
    ctx.wait_for("gate.alarm")
    [fault] = ctx.wait_for("device.offline")
    assert fault.priority.label == "high"
    assert "cut wire" in fault.payload["reason"]
    assert driver.health().state == "degraded"
    pin(22).drive_low()
    [repaired] = ctx.wait_for("device.online")
    assert repaired.payload["input"] == "gpio22"
    assert driver.health().state == "ok"


def test_open_circuit_at_start_is_reported(ctx: RecordingContext, start: Starter) -> None:
    start([{"pin": 6, "kind": "tamper"}])  # never closed: a disconnected input
    [event] = ctx.wait_for("tamper")
    assert event.payload["at_start"] is True
    assert event.priority.label == "high"


def test_door_contact_normally_open_with_restore(ctx: RecordingContext, start: Starter) -> None:
    start([{"pin": 12, "kind": "door.open", "wiring": "no", "debounce": 0.01}])
    pin(12).drive_low()  # normally open contact closes: door opened
    [opened] = ctx.wait_for("door.open")
    assert opened.priority.label == "normal"
    pin(12).drive_high()
    ctx.wait_for("door.closed")
    assert "device.offline" not in ctx.kinds()  # no supervision on normally-open wiring


def test_missed_edge_is_caught_by_the_periodic_check(ctx: RecordingContext, start: Starter) -> None:
    driver = start([{"pin": 9, "kind": "gate.alarm", "debounce": 0.01}], closed=(9,))
    at_rest(driver)
    alarms = len(ctx.wait_for("gate.alarm"))  # the open input at start
    contact = driver._contacts[0]
    contact.device.when_activated = None  # as if the pin library lost the interrupt
    contact.device.when_deactivated = None
    pin(9).drive_high()
    ctx.wait_for("gate.alarm", alarms + 1)


def test_simulate_drives_the_mock_pins(ctx: RecordingContext, start: Starter) -> None:
    driver = start([{"pin": 17, "kind": "gate.alarm", "name": "gate", "debounce": 0}], closed=(17,))
    at_rest(driver)
    alarms = len(ctx.wait_for("gate.alarm"))  # the open input at start
    assert driver.simulate("open", {"name": "gate"}) == {"input": "gate", "circuit": "open"}
    ctx.wait_for("gate.alarm", alarms + 1)
    with pytest.raises(CommandError, match="no input named 'nope'"):
        driver.simulate("open", {"name": "nope"})


def test_without_gpio_and_without_mock_it_refuses_clearly(ctx: RecordingContext) -> None:
    Device.pin_factory = None
    table = {"inputs": [{"pin": 17, "kind": "gate.alarm"}]}
    driver = ContactInputDriver(
        ctx, parse_section(ContactInputDriver.config_class, table, "drivers.relays")
    )
    with pytest.raises(
        NoGpioError, match=r'no GPIO pin library works on this machine.*pin_factory = "mock"'
    ):
        driver.start()
    assert driver.health().state == "starting"


@pytest.mark.parametrize(
    ("table", "where"),
    [
        ({"inputs": []}, "drivers.relays.inputs: at least one"),
        (
            {"inputs": [{"pin": 1, "kind": "a.b"}, {"pin": 1, "kind": "c.d"}]},
            "drivers.relays.inputs[1].pin",
        ),
        (
            {"inputs": [{"pin": 99, "kind": "a.b"}]},
            "drivers.relays.inputs[0].pin: must be at most 53",
        ),
        ({"inputs": [{"pin": 1, "kind": "Gate Alarm"}]}, "drivers.relays.inputs[0].kind"),
        (
            {"inputs": [{"pin": 1, "kind": "a.b", "wiring": "maybe"}]},
            "drivers.relays.inputs[0].wiring",
        ),
        (
            {"pin_factory": "magic", "inputs": [{"pin": 1, "kind": "a.b"}]},
            "drivers.relays.pin_factory",
        ),
    ],
)
def test_config_errors(table: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_section(ContactInputDriver.config_class, table, "drivers.relays")
    assert where in str(err.value)
